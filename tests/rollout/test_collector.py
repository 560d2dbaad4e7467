"""Tests of the collectors (flowrl.rollout: rollout, shard, collector, evaluation) with tiny policies on TwoGoal.

Oracles: a hand replay of the point-mass dynamics (x += 0.1 clip(a), goal radius 0.12,
30-step time limit) from the recorded observations and actions; separately built EnvShards;
policies whose actions are known (a constant velocity field that saturates the actions, a
closed-loop steering field); for episode collection, the valid mask, returns and env steps
recomputed from that replay, and the shards' rollouts padded by hand.
"""

from __future__ import annotations

from operator import attrgetter

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from envs.toy import GOALS, REWARDED_GOAL
from flowrl.config import build_config
from flowrl.core.windows import OneRandomStep
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.networks import ReinFlowNoiseNet, VelocityMLP
from flowrl.models.sampler import ChainSampler, ReinFlowConverter
from flowrl.rollout.build import make_collector
from flowrl.rollout.collector import InProcessCollector
from flowrl.rollout.evaluation import evaluate_policy, headline_success
from flowrl.rollout.rollout import Rollout
from flowrl.rollout.shard import EnvShard, EnvSpec

ENV_ID = "flowrl/TwoGoal-v0"
O, DA, K = 2, 2, 2
SPEED, RADIUS, MAX_STEPS = np.float32(0.1), 0.12, 30
EPISODE_FIELDS = ("episode_return", "episode_success", "episode_done")
TENSOR_FIELDS = (
    "obs",
    "next_obs",
    "samples.final",
    "samples.x_in",
    "samples.x_out",
    "samples.steps",
    "samples.log_prob",
    "samples.nfe",
    "rewards",
    "terminated",
    "truncated",
    "valid",
    "group",
)


def tiny_policy(horizon: int, seed: int = 0, window=None) -> FlowPolicy:
    torch.manual_seed(seed)
    velocity = VelocityMLP(O, horizon, DA, hidden_dims=(8,), time_dim=4)
    noise = ReinFlowNoiseNet(O, horizon, DA, 0.05, 0.1, hidden_dims=(4,), time_dim=4)
    return FlowPolicy(velocity, ChainSampler(K, ReinFlowConverter(noise), window))


def constant_policy(horizon: int, direction: tuple[float, float]) -> FlowPolicy:
    """v = 5 * direction everywhere, so x_K = x_0 + 5 direction + small noise: actions saturate at
    +-1 along ``direction`` (x_0 ~ N(0, 1) is below -4 with probability ~3e-5)."""
    policy = tiny_policy(horizon)
    with torch.no_grad():
        last = policy.velocity.net[-1]
        last.weight.zero_()
        last.bias.copy_((5.0 * torch.tensor(direction)).repeat(horizon))
    return policy


class SteerVelocity(nn.Module):
    """Closed-loop driver (with one-step chunks): from a start with y < 0 down into the wall (the episode
    runs to the time limit), else to the goal on the start's side, the rewarded one for x >= 0. An env
    whose first episode ends early runs more episodes while the rest of its shard is still going."""

    def __init__(self, horizon: int) -> None:
        super().__init__()
        self.event_shape = (horizon, DA)
        self.gain = nn.Parameter(torch.tensor(50.0))  # saturates the actions until close to the target

    def forward(self, obs, x, t, t_next=None):
        goals = torch.as_tensor(GOALS)
        target = torch.where(obs[:, :1] >= 0, goals[REWARDED_GOAL], goals[1 - REWARDED_GOAL])
        target = torch.where(obs[:, 1:] < 0, torch.tensor([0.0, -1.5]), target)
        return (self.gain * (target - obs)).unsqueeze(1).expand(-1, self.event_shape[0], DA)


def steer_policy(horizon: int) -> FlowPolicy:
    torch.manual_seed(0)
    noise = ReinFlowNoiseNet(O, horizon, DA, 0.05, 0.1, hidden_dims=(4,), time_dim=4)
    return FlowPolicy(SteerVelocity(horizon), ChainSampler(K, ReinFlowConverter(noise)))


