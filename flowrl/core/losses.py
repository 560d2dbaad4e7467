"""PPO / GRPO loss terms. Each returns ``(loss, metrics)``; metrics are detached floats."""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_surrogate(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip: float
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped policy loss ``-mean(min(r A, clip(r, 1-c, 1+c) A))``, r = exp(lp - lp_old).

    All inputs ``[B]``. Metrics: clip fraction, approximate KL (the ``(r-1) - log r``
    estimator), ratio mean / min / max.
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(
            f"clipped_surrogate: shapes differ: log_prob {tuple(log_prob.shape)}, "
            f"old_log_prob {tuple(old_log_prob.shape)}, advantages {tuple(advantages.shape)}"
        )
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {
            "clip_fraction": ((ratio - 1.0).abs() > clip).float().mean().item(),
            "approx_kl": ((ratio - 1.0) - log_ratio).mean().item(),
            "ratio_mean": ratio.mean().item(),
            "ratio_min": ratio.min().item(),
            "ratio_max": ratio.max().item(),
        }
    return loss, metrics


def value_loss(
    values: Tensor, returns: Tensor, old_values: Tensor | None = None, clip: float | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Squared error ``0.5 * mean((V - R)^2)``, optionally clipped around the old values.

    With ``clip``: the larger of the unclipped error and the error of
    ``old_values + clamp(V - old_values, -clip, clip)`` (PPO2-style). Inputs ``[B]``.
    """
    if values.shape != returns.shape:
        raise ValueError(f"value_loss: values {tuple(values.shape)} vs returns {tuple(returns.shape)}")
    err = (values - returns) ** 2
    if clip is not None:
        if old_values is None:
            raise ValueError("value_loss: clip needs old_values")
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    loss = 0.5 * err.mean()
    with torch.no_grad():
        var = returns.var(unbiased=False)
        explained = 1.0 - (returns - values).var(unbiased=False) / var if var > 0 else torch.tensor(float("nan"))
    return loss, {"explained_variance": float(explained)}
