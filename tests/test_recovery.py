"""Nothing lost, nothing silent: real training subprocesses killed or stopped at several
points (also with Ray on), then resumed, against an uninterrupted run with the same seed; a
second process on a run folder that another one writes; a diverging learning rate; a resume
whose overrides do not fit.

The waits follow progress, not the clock: a process counts as alive while its output or its run
folder changes, and fails only after ``STALL_S`` without any change (a hang) or ``OVERALL_S`` in
all, so a loaded machine (a busy laptop, a shared CI runner) is slow but passes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
STALL_S = 300.0  # no new output and no change in the run folder for this long: the process hangs
OVERALL_S = 1200.0  # one process, start to end, however loaded the machine
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


@dataclass
class Proc:
    """A flowrl subprocess whose output goes to temporary files (no pipe to fill up)."""

    popen: subprocess.Popen
    run_dir: Path | None
    out: IO[bytes] = field(repr=False)
    err: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    @property
    def stdout(self) -> str:
        return _read(self.out)

    @property
    def stderr(self) -> str:
        return _read(self.err)

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def progress(self) -> tuple:
        """Changes whenever the process writes output or anything in its run folder."""
        files = []
        if self.run_dir is not None and self.run_dir.exists():
            for path in self.run_dir.rglob("*"):
                try:
                    st = path.stat()
                except OSError:  # a temporary file renamed meanwhile
                    continue
                files.append((str(path), st.st_size, st.st_mtime_ns))
        return os.fstat(self.out.fileno()).st_size, os.fstat(self.err.fileno()).st_size, sorted(files)


def _read(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def _run_dir_of(args: tuple[str, ...] | list[str]) -> Path | None:
    for flag in ("--run-dir", "--resume"):
        if flag in args:
            return Path(args[list(args).index(flag) + 1])
    return None


_started: list[Proc] = []


@pytest.fixture(autouse=True)
def _no_process_left():
    """A failed test leaves no training process behind."""
    yield
    while _started:
        proc = _started.pop()
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait()


def _start(args: list[str], own_group: bool = False) -> Proc:
    """``own_group``: the process leads a process group (as under `setsid`), so a signal can go to the whole group."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    popen = subprocess.Popen(_cmd(*args), cwd=ROOT, stdout=out, stderr=err, start_new_session=own_group)
    _started.append(proc := Proc(popen, _run_dir_of(args), out, err))
    return proc


def _watch(proc: Proc, until=None) -> None:
    """Wait until ``until()`` holds (the process must still run then) or, without ``until``, until
    the process ends; fail after STALL_S without progress or OVERALL_S in all (killing it)."""
    start = last_change = time.monotonic()
    seen = proc.progress()
    while True:
        if until is not None and until():
            return
        if proc.popen.poll() is not None:
            assert until is None, f"the run ended before the awaited point: {proc.stderr[-2000:]}"
            return
        now = time.monotonic()
        if (current := proc.progress()) != seen:
            seen, last_change = current, now
        if now - last_change > STALL_S or now - start > OVERALL_S:
            proc.popen.kill()
            proc.popen.wait()
            stalled = now - last_change > STALL_S
            why = f"no progress for {STALL_S:.0f} s" if stalled else f"still running after {OVERALL_S:.0f} s"
            pytest.fail(f"{why}: {' '.join(proc.popen.args)}\n{proc.stderr[-2000:]}")
        time.sleep(0.05)


def _finish(proc: Proc) -> Proc:
    _watch(proc)
    return proc


def _run(*args: str, check: bool = True) -> Proc:
    proc = _finish(_start(list(args)))
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _train(run_dir: Path, *extra: str) -> list[str]:
    return ["train", "experiments/quickstart.yaml", *SMALL, *extra, "--run-dir", str(run_dir)]


def _wait_until(proc: Proc, condition) -> None:
    _watch(proc, until=condition)


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
    proc.popen.kill()
    proc.popen.wait()
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    out = _run("train", "--resume", str(run_dir))
    assert "starting the fine-tuning from the beginning" in out.stdout + out.stderr
    _assert_continuous(run_dir, reference)


def test_sigkill_during_pretraining_then_resume(tmp_path, reference) -> None:
    run_dir = tmp_path / "run"
    proc = _start(_train(run_dir))
    _wait_until(proc, lambda: any(r["step"] >= 300 for r in _records(run_dir / "pretrain_metrics.jsonl")))
    proc.popen.kill()
    proc.popen.wait()
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
    # checkpoint_every beyond the run: any checkpoint before its end is the stop's own (on a
    # loaded machine the signal can land after iteration 4, where a periodic one would be)
    proc = _start(_train(run_dir, "checkpoint_every=100"))
    _wait_until(proc, lambda: len(_records(run_dir / "metrics.jsonl")) >= 2)  # iteration 1 logged
    proc.send_signal(sig)
    stderr = _finish(proc).stderr
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("flowrl: stopped after iteration") and f"--resume {run_dir}" in last, stderr
    assert "Traceback" not in stderr
    stopped_at = torch.load(run_dir / "checkpoints" / "last.pt")["iteration"]
    assert 1 <= stopped_at < 8
    assert last.startswith(f"flowrl: stopped after iteration {stopped_at} of"), (last, stopped_at)
    _run("train", "--resume", str(run_dir))
    _assert_continuous(run_dir, reference, resumed_at=stopped_at)


