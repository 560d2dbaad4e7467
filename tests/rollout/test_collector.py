"""Tests of flowrl.rollout.collector with tiny policies on TwoGoal.

Oracles: a hand replay of the point-mass dynamics (x += 0.1 clip(a), goal radius 0.12,
30-step time limit) from the recorded observations and actions; separately built EnvShards;
policies whose actions are known (a constant velocity field that saturates the actions).
"""

from __future__ import annotations

from operator import attrgetter

import numpy as np
import pytest
import torch

from envs.toy import GOALS, REWARDED_GOAL
from flowrl.core.windows import OneRandomStep
from flowrl.models.flow_policy import FlowPolicy, ReinFlowConverter
from flowrl.models.networks import ReinFlowNoiseNet, VelocityMLP
from flowrl.rollout.collector import EnvShard, InProcessCollector, Rollout, evaluate_policy

ENV_ID = "flowrl/TwoGoal-v0"
O, DA, K = 2, 2, 2
SPEED, RADIUS, MAX_STEPS = np.float32(0.1), 0.12, 30
TENSOR_FIELDS = (
    "obs",
    "next_obs",
    "samples.chain",
    "samples.mask",
    "samples.log_prob",
    "rewards",
    "terminated",
    "truncated",
)


def tiny_policy(horizon: int, seed: int = 0, window=None) -> FlowPolicy:
    torch.manual_seed(seed)
    velocity = VelocityMLP(O, horizon, DA, hidden_dims=(8,), time_dim=4)
    noise = ReinFlowNoiseNet(O, horizon, DA, 0.05, 0.1, hidden_dims=(4,), time_dim=4)
    return FlowPolicy(velocity, K, ReinFlowConverter(noise), window)


def constant_policy(horizon: int, direction: tuple[float, float]) -> FlowPolicy:
    """v = 5 * direction everywhere, so x_K = x_0 + 5 direction + small noise: actions saturate at
    +-1 along ``direction`` (x_0 ~ N(0, 1) is below -4 with probability ~3e-5)."""
    policy = tiny_policy(horizon)
    with torch.no_grad():
        last = policy.velocity.net[-1]
        last.weight.zero_()
        last.bias.copy_((5.0 * torch.tensor(direction)).repeat(horizon))
    return policy


def replay(rollout: Rollout, horizon: int) -> dict:
    """Re-run the point-mass dynamics by hand from each recorded observation and chunk."""
    T, N = rollout.rewards.shape
    out = {
        "env_steps": 0,
        "next_obs": np.zeros((T, N, 2), np.float32),
        "rewards": np.zeros((T, N)),
        "terminated": np.zeros((T, N), bool),
        "truncated": np.zeros((T, N), bool),
        "returns": [[] for _ in range(N)],
        "successes": [[] for _ in range(N)],
    }
    for i in range(N):
        elapsed, ret = 0, 0.0
        for t in range(T):
            pos = rollout.obs[t, i].numpy().astype(np.float32)
            chunk = np.clip(rollout.samples.chain[t, i, -1].numpy().astype(np.float32), -1.0, 1.0)
            reached = -1
            for a in chunk:
                pos = np.clip(pos + SPEED * a, -1.5, 1.5).astype(np.float32)
                out["env_steps"] += 1
                elapsed += 1
                dists = np.linalg.norm(GOALS - pos, axis=1)
                if dists.min() < RADIUS:
                    reached = int(np.argmin(dists))
                    break
                if elapsed == MAX_STEPS:
                    break
            reward = 1.0 if reached == REWARDED_GOAL else 0.0
            ret += reward
            out["next_obs"][t, i] = pos
            out["rewards"][t, i] = reward
            out["terminated"][t, i] = reached >= 0
            out["truncated"][t, i] = reached < 0 and elapsed == MAX_STEPS
            if reached >= 0 or elapsed == MAX_STEPS:
                out["returns"][i].append(ret)
                out["successes"][i].append(float(reached == REWARDED_GOAL))
                elapsed, ret = 0, 0.0
    return out


