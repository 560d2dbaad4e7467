"""Advantage estimators: GAE over env steps (PPO) and group normalisation (GRPO)."""

from __future__ import annotations

import torch
from torch import Tensor


def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    dones: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation with bootstrap on truncation.

    All inputs ``[T, N]`` (time-major). ``next_values[t]`` is V of the state reached after
    step t: the final observation of the episode when it ended at t, so a truncated (time
    limit) episode bootstraps from it while a terminated one does not. ``dones = terminated
    | truncated`` cuts the recursion between episodes:

        delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t
        A_t     = delta_t + gamma * lam * (1 - dones_t) * A_{t+1}

    Returns ``(advantages, returns)``, each ``[T, N]``, with returns = advantages + values.
    """
    shape = rewards.shape
    for name, x in (("values", values), ("next_values", next_values), ("terminated", terminated), ("dones", dones)):
        if x.shape != shape:
            raise ValueError(f"gae: {name} has shape {tuple(x.shape)}, rewards has {tuple(shape)}")
    if rewards.ndim != 2:
        raise ValueError(f"gae: expected [T, N] inputs, got {tuple(shape)}")
    not_term = 1.0 - terminated.to(rewards.dtype)
    not_done = 1.0 - dones.to(rewards.dtype)
    deltas = rewards + gamma * not_term * next_values - values
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(shape[0] - 1, -1, -1):
        running = deltas[t] + gamma * lam * not_done[t] * running
        advantages[t] = running
    return advantages, advantages + values


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """GRPO advantages ``(r - mean_group) / (std_group + eps)``.

    ``rewards``: ``[G, n]`` (G groups of n samples sharing a prompt or reset seed); std is
    the population std of each group. Returns ``(advantages [G, n], has_signal [G])``;
    a group whose rewards are all equal carries no signal and should be dropped.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages: expected [G, n] rewards with n >= 2, got {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    has_signal = (rewards != rewards[:, :1]).any(dim=1)
    return (rewards - mean) / (std + eps), has_signal