# to the group: Ray's GCS and raylet used to get it too and could stop under the iteration in flight
# (a race; slow: a longer iteration gives it room)
@pytest.mark.parametrize("to", ["pid", pytest.param("group", marks=pytest.mark.slow)])
def test_sigterm_with_ray_on_saves_a_checkpoint_and_the_resume_redoes_nothing(tmp_path, to) -> None:
    """Ray's own SIGTERM handlers (ray.init's, and its C++ failure handler's stack dump) must not
    replace flowrl's: a scheduler's SIGTERM stops a Ray run like one without Ray. Sent to the
    whole process group, it must not stop Ray's GCS and raylet under the iteration in flight."""
    run_dir = tmp_path / "run"
    settings = [s for s in SMALL if not s.startswith(("ray.", "pretrain.", "checkpoint_every", "algo.steps"))]
    small = ["ray.enabled=true", "ray.num_cpus=1", "pretrain.demos.episodes=40", "pretrain.steps=40"]
    # to the group: iterations of some length, so that the signal lands while the workers collect
    small.append(f"algo.steps_per_iteration={128 if to == 'group' else 4}")
    # checkpoint_every beyond the run: any checkpoint before its end is the stop's own
    args = [
        "train",
        "experiments/quickstart.yaml",
        *settings,
        *small,
        "checkpoint_every=100",
        "--run-dir",
        str(run_dir),
    ]
    proc = _start(args, own_group=True)
    _wait_until(proc, lambda: len(_records(run_dir / "metrics.jsonl")) >= 2)  # iteration 1 logged
    if to == "pid":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    stderr = _finish(proc).stderr
    assert proc.returncode == 130, stderr
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("flowrl: stopped after iteration") and f"--resume {run_dir}" in last, stderr
    stopped_at = torch.load(run_dir / "checkpoints" / "last.pt")["iteration"]
    assert 1 <= stopped_at < 8
    before = _records(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in before] == list(range(stopped_at + 1))  # no row past the checkpoint
    out = _run("train", "--resume", str(run_dir), "ray={enabled: false}")  # the same rollouts without Ray
    assert f"resuming from {run_dir / 'checkpoints' / 'last.pt'} (iteration {stopped_at}," in out.stdout + out.stderr
    records = _records(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records] == list(range(9))  # every iteration once: none redone
    steps = [r["env_steps"] for r in records]
    assert steps == sorted(set(steps)), steps
    assert records[: stopped_at + 1] == before


def _event_file_pids(run_dir: Path) -> set[int]:
    """The pids in the names of a run's TensorBoard files (events.out.tfevents.TIME.HOST.PID.N)."""
    return {int(p.name.split(".")[-2]) for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}


def test_a_second_process_on_a_run_folder_is_refused_with_the_holders_pid(tmp_path) -> None:
    run_dir = tmp_path / "run"
    _run(*_train(run_dir, "algo.iterations=2", "pretrain.steps=100", "pretrain.demos.episodes=40"))
    first = _start(["train", "--resume", str(run_dir), "algo.iterations=1000"])  # stopped below
    _wait_until(first, lambda: len(_records(run_dir / "metrics.jsonl")) >= 4)  # writing: iteration 3 logged
    second = _start(["train", "--resume", str(run_dir), "algo.iterations=1000"])
    # the old code let the second one run: stop waiting as soon as it writes into the folder
    _watch(second, until=lambda: second.popen.poll() is not None or second.pid in _event_file_pids(run_dir))
    assert second.popen.poll() is not None, "a second process writes into the run folder alongside the first"
    assert second.returncode == 2, second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowrl: error:"), second.stderr
    assert f"pid {first.pid}" in lines[0] and str(run_dir.resolve()) in lines[0]
    assert second.stdout == ""
    assert second.pid not in _event_file_pids(run_dir)
    first.send_signal(signal.SIGTERM)
    _finish(first)
    assert first.returncode == 130, first.stderr[-2000:]
    records = _records(run_dir / "metrics.jsonl")
    steps = [r["env_steps"] for r in records]
    assert steps == sorted(set(steps)), steps  # one writer: no row twice, none out of order
    assert [r["iteration"] for r in records] == list(range(len(records)))


def test_a_signal_during_pretraining_saves_its_checkpoint(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = _start(["pretrain", "experiments/quickstart.yaml", *SMALL, "pretrain.steps=1000", "--run-dir", str(run_dir)])
    _wait_until(proc, lambda: any(r["step"] >= 100 for r in _records(run_dir / "pretrain_metrics.jsonl")))
    proc.send_signal(signal.SIGTERM)
    stderr = _finish(proc).stderr
    assert proc.returncode == 130, stderr
    assert "stopped pretraining at step" in stderr and "--resume" in stderr
    step = torch.load(run_dir / "checkpoints" / "pretrain.pt")["step"]
    assert 100 <= step < 1000
    _run("pretrain", "--resume", str(run_dir))
    assert (run_dir / "pretrained.pt").exists()
    steps = [r["step"] for r in _records(run_dir / "pretrain_metrics.jsonl")]
    assert steps == list(range(100, 1001, 100))


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
