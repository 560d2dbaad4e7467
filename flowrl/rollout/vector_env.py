"""``GymVectorEnv``: gymnasium tasks behind flowrl's vector-env interface (flowrl/core/env_step.py:
torch tensors in, torch tensors out, on the env's device).

``GymVectorEnv`` adapts gymnasium tasks (stepped on the CPU, same-step autoreset). A batched
GPU simulator (ManiSkill's ``physx_cuda``, envs/maniskill_batch.py) implements the same
interface with its tensors on the GPU, so the collector never converts to numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from torch import Tensor

import envs as flowrl_envs
from flowrl.core.env_step import EnvStep


def _per_env(info: dict, key: str, num_envs: int, default) -> np.ndarray:
    """``info[key]`` of every env after a SAME_STEP autoreset step: from ``final_info`` for
    the envs whose episode just ended, from ``info`` for the others, else ``default``."""
    out = np.full(num_envs, default)
    for source in (info, info.get("final_info", {})):
        if key in source:
            present = source.get(f"_{key}", np.ones(num_envs, dtype=bool))
            out[present] = source[key][present]
    return out


class GymVectorEnv:
    """``num_envs`` gymnasium envs taking action chunks of ``horizon`` steps (CPU)."""

    device = torch.device("cpu")

    def __init__(self, env_id: str, horizon: int, num_envs: int, env_kwargs: dict[str, Any] | None = None) -> None:
        self.num_envs = num_envs
        self.envs = SyncVectorEnv(
            [lambda: flowrl_envs.make_env(env_id, horizon, env_kwargs) for _ in range(num_envs)],
            autoreset_mode=AutoresetMode.SAME_STEP,
        )

    def reset(self, seeds: list[int]) -> Tensor:
        obs, _ = self.envs.reset(seed=list(seeds))
        return torch.as_tensor(obs, dtype=torch.float32)

    def step(self, actions: Tensor) -> EnvStep:
        next_obs, reward, terminated, truncated, info = self.envs.step(actions.detach().cpu().numpy())
        reached = np.array(next_obs, dtype=np.float32, copy=True)
        done = terminated | truncated
        success = np.zeros(self.num_envs, dtype=bool)
        if done.any():
            success = _per_env(info, "success", self.num_envs, False).astype(bool)
            for i in np.flatnonzero(done):
                reached[i] = info["final_obs"][i]
        success_once = None
        if "success_once" in info or "success_once" in info.get("final_info", {}):
            success_once = torch.from_numpy(_per_env(info, "success_once", self.num_envs, False).astype(bool))
        return EnvStep(
            obs=torch.as_tensor(next_obs, dtype=torch.float32),
            reached=torch.from_numpy(reached),
            reward=torch.as_tensor(reward),
            terminated=torch.as_tensor(terminated),
            truncated=torch.as_tensor(truncated),
            success=torch.from_numpy(success),
            env_steps=torch.from_numpy(_per_env(info, "chunk_steps", self.num_envs, 1).astype(np.int64)),
            success_once=success_once,
        )

    def close(self) -> None:
        self.envs.close()
