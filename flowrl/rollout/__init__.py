"""Vector envs and the collectors that turn envs + a policy into typed Rollouts."""

from flowrl.rollout.collector import Collector, EnvShard, InProcessCollector, Rollout, evaluate_policy, make_collector
from flowrl.rollout.vector_env import EnvStep, GymVectorEnv, VectorEnv

__all__ = [
    "Collector",
    "EnvShard",
    "EnvStep",
    "GymVectorEnv",
    "InProcessCollector",
    "Rollout",
    "VectorEnv",
    "evaluate_policy",
    "make_collector",
]
