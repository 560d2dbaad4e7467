"""Nothing lost, nothing silent: real training subprocesses killed or stopped at several
points, then resumed, against an uninterrupted run with the same seed; a diverging learning
rate; a resume whose overrides do not fit."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "ray.enabled=false",
    "env.num_envs=8",
    "env.num_workers=1",
    "pretrain.demos.episodes=100",
    "pretrain.steps=600",
    "pretrain.checkpoint_every=200",
    "algo.iterations=8",
    "algo.steps_per_iteration=4",
    "algo.minibatch_size=32",
    "algo.epochs=2",
    "eval.episodes=10",
    "eval.every=2",
    "checkpoint_every=4",
]


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowrl.cli", *args, "--no-progress"]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-2000:]
    return out


def _train(run_dir: Path, *extra: str) -> list[str]:
    return ["train", "experiments/quickstart.yaml", *SMALL, *extra, "--run-dir", str(run_dir)]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until(proc: subprocess.Popen, condition, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "kill point not reached in time"
        time.sleep(0.02)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _learning(records: list[dict]) -> list[dict]:
    """The records without wall-clock timings."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def _tensorboard_steps(folder: Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run with the same seed and settings."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _run(*_train(run_dir))
    return run_dir


def _assert_continuous(run_dir: Path, reference: Path, resumed_at: int | None = None) -> None:
    """metrics.jsonl and TensorBoard hold every step once, increasing, for all 8 iterations.
    A run restarted from scratch (``resumed_at`` None) equals the uninterrupted one; a run
    resumed from a checkpoint equals it up to that iteration (the resume resets the envs, so
    the episodes differ afterwards)."""
    records = _records(run_dir / "metrics.jsonl")
    steps = [r["env_steps"] for r in records]
    assert steps == sorted(set(steps)), steps  # every step exactly once, increasing
    assert [r["iteration"] for r in records] == list(range(9))
    expected = _learning(_records(reference / "metrics.jsonl"))
    upto = len(expected) if resumed_at is None else resumed_at + 1
    assert _learning(records)[:upto] == expected[:upto]
    tb = _tensorboard_steps(run_dir / "tensorboard", "eval/return")
    assert tb == sorted(set(tb)) == [r["env_steps"] for r in records if "eval/return" in r]
    pre = [r["step"] for r in _records(run_dir / "pretrain_metrics.jsonl")]
    assert pre == [100, 200, 300, 400, 500, 600]
    assert _tensorboard_steps(run_dir / "tensorboard" / "pretrain", "pretrain/loss") == pre
    if resumed_at is None:
        final, ref = torch.load(run_dir / "policy.pt"), torch.load(reference / "policy.pt")
        for key, value in ref["actor"].items():
            assert torch.equal(final["actor"][key], value), key


def test_sigkill_before_the_first_checkpoint_then_resume(tmp_path, reference) -> None:
    run_dir = tmp_path / "run"
    proc = _start(_train(run_dir))
    _wait_until(proc, lambda: len(_records(run_dir / "metrics.jsonl")) >= 3)  # before iteration 4's checkpoint
    proc.kill()
    proc.wait()
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    out = _run("train", "--resume", str(run_dir))
    assert "starting the fine-tuning from the beginning" in out.stdout + out.stderr
    _assert_continuous(run_dir, reference)


