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


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write a text file through a temporary file and a rename: never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_temporary_files(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files a killed process left in a run folder (``.NAME.*.tmp``
    next to checkpoints and logs); returns them."""
    run_dir = Path(run_dir)
    leftovers = [*run_dir.glob(".*.tmp"), *(run_dir / "checkpoints").glob(".*.tmp")]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


class RunLog:
    """Writes each record to ``metrics.jsonl`` (one JSON object per line) and TensorBoard.

    Records are keyed by ``env_steps`` (``step_key``), the TensorBoard step. ``resume_after``:
    the step of the checkpoint being resumed (-1: none, start over); records written after it
    (by the killed process) are dropped from the JSONL file and purged from TensorBoard, so
    both show one continuous curve. Pretraining logs to ``pretrain_metrics.jsonl`` and
    ``tensorboard/pretrain`` (``name="pretrain"``, keyed by gradient step).
    """

    def __init__(
        self, run_dir: str | Path, resume_after: int | None = None, name: str | None = None, step_key: str = "env_steps"
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is slow to import

        self.run_dir = Path(run_dir)
        self.step_key = step_key
        self.path = self.run_dir / (f"{name}_metrics.jsonl" if name else "metrics.jsonl")
        board = self.run_dir / "tensorboard" / (name or "")
        purge_step = None
        if resume_after is not None:
            purge_step = resume_after + 1
            if self.path.exists():
                kept = [r for r in _records(self.path.read_text()) if r.get(step_key, -1) <= resume_after]
                atomic_write_text("".join(json.dumps(r) + "\n" for r in kept), self.path)
            _wait_for_a_later_event_file_name(board)
        self.writer = SummaryWriter(str(board), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float], **fields: Any) -> None:
        record = {self.step_key: int(step), **fields, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
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
