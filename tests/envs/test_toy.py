"""Tests of the shipped envs: TwoGoal, the ActionChunk wrapper, the scripted demonstrator.

Oracles: gymnasium's env checker, hand-computed point-mass trajectories (x += 0.1 a,
goal radius 0.12) and a counting env whose rewards are known in closed form.
"""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.toy import GOALS, REWARDED_GOAL, TwoGoalEnv, scripted_demos
from envs.wrappers import ActionChunk

ENV_ID = "flowrl/TwoGoal-v0"
SPEED, RADIUS = 0.1, 0.12


def _check_env_without_warnings(env: gym.Env) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    # the only expected warning: checking a wrapped env instead of the unwrapped one
    others = [str(w.message) for w in caught if "different from the unwrapped version" not in str(w.message)]
    assert others == []


def test_check_env_unwrapped() -> None:
    _check_env_without_warnings(gym.make(ENV_ID).unwrapped)


def test_check_env_action_chunk() -> None:
    env = envs.make_env(ENV_ID, 4)
    assert isinstance(env, ActionChunk)
    assert env.action_space.shape == (4, 2)
    np.testing.assert_array_equal(env.action_space.low, -np.ones((4, 2), np.float32))
    np.testing.assert_array_equal(env.action_space.high, np.ones((4, 2), np.float32))
    _check_env_without_warnings(env)


# --------------------------------------------------------------------------------------------
# ActionChunk on a counting env with known rewards
# --------------------------------------------------------------------------------------------


