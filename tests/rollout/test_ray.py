"""Ray env workers and reward workers: identical rollouts, restarts, loud failures."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from operator import attrgetter

import pytest
import ray
import torch

from flowrl.config import build_config
from flowrl.errors import FlowRLError
from flowrl.models.build import build_actor, build_policy
from flowrl.rewards import RewardError
from flowrl.rollout.collector import InProcessCollector
from flowrl.rollout.ray_collector import RayCollector, WorkerError
from flowrl.rollout.ray_runtime import ray_session
from flowrl.rollout.reward_workers import RewardPool
from flowrl.rollout.shard import EnvSpec

FIELDS = (
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
EPISODE_FIELDS = ("episode_return", "episode_success", "episode_done")


@pytest.fixture(scope="module")
def local_ray():
    ray.shutdown()
    with ray_session(None, num_cpus=2):
        # Reward models defined in this file travel to the workers by value.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        yield
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def flowrl_log():
    """Records of the 'flowrl' logger (the CLI may have turned its propagation off)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger, handler = logging.getLogger("flowrl"), Keep(level=logging.WARNING)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


KWARGS = {"start_noise": 0.5}  # TwoGoal starts spread out: episodes of different lengths


def _policy(converter="reinflow"):
    cfg = build_config(
        {"name": "t", "policy": {"hidden_dims": [16], "time_embed_dim": 8}, "mdp": {"converter": {"type": converter}}}
    )
    torch.manual_seed(0)
    return build_policy(cfg, build_actor(cfg.policy, 2, 2))


@pytest.mark.parametrize("converter", ["reinflow", "flow_sde"])
def test_ray_and_in_process_collectors_return_identical_rollouts(local_ray, converter):
    policy = _policy(converter)
    remote = RayCollector(EnvSpec("flowrl/TwoGoal-v0", 4, 6, seed=11), num_workers=2)
    local = InProcessCollector(EnvSpec("flowrl/TwoGoal-v0", 4, 6, seed=11), num_workers=2)
    try:
        for collector in (remote, local):
            collector.reset(0)
        for iteration in range(2):
            a, b = remote.collect(policy, 7, iteration), local.collect(policy, 7, iteration)
            for name in FIELDS:
                assert torch.equal(attrgetter(name)(a), attrgetter(name)(b)), name
            assert (a.env_steps, a.episode_returns, a.episode_successes) == (
                b.env_steps,
                b.episode_returns,
                b.episode_successes,
            )
            with torch.no_grad():  # weights change between iterations, as in training
                policy.velocity.net[-1].bias.add_(0.05)
    finally:
        remote.close()
        local.close()


def test_ray_collector_measures_its_transfers(local_ray):
    """Bytes out = the policy's state tensors; bytes back = the shards' rollouts' tensors; the
    times are non-negative, the overhead no more than the collection's wall time; the workers'
    timings do not reach the rollout's metrics (the trainer logs those)."""
    policy = _policy()
    spec = EnvSpec("flowrl/TwoGoal-v0", 4, 6, seed=11)
    remote, local = RayCollector(spec, num_workers=2), InProcessCollector(spec, num_workers=2)
    try:
        remote.reset(0), local.reset(0)
        start = time.perf_counter()
        rollout = remote.collect(policy, 5, 0)
        wall_ms = 1e3 * (time.perf_counter() - start)
        parts = [shard.collect(policy, 5, 0) for shard in local.shards]
    finally:
        remote.close(), local.close()
    state = policy.state_dict()
    expected_out = sum(t.numel() * t.element_size() for t in state.values())
    expected_back = 0
    for part in parts:
        tensors = [getattr(part, k) for k in FIELDS if "." not in k]
        tensors += [getattr(part.samples, k.split(".")[1]) for k in FIELDS if "." in k]
        expected_back += sum(t.numel() * t.element_size() for t in tensors)
    t = remote.transfer
    assert t["weights_bytes"] == expected_out > 0 and t["rollout_bytes"] == expected_back > 0
    assert all(t[k] >= 0 for k in ("weights_put_ms", "worker_load_ms", "overhead_ms"))
    assert t["weights_put_ms"] + t["overhead_ms"] + t["worker_load_ms"] <= wall_ms
    assert rollout.metrics == {}


