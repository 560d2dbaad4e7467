"""The rollout records ``success_once`` (ManiSkill's "succeeded at any step of the episode")
where the env reports it, and nothing where it does not.

Oracle: an env whose success at a step is "the action's first coordinate was above 0.8" and
whose episodes last exactly 3 steps (gymnasium's time limit), so each episode's success (at
its last step) and success_once (at any step) are recomputed by hand from the actions the
rollout recorded.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from flowrl.algos.trainer import rollout_metrics
from flowrl.rollout.collector import InProcessCollector
from flowrl.rollout.shard import EnvSpec
from tests.rollout.test_collector import tiny_policy

ENV_ID = "test/PositiveOnce-v0"
LENGTH = 3
THRESHOLD = 0.8  # about one step in four of the tiny policy succeeds, about half the episodes once


class PositiveOnceEnv(gym.Env):
    """Success at a step iff the action's first coordinate is above THRESHOLD; reports success_once
    (no info at reset, so the ended episodes' values come from gymnasium's final_info only)."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.once = False

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.once = False
        return np.zeros(2, np.float32), {}

    def step(self, action):
        success = bool(action[0] > THRESHOLD)
        self.once = self.once or success
        return np.zeros(2, np.float32), 0.0, False, False, {"success": success, "success_once": self.once}


def _register() -> None:
    if ENV_ID not in gym.registry:
        gym.register(ENV_ID, entry_point=PositiveOnceEnv, max_episode_steps=LENGTH)


def _collector(env_id: str, num_envs: int = 4, workers: int = 2) -> InProcessCollector:
    return InProcessCollector(EnvSpec(env_id, 1, num_envs, seed=3), workers)


def test_step_collection_records_success_once_per_ended_episode() -> None:
    _register()
    collector = _collector(ENV_ID)
    try:
        collector.reset(0)
        rollout = collector.collect(tiny_policy(1), 7, 0)
    finally:
        collector.close()
    positive = (rollout.samples.final[:, :, 0, 0] > THRESHOLD).numpy()  # [T, N]
    once, last = [], []
    for shard in (range(0, 2), range(2, 4)):  # concat_envs joins the shards' lists in shard order
        for end in (2, 5):  # the steps where the 3-step episodes end, in time order within a shard
            for i in shard:
                once.append(float(positive[end - 2 : end + 1, i].any()))
                last.append(float(positive[end, i]))
    assert rollout.episode_successes_once == once
    assert rollout.episode_successes == last
    assert 0 < sum(once) < len(once) and once != last  # the check can tell the two apart
    assert rollout_metrics(rollout)["charts/success_once"] == np.mean(once)


def test_episode_collection_records_success_once_per_env() -> None:
    _register()
    collector = _collector(ENV_ID)
    try:
        full = collector.collect_episodes(tiny_policy(1), 5, 0)
        cut = collector.collect_episodes(tiny_policy(1), 2, 0)  # the budget ends every episode early
    finally:
        collector.close()
    positive = full.samples.final[:LENGTH, :, 0, 0] > THRESHOLD
    assert torch.equal(full.episode_success_once, positive.any(0))
    assert torch.equal(full.episode_success, positive[-1])
    assert full.episode_successes_once == positive.any(0).float().tolist()
    # Unfinished episodes: success_once so far, no ended episode to list.
    assert torch.equal(cut.episode_success_once, (cut.samples.final[:2, :, 0, 0] > THRESHOLD).any(0))
    assert not cut.episode_done.any() and cut.episode_successes_once == []


def test_envs_without_success_once_record_nothing() -> None:
    collector = _collector("flowrl/TwoGoal-v0")
    try:
        collector.reset(0)
        rollout = collector.collect(tiny_policy(1), 40, 0)
        episodes = collector.collect_episodes(tiny_policy(1), 40, 0)
    finally:
        collector.close()
    assert rollout.episode_successes and rollout.episode_successes_once == []
    assert "charts/success_once" not in rollout_metrics(rollout)
    assert episodes.episode_success_once is None and episodes.episode_successes_once == []
