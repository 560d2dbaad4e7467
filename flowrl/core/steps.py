"""Stochastic integration steps that turn a flow-matching sampler into an MDP.

Every step is a pure function of (x, v, t, t_next, ...): there is no hidden step counter.
It returns the next sample, the Gaussian transition (mean, std) and the log-prob of the
next sample under it. Given a stored ``next_x`` it does not sample: it re-evaluates the
log-prob of that sample, which is what PPO/GRPO need after the policy changed.

Shapes: ``x`` and ``v`` are ``[B, *E]`` (E: event dims, e.g. ``[Ta, Da]`` for an action
chunk or ``[C, H, W]`` for an image); ``t`` and ``t_next`` are scalars or ``[B]``. The
log-prob is summed over the event dims: ``[B]``. Arithmetic runs in at least float32 and
the sample is returned in the dtype of ``x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class StepOutput:
    """Result of one integration step.

    next_x: ``[B, *E]`` the sample entering the next step (the stored one when re-evaluating).
    mean: ``[B, *E]`` mean of the Gaussian transition.
    std: broadcastable to ``[B, *E]``; zero for a deterministic step.
    log_prob: ``[B]`` log-density of ``next_x``; zero for a deterministic step.
    """

    next_x: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def per_sample(value: Tensor | float, like: Tensor, dtype: torch.dtype | None = None, what: str = "time") -> Tensor:
    """A scalar or ``[B]`` ``value`` as a tensor broadcastable against ``like`` ([B, *E]), in
    ``dtype`` (default ``like``'s); ``what`` names it in the error."""
    value = torch.as_tensor(value, dtype=dtype or like.dtype, device=like.device)
    if value.ndim == 0:
        return value
    if value.ndim != 1 or value.shape[0] != like.shape[0]:
        raise ValueError(f"{what} must be a scalar or [B] with B={like.shape[0]}, got {tuple(value.shape)}")
    return value.view(-1, *([1] * (like.ndim - 1)))


def _sum_event(x: Tensor) -> Tensor:
    return x.flatten(1).sum(dim=1)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Log-density of a diagonal Gaussian, summed over event dims. ``[B, *E] -> [B]``."""
    std = torch.broadcast_to(std, mean.shape)
    z = (x - mean) / std
    return _sum_event(-0.5 * z * z - torch.log(std) - _LOG_SQRT_2PI)


def gaussian_entropy(std: Tensor, event_shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Entropy of a diagonal Gaussian with per-dimension ``std``, summed over event dims.

    ``std``: ``[B, ...]`` with a leading batch dim, broadcastable to ``[B, *event_shape]``;
    returns ``[B]``.
    """
    if std.ndim != len(event_shape) + 1:
        raise ValueError(
            f"gaussian_entropy: std needs shape [B, *{tuple(event_shape)}] (batch first), got {tuple(std.shape)}"
        )
    std = torch.broadcast_to(std, (std.shape[0], *event_shape))
    return _sum_event(0.5 + _LOG_SQRT_2PI + torch.log(std))


def gaussian_transition(
    x: Tensor,
    mean: Tensor,
    std: Tensor,
    noise: Tensor | None = None,
    next_x: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """The Gaussian transition every stochastic step shares: ``next ~ N(mean, std^2)``.

    x: ``[B, *E]`` (its dtype is the sample's); mean: ``[B, *E]`` in the compute dtype;
    std: broadcastable to ``[B, *E]``, >= 0; a sample with a zero std in any dim is
    deterministic: its next sample is the mean and its log-prob 0 (when no sample is
    stochastic no noise is drawn at all). Samples ``next_x`` (with ``noise`` or the
    generator) or re-evaluates a given one.
    """
    b = mean.shape[0]
    stochastic = std > 0
    rows = torch.broadcast_to(stochastic, mean.shape).reshape(b, -1).all(dim=1)
    all_stochastic = bool(rows.all())
    if next_x is None:
        if not all_stochastic and not bool(rows.any()):
            out_x = mean.to(x.dtype)
            return StepOutput(out_x, mean, torch.zeros_like(std), torch.zeros(b, dtype=mean.dtype, device=mean.device))
        out_x = gaussian_draw(x, mean, std, noise, generator)
        # The log-prob is of the sample as stored (e.g. rounded to bf16), so that
        # re-evaluating the stored sample reproduces it exactly.
        sample = out_x.to(mean.dtype)
    else:
        if next_x.shape != mean.shape:
            raise ValueError(f"next_x has shape {tuple(next_x.shape)}, expected {tuple(mean.shape)}")
        sample = next_x.to(mean.dtype)
        out_x = next_x
    if all_stochastic:
        return StepOutput(out_x, mean, std, gaussian_log_prob(sample, mean, std))
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    log_prob = gaussian_log_prob(sample, mean, safe_std)
    log_prob = torch.where(rows, log_prob, torch.zeros_like(log_prob))
    if next_x is None:
        det = ~rows.view(-1, *([1] * (mean.ndim - 1)))
        out_x = torch.where(det, mean.to(x.dtype), out_x)
    return StepOutput(out_x, mean, torch.where(stochastic, std, torch.zeros_like(std)), log_prob)


def gaussian_draw(
    x: Tensor, mean: Tensor, std: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """``mean + std * noise`` in ``x``'s dtype, ``noise ~ N(0, I)`` drawn with ``generator``
    unless given: the sample of ``gaussian_transition`` where every std is > 0."""
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise.to(mean.dtype)).to(x.dtype)


def gaussian_kl(mean: Tensor, std: Tensor, ref_mean: Tensor, ref_std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(ref_mean, ref_std^2)) of diagonal Gaussians, summed over event dims.

    ``[B, *E] -> [B]`` (stds broadcastable). With equal stds it is Flow-GRPO's per-step KL
    ``||mean - ref_mean||^2 / (2 std^2)``.
    """
    std = torch.broadcast_to(std, mean.shape)
    ref_std = torch.broadcast_to(ref_std, mean.shape)
    var, ref_var = std * std, ref_std * ref_std
    kl = torch.log(ref_std / std) + (var + (mean - ref_mean) ** 2) / (2.0 * ref_var) - 0.5
    return _sum_event(kl)


def euler_mean(x: Tensor, v: Tensor, t: Tensor | float, t_next: Tensor | float) -> Tensor:
    """``x + h v`` with ``h = t_next - t`` in the compute dtype: the mean of the Euler step and
    of the ReinFlow step around it."""
    dtype = _compute_dtype(x)
    x32, v32 = x.to(dtype), v.to(dtype)
    h = per_sample(t_next, x32) - per_sample(t, x32)
    return x32 + h * v32


def euler_step(x: Tensor, v: Tensor, t: Tensor | float, t_next: Tensor | float) -> StepOutput:
    """Deterministic ODE step ``next = x + h v`` with ``h = t_next - t``; std and log-prob 0."""
    mean = euler_mean(x, v, t, t_next)
    dtype = mean.dtype
    zeros = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
    return StepOutput(mean.to(x.dtype), mean, torch.zeros((), dtype=dtype, device=x.device), zeros)


def gaussian_step(
    x: Tensor,
    v: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    std: Tensor | float,
    *,
    noise: Tensor | None = None,
    next_x: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """ReinFlow / Flow-Noise step: ``next ~ N(x + h v, std^2)`` with a given (e.g. learned) std.

    ``std``: scalar or broadcastable to ``[B, *E]``, strictly positive.
    """
    mean = euler_mean(x, v, t, t_next)
    std_t = torch.as_tensor(std, dtype=mean.dtype, device=x.device)
    return gaussian_transition(x, mean, std_t, noise, next_x, generator)


def flow_sde_std_scale(t: Tensor, noise_level: float, t_floor: float) -> Tensor:
    """Diffusion coefficient ``s_t = a sqrt((1 - t) / t)`` with t in the denominator floored.

    At t = 0 the coefficient is infinite; like Flow-GRPO we evaluate the denominator at the
    first positive grid point ``t_floor`` instead.
    """
    return noise_level * torch.sqrt((1.0 - t) / torch.clamp(t, min=t_floor))


def flow_sde_step(
    x: Tensor,
    v: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    noise_level: float,
    t_floor: float,
    *,
    noise: Tensor | None = None,
    next_x: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Flow-SDE step (Flow-GRPO, DanceGRPO, piRL "flow_sde"): Euler-Maruyama on the SDE with
    the ODE's marginals, ``dx = (v + s_t^2/2 * score) dt + s_t dW``.

    score = -(x - t v) / (1 - t) (the noise estimate over its coefficient),
    mean = x + h (v + s_t^2/2 * score), std = s_t sqrt(h), s_t = a sqrt((1 - t)/t).
    ``t_floor``: the first positive grid point (guards t = 0). Requires t < 1.
    """
    dtype = _compute_dtype(x)
    x32, v32 = x.to(dtype), v.to(dtype)
    t_b = per_sample(t, x32)
    h = per_sample(t_next, x32) - t_b
    s = flow_sde_std_scale(t_b, noise_level, t_floor)
    score = -(x32 - t_b * v32) / (1.0 - t_b)
    mean = x32 + h * (v32 + 0.5 * s * s * score)
    std = s * torch.sqrt(h)
    return gaussian_transition(x, mean, std, noise, next_x, generator)


def cps_step(
    x: Tensor,
    v: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    noise_level: float,
    *,
    noise: Tensor | None = None,
    next_x: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Coefficients-preserving step: keeps next = t' x_hat + (1 - t') eps in distribution.

    x_hat = x + (1 - t) v, eps_hat = x - t v, std = (1 - t') sin(a pi / 2),
    mean = t' x_hat + sqrt((1 - t')^2 - std^2) eps_hat with t' = t_next.
    At t' = 1 the std is 0: that sample's step is deterministic and its log-prob is 0.
    """
    dtype = _compute_dtype(x)
    x32, v32 = x.to(dtype), v.to(dtype)
    t_b = per_sample(t, x32)
    tn_b = per_sample(t_next, x32)
    x_hat = x32 + (1.0 - t_b) * v32
    eps_hat = x32 - t_b * v32
    std = (1.0 - tn_b) * math.sin(noise_level * math.pi / 2.0)
    mean = tn_b * x_hat + torch.sqrt(torch.clamp((1.0 - tn_b) ** 2 - std * std, min=0.0)) * eps_hat
    return gaussian_transition(x, mean, std, noise, next_x, generator)