class CountingEnv(gym.Env):
    """Reward at the k-th step (k = 1, 2, ...) is k + 10 a; terminates at step ``end``; records actions."""

    def __init__(self, end: int = 5) -> None:
        self.end = end
        self.observation_space = gym.spaces.Box(0.0, 1000.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.k = 0
        self.received: list[float] = []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.k = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.k += 1
        self.received.append(float(np.asarray(action)[0]))
        reward = self.k + 10.0 * float(action[0])
        return np.full(1, self.k, np.float32), reward, self.k >= self.end, False, {"k": self.k}


def test_action_chunk_sums_rewards_clips_and_stops_at_termination() -> None:
    inner = CountingEnv(end=5)
    env = ActionChunk(inner, 3)
    env.reset(seed=0)
    obs, reward, term, trunc, info = env.step(np.array([[0.5], [2.0], [-3.0]]))
    assert inner.received == [0.5, 1.0, -1.0]  # clipped to the inner action space
    assert reward == pytest.approx((1 + 5) + (2 + 10) + (3 - 10))
    assert (term, trunc, info["chunk_steps"], info["k"], float(obs[0])) == (False, False, 3, 3, 3.0)
    obs, reward, term, trunc, info = env.step(np.array([[0.1], [0.2], [0.3]]))
    # steps 4 and 5, then the episode terminates: the third action is never executed
    assert inner.received[3:] == pytest.approx([0.1, 0.2])
    assert reward == pytest.approx((4 + 1) + (5 + 2))
    assert (term, trunc, info["chunk_steps"], float(obs[0])) == (True, False, 2, 5.0)


def test_action_chunk_stops_at_truncation() -> None:
    inner = CountingEnv(end=100)
    env = ActionChunk(gym.wrappers.TimeLimit(inner, max_episode_steps=4), 3)
    env.reset(seed=0)
    _, reward, term, trunc, info = env.step(np.zeros((3, 1)))
    assert (reward, term, trunc, info["chunk_steps"]) == (6.0, False, False, 3)
    _, reward, term, trunc, info = env.step(np.zeros((3, 1)))
    assert (reward, term, trunc, info["chunk_steps"]) == (4.0, False, True, 1)
    assert len(inner.received) == 4


def test_action_chunk_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ActionChunk(CountingEnv(), 0)
    discrete = CountingEnv()
    discrete.action_space = gym.spaces.Discrete(3)
    with pytest.raises(ValueError):
        ActionChunk(discrete, 2)


# --------------------------------------------------------------------------------------------
# TwoGoal dynamics, goals, time limit
# --------------------------------------------------------------------------------------------


def _straight_line(start: np.ndarray, goal: np.ndarray) -> tuple[np.ndarray, int]:
    """Unit direction to the goal and the number of full-speed steps until within the radius."""
    delta = goal.astype(np.float64) - start.astype(np.float64)
    dist = float(np.linalg.norm(delta))
    ratio = (dist - RADIUS) / SPEED
    # the test is only meaningful away from the boundary case (float32 rounding)
    assert abs(ratio - round(ratio)) > 0.02, ratio
    return (delta / dist).astype(np.float32), math.floor(ratio) + 1


@pytest.mark.parametrize("seed", [0, 1])
def test_drive_to_rewarded_goal_in_chunks(seed) -> None:
    env = envs.make_env(ENV_ID, 4)
    start, _ = env.reset(seed=seed)
    assert np.linalg.norm(start) < 0.2  # starts near the origin
    direction, n = _straight_line(start, GOALS[REWARDED_GOAL])
    assert 8 < n <= 12  # a distance of ~0.99 at 0.1 per step, minus the radius
    chunk = np.repeat(direction[None], 4, axis=0)
    taken, rewards = [], []
    while True:
        obs, reward, term, trunc, info = env.step(chunk)
        taken.append(info["chunk_steps"])
        rewards.append(reward)
        if term or trunc:
            break
    full, rest = divmod(n, 4)
    assert taken == [4] * full + ([rest] if rest else [])
    assert rewards == [0.0] * (len(taken) - 1) + [1.0]
    assert term and not trunc and info["success"] is True
    np.testing.assert_allclose(obs, start + SPEED * n * direction, atol=1e-5)
    assert np.linalg.norm(obs - GOALS[REWARDED_GOAL]) < RADIUS


def test_other_goal_pays_nothing() -> None:
    env = ActionChunk(TwoGoalEnv(), 16)
    start, _ = env.reset(seed=3)
    other = 1 - REWARDED_GOAL
    direction, n = _straight_line(start, GOALS[other])
    obs, reward, term, trunc, info = env.step(np.repeat(direction[None], 16, axis=0))
    assert info["chunk_steps"] == n
    assert reward == 0.0 and term and not trunc and info["success"] is False
    assert np.linalg.norm(obs - GOALS[other]) < RADIUS


def test_actions_are_clipped() -> None:
    env = envs.make_env(ENV_ID, 2)
    start, _ = env.reset(seed=4)
    obs, *_ = env.step(np.array([[5.0, -5.0], [0.5, 30.0]]))
    np.testing.assert_allclose(obs, start + SPEED * np.array([1.0 + 0.5, -1.0 + 1.0]), atol=1e-6)
    raw = TwoGoalEnv()
    start, _ = raw.reset(seed=4)
    obs, *_ = raw.step(np.array([-7.0, 0.25]))
    np.testing.assert_allclose(obs, start + SPEED * np.array([-1.0, 0.25]), atol=1e-6)


def test_position_stays_in_box() -> None:
    raw = TwoGoalEnv()
    raw.reset(seed=0)
    for _ in range(25):
        obs, *_ = raw.step(np.array([0.0, -1.0]))
    np.testing.assert_allclose(obs[1], -1.5)


def test_time_limit_truncates_at_30_steps() -> None:
    env = gym.make(ENV_ID)
    env.reset(seed=0)
    for step in range(1, 31):
        _, reward, term, trunc, _ = env.step(np.zeros(2, np.float32))
        assert not term and reward == 0.0
        assert trunc == (step == 30), step
    chunked = envs.make_env(ENV_ID, 4)
    chunked.reset(seed=0)
    steps = []
    for _ in range(8):  # 7 chunks of 4 = 28 steps, then 2 more
        _, _, term, trunc, info = chunked.step(np.zeros((4, 2), np.float32))
        steps.append((info["chunk_steps"], term, trunc))
    assert steps == [(4, False, False)] * 7 + [(2, False, True)]


# --------------------------------------------------------------------------------------------
# scripted demonstrations
# --------------------------------------------------------------------------------------------


def test_scripted_demos_structure_dynamics_and_bimodality() -> None:
    n_ep = 40
    d = scripted_demos(n_ep, seed=0)
    obs, act, ends = d["observations"], d["actions"], d["episode_ends"]
    assert obs.dtype == np.float32 and act.dtype == np.float32 and ends.dtype == np.int64
    assert obs.shape == act.shape and obs.shape[1] == 2
    assert len(ends) == n_ep and ends[-1] == len(obs) and np.all(np.diff(ends) > 0) and ends[0] > 0
    assert np.all(np.diff(np.concatenate([[0], ends])) <= 30)
    assert np.all(np.abs(act) <= 1.0)
    starts = np.concatenate([[0], ends[:-1]])
    near = []
    for s, e in zip(starts, ends, strict=True):
        assert np.linalg.norm(obs[s]) < 0.2  # episodes start near the origin
        # within an episode, the next observation follows x += 0.1 a
        np.testing.assert_allclose(obs[s + 1 : e], obs[s : e - 1] + SPEED * act[s : e - 1], atol=1e-5)
        final = obs[e - 1] + SPEED * act[e - 1]
        dists = np.linalg.norm(GOALS - final, axis=1)
        assert dists.min() < RADIUS  # every demonstration reaches a goal
        near.append(int(np.argmin(dists)))
    frac = np.mean(np.array(near) == REWARDED_GOAL)
    assert 0.35 <= frac <= 0.65  # bimodal: about half the demonstrations go to each goal
    assert envs.DEMONSTRATORS[ENV_ID] is scripted_demos


def test_scripted_demos_seeding() -> None:
    a, b, c = scripted_demos(6, seed=1), scripted_demos(6, seed=1), scripted_demos(6, seed=2)
    for key in ("observations", "actions", "episode_ends"):
        np.testing.assert_array_equal(a[key], b[key])
    assert len(a["actions"]) != len(c["actions"]) or not np.array_equal(a["actions"], c["actions"])
    assert not np.array_equal(a["observations"][0], c["observations"][0])
