"""The run folder: one writer at a time (an OS lock that dies with its process), and bad places
or seeds refused with one line before a folder or file exists; a full disk leaves the previous
checkpoint intact and says which disk."""

from __future__ import annotations

import errno
import os
import pathlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flowrl.runlog as runlog
from flowrl.cli import main
from flowrl.errors import FlowRLError
from flowrl.runlog import atomic_save, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
TINY = [
    "ray.enabled=false",
    "pretrain.steps=40",
    "pretrain.demos.episodes=40",
    "env.num_envs=4",
    "env.num_workers=1",
    "algo.steps_per_iteration=4",
    "algo.epochs=1",
    "algo.minibatch_size=8",
    "eval.episodes=4",
    "policy.hidden_dims=[16]",
]

HOLDER = """
import sys, time
from flowrl.runlog import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_held_run_folder_is_refused_naming_the_pid_and_a_killed_holder_leaves_no_lock(tmp_path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(runlog.RunFolderBusy, match=f"pid {holder.pid}"):
            with runlog.run_folder_lock(tmp_path):
                pass
        holder.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel drops the lock
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with runlog.run_folder_lock(tmp_path):
        with runlog.run_folder_lock(tmp_path):  # re-entrant within a process (the CLI and experiment.train)
            assert (tmp_path / runlog.LOCK_NAME).read_text().split()[0] == str(os.getpid())
    with runlog.run_folder_lock(tmp_path):  # released on leaving
        pass


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowrl: error:"), err
    assert "Traceback" not in err
    return lines[0]


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*"))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("seed=-1", "seed: Input should be greater than or equal to 0"),
        ("seed=100000000000000000000000", "seed: Input should be less than 4294967296"),
    ],
)
def test_a_seed_out_of_range_is_one_line_before_a_run_folder(override, needle, tmp_path, capsys) -> None:
    assert main(["train", QUICKSTART, *TINY, override, f"runs_dir={tmp_path / 'runs'}", "--no-progress"]) == 2
    assert needle in _one_line_error(capsys)
    assert _entries(tmp_path) == []


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["train", QUICKSTART, *TINY, "--run-dir", str(afile), "--no-progress"]) == 2
    assert f"--run-dir {afile} is a file" in _one_line_error(capsys)
    assert afile.read_text() == "mine" and _entries(tmp_path) == ["afile"]
    assert main(["train", QUICKSTART, *TINY, "--run-dir", str(afile / "run"), "--no-progress"]) == 2
    assert "Not a directory" in _one_line_error(capsys)
    assert _entries(tmp_path) == ["afile"]


@pytest.mark.parametrize("how", ["--run-dir", "runs_dir="])
def test_a_read_only_disk_is_one_line_and_creates_nothing(how, tmp_path, capsys, monkeypatch) -> None:
    read_only = tmp_path / "ro"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self: Path, *args, **kwargs) -> None:  # what a read-only mount does (root passes chmod)
        if str(self).startswith(str(read_only)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    where = ["--run-dir", str(read_only / "run")] if how == "--run-dir" else [f"runs_dir={read_only}"]
    assert main(["train", QUICKSTART, *TINY, *where, "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert "read-only file system" in line and str(read_only) in line
    assert _entries(tmp_path) == []


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys")
def test_runs_dir_where_nothing_may_be_created_is_one_line(capsys) -> None:
    # /sys refuses a new folder to everyone, root included (EPERM; EACCES for other users)
    assert main(["train", QUICKSTART, *TINY, "runs_dir=/sys/flowrl-test", "--no-progress"]) == 2
    assert "/sys/flowrl-test" in _one_line_error(capsys)
    assert not Path("/sys/flowrl-test").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["ray.num_cpus=2", "env.num_workers=4", "env.num_envs=32"],
        ["env.num_workers=1000", "env.num_envs=1000"],
    ],
)
def test_env_workers_beyond_a_local_rays_cpus_are_refused_before_a_run_folder(overrides, tmp_path, capsys) -> None:
    assert main(["train", QUICKSTART, *overrides, f"runs_dir={tmp_path}", "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert "env workers" in line and "CPUs" in line and "env.num_workers" in line
    assert _entries(tmp_path) == []


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_then_torn_zip(*args, **kwargs):  # what torch.save raises when its zip writer then fails to close
    try:
        _full()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 639744 vs 639636") from None


@pytest.mark.parametrize(
    ("failing", "fault"),
    [("torch.save", _full), ("torch.save", _full_then_torn_zip), ("os.replace", _full)],
)
def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_disk(failing, fault, tmp_path, monkeypatch) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    atomic_save({"iteration": 1}, path)
    monkeypatch.setattr(runlog.torch if failing == "torch.save" else runlog.os, failing.split(".")[1], fault)
    with pytest.raises(FlowRLError) as raised:
        atomic_save({"iteration": 2}, path)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message and "full" in message and "mounted on" in message
    assert torch.load(path)["iteration"] == 1  # the previous checkpoint is intact
    assert _entries(tmp_path) == ["checkpoints", "last.pt"]  # no temporary file left
    if failing == "os.replace":  # text files go through the same rename
        with pytest.raises(FlowRLError, match="full"):
            atomic_write_text("x", tmp_path / "config.txt")
        assert _entries(tmp_path) == ["checkpoints", "last.pt"]


def test_a_full_disk_during_training_is_one_line_and_the_last_checkpoint_survives(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    real_replace = os.replace
    saved = []

    def replace(src, dst, *args, **kwargs):  # the second checkpoint finds the disk full
        if Path(dst).name == "last.pt" and saved:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst, *args, **kwargs)
        if Path(dst).name == "last.pt":
            saved.append(dst)

    monkeypatch.setattr(runlog.os, "replace", replace)
    args = ["train", QUICKSTART, *TINY, "algo.iterations=3", "checkpoint_every=1", "--run-dir", str(run_dir)]
    assert main([*args, "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("flowrl: error:") and "last.pt" in last and "full" in last, last
    assert torch.load(run_dir / "checkpoints" / "last.pt")["iteration"] == 1
    assert not list(run_dir.rglob("*.tmp"))
