"""Environments shipped with flowrl, registered with gymnasium on import.

| id | file | what |
|---|---|---|
| flowrl/TwoGoal-v0 | envs/toy.py | 2-D point mass, two goals, one pays (quickstart) |
| flowrl/FaultInjection-v0 | envs/faults.py | TwoGoal that fails at a chosen step (worker-recovery tests) |
| Hopper-v5, Walker2d-v5, HalfCheetah-v5, Ant-v5, Humanoid-v5 | gymnasium | locomotion (LOCOMOTION) |

The locomotion tasks' demonstrations come from `flowrl collect` (experiments/locomotion).

``make_env`` wraps any of them in action chunking; observation normalisation lives in the
policy's networks (their ObsNormalizer buffers travel with every checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from envs import toy
from envs.wrappers import ActionChunk

if "flowrl/TwoGoal-v0" not in gym.registry:
    gym.register("flowrl/TwoGoal-v0", entry_point="envs.toy:TwoGoalEnv", max_episode_steps=30)
if "flowrl/FaultInjection-v0" not in gym.registry:
    gym.register("flowrl/FaultInjection-v0", entry_point="envs.faults:FaultInjectionEnv", max_episode_steps=30)

LOCOMOTION = ("Hopper-v5", "Walker2d-v5", "HalfCheetah-v5", "Ant-v5", "Humanoid-v5")

# Scripted demonstrators by env id: (num_episodes, seed) -> dataset dict.
DEMONSTRATORS: dict[str, Callable[[int, int], dict[str, np.ndarray]]] = {
    "flowrl/TwoGoal-v0": toy.scripted_demos,
    "flowrl/FaultInjection-v0": toy.scripted_demos,  # the same task, until its fault fires
}


def make_env(env_id: str, horizon: int, kwargs: dict[str, Any] | None = None) -> gym.Env:
    """An env that takes action chunks of ``horizon`` steps (``kwargs`` go to gym.make)."""
    try:
        env = gym.make(env_id, **(kwargs or {}))
    except gym.error.Error as exc:
        raise ValueError(f"cannot make env {env_id!r} (env.id / env.kwargs): {exc}") from None
    return ActionChunk(env, horizon)


__all__ = ["DEMONSTRATORS", "LOCOMOTION", "ActionChunk", "make_env"]
