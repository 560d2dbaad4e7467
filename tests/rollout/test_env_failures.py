"""An env that raises in ``reset`` or ``step`` outside Ray's worker restarts: one EnvError line
naming the env, the call and the exception, and what to do; the run stops with its last
checkpoint intact and resumes from it.

The faulty env is envs/faults.py's FaultInjection task (TwoGoal that raises at a chosen step or
reset). Oracles: the fault's own message; the checkpoint's iteration against the metrics rows
written before the fault; a resume that continues from that iteration.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowrl.cli import main
from flowrl.errors import EnvError
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.networks import ReinFlowNoiseNet, VelocityMLP
from flowrl.models.sampler import ChainSampler, ReinFlowConverter
from flowrl.rollout.collector import InProcessCollector
from flowrl.rollout.evaluation import evaluate_policy
from flowrl.rollout.shard import EnvSpec
from flowrl.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[2]
FAULTY = "flowrl/FaultInjection-v0"
# 4 envs x 8 chunks of 4 steps: every env takes 32 steps an iteration, so a fault at step 40
# fires in the second iteration; evaluation episodes (at most 30 steps) never reach it.
TINY = [
    "ray.enabled=false",
    "pretrain.steps=20",
    "pretrain.demos.episodes=20",
    "env.num_envs=4",
    "algo.steps_per_iteration=8",
    "algo.epochs=1",
    "algo.minibatch_size=8",
    "algo.iterations=3",
    "eval.episodes=4",
    "eval.every=1",
    "eval.keep_envs=false",  # FaultInjection counts steps over its lifetime: kept eval envs would reach the fault
    "checkpoint_every=1",
    f"env.id={FAULTY}",
]


def _policy(horizon: int = 4) -> FlowPolicy:
    torch.manual_seed(0)
    velocity = VelocityMLP(2, horizon, 2, hidden_dims=(8,), time_dim=4)
    noise = ReinFlowNoiseNet(2, horizon, 2, 0.05, 0.1, hidden_dims=(4,), time_dim=4)
    return FlowPolicy(velocity, ChainSampler(2, ReinFlowConverter(noise)))


def test_training_with_an_env_that_raises_stops_with_one_line_and_resumes_from_its_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowrl.cli",
            "train",
            "experiments/quickstart.yaml",
            *TINY,
            "env.kwargs={fail_at_step: 40}",
            f"runs_dir={runs}",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # ~20 s alone; generous for a loaded machine
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("flowrl:")]
    assert errors == [
        f"flowrl: error: env {FAULTY} raised in step (env shard 0): RuntimeError: injected fault at step 40; "
        "fix the env, or set ray.enabled=true: Ray restarts a failed env worker and redoes its share "
        "(ray.max_restarts)"
    ], proc.stderr
    (run,) = runs.iterdir()
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1]  # the fault fired in the second iteration
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["iteration"] == 1
    # the env fixed (its fault past the run's end), the run continues from its checkpoint
    assert main(["train", "--resume", str(run), "env.kwargs={fail_at_step: 100000}", "--no-progress"]) == 0
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1, 2, 3]


def test_an_env_that_raises_in_reset_is_one_line_naming_it():
    collector = InProcessCollector(EnvSpec(FAULTY, 4, 4, seed=0, env_kwargs={"fail_at_reset": 1}), num_workers=2)
    try:
        with pytest.raises(EnvError) as err:
            collector.reset(0)
    finally:
        collector.close()
    message = str(err.value)
    assert message.startswith(f"env {FAULTY} raised in reset (env shard 0): RuntimeError: injected fault at reset 1;")
    assert "ray.enabled=true" in message and "\n" not in message


def test_a_policy_that_raises_is_not_blamed_on_the_env():
    """Only the env's calls become EnvErrors: a bug elsewhere keeps its own exception (and traceback)."""
    policy = _policy()

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug in the policy")

    policy.sample = broken
    collector = InProcessCollector(EnvSpec("flowrl/TwoGoal-v0", 4, 2, seed=0))
    try:
        collector.reset(0)
        with pytest.raises(ZeroDivisionError, match="a bug in the policy"):
            collector.collect(policy, 2, 0)
    finally:
        collector.close()


@pytest.mark.parametrize(
    ("kwargs", "call"),
    [
        ({"fail_at_reset": 1}, "reset (episode 0): RuntimeError: injected fault at reset 1"),
        ({"fail_at_step": 1}, "step (episode 0): RuntimeError: injected fault at step 1"),
    ],
)
def test_evaluation_with_an_env_that_raises_is_one_line_naming_it(kwargs, call):
    with pytest.raises(EnvError) as err:
        evaluate_policy(_policy(), FAULTY, 4, episodes=3, seed=0, env_kwargs=kwargs)
    assert str(err.value).startswith(f"evaluation: env {FAULTY} raised in {call}; fix the env")
