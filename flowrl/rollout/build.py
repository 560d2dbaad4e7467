"""``make_collector``: the experiment's collector, built from its config.

Ray and the image stack are imported only when the experiment uses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowrl.rollout.collector import InProcessCollector
from flowrl.rollout.rollout import Collector
from flowrl.rollout.shard import EnvSpec

if TYPE_CHECKING:
    from flowrl.config import ExperimentConfig


def make_collector(cfg: ExperimentConfig) -> Collector:
    """The experiment's env workers: Ray actors (ray.enabled, inside a Ray session) or the
    same shards in this process; the worker count is env.num_workers either way."""
    if cfg.env.type == "shapes":  # prompts, not envs: reward workers instead of env workers
        from flowrl.rollout.prompts import make_prompt_collector

        return make_prompt_collector(cfg)
    spec = EnvSpec.from_config(cfg)
    if cfg.env.batched:  # one batch in this process, on the learner's device (no env workers)
        from flowrl.runtime import resolve_device

        return InProcessCollector(spec, 1, resolve_device(cfg.device))
    if cfg.ray.enabled:
        from flowrl.rollout.ray_collector import RayCollector  # Ray is imported only when used

        return RayCollector(spec, cfg.env.num_workers, cfg.ray.cpus_per_worker, cfg.ray.max_restarts)
    return InProcessCollector(spec, cfg.env.num_workers)


__all__ = ["make_collector"]
