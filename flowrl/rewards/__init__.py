"""Reward models: anything callable on a batch that returns one finite score per sample.

``RewardModel``: ``model(batch) -> [B]`` scores (tensor, array or list). A reward model is
built inside its worker by a zero-argument factory (so big models load where they run);
``flowrl.rollout.reward_workers.RewardPool`` scores batches on Ray actors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from flowrl.errors import FlowRLError


class RewardModel(Protocol):
    def __call__(self, batch: Any) -> torch.Tensor | np.ndarray | list[float]:
        """One score per sample of ``batch``: ``[B]``."""
        ...


RewardFactory = Callable[[], RewardModel]


class RewardError(FlowRLError):
    """A reward model failed or returned unusable scores; never replaced by a default score."""


def check_scores(scores: Any, batch_size: int | None, source: str) -> torch.Tensor:
    """Scores as a float32 ``[B]`` tensor; raises RewardError on a wrong shape or a non-finite score."""
    try:
        out = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise RewardError(f"{source} returned scores that are not numbers: {exc}") from None
    if out.ndim != 1 or (batch_size is not None and out.shape[0] != batch_size):
        raise RewardError(f"{source} returned scores of shape {tuple(out.shape)}, expected [{batch_size}]")
    bad = (~torch.isfinite(out)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise RewardError(
            f"{source} returned a non-finite score {out[i].item()} for sample {i} ({len(bad)} of {len(out)} bad); "
            "fix the reward model (flowrl never substitutes a default reward)"
        )
    return out


__all__ = ["RewardError", "RewardFactory", "RewardModel", "check_scores"]