def replay(rollout: Rollout, horizon: int) -> dict:
    """Re-run the point-mass dynamics by hand from each recorded observation and chunk."""
    T, N = rollout.rewards.shape
    out = {
        "env_steps": 0,
        "chunk_steps": np.zeros((T, N), np.int64),
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
            chunk = np.clip(rollout.samples.final[t, i].numpy().astype(np.float32), -1.0, 1.0)
            reached = -1
            for a in chunk:
                pos = np.clip(pos + SPEED * a, -1.5, 1.5).astype(np.float32)
                out["env_steps"] += 1
                out["chunk_steps"][t, i] += 1
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


def _env_axis(name: str) -> int:
    """The env axis of a rollout field: per-env fields are ``[N]``, the others ``[T, N, ...]``."""
    return 0 if name == "group" or name in EPISODE_FIELDS else 1


def _collect(policy, horizon, num_envs, seed, steps, num_workers=1, iteration=0, group_size=1) -> Rollout:
    collector = InProcessCollector(EnvSpec(ENV_ID, horizon, num_envs, seed, group_size=group_size), num_workers)
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
    for name in EPISODE_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name


def test_rollout_shapes() -> None:
    horizon, n, steps = 3, 4, 5
    r = _collect(tiny_policy(horizon), horizon, n, seed=0, steps=steps)
    assert r.obs.shape == r.next_obs.shape == (steps, n, O)
    # every one of the K steps is stochastic (default window): all K are stored, in step order
    assert r.samples.final.shape == (steps, n, horizon, DA)
    assert r.samples.x_in.shape == r.samples.x_out.shape == (steps, n, K, horizon, DA)
    assert r.samples.steps.dtype == torch.int64
    assert torch.equal(r.samples.steps, torch.arange(K).expand(steps, n, K))
    assert r.samples.log_prob.shape == (steps, n, K)
    assert r.samples.nfe.shape == (steps, n) and bool((r.samples.nfe == K).all())  # Euler: one NFE per step
    # the stored steps are one chain: each step starts where the previous one ended, the last gives the actions
    assert torch.equal(r.samples.x_in[:, :, 1:], r.samples.x_out[:, :, :-1])
    assert torch.equal(r.samples.final, r.samples.x_out[:, :, -1])
    for name in ("rewards", "terminated", "truncated", "valid"):
        assert attrgetter(name)(r).shape == (steps, n), name
    assert r.terminated.dtype == torch.bool and r.truncated.dtype == torch.bool
    assert r.valid.dtype == torch.bool and bool(r.valid.all())  # collect: every step is a training step
    assert torch.equal(r.group, torch.arange(n))  # group_size 1: every env its own group
    assert r.episode_return is None and r.episode_success is None and r.episode_done is None
    assert r.obs.dtype == torch.float32 and r.rewards.dtype == torch.float32
    # the stored log-probs are those of the stored chains
    policy = tiny_policy(horizon)
    lp = policy.evaluate(r.obs.flatten(0, 1), r.samples.flatten(0, 1)).log_prob
    torch.testing.assert_close(lp.view(steps, n, K), r.samples.log_prob, rtol=1e-5, atol=1e-5)


def test_same_seed_same_rollout_other_seed_differs() -> None:
    policy = tiny_policy(2, window=OneRandomStep())
    a = _collect(policy, 2, 3, seed=7, steps=4)
    b = _collect(policy, 2, 3, seed=7, steps=4)
    c = _collect(policy, 2, 3, seed=8, steps=4)
    _assert_rollouts_equal(a, b)
    assert not torch.equal(a.obs[0], c.obs[0])  # other env seeds
    # other policy noise: other window draws, and other initial noise x_0 (x_in where the stochastic step is 0)
    assert not torch.equal(a.samples.steps, c.samples.steps)
    first = (a.samples.steps == 0) & (c.samples.steps == 0)
    assert bool(first.any())
    assert not torch.equal(a.samples.x_in[first], c.samples.x_in[first])
    # collecting again after reset(0) repeats the rollout; a new epoch gives a new one
    collector = InProcessCollector(EnvSpec(ENV_ID, 2, 3, 7))
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
    combined = _collect(policy, horizon, 4, seed=seed, steps=steps, num_workers=2)
    parts = []
    for index in (0, 1):
        shard = EnvShard(EnvSpec(ENV_ID, horizon, 2, seed, index))
        shard.reset(0)
        parts.append(shard.collect(policy, steps, 0))
        shard.close()
    assert not torch.equal(parts[0].obs, parts[1].obs)
    for name in TENSOR_FIELDS:
        joined = torch.cat([attrgetter(name)(p) for p in parts], dim=_env_axis(name))
        assert torch.equal(attrgetter(name)(combined), joined), name
    assert torch.equal(combined.group, torch.arange(4))  # groups are numbered over all shards
    assert combined.env_steps == parts[0].env_steps + parts[1].env_steps
    assert combined.episode_returns == parts[0].episode_returns + parts[1].episode_returns
    with pytest.raises(ValueError):
        InProcessCollector(EnvSpec(ENV_ID, horizon, 3, seed), num_workers=2)


def test_env_spec_from_the_config_and_split_into_the_workers_shards() -> None:
    cfg = build_config(
        {
            "name": "t",
            "seed": 5,
            "policy": {"horizon": 3},
            "env": {"num_envs": 12, "num_workers": 3, "group_size": 2, "kwargs": {"start_noise": 0.5}},
            "ray": {"enabled": False},
            "algo": {"type": "grpo"},
        }
    )
    spec = EnvSpec.from_config(cfg)
    assert spec == EnvSpec(ENV_ID, 3, 12, 5, 0, {"start_noise": 0.5}, 2)
    shards = [EnvSpec(ENV_ID, 3, 4, 5, i, {"start_noise": 0.5}, 2) for i in range(3)]
    assert spec.shards(3) == shards
    collector = make_collector(cfg)  # the experiment's collector runs exactly these shards
    try:
        assert [shard.spec for shard in collector.shards] == shards
    finally:
        collector.close()


def test_evaluate_policy_range_and_determinism() -> None:
    horizon = 4
    policy = tiny_policy(horizon)
    a = evaluate_policy(policy, ENV_ID, horizon, episodes=6, seed=0)
    b = evaluate_policy(policy, ENV_ID, horizon, episodes=6, seed=0)
    assert a == b
    assert set(a) == {"eval/return", "eval/return_std", "eval/return_iqm", "eval/success_rate", "eval/episode_length"}
    assert 0.0 <= a["eval/success_rate"] <= 1.0
    assert 1.0 <= a["eval/episode_length"] <= MAX_STEPS
    # known outcomes: a policy driving to the rewarded goal always succeeds, one driving to the other never
    good = evaluate_policy(constant_policy(horizon, (1.0, 1.0)), ENV_ID, horizon, episodes=6, seed=0)
    assert good["eval/success_rate"] == 1.0 and good["eval/return"] == 1.0
    assert good["eval/episode_length"] < 10  # ~0.87 / 0.141 diagonal steps
    bad = evaluate_policy(constant_policy(horizon, (-1.0, 1.0)), ENV_ID, horizon, episodes=6, seed=0)
    assert bad["eval/success_rate"] == 0.0 and bad["eval/return"] == 0.0 and bad["eval/episode_length"] < 10


class SucceedsOnceEnv(gym.Env):
    """Succeeds at step 2 only and runs on to the time limit (5 steps), reporting ``success_once``
    as ManiSkill's envs do: success at the end 0, success at some step 1."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (O,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (DA,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(O, np.float32), {}

    def step(self, action):
        self.t += 1
        info = {"success": self.t == 2, "success_once": self.t >= 2}
        return np.zeros(O, np.float32), 0.0, False, False, info


def test_evaluate_policy_reports_success_once_when_the_env_does() -> None:
    if "test/SucceedsOnce-v0" not in gym.registry:
        gym.register("test/SucceedsOnce-v0", entry_point=SucceedsOnceEnv, max_episode_steps=5)
    out = evaluate_policy(tiny_policy(1), "test/SucceedsOnce-v0", 1, episodes=3, seed=0)
    assert out["eval/success_once"] == 1.0 and out["eval/success_rate"] == 0.0
    assert out["eval/episode_length"] == 5.0
    assert headline_success(out) == 1.0  # what the console shows for such envs
    assert headline_success({"eval/success_rate": 0.25}) == 0.25


@pytest.mark.parametrize("failure", ["making the third env", "the policy's first step"])
def test_evaluate_policy_closes_every_env_it_made_when_it_fails(failure, monkeypatch) -> None:
    import envs

    made, closed, real = [], [], envs.make_env

    def make_env(*args, **kwargs):
        if failure == "making the third env" and len(made) == 2:
            raise RuntimeError("out of memory")
        env = real(*args, **kwargs)
        made.append(env)
        env.close = lambda env=env: closed.append(env)  # noqa: PLW0108 - records which env was closed
        return env

    class Failing:
        def act(self, obs, generator):
            raise RuntimeError("out of memory")

    monkeypatch.setattr(envs, "make_env", make_env)
    policy = Failing() if failure == "the policy's first step" else tiny_policy(1)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate_policy(policy, ENV_ID, 1, episodes=4, seed=0)
    assert len(made) == (2 if failure == "making the third env" else 4)
    assert closed == made


# --------------------------------------------------------------------------- reset groups
@pytest.mark.parametrize(("num_envs", "num_workers", "group_size"), [(6, 1, 3), (8, 2, 2), (8, 2, 4), (4, 2, 1)])
@pytest.mark.parametrize("method", ["collect", "collect_episodes"])
def test_reset_groups_share_their_initial_observation(num_envs, num_workers, group_size, method) -> None:
    horizon = 2
    policy = tiny_policy(horizon)
    collector = InProcessCollector(EnvSpec(ENV_ID, horizon, num_envs, 3, group_size=group_size), num_workers)
    try:
        if method == "collect":
            collector.reset(0)
            r = collector.collect(policy, 3, 0)
        else:
            r = collector.collect_episodes(policy, 3, 0)
    finally:
        collector.close()
    expected_group = torch.arange(num_envs) // group_size  # over all shards, not per shard
    assert r.group.dtype == torch.int64 and torch.equal(r.group, expected_group)
    start = r.obs[0]
    for i in range(num_envs):
        for j in range(num_envs):
            same_group = i // group_size == j // group_size
            assert torch.equal(start[i], start[j]) == same_group, (i, j)  # different groups differ, across shards too
    # a group shares its start only: every env draws its own policy noise, so the actions differ
    final = r.samples.final[0].flatten(1)
    assert len({tuple(row.tolist()) for row in final}) == num_envs


def test_group_that_does_not_fit_a_shard_is_refused() -> None:
    with pytest.raises(ValueError, match="whole groups"):
        InProcessCollector(EnvSpec(ENV_ID, 2, 4, 0, group_size=4), 2)  # shards of 2 envs, groups of 4
    with pytest.raises(ValueError, match="whole groups"):
        EnvShard(EnvSpec(ENV_ID, 2, 6, 0, group_size=4))


# --------------------------------------------------------------------------- episode collection
def _first_ends(done: np.ndarray) -> list[int | None]:
    """Per env, the policy step at which its first episode ended (None if none did)."""
    return [int(np.argmax(done[:, i])) if done[:, i].any() else None for i in range(done.shape[1])]


def _pad(t: torch.Tensor, horizon: int) -> torch.Tensor:
    return torch.cat([t, torch.zeros((horizon - t.shape[0], *t.shape[1:]), dtype=t.dtype)])


# (policy, horizon, seed, max_steps, env_kwargs, what the case covers)
EPISODE_CASES = {
    # starts spread out (start_noise 0.3): driving diagonally, some envs hit the rewarded goal after 4-7
    # steps, others miss it and run into the wall; max_steps 12 cuts the latter
    "cut": ("diagonal", 1, 0, 12, {"start_noise": 0.3}),
    # the same with room for every episode (30-step limit): shard 0 is done after 7 steps, shard 1 runs 30
    "padded": ("diagonal", 1, 5, 40, {"start_noise": 0.3}),
    # a random policy: 5 chunks of 4 steps stay short of the time limit, no goal is reached
    "random_cut": ("random", 4, 1, 5, None),
    # 10 chunks of 4 steps exceed the 30-step limit: every episode ends (truncated mid-chunk)
    "random_done": ("random", 4, 2, 10, None),
    # shard 0 runs to the time limit, shard 1 is done after 6 steps; in shard 0 an env whose first episode
    # failed (other goal) succeeds in a later episode: steps that must not count for it
    "later_episodes": ("steer", 1, 5, 40, None),
}


@pytest.mark.parametrize("case", EPISODE_CASES)
def test_collect_episodes_matches_hand_replay(case) -> None:
    kind, horizon, seed, max_steps, env_kwargs = EPISODE_CASES[case]
    num_envs, num_workers = 4, 2
    if kind == "diagonal":
        policy = constant_policy(horizon, (1.0, 1.0))
    elif kind == "steer":
        policy = steer_policy(horizon)
    else:
        policy = tiny_policy(horizon, seed, window=OneRandomStep())
    collector = InProcessCollector(EnvSpec(ENV_ID, horizon, num_envs, seed, env_kwargs=env_kwargs), num_workers)
    r = collector.collect_episodes(policy, max_steps, 0)
    collector.close()
    per_shard = num_envs // num_workers
    parts = []
    for index in range(num_workers):
        shard = EnvShard(EnvSpec(ENV_ID, horizon, per_shard, seed, index, env_kwargs))
        parts.append(shard.collect_episodes(policy, max_steps, 0))
        shard.close()

    valid_parts, done_parts, return_parts, env_steps = [], [], [], 0
    for part in parts:
        # the dynamics by hand over every recorded step (envs keep stepping, and auto-reset, after their
        # episode ended, until every env of the shard is done)
        ref = replay(part, horizon)
        length = part.obs.shape[0]
        np.testing.assert_allclose(part.next_obs.numpy(), ref["next_obs"], atol=1e-6)
        np.testing.assert_array_equal(part.rewards.numpy(), ref["rewards"])
        np.testing.assert_array_equal(part.terminated.numpy(), ref["terminated"])
        np.testing.assert_array_equal(part.truncated.numpy(), ref["truncated"])
        ends = _first_ends(ref["terminated"] | ref["truncated"])
        # the shard stops once all its episodes ended, else after max_steps policy steps
        assert length == (max_steps if None in ends else max(ends) + 1)
        valid = np.zeros((length, per_shard), bool)
        for i, end in enumerate(ends):
            valid[: length if end is None else end + 1, i] = True  # a prefix ending at the first episode's end
        valid_parts.append(valid)
        done_parts.append(np.array([end is not None for end in ends]))
        return_parts.append((ref["rewards"] * valid).sum(0))
        env_steps += int(ref["chunk_steps"][valid].sum())
        np.testing.assert_array_equal(part.valid.numpy(), valid)

    # the shards joined along the env axis, the shorter one padded in time with zero, invalid steps
    horizon_t = max(p.obs.shape[0] for p in parts)
    assert r.obs.shape[:2] == (horizon_t, num_envs)
    for name in TENSOR_FIELDS:
        if name == "group":
            continue
        padded = [_pad(attrgetter(name)(p), horizon_t) for p in parts]
        assert torch.equal(attrgetter(name)(r), torch.cat(padded, dim=1)), name
    expected_valid = np.concatenate([np.pad(v, ((0, horizon_t - v.shape[0]), (0, 0))) for v in valid_parts], axis=1)
    np.testing.assert_array_equal(r.valid.numpy(), expected_valid)
    assert torch.equal(r.group, torch.arange(num_envs))

    done = np.concatenate(done_parts)
    returns = np.concatenate(return_parts)
    np.testing.assert_array_equal(r.episode_done.numpy(), done)
    # the return of every env's episode: the sum of its valid rewards (so far, for a cut episode)
    np.testing.assert_array_equal(r.episode_return.numpy(), returns)
    np.testing.assert_array_equal(r.episode_return.numpy(), (r.rewards * r.valid).sum(0).numpy())
    # TwoGoal pays 1 exactly when the rewarded goal is reached, which ends the episode
    np.testing.assert_array_equal(r.episode_success.numpy(), done & (returns == 1.0))
    assert r.env_steps == env_steps  # primitive steps of the valid policy steps only
    assert r.episode_returns == returns[done].tolist()
    assert r.episode_successes == (done & (returns == 1.0))[done].astype(float).tolist()

    lengths = [p.obs.shape[0] for p in parts]
    if case == "cut":
        assert done.any() and not done.all() and returns[done].min() == 1.0 and lengths == [max_steps] * 2
    elif case == "padded":
        assert done.all() and lengths[0] < lengths[1] and not bool(r.valid[lengths[0] :, :per_shard].any())
        assert bool((r.obs[lengths[0] :, :per_shard] == 0).all())
        assert r.env_steps < horizon * max_steps * num_envs
    elif case == "random_cut":
        assert not done.any() and r.episode_returns == [] and r.env_steps == horizon * max_steps * num_envs
    elif case == "random_done":
        assert done.all() and bool(r.truncated[r.valid].any()) and r.env_steps == MAX_STEPS * num_envs
    else:
        assert done.all() and lengths[1] < lengths[0] == MAX_STEPS
        later_success = ((r.rewards > 0) & ~r.valid).any(0) & ~r.episode_success
        assert bool(later_success.any()) and bool((r.rewards * ~r.valid).sum() > 0)


def test_collect_episodes_same_seed_and_iteration_same_rollout() -> None:
    horizon, num_envs, seed, max_steps = 2, 8, 4, 6
    policy = tiny_policy(horizon, window=OneRandomStep())

    def episodes(iteration: int, collector=None) -> Rollout:
        own = collector is None
        collector = collector or InProcessCollector(EnvSpec(ENV_ID, horizon, num_envs, seed, group_size=2), 2)
        try:
            return collector.collect_episodes(policy, max_steps, iteration)
        finally:
            if own:
                collector.close()

    a, b = episodes(3), episodes(3)
    _assert_rollouts_equal(a, b)
    # the same collector resets at every call: collecting again repeats the rollout
    collector = InProcessCollector(EnvSpec(ENV_ID, horizon, num_envs, seed, group_size=2), 2)
    _assert_rollouts_equal(episodes(3, collector), a)
    _assert_rollouts_equal(episodes(3, collector), a)
    # another iteration: other reset states for every env (still shared within each group)
    c = episodes(4, collector)
    collector.close()
    for i in range(num_envs):
        assert not torch.equal(c.obs[0, i], a.obs[0, i]), i
    assert torch.equal(c.obs[0, 0::2], c.obs[0, 1::2])
    # and a collection after a collect with the same iteration does not depend on that collect
    collector = InProcessCollector(EnvSpec(ENV_ID, horizon, num_envs, seed, group_size=2), 2)
    collector.reset(0)
    collector.collect(policy, 5, 0)
    _assert_rollouts_equal(episodes(3, collector), a)
    collector.close()
