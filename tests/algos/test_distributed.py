"""The data-parallel learner (flowrl.algos.distributed; learner.num_workers > 1, gloo on the CPU):

- after one update on the same batch, 2 ranks give the parameters of the one-process learner
  (the oracle: the unchanged ``Algorithm.update``), for PPO with a critic and for GRPO, with
  minibatches that split unevenly and one smaller than the ranks, with DDP and with FSDP
  (sharded parameters and Adam moments; the driver gets them whole, and FSDP ranks handed a
  checkpoint's state rebuild their shards from it);
- a dead rank stops the update with one line naming it and its node;
- through the CLI (each a run of its own, with its Ray, pretraining and ranks: 30-40 s): a
  2-rank quickstart learns (held-out success well above the pretrained policy's), a killed rank
  ends the run with one line and a checkpoint that resumes with one rank and no Ray.

One local Ray serves the module's in-process tests (starting it costs seconds).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowrl.algos.distributed import DataParallelLearner, LearnerError, RankDataParallel
from flowrl.config import build_config
from flowrl.errors import FlowRLError
from flowrl.experiment import build_algorithm, preflight, rank_algorithm
from flowrl.models.build import build_actor, build_policy
from flowrl.rollout.collector import InProcessCollector
from flowrl.rollout.shard import EnvSpec
from flowrl.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    from flowrl.rollout.ray_runtime import ray_session

    with ray_session(None, num_cpus=4) as ray:
        yield ray


def _config(algo: dict, env: dict, **learner):
    return build_config(
        {
            "name": "t",
            "env": {"num_workers": 1, **env},
            "policy": {"hidden_dims": [16], "time_embed_dim": 8, "obs_norm": "none"},
            "pretrain": None,
            "mdp": {"converter": {"type": "reinflow"}, "window": {"type": "all"}},
            "algo": algo,
            "learner": {"num_workers": 2, "backend": "gloo", **learner},
        }
    )


def _one_update_both_ways(cfg, collect, reload: bool = False, check_ranks=None) -> None:
    """One iteration's update by the one-process algorithm and by 2 ranks from the same start:
    same parameters (policy and critic) and optimiser moments afterwards. ``reload``: the ranks
    update once first, are handed the start again (as on resuming a checkpoint), then update.
    ``check_ranks``: called with the learner after its update, before it closes."""
    torch.manual_seed(0)
    actor = build_actor(cfg.policy, 2, 2)
    device = torch.device("cpu")
    single = build_algorithm(cfg, build_policy(cfg, actor), actor, device)
    start = copy.deepcopy(single.state_dict())
    rollout = collect(single.policy)
    ranks_algo = build_algorithm(cfg, build_policy(cfg, copy.deepcopy(actor)), copy.deepcopy(actor), device)
    ranks_algo.load_state_dict(copy.deepcopy(start))
    learner = DataParallelLearner(ranks_algo, cfg.learner, functools.partial(rank_algorithm, cfg, copy.deepcopy(actor)))
    try:
        single.set_progress(0.0)
        learner.set_progress(0.0)
        single.update(single.prepare(rollout), 0)
        if reload:
            learner.update(learner.prepare(rollout), 0)
            learner.load_state_dict(copy.deepcopy(start))
        metrics = learner.update(learner.prepare(rollout), 0)
        if check_ranks is not None:
            check_ranks(learner)
    finally:
        learner.close()
    assert metrics["train/epochs"] >= 1
    moved = False
    for key in ("policy", "critic"):
        if key not in start:
            continue
        ours, theirs = single.state_dict()[key], ranks_algo.state_dict()[key]
        for name, value in ours.items():
            where = f"{key}.{name}"
            torch.testing.assert_close(theirs[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, n=where: f"{n}: {m}")
            moved |= not torch.equal(value, start[key][name])
    assert moved  # the update did something to compare
    # Adam hides a constant scale of the loss from the weights; its first moments (mean gradients) do not
    for key in ("actor_opt", "critic_opt"):
        for i, st in single.state_dict().get(key, {"state": {}})["state"].items():
            torch.testing.assert_close(ranks_algo.state_dict()[key]["state"][i]["exp_avg"], st["exp_avg"])


def _ppo_config(strategy: str = "ddp"):
    """PPO with a critic: 3 envs x 7 steps = 21 env steps in minibatches of 4 and a last one of 1
    (every rank takes that whole)."""
    return _config(
        {"type": "ppo", "minibatch_size": 4, "epochs": 2, "steps_per_iteration": 7, "target_kl": 10.0},
        {"num_envs": 3},
        strategy=strategy,
    )


def _collect_steps(cfg, policy):
    """One PPO collection of ``cfg``'s envs (seed 0) in this process."""
    collector = InProcessCollector(EnvSpec(cfg.env.id, cfg.policy.horizon, cfg.env.num_envs, seed=0))
    try:
        return collector.collect(policy, cfg.algo.steps_per_iteration, iteration=0)
    finally:
        collector.close()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ppo_with_a_critic_two_ranks_make_the_one_process_update(ray_local, strategy) -> None:
    cfg = _ppo_config(strategy)
    _one_update_both_ways(cfg, functools.partial(_collect_steps, cfg), reload=strategy == "fsdp")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_grpo_two_ranks_make_the_one_process_update(ray_local, strategy) -> None:
    cfg = _config(
        {"type": "grpo", "minibatch_size": 6, "epochs": 2, "max_steps": 7},
        {"num_envs": 3, "group_size": 3},
        strategy=strategy,
    )

    def collect(policy):
        spec = EnvSpec(cfg.env.id, cfg.policy.horizon, cfg.env.num_envs, seed=0, group_size=cfg.env.group_size)
        collector = InProcessCollector(spec)
        try:
            rollout = collector.collect_episodes(policy, cfg.algo.max_steps, iteration=0)
        finally:
            collector.close()
        assert int(rollout.valid.sum()) % 6 % 2 == 1  # a last minibatch of odd size: shares of unequal size
        # a random policy scores 0 everywhere (every group tied): outcomes with spread instead
        outcome = torch.randn(cfg.env.num_envs, generator=torch.Generator().manual_seed(0))
        return dataclasses.replace(rollout, episode_return=outcome)

    _one_update_both_ways(cfg, collect)


