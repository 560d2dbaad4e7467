"""Tests of flowrl.core.grids.time_grid against closed forms written out here."""

from __future__ import annotations

import pytest
import torch

from flowrl.core.grids import time_grid


@pytest.mark.parametrize("num_steps", [1, 2, 5, 10, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_equals_linspace(num_steps: int, dtype: torch.dtype) -> None:
    grid = time_grid(num_steps, dtype=dtype)
    assert grid.shape == (num_steps + 1,)
    assert grid.dtype == dtype
    # Oracle: t_k = k / K computed with python floats.
    expected = torch.tensor([k / num_steps for k in range(num_steps + 1)], dtype=dtype)
    torch.testing.assert_close(grid, expected, rtol=0, atol=1e-7 if dtype == torch.float32 else 1e-15)
    torch.testing.assert_close(grid, torch.linspace(0.0, 1.0, num_steps + 1, dtype=dtype))


def test_default_kind_is_uniform_and_default_dtype_is_float32() -> None:
    grid = time_grid(4)
    assert grid.dtype == torch.float32
    assert grid.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]  # exact binary fractions


@pytest.mark.parametrize("num_steps", [1, 3, 4, 10, 25])
@pytest.mark.parametrize("shift", [0.25, 0.5, 2.0, 3.0, 7.5])
def test_shifted_matches_sd3_closed_form(num_steps: int, shift: float) -> None:
    grid = time_grid(num_steps, "shifted", shift=shift, dtype=torch.float64)
    expected = []
    for k in range(num_steps + 1):
        sigma = 1.0 - k / num_steps  # noise level of the uniform grid
        sigma_shifted = shift * sigma / (1.0 + (shift - 1.0) * sigma)
        expected.append(1.0 - sigma_shifted)
    torch.testing.assert_close(grid, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_shifted_hand_values_k2_shift3() -> None:
    # K = 2, shift = 3: sigma = 1, 1/2, 0 -> sigma' = 1, (3/2)/(1 + 1) = 3/4, 0 -> t = 0, 1/4, 1.
    grid = time_grid(2, "shifted", shift=3.0, dtype=torch.float64)
    torch.testing.assert_close(grid, torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind,shift", [("uniform", 1.0), ("shifted", 1.0), ("shifted", 3.0), ("shifted", 12.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_steps", [1, 2, 7, 50])
def test_endpoints_exact_and_strictly_increasing(kind: str, shift: float, dtype: torch.dtype, num_steps: int) -> None:
    grid = time_grid(num_steps, kind, shift=shift, dtype=dtype)  # type: ignore[arg-type]
    assert grid.shape == (num_steps + 1,)
    assert grid.dtype == dtype
    assert grid[0].item() == 0.0
    assert grid[-1].item() == 1.0
    assert bool((grid[1:] > grid[:-1]).all())


def test_endpoints_exact_for_shift_below_one() -> None:
    """The docstring promises t_0 = 0 and t_K = 1 for any shift > 0; consumers rely on t in [0, 1]."""
    bad = {}
    for shift in (0.08, 0.3, 0.5, 0.7):
        for dtype in (torch.float32, torch.float64):
            grid = time_grid(8, "shifted", shift=shift, dtype=dtype)
            if grid[0].item() != 0.0 or grid[-1].item() != 1.0:
                bad[(shift, str(dtype))] = (grid[0].item(), grid[-1].item())
    assert not bad, f"endpoints (t_0, t_K) not exactly (0, 1): {bad}"


@pytest.mark.parametrize("num_steps", [1, 3, 10, 33])
def test_shift_one_equals_uniform(num_steps: int) -> None:
    shifted = time_grid(num_steps, "shifted", shift=1.0, dtype=torch.float64)
    uniform = time_grid(num_steps, "uniform", dtype=torch.float64)
    torch.testing.assert_close(shifted, uniform, rtol=0, atol=1e-15)


def test_shift_above_one_spends_more_steps_near_noise() -> None:
    # sigma' > sigma for shift > 1 and 0 < sigma < 1, so every interior t moves towards 0.
    shifted = time_grid(10, "shifted", shift=3.0, dtype=torch.float64)
    uniform = time_grid(10, dtype=torch.float64)
    assert bool((shifted[1:-1] < uniform[1:-1]).all())
    below = time_grid(10, "shifted", shift=0.5, dtype=torch.float64)
    assert bool((below[1:-1] > uniform[1:-1]).all())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_steps": 0},
        {"num_steps": -3},
        {"num_steps": 4, "kind": "shifted", "shift": 0.0},
        {"num_steps": 4, "kind": "shifted", "shift": -2.0},
        {"num_steps": 4, "kind": "cosine"},
    ],
)
def test_bad_args_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        time_grid(**kwargs)
