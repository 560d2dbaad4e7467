"""Deterministic ODE solvers for the sampling ODE dx/dt = v(x, t), used outside a stochastic window.

Convention (as in :mod:`flowrl.core.steps`): t = 0 is Gaussian noise, t = 1 is data, the path is
x_t = (1 - t) eps + t x, the velocity v = x - eps and the data estimate x_hat = x + (1 - t) v.

Every step is a pure function. Shapes: ``x`` and ``v`` are ``[B, *E]``; times are python floats,
0-dim tensors or ``[B]`` tensors. Arithmetic runs in at least float32 and results come back in the
dtype of ``x``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from flowrl.core.steps import euler_step, per_sample

SolverName = Literal["euler", "heun", "dpm_solver_2m"]
SOLVERS: tuple[SolverName, ...] = ("euler", "heun", "dpm_solver_2m")

# Velocity field: ``velocity(x [B, *E], t, t_next) -> v [B, *E]`` with 0-dim times from the grid.
VelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def heun_step(x: Tensor, v: Tensor, v_next: Tensor, t: Tensor | float, t_next: Tensor | float) -> Tensor:
    """Heun (explicit trapezoid) step ``next = x + h/2 (v + v_next)`` with ``h = t_next - t``.

    ``v`` is the velocity at ``(x, t)``; ``v_next`` the velocity at the Euler predictor
    ``(x + h v, t_next)``. Shapes: ``[B, *E]``; returns ``[B, *E]`` in ``x``'s dtype.
    """
    dtype = _compute_dtype(x)
    x32 = x.to(dtype)
    h = per_sample(t_next, x32) - per_sample(t, x32)
    return (x32 + 0.5 * h * (v.to(dtype) + v_next.to(dtype))).to(x.dtype)


def dpm_solver_2m_step(
    x: Tensor,
    v: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    x0_prev: Tensor | None = None,
    t_prev: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++(2M) step (Lu et al. 2022, data prediction, multistep, midpoint variant).

    Schedule: alpha_t = t, sigma_t = 1 - t, lambda_t = log(alpha_t / sigma_t). Data prediction
    x0 = x + (1 - t) v. Second order, with h = lambda_next - lambda_t and
    r = (lambda_t - lambda_prev) / h::

        D    = (1 + 1/(2r)) x0 - 1/(2r) x0_prev
        next = (sigma_next / sigma_t) x - alpha_next (exp(-h) - 1) D

    The first-order update DPM-Solver++(1), ``(sigma'/sigma) x - alpha' (exp(-h) - 1) x0``, is the
    Euler step exactly: with exp(-h) = alpha sigma' / (sigma alpha') and x0 = x + sigma v it is
    ``(sigma'/sigma)(1 - alpha) x + alpha' x + (alpha' sigma - alpha sigma') v = x + (t' - t) v``,
    since 1 - alpha = sigma, sigma' + alpha' = 1 and alpha' sigma - alpha sigma' = t' - t. So it is
    computed by :func:`flowrl.core.steps.euler_step`. It is used where ``x0_prev`` is None, where
    t = 0 or t_prev = 0 (lambda = -inf), where t_prev >= t (no usable history), and where
    t_next = 1 (sigma_next = 0: "lower order final", as diffusers does).

    Args:
        x, v: ``[B, *E]`` sample and velocity at time ``t``.
        t, t_next: scalars or ``[B]``.
        x0_prev: ``[B, *E]`` data prediction returned by the previous step, or None.
        t_prev: scalar or ``[B]``, the time at which ``x0_prev`` was predicted; required with it.

    Returns:
        ``(next_x, x0)``, both ``[B, *E]`` in ``x``'s dtype; pass ``x0`` (and ``t``) as the
        history of the next step.
    """
    dtype = _compute_dtype(x)
    x32, v32 = x.to(dtype), v.to(dtype)
    t_b = per_sample(t, x32)
    x0 = x32 + (1.0 - t_b) * v32
    first = euler_step(x, v, t, t_next)
    if x0_prev is None:
        return first.next_x, x0.to(x.dtype)
    if t_prev is None:
        raise ValueError("dpm_solver_2m_step: t_prev is required with x0_prev")

    tn_b = per_sample(t_next, x32)
    tp_b = per_sample(t_prev, x32)
    second = (tp_b > 0) & (tp_b < t_b) & (tn_b < 1)
    mean = _second_order_mean(x32, x0, x0_prev.to(dtype), tp_b, t_b, tn_b, second)
    return torch.where(second, mean, first.mean).to(x.dtype), x0.to(x.dtype)


