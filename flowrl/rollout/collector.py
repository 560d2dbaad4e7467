"""InProcessCollector: the experiment's env shards run one after the other in this process.

The Collector interface and the Rollout it returns are in rollout.py; the env shard in
shard.py; ``RayCollector`` (ray_collector.py) runs the same shards in Ray actors, seeded alike,
so ``ray.enabled`` true and false give identical rollouts. ``make_collector`` (build.py) picks one.
"""

from __future__ import annotations

import torch

from flowrl.models.policy import Policy
from flowrl.rollout.rollout import Rollout
from flowrl.rollout.shard import EnvShard


class InProcessCollector:
    """Collector running its env shards one after the other in this process."""

    def __init__(
        self,
        env_id: str,
        horizon: int,
        num_envs: int,
        seed: int,
        num_workers: int = 1,
        env_kwargs: dict | None = None,
        group_size: int = 1,
        batched_device: torch.device | None = None,
    ) -> None:
        if num_envs % num_workers:
            raise ValueError(f"num_envs={num_envs} must be divisible by the number of env workers ({num_workers})")
        per_shard = num_envs // num_workers
        self.shards = [
            EnvShard(env_id, horizon, per_shard, seed, i, env_kwargs, group_size, batched_device)
            for i in range(num_workers)
        ]

    def reset(self, epoch: int) -> None:
        for shard in self.shards:
            shard.reset(epoch)

    def collect(self, policy: Policy, num_steps: int, iteration: int) -> Rollout:
        return Rollout.concat_envs([s.collect(policy, num_steps, iteration) for s in self.shards])

    def collect_episodes(self, policy: Policy, max_steps: int, iteration: int) -> Rollout:
        return Rollout.concat_envs([s.collect_episodes(policy, max_steps, iteration) for s in self.shards])

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


__all__ = ["InProcessCollector"]
