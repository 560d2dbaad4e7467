"""Run folder I/O: metrics.jsonl + TensorBoard, atomic checkpoints, resume bookkeeping."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunLog:
    """Writes each record to ``metrics.jsonl`` (one JSON object per line) and TensorBoard.

    Records are keyed by ``env_steps``, the TensorBoard step. ``resume_after``: the env_steps
    of the checkpoint being resumed; records written after it (by the killed process) are
    dropped from metrics.jsonl and purged from TensorBoard, so both show one continuous curve.
    """

    def __init__(self, run_dir: str | Path, resume_after: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is slow to import

        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        purge_step = None
        if resume_after is not None:
            purge_step = resume_after + 1
            if self.path.exists():
                kept = [r for r in _records(self.path.read_text()) if r["env_steps"] <= resume_after]
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            _wait_for_a_later_event_file_name(self.run_dir / "tensorboard")
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, env_steps: int, metrics: dict[str, float], **fields: Any) -> None:
        record = {"env_steps": int(env_steps), **fields, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, env_steps)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _wait_for_a_later_event_file_name(folder: Path) -> None:
    """TensorBoard reads a folder's event files in name order (events.out.tfevents.SECONDS.
    HOST.PID.N), and the purge on resume only drops events read before it. A resume within
    the killed process's second would sort by pid, maybe first; wait until the name's
    timestamp is later than every existing file's (at most a second)."""
    stamps = []
    for path in folder.glob("events.out.tfevents.*"):
        try:
            stamps.append(int(path.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    if stamps:
        while time.time() < max(stamps) + 1:
            time.sleep(0.02)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _records(text: str) -> list[dict[str, Any]]:
    """Parsed lines; a last line torn by a killed process is dropped."""
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order."""
    return _records((Path(run_dir) / "metrics.jsonl").read_text())