def _second_order_mean(
    x: Tensor, x0: Tensor, x0_prev: Tensor, t_prev: Tensor, t: Tensor, t_next: Tensor, second: Tensor
) -> Tensor:
    """The DPM-Solver++(2M) update of ``dpm_solver_2m_step`` (``[B, *E]``, compute dtype),
    meaningful where ``second`` holds; times are per sample, broadcastable to ``x``."""
    # Samples taking the first-order branch get harmless stand-in times, so that the unused
    # second-order branch never sees lambda = +-inf (whose NaNs would leak into gradients).
    half = torch.full((), 0.5, dtype=x.dtype, device=x.device)
    tp_s = torch.where(second, t_prev, 0.25 * half)
    t_s = torch.where(second, t, half)
    tn_s = torch.where(second, t_next, 1.5 * half)
    lam_prev, lam, lam_next = torch.logit(tp_s), torch.logit(t_s), torch.logit(tn_s)
    h = lam_next - lam
    half_inv_r = 0.5 * h / (lam - lam_prev)
    d = (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev
    # expm1 keeps exp(-h) - 1 accurate for the small h of fine grids.
    return ((1.0 - tn_s) / (1.0 - t_s)) * x - tn_s * torch.expm1(-h) * d


def ode_solve(velocity: VelocityFn, x: Tensor, grid: Tensor, solver: SolverName = "euler") -> tuple[Tensor, int]:
    """Integrate dx/dt = v(x, t) from ``grid[0]`` to ``grid[-1]`` with the named solver.

    Args:
        velocity: ``velocity(x, t, t_next) -> v``, ``[B, *E] -> [B, *E]``; ``t`` and ``t_next`` are
            0-dim tensors taken from the grid. Heun's corrector queries the velocity at the
            predictor as ``velocity(x_pred, t_next, t_next)`` (the instantaneous velocity, as the
            flow-matching loss queries it).
        x: ``[B, *E]`` the state at ``grid[0]`` (noise when ``grid[0] = 0``).
        grid: ``[M + 1]`` increasing times, e.g. from :func:`flowrl.core.grids.time_grid`.
        solver: one of :data:`SOLVERS`.

    Returns:
        ``(x_end, nfe)``: ``[B, *E]`` state at ``grid[-1]`` and the number of velocity calls per
        sample: M for euler and dpm_solver_2m, 2M for heun.
    """
    if solver not in SOLVERS:
        raise ValueError(f"ode_solve: unknown solver {solver!r}; valid solvers are {', '.join(SOLVERS)}")
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"ode_solve: grid must be [M + 1] with M >= 1, got {tuple(grid.shape)}")
    nfe = 0
    x0_prev: Tensor | None = None
    t_prev: Tensor | None = None
    for k in range(grid.shape[0] - 1):
        t, t_next = grid[k], grid[k + 1]
        v = velocity(x, t, t_next)
        nfe += 1
        if solver == "euler":
            x = euler_step(x, v, t, t_next).next_x
        elif solver == "heun":
            x_pred = euler_step(x, v, t, t_next).next_x
            v_next = velocity(x_pred, t_next, t_next)
            nfe += 1
            x = heun_step(x, v, v_next, t, t_next)
        else:
            x, x0_prev = dpm_solver_2m_step(x, v, t, t_next, x0_prev, t_prev)
            t_prev = t
    return x, nfe
