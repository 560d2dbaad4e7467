"""The time grid shared by sampling and log-prob re-evaluation.

Convention: t = 0 is Gaussian noise, t = 1 is data. Sampling and re-evaluation must build
the grid with this one function; a grid that differs between the two makes the first PPO
ratio != 1 (the failure behind ReinFlow's public issue #5).
"""

from __future__ import annotations

from typing import Literal

import torch

GridKind = Literal["uniform", "shifted"]


def time_grid(
    num_steps: int,
    kind: GridKind = "uniform",
    shift: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Times t_0 = 0 < t_1 < ... < t_K = 1 of a K-step integration.

    ``shifted`` applies the SD3 timestep shift in the noise-level convention sigma = 1 - t:
    sigma' = shift * sigma / (1 + (shift - 1) * sigma), so shift > 1 spends more steps near
    the noise end. ``shift = 1`` gives the uniform grid.

    Returns: ``[K + 1]`` tensor.
    """
    if num_steps < 1:
        raise ValueError(f"time_grid: num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"time_grid: shift must be > 0, got {shift}")
    t = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    if kind == "shifted":
        sigma = 1.0 - t
        sigma = shift * sigma / (1.0 + (shift - 1.0) * sigma)
        t = 1.0 - sigma
        t[0], t[-1] = 0.0, 1.0  # exact endpoints whatever the round-off of the shift
    elif kind != "uniform":
        raise ValueError(f"time_grid: kind must be 'uniform' or 'shifted', got {kind!r}")
    return t.to(device=device, dtype=dtype)
