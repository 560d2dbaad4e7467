"""Several rewards at once.

``MultiReward`` scores a batch with every component and returns their weighted sum; its
details keep each component's scores under the component's name (and the component's own
details as ``"<name>/<key>"``), so a trainer can instead normalise each reward within its
prompt group and then weight them (``combined_group_advantages``), which keeps a reward with a
large scale (JPEG kB) from drowning one in [0, 1] (the verifier). ``advantages`` says which
of the two GRPO uses (``env.reward.advantages``: ``sum`` or ``per_reward``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flowrl.errors import ConfigError
from flowrl.rewards import ImageBatch, RewardModel, RewardOutput, check_scores
from flowrl.rewards.registry import RewardSpec, build_reward, register_reward, spec_of

Advantages = Literal["sum", "per_reward"]


class MultiReward:
    """``components``: (reward model, weight) pairs with distinct ``name``s; ``advantages``:
    GRPO's advantages of the weighted sum (``sum``) or of each reward normalised within its
    group, then weighted (``per_reward``)."""

    name = "multi"

    def __init__(self, components: Sequence[tuple[RewardModel, float]], advantages: Advantages = "sum") -> None:
        if not components:
            raise ValueError("multi reward: needs at least one component")
        names = [model.name for model, _ in components]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"multi reward: component names must differ, {repeated} appear more than once")
        self.components = [(model, float(weight)) for model, weight in components]
        self.advantages = advantages

    @property
    def weights(self) -> dict[str, float]:
        return {model.name: weight for model, weight in self.components}

    def __call__(self, batch: ImageBatch) -> RewardOutput:
        total = torch.zeros(len(batch))
        details: dict[str, torch.Tensor] = {}
        for model, weight in self.components:
            out = check_scores(model(batch), len(batch), f"reward model {model.name!r}")
            if not isinstance(out, RewardOutput):
                out = RewardOutput(out)
            total += weight * out.scores
            details[model.name] = out.scores
            details.update({f"{model.name}/{key}": value for key, value in out.details.items()})
        return RewardOutput(total, details)


class _Weight(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, allow_inf_nan=False)


@register_reward
class MultiSpec(RewardSpec):
    """Weighted sum of reward models; GRPO may normalise each within its group first (per_reward)."""

    type: Literal["multi"] = "multi"
    components: list[dict[str, Any]] = Field(min_length=1, description="reward specs, each with an optional weight")
    advantages: Advantages = Field(
        "sum",
        description="GRPO's advantages: of the weighted sum of the scores (sum), or the sum of each reward's "
        "group-normalised scores times its weight (per_reward: a reward's scale no longer matters)",
    )

    def parts(self, where: str = "env.reward") -> list[tuple[RewardSpec, float]]:
        """(validated spec, weight) of each component; ConfigError naming the component's key."""
        parts = []
        for i, raw in enumerate(self.components):
            here = f"{where}.components[{i}]"
            try:
                weight = _Weight(weight=raw.get("weight", 1.0)).weight
            except ValidationError as exc:
                raise ConfigError(f"{here}.weight: {exc.errors()[0]['msg']}") from None
            parts.append((spec_of({k: v for k, v in raw.items() if k != "weight"}, here), weight))
        return parts

    def check_nested(self, where: str) -> None:
        names = [spec.reward_name for spec, _ in self.parts(where)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"{where}: multi reward: component names must differ, {repeated} appear more than once")

    def per_reward_weights(self) -> dict[str, float] | None:
        if self.advantages != "per_reward":
            return None
        return {spec.reward_name: weight for spec, weight in self.parts()}

    def preflight(self) -> None:
        for spec, _ in self.parts():
            spec.preflight()

    def build(self) -> MultiReward:
        parts = self.parts()
        built = [(build_reward(spec, f"env.reward.components[{i}]"), weight) for i, (spec, weight) in enumerate(parts)]
        return MultiReward(built, self.advantages)


def combined_group_advantages(
    components: Mapping[str, torch.Tensor], weights: Mapping[str, float], group_ids: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    """``sum_k w_k (r_k - mean_group(r_k)) / (std_group(r_k) + eps)``: float32 ``[B]``.

    ``components``: name -> scores ``[B]``; ``weights``: name -> weight (the same names);
    ``group_ids``: ``[B]`` integers, samples with the same id share a prompt. std is the
    population std within the group (as ``flowrl.core.advantages.group_advantages``); a
    component that is constant within a group contributes 0 there.
    """
    if set(components) != set(weights):
        raise ValueError(f"combined_group_advantages: components {sorted(components)} but weights {sorted(weights)}")
    if group_ids.ndim != 1:
        raise ValueError(f"combined_group_advantages: group_ids must be [B], got {tuple(group_ids.shape)}")
    _, group = torch.unique(group_ids, return_inverse=True)
    count = torch.bincount(group).double()
    total = torch.zeros(len(group_ids), dtype=torch.float64)
    for name, scores in components.items():
        if scores.shape != group_ids.shape:
            shapes = f"{tuple(scores.shape)} vs group_ids {tuple(group_ids.shape)}"
            raise ValueError(f"combined_group_advantages: {name!r} scores {shapes}")
        r = scores.double()
        mean = torch.bincount(group, r) / count
        centred = r - mean[group]
        std = (torch.bincount(group, centred.square()) / count).sqrt()
        total += weights[name] * centred / (std[group] + eps)
    return total.float()


__all__ = ["MultiReward", "MultiSpec", "combined_group_advantages"]
