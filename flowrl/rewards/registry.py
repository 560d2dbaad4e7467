"""``build_reward(spec)``: a reward model from a config mapping.

| spec | reward model |
|---|---|
| ``{"type": "verifier"}`` | ShapesVerifier |
| ``{"type": "jpeg", "mode": "compressibility", "quality": 95}`` | JpegReward |
| ``{"type": "learned", "path": "layout.pt"}`` | LearnedLayoutReward |
| ``{"type": "multi", "components": [{"type": ..., "weight": 1.0}, ...], "advantages": "sum"}`` | MultiReward |

A RewardPool factory is ``functools.partial(build_reward, spec)``: picklable, so each Ray
worker builds (and loads) its own model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from flowrl.errors import ConfigError
from flowrl.rewards import RewardModel
from flowrl.rewards.jpeg import JpegReward
from flowrl.rewards.learned import LearnedLayoutReward
from flowrl.rewards.multi import MultiReward
from flowrl.rewards.verifier import ShapesVerifier


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VerifierSpec(_Spec):
    type: Literal["verifier"] = "verifier"


class JpegSpec(_Spec):
    type: Literal["jpeg"] = "jpeg"
    mode: Literal["compressibility", "incompressibility"] = Field("compressibility", description="-kB or +kB")
    quality: StrictInt = Field(95, ge=1, le=95, description="pillow's JPEG quality")


class LearnedSpec(_Spec):
    type: Literal["learned"] = "learned"
    path: str = Field(description="checkpoint written by flowrl.rewards.learned.save_layout_model")


class MultiSpec(_Spec):
    type: Literal["multi"] = "multi"
    components: list[dict[str, Any]] = Field(min_length=1, description="reward specs, each with an optional weight")
    advantages: Literal["sum", "per_reward"] = Field(
        "sum",
        description="GRPO's advantages: of the weighted sum of the scores (sum), or the sum of each reward's "
        "group-normalised scores times its weight (per_reward: a reward's scale no longer matters)",
    )


class _Weight(_Spec):
    weight: float = Field(1.0, allow_inf_nan=False)


SPECS: dict[str, type[_Spec]] = {"verifier": VerifierSpec, "jpeg": JpegSpec, "learned": LearnedSpec, "multi": MultiSpec}


def build_reward(spec: Mapping[str, Any], where: str = "reward") -> RewardModel:
    """The reward model ``spec`` describes; ConfigError (one line naming ``where`` and the key)
    for an unknown type, an unknown key or a bad value."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: a reward spec is a mapping with a 'type', got {spec!r}")
    kind = spec.get("type")
    if kind not in SPECS:
        raise ConfigError(f"{where}.type: {kind!r} is not one of {', '.join(SPECS)}")
    cfg = _validate(SPECS[kind], spec, where)
    if isinstance(cfg, JpegSpec):
        return JpegReward(cfg.mode, cfg.quality)
    if isinstance(cfg, LearnedSpec):
        return LearnedLayoutReward(cfg.path)
    if isinstance(cfg, VerifierSpec):
        return ShapesVerifier()
    assert isinstance(cfg, MultiSpec)
    components = []
    for i, raw in enumerate(cfg.components):
        here = f"{where}.components[{i}]"
        weight = _validate(_Weight, {"weight": raw.get("weight", 1.0)}, here)
        components.append((build_reward({k: v for k, v in raw.items() if k != "weight"}, here), float(weight.weight)))
    try:
        return MultiReward(components, cfg.advantages)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _validate(model: type[_Spec], spec: Mapping[str, Any], where: str) -> Any:
    try:
        return model.model_validate(dict(spec))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            valid = ", ".join(model.model_fields)
            raise ConfigError(
                f"{where}: unknown key {key!r} for type {spec.get('type')!r}; valid keys: {valid}"
            ) from None
        got = f" (got {err['input']!r})" if err["type"] != "missing" else ""
        raise ConfigError(f"{where}.{key}: {err['msg']}{got}") from None


def per_reward_weights(spec: Mapping[str, Any]) -> dict[str, float] | None:
    """The component weights by name when ``spec`` asks GRPO for per-reward group advantages
    (a multi reward with ``advantages: per_reward``); None for advantages of the scores."""
    model = build_reward(spec) if spec.get("type") == "multi" else None
    return model.weights if isinstance(model, MultiReward) and model.advantages == "per_reward" else None


__all__ = ["SPECS", "build_reward", "per_reward_weights"]