def test_a_dead_rank_stops_the_update_with_one_line_naming_it(ray_local) -> None:
    cfg = _config(
        {"type": "ppo", "minibatch_size": 8, "epochs": 1, "steps_per_iteration": 4}, {"num_envs": 2}, timeout_s=30
    )
    torch.manual_seed(0)
    actor = build_actor(cfg.policy, 2, 2)
    algo = build_algorithm(cfg, build_policy(cfg, actor), actor, torch.device("cpu"))
    collector = InProcessCollector(EnvSpec(cfg.env.id, cfg.policy.horizon, cfg.env.num_envs, seed=0))
    rollout = collector.collect(algo.policy, 4, iteration=0)
    collector.close()
    learner = DataParallelLearner(algo, cfg.learner, functools.partial(rank_algorithm, cfg, copy.deepcopy(actor)))
    try:
        learner.update(learner.prepare(rollout), 0)
        ip, _, pid = learner.where[1]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(LearnerError) as err:
            learner.update(learner.prepare(rollout), 1)
    finally:
        learner.close()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"learner rank 1 of 2 (node {ip}") and f"pid {pid}" in message and "died" in message


def test_minibatch_shares_cover_the_minibatch_once() -> None:
    dp = object.__new__(RankDataParallel)  # no process group needed for the split
    mb = torch.randperm(13)
    for world in (2, 3):
        parts = []
        for rank in range(world):
            dp.rank, dp.world = rank, world
            parts.append(dp.local(mb))
            assert dp.weight == pytest.approx(len(parts[-1]) / 13)
        assert torch.equal(torch.cat(parts), mb)
    dp.rank, dp.world = 1, 4
    assert torch.equal(dp.local(mb[:3]), mb[:3]) and dp.whole  # fewer samples than ranks: whole


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["learner.num_workers=2", "ray.enabled=false"], "set ray.enabled: true"),
        (["learner.num_workers=2", "algo.minibatch_size=127"], "multiple of learner.num_workers"),
        (["learner.backend=gloo"], "backend only applies to data-parallel learners"),
        (["learner.num_workers=2", "learner.backend=nccl"], "resources_per_worker.GPU=1"),
        (["learner.num_workers=4", "ray.num_cpus=4"], "lower learner.num_workers"),
    ],
)
def test_bad_learner_settings_are_one_line_before_any_work(overrides, needle, tmp_path) -> None:
    from flowrl.config import load_config

    with pytest.raises((FlowRLError, ValueError)) as err:
        preflight(load_config(ROOT / "experiments" / "quickstart.yaml", overrides))
    assert needle in str(err.value)


