"""Seeding and device selection: the one place where randomness is set up."""

from __future__ import annotations

import random
import sys
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
