"""InProcessCollector: the experiment's env shards run one after the other in this process.

The Collector interface and the Rollout it returns are in rollout.py; the env shard in
shard.py; ``RayCollector`` (ray_collector.py) runs the same shards in Ray actors, seeded alike,
so ``ray.enabled`` true and false give identical rollouts. ``make_collector`` (build.py) picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from flowrl.errors import EnvError
from flowrl.models.policy import Policy
from flowrl.rollout.rollout import Rollout
from flowrl.rollout.shard import EnvShard

T = TypeVar("T")


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
        # What to do when an env raises: no worker restarts here (Ray's env workers have them).
        self._fix = (
            "fix the env (the batched simulator runs in this process, without worker restarts)"
            if batched_device is not None
            else "fix the env, or set ray.enabled=true: Ray restarts a failed env worker and redoes its share "
            "(ray.max_restarts)"
        )

    def _each(self, call: Callable[[EnvShard], T]) -> list[T]:
        """``call`` on every shard in turn; an EnvError gains what to do, so it stops the run as one line."""
        try:
            return [call(shard) for shard in self.shards]
        except EnvError as exc:
            raise EnvError(f"{exc}; {self._fix}") from exc

    def reset(self, epoch: int) -> None:
        self._each(lambda shard: shard.reset(epoch))

    def collect(self, policy: Policy, num_steps: int, iteration: int) -> Rollout:
        return Rollout.concat_envs(self._each(lambda shard: shard.collect(policy, num_steps, iteration)))

    def collect_episodes(self, policy: Policy, max_steps: int, iteration: int) -> Rollout:
        return Rollout.concat_envs(self._each(lambda shard: shard.collect_episodes(policy, max_steps, iteration)))

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


__all__ = ["InProcessCollector"]
