"""What a sampled denoising chain keeps for re-evaluation, and how it becomes PPO/GRPO samples.

Only the S stochastic steps of each sample are stored (S = K with every step stochastic,
the window size for a sliding window, 1 for one random step): the state entering the step,
the sampled next state, the step index and the sampled log-prob. Memory grows with S, not
with K. ``sample_unit`` decides what one policy-gradient sample is:

- ``chain``: the whole chain, with the log-prob summed over its S steps (ReinFlow, piRL
  Flow-Noise joint log-prob, Gaussian policies with S = 1);
- ``step``: each stochastic denoising step on its own, one clipped ratio per step (DPPO,
  Flow-GRPO, MixGRPO).

``reduce`` scales log-probs to a size-independent range: ``sum`` keeps the Gaussian
log-densities summed over the event dims (and steps); ``mean`` divides by the number of
summed dims (and steps), the per-dimension average ReinFlow and piRL use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flowrl.core.batch import TensorBatch

SampleUnit = Literal["chain", "step"]
Reduce = Literal["sum", "mean"]


@dataclass
class Transitions(TensorBatch):
    """The S stochastic steps of a batch of sampled chains.

    final: ``[B, *E]`` the chain's end (actions ``[Ta, Da]``, an image latent ``[C, H, W]``).
    x_in: ``[B, S, *E]`` the state entering each stochastic step.
    x_out: ``[B, S, *E]`` the sampled state it stepped to.
    steps: ``[B, S]`` int64, the step index k in 0..K-1 (increasing along S).
    log_prob: ``[B, S]`` the sampled Gaussian log-density of x_out, summed over the event dims.
    nfe: ``[B]`` network evaluations the sample cost (float, so it averages and stacks).
    """

    final: Tensor
    x_in: Tensor
    x_out: Tensor
    steps: Tensor
    log_prob: Tensor
    nfe: Tensor


def steps_from_mask(mask: Tensor) -> Tensor:
    """``[B, K]`` bool -> ``[B, S]`` indices of the True entries, in increasing order.

    Every row must hold the same number S >= 1 of stochastic steps (every window does: a
    window is either batch-wide or one step per sample)."""
    counts = mask.sum(dim=1)
    if mask.shape[0] and not bool((counts == counts[0]).all()):
        raise ValueError(f"every sample needs the same number of stochastic steps, got {counts.tolist()}")
    if mask.shape[0] and int(counts[0]) == 0:
        raise ValueError("the window holds no stochastic step: nothing to train")
    s = int(counts[0]) if mask.shape[0] else 0
    return mask.nonzero(as_tuple=True)[1].view(mask.shape[0], s)


def unit_values(per_step: Tensor, unit: SampleUnit, reduce: Reduce, event_numel: int) -> Tensor:
    """Per-step values ``[B, S]`` (log-probs or KLs summed over ``event_numel`` dims) -> one
    value per policy-gradient sample: ``[B]`` for ``chain``, ``[B * S]`` (row-major) for ``step``.

    chain: sum over S (in step order), divided by S * event_numel for ``mean``;
    step: each entry, divided by event_numel for ``mean``.
    """
    if per_step.ndim != 2:
        raise ValueError(f"expected per-step values [B, S], got {tuple(per_step.shape)}")
    if unit == "chain":
        total = torch.zeros_like(per_step[:, 0])
        for s in range(per_step.shape[1]):  # in step order, as the sampler accumulates
            total = total + per_step[:, s]
        if reduce == "sum":
            return total
        return total / (per_step.shape[1] * event_numel)
    if unit == "step":
        values = per_step if reduce == "sum" else per_step / event_numel
        return values.reshape(-1)
    raise ValueError(f"sample_unit must be 'chain' or 'step', got {unit!r}")


def unit_count(batch: int, per_step: Tensor, unit: SampleUnit) -> int:
    """How many policy-gradient samples ``batch`` chains with ``[B, S]`` steps give."""
    return batch if unit == "chain" else batch * per_step.shape[1]