def _collect(policy, horizon, num_envs, seed, steps, num_shards=1, iteration=0) -> Rollout:
    collector = InProcessCollector(ENV_ID, horizon, num_envs, seed, num_shards)
    try:
        collector.reset(0)
        return collector.collect(policy, steps, iteration)
    finally:
        collector.close()


def _assert_rollouts_equal(a: Rollout, b: Rollout) -> None:
    for name in TENSOR_FIELDS:
        assert torch.equal(attrgetter(name)(a), attrgetter(name)(b)), name
    assert a.env_steps == b.env_steps
    assert a.episode_returns == b.episode_returns and a.episode_successes == b.episode_successes


def test_rollout_shapes() -> None:
    horizon, n, steps = 3, 4, 5
    r = _collect(tiny_policy(horizon), horizon, n, seed=0, steps=steps)
    assert r.obs.shape == r.next_obs.shape == (steps, n, O)
    assert r.samples.chain.shape == (steps, n, K + 1, horizon, DA)
    assert r.samples.mask.shape == (steps, n, K) and r.samples.mask.dtype == torch.bool
    for name in ("samples.log_prob", "rewards", "terminated", "truncated"):
        assert attrgetter(name)(r).shape == (steps, n), name
    assert r.terminated.dtype == torch.bool and r.truncated.dtype == torch.bool
    assert r.obs.dtype == torch.float32 and r.rewards.dtype == torch.float32
    # the stored log-probs are those of the stored chains
    policy = tiny_policy(horizon)
    lp, _ = policy.log_prob(r.obs.flatten(0, 1), r.samples.flatten(0, 1))
    torch.testing.assert_close(lp.view(steps, n), r.samples.log_prob, rtol=1e-5, atol=1e-5)


def test_same_seed_same_rollout_other_seed_differs() -> None:
    policy = tiny_policy(2, window=OneRandomStep())
    a = _collect(policy, 2, 3, seed=7, steps=4)
    b = _collect(policy, 2, 3, seed=7, steps=4)
    c = _collect(policy, 2, 3, seed=8, steps=4)
    _assert_rollouts_equal(a, b)
    assert not torch.equal(a.obs[0], c.obs[0])  # other env seeds
    assert not torch.equal(a.samples.chain[:, :, 0], c.samples.chain[:, :, 0])  # other policy noise
    # collecting again after reset(0) repeats the rollout; a new epoch gives a new one
    collector = InProcessCollector(ENV_ID, 2, 3, 7)
    collector.reset(0)
    _assert_rollouts_equal(collector.collect(policy, 4, 0), a)
    collector.reset(0)
    _assert_rollouts_equal(collector.collect(policy, 4, 0), a)
    collector.reset(1)
    assert not torch.equal(collector.collect(policy, 4, 0).obs[0], a.obs[0])
    collector.close()


def test_env_steps_without_episode_ends() -> None:
    # 2 chunks of 2 steps: at most 4 steps of length <= 0.1 * sqrt(2) from a start within ~0.15 of
    # the origin can not come within 0.12 of a goal at distance 0.99, and 4 < 30: no episode ends.
    horizon, n, steps = 2, 4, 2
    r = _collect(tiny_policy(horizon), horizon, n, seed=1, steps=steps)
    assert not bool((r.terminated | r.truncated).any())
    assert r.env_steps == horizon * steps * n
    assert r.episode_returns == [] and r.episode_successes == []
    assert torch.equal(r.next_obs[:-1], r.obs[1:])


