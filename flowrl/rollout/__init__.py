"""Collectors that turn envs + a policy into typed Rollouts."""

from flowrl.rollout.collector import Collector, EnvShard, InProcessCollector, Rollout, evaluate_policy

__all__ = ["Collector", "EnvShard", "InProcessCollector", "Rollout", "evaluate_policy"]
