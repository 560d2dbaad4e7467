"""The vector-env interface: what every env family's vector of envs implements, and the EnvStep
record one step of it returns (torch tensors on the env's device).

It sits in the lowest layer so that both sides import it without an upward arrow: the env
families of ``envs/`` implement it (envs/maniskill_batch.py: a GPU-batched simulator) and the
collectors of ``flowrl.rollout`` drive it (flowrl/rollout/vector_env.py adapts gymnasium's envs).
Nothing here imports an env.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class EnvStep:
    """What one vector step returns, every field ``[N, ...]`` on the env's device.

    obs: the observation to act on next (the new episode's first one where an episode ended).
    reached: the state the step reached (the episode's final observation where it ended),
        for bootstrapping.
    reward: summed over the action chunk, in the env's own precision (float64 for gymnasium).
    terminated, truncated: bool.
    success: bool, meaningful where the episode ended. env_steps: primitive steps taken.
    success_once: bool, whether the episode has succeeded at any step so far (the ended
        episode's where it ended), for envs that report it (ManiSkill's ``success_once``); None
        for envs that do not.
    """

    obs: Tensor
    reached: Tensor
    reward: Tensor
    terminated: Tensor
    truncated: Tensor
    success: Tensor
    env_steps: Tensor
    success_once: Tensor | None = None


class VectorEnv(Protocol):
    num_envs: int
    device: torch.device

    def reset(self, seeds: list[int]) -> Tensor:
        """Reset env i with ``seeds[i]``; returns the observations ``[N, O]``."""
        ...

    def step(self, actions: Tensor) -> EnvStep:
        """One policy step (an action chunk ``[N, Ta, Da]``) in every env, auto-resetting ended ones."""
        ...

    def close(self) -> None: ...


__all__ = ["EnvStep", "VectorEnv"]
