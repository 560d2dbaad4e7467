"""Reward models: anything callable on a batch that returns one finite score per sample.

``RewardModel``: ``model(batch) -> RewardOutput`` (scores ``[B]`` plus per-sample details for
logging); older models may return plain ``[B]`` scores (tensor, array or list).

One file per reward model: the model and its spec (a ``RewardSpec`` with a ``type`` literal,
registered by ``@register_reward``, ``flowrl.rewards.registry``). The registry finds the files of
this package itself, so the list of reward types is ``registry.reward_types()``, never typed
out; a reward of your own is any file named as ``type: path/to/file.py:NAME`` (README, "Adding a
reward model"). A model is built inside its worker by a zero-argument factory (so big models
load where they run), ``functools.partial(build_reward, spec)``;
``flowrl.rollout.reward_workers.RewardPool`` scores batches on Ray actors.

A reward never silently becomes 0: a failed model, a non-finite score or a non-finite image
is a RewardError naming the reward model and the sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from flowrl.errors import RewardError


@dataclass
class ImageBatch:
    """What image reward models score: ``images`` float32 ``[B, 3, H, W]`` in [0, 1] and one
    prompt per image."""

    images: torch.Tensor
    prompts: list[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"ImageBatch: images must be [B, 3, H, W], got {tuple(self.images.shape)}")
        if len(self.prompts) != self.images.shape[0]:
            raise ValueError(f"ImageBatch: {self.images.shape[0]} images but {len(self.prompts)} prompts")

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class RewardOutput:
    """``scores``: float32 ``[B]``; ``details``: per-sample numbers ``[B]`` for logging
    (e.g. ``correct``, a component's score), never used as the reward itself."""

    scores: torch.Tensor
    details: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)


class RewardModel(Protocol):
    name: str

    def __call__(self, batch: Any) -> RewardOutput | torch.Tensor | np.ndarray | list[float]:
        """Scores ``[B]`` of ``batch``, as a RewardOutput (or plain scores)."""
        ...


RewardFactory = Callable[[], RewardModel]


def check_scores(scores: Any, batch_size: int | None, source: str) -> Any:
    """Checked scores: a RewardOutput stays one (scores and every detail float32 ``[B]``),
    anything else becomes a float32 ``[B]`` tensor.

    Raises RewardError naming ``source`` on a wrong shape, on values that are not numbers, and
    on a non-finite score (with the first bad sample's index). Details may be non-finite (a
    logging quantity that does not apply to a sample).
    """
    if not isinstance(scores, RewardOutput):
        return _finite(_as_vector(scores, batch_size, source, "scores"), source)
    checked = _finite(_as_vector(scores.scores, batch_size, source, "scores"), source)
    details = {k: _as_vector(v, len(checked), source, f"detail {k!r}") for k, v in scores.details.items()}
    return RewardOutput(checked, details)


def _as_vector(values: Any, batch_size: int | None, source: str, what: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    try:
        out = torch.as_tensor(np.asarray(values, dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise RewardError(f"{source} returned {what} that are not numbers: {exc}") from None
    if out.ndim != 1 or (batch_size is not None and out.shape[0] != batch_size):
        raise RewardError(f"{source} returned {what} of shape {tuple(out.shape)}, expected [{batch_size}]")
    return out


def _finite(scores: torch.Tensor, source: str) -> torch.Tensor:
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise RewardError(
            f"{source} returned a non-finite score {scores[i].item()} for sample {i} ({len(bad)} of {len(scores)} "
            "bad); fix the reward model (flowrl never substitutes a default reward)"
        )
    return scores


def check_images(batch: ImageBatch, source: str) -> torch.Tensor:
    """The batch's images as float32 on the CPU; RewardError naming ``source`` and the first
    image with a non-finite pixel (a reward for it would be meaningless, not 0)."""
    images = batch.images.detach().to("cpu", torch.float32)
    bad = (~torch.isfinite(images)).flatten(1).any(dim=1).nonzero().flatten()
    if len(bad):
        raise RewardError(
            f"{source}: image {int(bad[0])} of the batch has non-finite pixels ({len(bad)} of {len(images)} images); "
            "the generator produced NaN/inf, there is nothing to score"
        )
    return images


__all__ = [
    "ImageBatch",
    "RewardError",
    "RewardFactory",
    "RewardModel",
    "RewardOutput",
    "check_images",
    "check_scores",
]
