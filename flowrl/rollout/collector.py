"""Collectors: run envs with a policy (any family) and return a typed Rollout.

The Collector interface is what the learner sees; ``InProcessCollector`` implements it in
this process. An ``EnvShard`` (a gymnasium vector env plus the random generator that drives
the policy's noise, both seeded from (seed, shard index)) is the unit a Ray EnvWorker owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from torch import Tensor

import envs as flowrl_envs
from flowrl.core.batch import TensorBatch
from flowrl.models.policy import Policy
from flowrl.runtime import derive_seed


@dataclass
class Rollout:
    """Time-major batch of policy (action-chunk) steps from N envs.

    obs, next_obs: ``[T, N, O]``; next_obs is the state reached (the episode's final
        observation when it ended at that step, before any reset).
    samples: the policy's samples stacked ``[T, N, ...]`` (a ChainSample of chains, masks
        and log-probs for flow and diffusion policies, a GaussianSample for Gaussian ones).
    rewards: ``[T, N]`` (summed over the chunk); terminated, truncated: ``[T, N]`` bool.
    env_steps: primitive env steps taken. episode_returns / episode_successes: one entry
    per episode that ended during the collection.
    """

    obs: Tensor
    next_obs: Tensor
    samples: TensorBatch
    rewards: Tensor
    terminated: Tensor
    truncated: Tensor
    env_steps: int
    episode_returns: list[float] = field(default_factory=list)
    episode_successes: list[float] = field(default_factory=list)

    @staticmethod
    def concat_envs(parts: list[Rollout]) -> Rollout:
        """Join rollouts of different env shards (same T) along the env axis."""
        tensors = {k: torch.cat([getattr(p, k) for p in parts], dim=1) for k in _TENSORS}
        return Rollout(
            **tensors,
            samples=type(parts[0].samples).cat([p.samples for p in parts], dim=1),
            env_steps=sum(p.env_steps for p in parts),
            episode_returns=[r for p in parts for r in p.episode_returns],
            episode_successes=[s for p in parts for s in p.episode_successes],
        )


_TENSORS = ("obs", "next_obs", "rewards", "terminated", "truncated")


class Collector(Protocol):
    def reset(self, epoch: int) -> None:
        """(Re)start every env from seeds derived from (seed, shard, epoch)."""

    def collect(self, policy: Policy, num_steps: int, iteration: int) -> Rollout:
        """``num_steps`` policy steps in every env with the window of ``iteration``."""

    def close(self) -> None: ...


def _per_env(info: dict, key: str, num_envs: int, default) -> np.ndarray:
    """``info[key]`` of every env after a SAME_STEP autoreset step: from ``final_info`` for
    the envs whose episode just ended, from ``info`` for the others, else ``default``."""
    out = np.full(num_envs, default)
    for source in (info, info.get("final_info", {})):
        if key in source:
            present = source.get(f"_{key}", np.ones(num_envs, dtype=bool))
            out[present] = source[key][present]
    return out


class EnvShard:
    """A vector of ``num_envs`` envs and the noise generator of the policy sampling for it."""

    def __init__(
        self, env_id: str, horizon: int, num_envs: int, seed: int, index: int, env_kwargs: dict | None = None
    ) -> None:
        self.num_envs, self.seed, self.index = num_envs, seed, index
        self.envs = SyncVectorEnv(
            [lambda: flowrl_envs.make_env(env_id, horizon, env_kwargs) for _ in range(num_envs)],
            autoreset_mode=AutoresetMode.SAME_STEP,
        )
        self.generator = torch.Generator()
        self._obs: np.ndarray | None = None
        self._returns = np.zeros(num_envs)

    def reset(self, epoch: int) -> None:
        base = derive_seed(self.seed, self.index, epoch)
        self._obs, _ = self.envs.reset(seed=[base + i for i in range(self.num_envs)])
        self.generator.manual_seed(derive_seed(self.seed, self.index, epoch, 1))
        self._returns[:] = 0.0

    def collect(self, policy: Policy, num_steps: int, iteration: int) -> Rollout:
        if self._obs is None:
            self.reset(0)
        buf: dict[str, list] = {k: [] for k in _TENSORS}
        samples = []
        env_steps = 0
        ep_returns: list[float] = []
        ep_successes: list[float] = []
        for _ in range(num_steps):
            obs = torch.as_tensor(self._obs, dtype=torch.float32)
            sample = policy.sample(obs, iteration, self.generator)
            next_obs, reward, terminated, truncated, info = self.envs.step(sample.actions.numpy())
            real_next = np.array(next_obs, dtype=np.float32, copy=True)
            done = terminated | truncated
            self._returns += reward
            if done.any():
                success = _per_env(info, "success", self.num_envs, False)
                for i in np.flatnonzero(done):
                    real_next[i] = info["final_obs"][i]
                    ep_returns.append(float(self._returns[i]))
                    ep_successes.append(float(bool(success[i])))
                    self._returns[i] = 0.0
            env_steps += int(_per_env(info, "chunk_steps", self.num_envs, 1).sum())
            for key, value in (
                ("obs", obs),
                ("next_obs", torch.from_numpy(real_next)),
                ("rewards", torch.as_tensor(reward, dtype=torch.float32)),
                ("terminated", torch.as_tensor(terminated)),
                ("truncated", torch.as_tensor(truncated)),
            ):
                buf[key].append(value)
            samples.append(sample)
            self._obs = next_obs
        return Rollout(
            **{k: torch.stack(v) for k, v in buf.items()},
            samples=type(samples[0]).stack(samples),
            env_steps=env_steps,
            episode_returns=ep_returns,
            episode_successes=ep_successes,
        )

    def close(self) -> None:
        self.envs.close()


class InProcessCollector:
    """Collector running its env shards one after the other in this process."""

    def __init__(
        self, env_id: str, horizon: int, num_envs: int, seed: int, num_shards: int = 1, env_kwargs: dict | None = None
    ) -> None:
        if num_envs % num_shards:
            raise ValueError(f"num_envs={num_envs} must be divisible by the number of shards ({num_shards})")
        per_shard = num_envs // num_shards
        self.shards = [EnvShard(env_id, horizon, per_shard, seed, i, env_kwargs) for i in range(num_shards)]

    def reset(self, epoch: int) -> None:
        for shard in self.shards:
            shard.reset(epoch)

    def collect(self, policy: Policy, num_steps: int, iteration: int) -> Rollout:
        return Rollout.concat_envs([s.collect(policy, num_steps, iteration) for s in self.shards])

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


def evaluate_policy(
    policy: Policy, env_id: str, horizon: int, episodes: int, seed: int, env_kwargs: dict | None = None
) -> dict[str, float]:
    """Deterministic (ODE) evaluation: ``episodes`` envs, one episode each, fixed seeds.

    The seeds and the initial noise are the same at every call, so successive evaluations
    of a changing policy are compared on common random numbers.
    """
    env_list = [flowrl_envs.make_env(env_id, horizon, env_kwargs) for _ in range(episodes)]
    base = derive_seed(seed, 10**6)
    obs = np.stack([env.reset(seed=base + i)[0] for i, env in enumerate(env_list)]).astype(np.float32)
    generator = torch.Generator().manual_seed(derive_seed(seed, 10**6, 1))
    returns, lengths = np.zeros(episodes), np.zeros(episodes)
    success = np.zeros(episodes, dtype=bool)
    active = np.ones(episodes, dtype=bool)
    while active.any():
        actions = policy.act(torch.as_tensor(obs), generator).numpy()
        for i in np.flatnonzero(active):
            o, r, term, trunc, info = env_list[i].step(actions[i])
            obs[i] = o
            returns[i] += r
            lengths[i] += info["chunk_steps"]
            if term or trunc:
                active[i] = False
                success[i] = bool(info.get("success", False))
    for env in env_list:
        env.close()
    return {
        "eval/return": float(returns.mean()),
        "eval/success_rate": float(success.mean()),
        "eval/episode_length": float(lengths.mean()),
    }


__all__ = ["Collector", "EnvShard", "InProcessCollector", "Rollout", "evaluate_policy"]
