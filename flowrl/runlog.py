"""Run folder I/O: metrics.jsonl + TensorBoard, atomic checkpoints, resume bookkeeping, and
the lock that keeps a run folder to one writer."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from flowrl.errors import FlowRLError

LOCK_NAME = ".lock"
# Errors of a full or read-only disk: a FlowRLError naming the file and the disk, not a traceback;
# where flowrl itself writes (run folders, checkpoints), a folder it may not write is one line too.
FULL_OR_READ_ONLY = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
_DISK_ERRORS = FULL_OR_READ_ONLY | {errno.EACCES, errno.EPERM}


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def is_disk_error(exc: BaseException, permissions: bool = True) -> bool:
    """An OSError of a full or read-only disk, or (``permissions``) of a file that may not be written."""
    return isinstance(exc, OSError) and exc.errno in (_DISK_ERRORS if permissions else FULL_OR_READ_ONLY)


def disk_error(exc: OSError, path: str | Path, doing: str) -> FlowRLError:
    """One line for an OSError of the disk while ``doing`` (e.g. "writing") ``path``: which
    file, which disk (its mount point, and the space left when it is full), and what to do."""
    path = Path(path)
    disk = _mount_point(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(disk).free
            return FlowRLError(
                f"the disk of {path} (mounted on {disk}) is full ({_size(free)} free; "
                f"{os.strerror(exc.errno)}) while {doing} it; an earlier version of the file, if any, is intact: "
                "free space there (or point runs_dir / --run-dir elsewhere), then resume"
            )
        return FlowRLError(f"the disk of {path} (mounted on {disk}) is full while {doing} it: free space there")
    if exc.errno == errno.EROFS:
        why = f"is on a read-only file system (mounted on {disk})"
    else:
        why = f"is not writable ({os.strerror(exc.errno or 0)})"
    return FlowRLError(f"{path} {why}: choose a writable folder (runs_dir, or --run-dir)")


def check_disk_error(exc: OSError, path: str | Path, doing: str) -> None:
    """Raise ``disk_error`` for an error of a full or read-only disk; anything else goes on."""
    if is_disk_error(exc):
        raise disk_error(exc, path, doing) from None


class RunFolderBusy(FlowRLError):
    """Another live process holds the run folder's lock."""


_held: dict[Path, list[int]] = {}  # run folder -> [lock file descriptor, nesting depth], this process


@contextlib.contextmanager
def run_folder_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder for this process: one writer per folder.

    An OS lock (``flock``) on ``RUN/.lock`` that the kernel drops when its process ends, however
    it ends, so a SIGKILLed run leaves no stale lock. The file holds the holder's pid and host,
    for the one-line refusal another process gets (RunFolderBusy). Taken before the run writes
    anything; re-entrant within a process (the CLI and ``experiment.train`` both take it)."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    path = key / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        check_disk_error(exc, path, "creating")
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        who = f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "an unknown pid"
        raise RunFolderBusy(
            f"run folder {key} is in use by another flowrl process ({who}): one process writes a run folder at a "
            f"time; wait for it to end or stop it (kill -TERM {holder[0] if holder else 'PID'}), or use another folder"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        check_disk_error(exc, path, "writing")
        raise
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting process)


_F = TypeVar("_F", bound=Callable[..., Any])


def holds_run_folder(fn: _F) -> _F:
    """Decorate ``fn(cfg, run_dir, ...)`` to run under ``run_folder_lock(run_dir)``."""

    @functools.wraps(fn)
    def wrapper(cfg: Any, run_dir: str | Path, *args: Any, **kwargs: Any) -> Any:
        with run_folder_lock(run_dir):
            return fn(cfg, run_dir, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a torn file. A
    full or read-only disk leaves the previous file intact, no temporary file, and raises one
    line naming the file and the disk (FlowRLError)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = _disk_oserror(exc)
        if cause is not None:
            raise disk_error(cause, path, "writing") from None
        raise


def _disk_oserror(exc: BaseException) -> OSError | None:
    """The OSError of a full or read-only disk behind ``exc``: itself, or what it arose from.
    torch.save passes a failed write on as it is, or, when its zip writer then fails to close,
    as a RuntimeError ("unexpected pos ...") raised while handling it."""
    for _ in range(8):  # a chain of a few links at most
        if is_disk_error(exc):
            return exc  # type: ignore[return-value]
        if (exc := exc.__cause__ or exc.__context__) is None:
            return None
    return None


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write a text file through a temporary file and a rename: never a torn file; a full or
    read-only disk leaves the previous file intact and raises one line (FlowRLError)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        check_disk_error(exc, path, "writing")
        raise


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
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # a torn last line is dropped on reading (_records)
            check_disk_error(exc, self.path, "appending to")
            raise
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