@pytest.mark.parametrize("converter", ["reinflow", "flow_sde"])
def test_ray_and_in_process_collectors_return_identical_episode_rollouts(local_ray, converter):
    # groups of 2 envs (3 per worker), episodes ended in some envs and cut by max_steps in the others, new
    # reset states every iteration: the same rollout over Ray as in this process
    policy = _policy(converter)
    remote = RayCollector(EnvSpec("flowrl/TwoGoal-v0", 4, 12, seed=1, env_kwargs=KWARGS, group_size=2), num_workers=2)
    local = InProcessCollector(EnvSpec("flowrl/TwoGoal-v0", 4, 12, 1, env_kwargs=KWARGS, group_size=2), 2)
    try:
        for iteration in range(2):
            a, b = remote.collect_episodes(policy, 7, iteration), local.collect_episodes(policy, 7, iteration)
            for name in FIELDS:
                assert torch.equal(attrgetter(name)(a), attrgetter(name)(b)), name
            for name in EPISODE_FIELDS:
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            assert (a.env_steps, a.episode_returns, a.episode_successes) == (
                b.env_steps,
                b.episode_returns,
                b.episode_successes,
            )
            assert torch.equal(a.group, torch.arange(12) // 2)
            if iteration == 0:  # some episodes ended before the others (the mask matters), some were cut
                assert not bool(a.valid.all()) and bool(a.episode_done.any()) and not bool(a.episode_done.all())
            with torch.no_grad():
                policy.velocity.net[-1].bias.add_(0.05)
    finally:
        remote.close()
        local.close()


def test_killed_worker_is_restarted_and_its_share_redone(local_ray, flowrl_log, tmp_path):
    policy = _policy()
    collector = RayCollector(EnvSpec("flowrl/TwoGoal-v0", 4, 4, seed=0), num_workers=2)
    try:
        collector.reset(0)
        collector.collect(policy, 3, 0)
        victim = collector.where()[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        rollout = collector.collect(policy, 3, 1)
        assert rollout.obs.shape == (3, 4, 2) and collector.restarts == 1
        assert victim not in {w["pid"] for w in collector.where()}
        messages = [r.getMessage() for r in flowrl_log]
        assert any("env worker 1 failed in collect (iteration 1)" in m and "died" in m for m in messages), messages
    finally:
        collector.close()


def test_worker_dying_mid_collection_is_redone(local_ray, flowrl_log, tmp_path):
    marker = tmp_path / "fault-fired"
    collector = RayCollector(
        EnvSpec(
            "flowrl/FaultInjection-v0",
            4,
            4,
            seed=0,
            env_kwargs={"fail_at_step": 6, "mode": "exit", "once_marker": str(marker)},
        ),
        num_workers=2,
    )
    try:
        collector.reset(0)
        rollout = collector.collect(_policy(), 5, 0)  # 5 chunks x 4 steps: the fault fires mid-collection
        assert marker.exists() and collector.restarts == 1
        assert rollout.obs.shape == (5, 4, 2) and torch.isfinite(rollout.rewards).all()
        assert any("restarting it" in r.getMessage() for r in flowrl_log)
    finally:
        collector.close()


def test_env_that_keeps_raising_is_an_error_naming_worker_and_cause(local_ray):
    collector = RayCollector(
        EnvSpec("flowrl/FaultInjection-v0", 4, 2, seed=0, env_kwargs={"fail_at_step": 2, "mode": "raise"}),
        num_workers=2,
        max_restarts=1,
    )
    try:
        collector.reset(0)
        with pytest.raises(WorkerError, match=r"env worker 0 failed 2 times.*RuntimeError: injected fault at step 2"):
            collector.collect(_policy(), 3, 0)
    finally:
        collector.close()


def test_bad_env_kwargs_and_too_few_cpus_fail_at_set_up(local_ray):
    with pytest.raises(WorkerError, match="unexpected keyword argument 'nope'"):
        RayCollector(EnvSpec("flowrl/TwoGoal-v0", 4, 2, seed=0, env_kwargs={"nope": 1}), num_workers=2, max_restarts=0)
    with pytest.raises(FlowRLError, match="need 4 CPUs, the Ray cluster has 2"):
        RayCollector(EnvSpec("flowrl/TwoGoal-v0", 4, 4, seed=0), num_workers=4)


# ----------------------------------------------------------------------------- reward workers
class RowSum:
    """Score = sum of each row: an oracle is one line of torch."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def __call__(self, batch):
        time.sleep(self.delay)
        return batch.sum(dim=1)


class CrashOnce(RowSum):
    """Kills its process on its first call (marker file), then scores normally."""

    def __init__(self, marker: str, hard: bool) -> None:
        super().__init__()
        self.marker, self.hard = marker, hard

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            if self.hard:
                os._exit(3)
            raise RuntimeError("transient failure")
        return super().__call__(batch)


class AlwaysFails:
    def __call__(self, batch):
        raise RuntimeError("model weights missing")


class NaNScores:
    def __call__(self, batch):
        out = batch.sum(dim=1)
        out[1] = float("nan")
        return out


@pytest.mark.parametrize("use_ray", [True, False])
def test_reward_pool_scores_like_the_model(local_ray, use_ray):
    pool = RewardPool(lambda: RowSum(), num_workers=2, use_ray=use_ray)
    batches = [torch.randn(5, 3) for _ in range(3)]
    futures = [pool.submit(b) for b in batches]
    for batch, future in zip(batches, futures, strict=True):
        assert torch.allclose(pool.result(future), batch.sum(dim=1))
    pool.close()


def test_reward_pool_scores_while_the_caller_works(local_ray):
    pool = RewardPool(lambda: RowSum(delay=1.5), use_ray=True)
    pool.score(torch.zeros(1, 1))  # the model is built and warm
    start = time.perf_counter()
    future = pool.submit(torch.ones(4, 2))
    assert time.perf_counter() - start < 0.5, "submit must not wait for the scores"
    ready, _ = ray.wait([future.ref], timeout=0)
    assert not ready
    assert torch.equal(pool.result(future), torch.full((4,), 2.0))
    pool.close()


@pytest.mark.parametrize(("use_ray", "hard"), [(True, True), (True, False), (False, False)])
def test_reward_worker_failure_is_retried_and_logged(local_ray, flowrl_log, tmp_path, use_ray, hard):
    marker = str(tmp_path / "crashed")
    pool = RewardPool(lambda: CrashOnce(marker, hard), use_ray=use_ray, max_retries=2)
    batch = torch.arange(6.0).view(3, 2)
    assert torch.equal(pool.score(batch), batch.sum(dim=1))
    assert pool.retries == 1
    assert any("reward model (worker 0) failed" in r.getMessage() for r in flowrl_log)
    pool.close()


@pytest.mark.parametrize("use_ray", [True, False])
def test_reward_failures_are_raised_never_zero(local_ray, use_ray):
    pool = RewardPool(lambda: AlwaysFails(), use_ray=use_ray, max_retries=1)
    with pytest.raises(RewardError, match="failed 2 times on the same batch.*model weights missing"):
        pool.score(torch.ones(2, 2))
    pool.close()
    pool = RewardPool(lambda: NaNScores(), use_ray=use_ray)
    with pytest.raises(RewardError, match="non-finite score nan for sample 1"):
        pool.score(torch.ones(3, 2))
    assert pool.retries == 0
    pool.close()
