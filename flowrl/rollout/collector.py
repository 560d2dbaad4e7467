"""InProcessCollector: the experiment's env shards run one after the other in this process.

The Collector interface and the Rollout it returns are in rollout.py; the env shard and the
EnvSpec it is built from in shard.py; ``RayCollector`` (ray_collector.py) runs the same shards in
Ray actors, seeded alike, so ``ray.enabled`` true and false give identical rollouts.
``make_collector`` (build.py) picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from flowrl.errors import EnvError
from flowrl.models.policy import Policy
from flowrl.rollout.rollout import Rollout
from flowrl.rollout.shard import EnvShard, EnvSpec

T = TypeVar("T")


class InProcessCollector:
    """Collector running the envs of ``spec`` as ``num_workers`` env shards, one after the other
    in this process (``batched_device``: see EnvShard)."""

    def __init__(self, spec: EnvSpec, num_workers: int = 1, batched_device: torch.device | None = None) -> None:
        self.shards = [EnvShard(shard, batched_device) for shard in spec.shards(num_workers)]
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
