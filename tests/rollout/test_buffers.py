"""The collector's reworked hot path (issue 27) records exactly what the old path recorded.

Oracle: a copy of the old recording, kept here: the old ``GymVectorEnv.step`` (two float32
conversions, a per-env loop for the final observations) and the old ``EnvShard.collect`` /
``collect_episodes`` (rewards converted step by step, episodes gathered env by env, env steps
summed step by step). A shard built from the same spec runs it, and every
field of the Rollout (each sample field, the episode lists and per-env tensors) is compared
with the new shard's, dtype included: a field that changes fails here.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from flowrl.core.env_step import EnvStep
from flowrl.rollout.collector import InProcessCollector
from flowrl.rollout.rollout import Rollout
from flowrl.rollout.shard import EnvShard, EnvSpec
from flowrl.rollout.vector_env import per_env
from tests.rollout.test_collector import steer_policy, tiny_policy
from tests.rollout.test_success_once import ENV_ID as ONCE_ID
from tests.rollout.test_success_once import _register

TIME_MAJOR = ("obs", "next_obs", "rewards", "terminated", "truncated", "valid")


def old_vector_step(shard: EnvShard, actions: torch.Tensor) -> EnvStep:
    """The old GymVectorEnv.step."""
    num_envs, vec = shard.num_envs, shard.envs.envs  # type: ignore[attr-defined]
    next_obs, reward, terminated, truncated, info = vec.step(actions.detach().cpu().numpy())
    reached = np.array(next_obs, dtype=np.float32, copy=True)
    done = terminated | truncated
    success = np.zeros(num_envs, dtype=bool)
    if done.any():
        success = per_env(info, "success", num_envs, False).astype(bool)
        for i in np.flatnonzero(done):
            reached[i] = info["final_obs"][i]
    once = None
    if "success_once" in info or "success_once" in info.get("final_info", {}):
        once = torch.from_numpy(per_env(info, "success_once", num_envs, False).astype(bool))
    return EnvStep(
        obs=torch.as_tensor(next_obs, dtype=torch.float32),
        reached=torch.from_numpy(reached),
        reward=torch.as_tensor(reward),
        terminated=torch.as_tensor(terminated),
        truncated=torch.as_tensor(truncated),
        success=torch.from_numpy(success),
        env_steps=torch.from_numpy(per_env(info, "chunk_steps", num_envs, 1).astype(np.int64)),
        success_once=once,
    )


def _old_step(shard: EnvShard, policy, iteration: int):
    obs = shard._obs
    sample = policy.sample(obs, iteration, shard.generator)
    step = old_vector_step(shard, sample.final)
    shard._obs = step.obs
    return obs, sample, step


def _record(rows, obs, step, valid) -> None:
    values = (obs, step.reached, step.reward.to(torch.float32), step.terminated, step.truncated, valid)
    for key, value in zip(TIME_MAJOR, values, strict=True):
        rows[key].append(value)


def old_collect(shard: EnvShard, policy, num_steps: int, iteration: int) -> Rollout:
    """The old EnvShard.collect."""
    rows: dict = {k: [] for k in TIME_MAJOR}
    samples, env_steps, ep_returns, ep_successes, ep_once = [], 0, [], [], []
    every = torch.ones(shard.num_envs, dtype=torch.bool)
    for _ in range(num_steps):
        obs, sample, step = _old_step(shard, policy, iteration)
        done = (step.terminated | step.truncated).cpu().numpy()
        shard._returns += step.reward.cpu().numpy()
        for i in np.flatnonzero(done):
            ep_returns.append(float(shard._returns[i]))
            ep_successes.append(float(bool(step.success[i])))
            if step.success_once is not None:
                ep_once.append(float(bool(step.success_once[i])))
            shard._returns[i] = 0.0
        env_steps += int(step.env_steps.sum())
        _record(rows, obs, step, every)
        samples.append(sample)
    return Rollout(
        **{k: torch.stack(v) for k, v in rows.items()},
        samples=type(samples[0]).stack(samples),
        group=shard.group.clone(),
        env_steps=env_steps,
        episode_returns=ep_returns,
        episode_successes=ep_successes,
        episode_successes_once=ep_once,
    )


def old_collect_episodes(shard: EnvShard, policy, max_steps: int, iteration: int) -> Rollout:
    """The old EnvShard.collect_episodes."""
    shard.reset(iteration)
    rows: dict = {k: [] for k in TIME_MAJOR}
    samples, env_steps, n = [], 0, shard.num_envs
    active = torch.ones(n, dtype=torch.bool)
    returns = torch.zeros(n, dtype=torch.float64)
    success = torch.zeros(n, dtype=torch.bool)
    once = None
    for _ in range(max_steps):
        if not bool(active.any()):
            break
        obs, sample, step = _old_step(shard, policy, iteration)
        valid = active.clone()
        returns += torch.where(valid, step.reward.double(), torch.zeros_like(returns))
        ended = valid & (step.terminated | step.truncated)
        success |= ended & step.success
        if step.success_once is not None:
            once = (torch.zeros_like(success) if once is None else once) | (valid & step.success_once)
        active &= ~ended
        env_steps += int(step.env_steps[valid].sum())
        _record(rows, obs, step, valid)
        samples.append(sample)
    done = ~active
    shard._obs = None
    return Rollout(
        **{k: torch.stack(v) for k, v in rows.items()},
        samples=type(samples[0]).stack(samples),
        group=shard.group.clone(),
        env_steps=env_steps,
        episode_returns=returns[done].tolist(),
        episode_successes=success[done].float().tolist(),
        episode_return=returns.float(),
        episode_success=success,
        episode_done=done,
        episode_successes_once=[] if once is None else once[done].float().tolist(),
        episode_success_once=once,
    )


def assert_same(new: Rollout, old: Rollout) -> None:
    """Every field of the two rollouts equal, tensors in value, dtype and shape."""
    for f in fields(Rollout):
        a, b = getattr(new, f.name), getattr(old, f.name)
        if f.name == "samples":
            for g in fields(a):
                x, y = getattr(a, g.name), getattr(b, g.name)
                assert x.dtype == y.dtype and torch.equal(x, y), f"samples.{g.name}"
        elif isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f.name
        else:
            assert a == b, f.name


# (env id, horizon, envs, policy steps): TwoGoal with the steering policy (episodes end at different
# steps, some by the time limit); an env reporting success_once; Hopper (float64 observations).
CASES = [("flowrl/TwoGoal-v0", 1, 4, 40), (ONCE_ID, 1, 4, 8), ("Hopper-v5", 4, 4, 12)]


def _policy(env_id: str, horizon: int):
    if env_id == "flowrl/TwoGoal-v0":
        return steer_policy(horizon)
    if env_id == "Hopper-v5":
        from flowrl.bench.rollout import _policy as bench_policy

        return bench_policy(env_id, horizon, 2)
    return tiny_policy(horizon)


@pytest.mark.parametrize("env_id, horizon, num_envs, steps", CASES)
def test_step_collection_records_what_the_old_path_recorded(env_id, horizon, num_envs, steps) -> None:
    _register()
    spec = EnvSpec(env_id, horizon, num_envs, seed=5)
    policy = _policy(env_id, horizon)
    new, old = EnvShard(spec), EnvShard(spec)
    try:
        new.reset(0), old.reset(0)
        for iteration in range(2):  # the second collection continues the episodes of the first
            a, b = new.collect(policy, steps, iteration), old_collect(old, policy, steps, iteration)
            assert b.episode_returns, "the case should end some episodes"
            assert_same(a, b)
    finally:
        new.close(), old.close()


@pytest.mark.parametrize("env_id, horizon, num_envs, steps", CASES)
def test_episode_collection_records_what_the_old_path_recorded(env_id, horizon, num_envs, steps) -> None:
    _register()
    spec = EnvSpec(env_id, horizon, num_envs, seed=5, group_size=2)
    policy = _policy(env_id, horizon)
    new, old = EnvShard(spec), EnvShard(spec)
    try:
        for budget in (steps, 2):  # episodes that all end (an early stop), then a budget that cuts them
            a, b = new.collect_episodes(policy, budget, 1), old_collect_episodes(old, policy, budget, 1)
            assert_same(a, b)
    finally:
        new.close(), old.close()


def test_two_shards_joined_record_what_the_old_path_recorded() -> None:
    spec = EnvSpec("flowrl/TwoGoal-v0", 1, 4, seed=2)
    policy = steer_policy(1)
    collector = InProcessCollector(spec, num_workers=2)
    old = [EnvShard(s) for s in spec.shards(2)]
    try:
        collector.reset(0)
        for shard in old:
            shard.reset(0)
        new = collector.collect(policy, 40, 0)
        assert_same(new, Rollout.concat_envs([old_collect(s, policy, 40, 0) for s in old]))
        new = collector.collect_episodes(policy, 40, 3)
        assert_same(new, Rollout.concat_envs([old_collect_episodes(s, policy, 40, 3) for s in old]))
    finally:
        collector.close()
        for shard in old:
            shard.close()
