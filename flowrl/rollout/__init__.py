"""Vector envs and the collectors that turn envs + a policy into typed Rollouts."""

from flowrl.core.env_step import EnvStep, VectorEnv
from flowrl.rollout.build import make_collector
from flowrl.rollout.collector import InProcessCollector
from flowrl.rollout.evaluation import evaluate_policy
from flowrl.rollout.rollout import Collector, Rollout
from flowrl.rollout.shard import EnvShard, EnvSpec
from flowrl.rollout.vector_env import GymVectorEnv

__all__ = [
    "Collector",
    "EnvShard",
    "EnvSpec",
    "EnvStep",
    "GymVectorEnv",
    "InProcessCollector",
    "Rollout",
    "VectorEnv",
    "evaluate_policy",
    "make_collector",
]