# --------------------------------------------------------------------------- through the CLI
QUICK = [  # a short run for the fault test (it need not learn)
    "pretrain.steps=300",
    "pretrain.demos.episodes=100",
    "eval.episodes=20",
    "ray.num_cpus=4",
    "learner.num_workers=2",
]


def _train(run_dir: Path, *overrides: str, resume: bool = False) -> subprocess.Popen:
    args = ["--resume", str(run_dir)] if resume else ["experiments/quickstart.yaml", "--run-dir", str(run_dir)]
    return subprocess.Popen(
        [sys.executable, "-m", "flowrl.cli", "train", *args, "--no-progress", *overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_two_rank_quickstart_learns(tmp_path) -> None:
    """The quickstart's own pretraining (2000 steps: 300 give a policy that PPO cannot lift) and
    10 of its iterations at a constant learning rate (its 50-iteration linear schedule's first
    10 stay above 0.8x), 2 ranks, one env worker. The pretrained policy's held-out success
    (the evaluation before training, 100 episodes) is the baseline: the last evaluation must
    beat it by a one-sided two-proportion z-test at z > 3 (p < 0.002)."""
    run = _train(
        tmp_path / "run",
        "learner.num_workers=2",
        "env.num_workers=1",
        "ray.num_cpus=3",
        "algo.iterations=10",
        "algo.lr_schedule=constant",
        "eval.every=5",
        "checkpoint_every=10",
    )
    out, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-2000:]
    assert "2 learner ranks (gloo, DDP)" in out + err
    evals = [row for row in read_metrics(tmp_path / "run") if "eval/success_rate" in row]
    before, after = evals[0]["eval/success_rate"], evals[-1]["eval/success_rate"]
    n = 100  # eval.episodes, the quickstart's
    pooled = (before + after) / 2
    z = (after - before) / math.sqrt(max(pooled * (1 - pooled), 1e-12) * 2 / n)
    assert z > 3, (before, after, z)


def _rank_pid(run_dir: Path, rank: int, deadline: float) -> int:
    """The pid the run logged for a learner rank (events.log), waiting for it."""
    while time.monotonic() < deadline:
        log = run_dir / "events.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            if f"learner rank {rank}: pid " in line:
                return int(line.split(f"learner rank {rank}: pid ")[1].split()[0])
        time.sleep(0.5)
    raise AssertionError("the run logged no learner ranks")


def test_a_killed_rank_ends_the_run_with_one_line_and_it_resumes_with_one_rank(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run = _train(run_dir, *QUICK, "pretrain.steps=50", "algo.iterations=400", "eval.every=400", "checkpoint_every=1")
    try:
        deadline = time.monotonic() + 600
        pid = _rank_pid(run_dir, 1, deadline)
        last = run_dir / "checkpoints" / "last.pt"
        while not last.exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.5)
        assert last.exists(), run.stderr.read() if run.poll() is not None else "no checkpoint in time"
        os.kill(pid, signal.SIGKILL)
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("flowrl: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert errors[0].startswith("flowrl: error: learner rank 1 of 2 (node ") and f"pid {pid}" in errors[0]
    done = torch.load(last, weights_only=True)["iteration"]
    assert done >= 1
    # whole sections: learner's other keys (backend, ...) and ray's do nothing in one process. The
    # checkpoint holds no rank or worker, so the run goes on without Ray
    resumed = _train(
        run_dir,
        "learner={num_workers: 1}",
        "ray={enabled: false}",
        f"algo.iterations={done + 1}",
        "eval.every=1000",
        resume=True,
    )
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resuming from {last} (iteration {done}" in out + err
    assert torch.load(last, weights_only=True)["iteration"] == done + 1
