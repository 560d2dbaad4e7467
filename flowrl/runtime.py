"""Seeding and device selection (the one place where randomness is set up), progress bars,
stopping at a safe point on SIGINT/SIGTERM, and the process tree as Linux's /proc shows it."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Iterable

import numpy as np
import torch
from tqdm import tqdm

from flowrl.errors import FlowRLError


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from (experiment seed, worker index, epoch, ...), well mixed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FlowRLError("device: cuda was requested but no CUDA GPU is visible; use device: auto or cpu")
    return torch.device(name)


def progress(iterable: Iterable, desc: str, enabled: bool = True, **kwargs) -> tqdm:
    """A progress bar on stderr; in logs (no terminal) it refreshes every 10 s, not every step."""
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=interactive,
        mininterval=0.2 if interactive else 10.0,
        **kwargs,
    )


_stop = {"requested": False}


def stop_requested() -> bool:
    """True once SIGINT or SIGTERM arrived inside ``graceful_stop``: stop at the next safe point."""
    return _stop["requested"]


@contextlib.contextmanager
def graceful_stop():
    """While inside: the first SIGINT/SIGTERM asks the run to stop at its next safe point
    (after the current iteration or pretraining step, with a checkpoint); a second one stops
    at once. Outside the main thread (where handlers cannot be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        if _stop["requested"]:
            raise KeyboardInterrupt
        _stop["requested"] = True
        logging.getLogger("flowrl").warning(
            "%s: stopping after the current step with a checkpoint (again to stop at once)", signal.Signals(signum).name
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _stop["requested"] = False
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _stop["requested"] = False


def process_stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, start time, state) of ``pid`` from Linux's /proc; None once it is gone (or
    where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19], fields[0]


def descendants(pid: int) -> dict[int, str]:
    """Every descendant of ``pid``, with its start time (a pid can be reused, a start time not)."""
    children: dict[int, list[tuple[int, str]]] = {}
    if os.path.isdir("/proc"):
        for name in os.listdir("/proc"):
            if name.isdigit() and (st := process_stat(int(name))):
                children.setdefault(st[0], []).append((int(name), st[1]))
    found, todo = {}, [pid]
    while todo:
        for child, start in children.get(todo.pop(), ()):
            found[child] = start
            todo.append(child)
    return found