@pytest.mark.parametrize("policy_kind, seed", [("random", 0), ("random", 5), ("rewarded", 0), ("other", 2)])
def test_rollout_matches_hand_replay(policy_kind, seed) -> None:
    horizon, n, steps = 4, 3, 12
    if policy_kind == "random":
        policy = tiny_policy(horizon, seed)
    elif policy_kind == "rewarded":
        policy = constant_policy(horizon, (1.0, 1.0))  # diagonal, straight to GOALS[0] = (0.7, 0.7)
    else:
        policy = constant_policy(horizon, (-1.0, 1.0))  # straight to GOALS[1] = (-0.7, 0.7)
    r = _collect(policy, horizon, n, seed=seed, steps=steps)
    ref = replay(r, horizon)
    assert r.env_steps == ref["env_steps"]
    np.testing.assert_allclose(r.next_obs.numpy(), ref["next_obs"], atol=1e-6)
    np.testing.assert_array_equal(r.rewards.numpy(), ref["rewards"])
    np.testing.assert_array_equal(r.terminated.numpy(), ref["terminated"])
    np.testing.assert_array_equal(r.truncated.numpy(), ref["truncated"])
    done = (r.terminated | r.truncated).numpy()
    assert done.any()  # 12 chunks of 4 steps exceed the 30-step limit: every env ends at least once
    # next_obs is obs[t + 1] unless the episode ended; then it is the final observation, and
    # obs[t + 1] is a fresh start near the origin
    for t in range(steps - 1):
        for i in range(n):
            if done[t, i]:
                assert not torch.equal(r.next_obs[t, i], r.obs[t + 1, i])
                assert float(r.obs[t + 1, i].norm()) < 0.2
            else:
                assert torch.equal(r.next_obs[t, i], r.obs[t + 1, i])
    # episodes: one entry per ended episode, returns and successes as replayed (any order across envs)
    assert len(r.episode_returns) == len(r.episode_successes) == int(done.sum())
    assert sorted(r.episode_returns) == sorted(x for env in ref["returns"] for x in env)
    assert sorted(r.episode_successes) == sorted(x for env in ref["successes"] for x in env)
    if policy_kind == "rewarded":
        assert r.episode_successes == [1.0] * len(r.episode_successes)
        assert r.episode_returns == [1.0] * len(r.episode_returns)
        assert bool(r.terminated.any()) and not bool(r.truncated.any())
    elif policy_kind == "other":
        assert bool(r.terminated.any()) and r.episode_successes == [0.0] * len(r.episode_successes)
    else:
        assert bool(r.truncated.any())


def test_two_shards_are_two_separately_seeded_envshards() -> None:
    horizon, steps, seed = 3, 6, 11
    policy = tiny_policy(horizon, window=OneRandomStep())
    combined = _collect(policy, horizon, 4, seed=seed, steps=steps, num_shards=2)
    parts = []
    for index in (0, 1):
        shard = EnvShard(ENV_ID, horizon, 2, seed, index)
        shard.reset(0)
        parts.append(shard.collect(policy, steps, 0))
        shard.close()
    assert not torch.equal(parts[0].obs, parts[1].obs)
    for name in TENSOR_FIELDS:
        assert torch.equal(attrgetter(name)(combined), torch.cat([attrgetter(name)(p) for p in parts], dim=1)), name
    assert combined.env_steps == parts[0].env_steps + parts[1].env_steps
    assert combined.episode_returns == parts[0].episode_returns + parts[1].episode_returns
    with pytest.raises(ValueError):
        InProcessCollector(ENV_ID, horizon, 3, seed, num_shards=2)


def test_evaluate_policy_range_and_determinism() -> None:
    horizon = 4
    policy = tiny_policy(horizon)
    a = evaluate_policy(policy, ENV_ID, horizon, episodes=6, seed=0)
    b = evaluate_policy(policy, ENV_ID, horizon, episodes=6, seed=0)
    assert a == b
    assert set(a) == {"eval/return", "eval/success_rate", "eval/episode_length"}
    assert 0.0 <= a["eval/success_rate"] <= 1.0
    assert 1.0 <= a["eval/episode_length"] <= MAX_STEPS
    # known outcomes: a policy driving to the rewarded goal always succeeds, one driving to the other never
    good = evaluate_policy(constant_policy(horizon, (1.0, 1.0)), ENV_ID, horizon, episodes=6, seed=0)
    assert good["eval/success_rate"] == 1.0 and good["eval/return"] == 1.0
    assert good["eval/episode_length"] < 10  # ~0.87 / 0.141 diagonal steps
    bad = evaluate_policy(constant_policy(horizon, (-1.0, 1.0)), ENV_ID, horizon, episodes=6, seed=0)
    assert bad["eval/success_rate"] == 0.0 and bad["eval/return"] == 0.0 and bad["eval/episode_length"] < 10
