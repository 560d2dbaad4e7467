"""``make_collector``: the experiment's collector, built from its config.

Ray and the image stack are imported only when the experiment uses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowrl.rollout.collector import InProcessCollector
from flowrl.rollout.rollout import Collector

if TYPE_CHECKING:
    from flowrl.config import ExperimentConfig


def make_collector(cfg: ExperimentConfig) -> Collector:
    """The experiment's env workers: Ray actors (ray.enabled, inside a Ray session) or the
    same shards in this process; the worker count is env.num_workers either way."""
    if cfg.env.type == "shapes":  # prompts, not envs: reward workers instead of env workers
        from flowrl.rollout.prompts import make_prompt_collector

        return make_prompt_collector(cfg)
    env, horizon = cfg.env, cfg.policy.horizon
    if env.batched:  # one batch in this process, on the learner's device (no env workers)
        from flowrl.runtime import resolve_device

        device = resolve_device(cfg.device)
        return InProcessCollector(env.id, horizon, env.num_envs, cfg.seed, 1, env.kwargs, env.group_size, device)
    if cfg.ray.enabled:
        from flowrl.rollout.ray_collector import RayCollector  # Ray is imported only when used

        return RayCollector(
            env.id,
            horizon,
            env.num_envs,
            cfg.seed,
            env.num_workers,
            cfg.ray.cpus_per_worker,
            cfg.ray.max_restarts,
            env.kwargs,
            env.group_size,
        )
    return InProcessCollector(env.id, horizon, env.num_envs, cfg.seed, env.num_workers, env.kwargs, env.group_size)


__all__ = ["make_collector"]