def test_sigkill_during_pretraining_then_resume(tmp_path, reference) -> None:
    run_dir = tmp_path / "run"
    proc = _start(_train(run_dir))
    _wait_until(proc, lambda: any(r["step"] >= 300 for r in _records(run_dir / "pretrain_metrics.jsonl")))
    proc.kill()
    proc.wait()
    assert (run_dir / "checkpoints" / "pretrain.pt").exists() and not (run_dir / "pretrained.pt").exists()
    # a checkpoint write torn by the kill leaves a temporary file: the resume removes it
    torn = run_dir / "checkpoints" / ".last.pt.abc123.tmp"
    torn.write_bytes(b"torn")
    out = _run("train", "--resume", str(run_dir))
    assert "resuming pretraining" in out.stdout + out.stderr
    assert not torn.exists()
    assert not (run_dir / "checkpoints" / "pretrain.pt").exists()
    _assert_continuous(run_dir, reference)
    pretrained, ref = torch.load(run_dir / "pretrained.pt"), torch.load(reference / "pretrained.pt")
    for key, value in ref["actor"].items():
        assert torch.equal(pretrained["actor"][key], value), key


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, reference, sig) -> None:
    run_dir = tmp_path / "run"
    proc = _start(_train(run_dir))
    _wait_until(proc, lambda: len(_records(run_dir / "metrics.jsonl")) >= 2)  # iteration 1 logged
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("flowrl: stopped after iteration") and f"--resume {run_dir}" in last, stderr
    assert "Traceback" not in stderr
    stopped_at = torch.load(run_dir / "checkpoints" / "last.pt")["iteration"]
    assert 1 <= stopped_at < 8 and stopped_at % 4 != 0  # saved for the stop, not a periodic checkpoint
    _run("train", "--resume", str(run_dir))
    _assert_continuous(run_dir, reference, resumed_at=stopped_at)


def test_a_signal_during_pretraining_saves_its_checkpoint(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = _start(["pretrain", "experiments/quickstart.yaml", *SMALL, "pretrain.steps=3000", "--run-dir", str(run_dir)])
    _wait_until(proc, lambda: any(r["step"] >= 100 for r in _records(run_dir / "pretrain_metrics.jsonl")))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopped pretraining at step" in stderr and "--resume" in stderr
    step = torch.load(run_dir / "checkpoints" / "pretrain.pt")["step"]
    assert 100 <= step < 3000
    _run("pretrain", "--resume", str(run_dir))
    assert (run_dir / "pretrained.pt").exists()
    steps = [r["step"] for r in _records(run_dir / "pretrain_metrics.jsonl")]
    assert steps == list(range(100, 3001, 100))


def test_a_resume_whose_overrides_do_not_fit_changes_nothing(tmp_path) -> None:
    run_dir = tmp_path / "run"
    _run(*_train(run_dir, "algo.iterations=4"))
    config = (run_dir / "config.yaml").read_text()
    out = _run("train", "--resume", str(run_dir), "policy.hidden_dims=[32]", "algo.iterations=6", check=False)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowrl: error:") and "does not fit" in lines[0], out.stderr
    assert (run_dir / "config.yaml").read_text() == config
    _run("train", "--resume", str(run_dir), "algo.iterations=6")  # the run is not lost
    assert torch.load(run_dir / "checkpoints" / "last.pt")["iteration"] == 6


def test_a_diverging_learning_rate_stops_without_writing_bad_weights(tmp_path) -> None:
    run_dir = tmp_path / "run"
    out = _run(*_train(run_dir, "algo.actor_lr=1.0e+30", "algo.noise_lr=1.0e+30"), check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("flowrl: error:") and "non-finite" in last and "iteration" in last, out.stderr
    assert "learning rate" in last
    assert "Traceback" not in out.stderr
    assert "update skipped" in (run_dir / "events.log").read_text()
    assert not (run_dir / "policy.pt").exists()
    checkpoint = run_dir / "checkpoints" / "last.pt"
    if checkpoint.exists():  # whatever was written is finite
        state = torch.load(checkpoint)
        assert all(torch.isfinite(v).all() for v in state["actor"].values() if v.is_floating_point())
    skipped = [r.get("train/skipped_updates", 0) for r in _records(run_dir / "metrics.jsonl")]
    assert all(math.isfinite(s) for s in skipped)


def test_resume_needs_no_experiment_and_rejects_a_missing_run(tmp_path) -> None:
    out = _run("train", "--resume", str(tmp_path / "nothing"), check=False)
    assert out.returncode == 2 and "config.yaml" in out.stderr
    assert os.listdir(tmp_path) == []
