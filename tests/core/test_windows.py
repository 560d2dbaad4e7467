"""Tests of flowrl.core.windows against hand-computed schedules and frequency checks.

A sliding window slides over the eligible steps only: its positions are ranks among the E
eligible steps, so it always holds min(size, E) eligible steps (and no other).
"""

from __future__ import annotations

import math

import pytest
import torch

from flowrl.core.grids import time_grid
from flowrl.core.windows import AllSteps, OneRandomStep, SlidingWindow
from flowrl.models.sampler import CPSConverter


def _eligible(*flags: int) -> torch.Tensor:
    return torch.tensor([bool(f) for f in flags])


def _window_mask(begin: int, size: int, eligible: torch.Tensor) -> torch.Tensor:
    """The eligible steps whose rank among the eligible steps is in [begin, begin + size)."""
    rank, row = 0, []
    for flag in eligible.tolist():
        row.append(bool(flag) and begin <= rank < begin + size)
        rank += bool(flag)
    return torch.tensor(row)


# --------------------------------------------------------------------------------------------
# AllSteps
# --------------------------------------------------------------------------------------------


def test_all_steps_gives_all_eligible() -> None:
    eligible = _eligible(1, 1, 0, 1, 0)
    mask = AllSteps().mask(3, eligible, iteration=7, generator=None)
    assert mask.shape == (3, 5) and mask.dtype == torch.bool
    assert mask.tolist() == [[True, True, False, True, False]] * 3
    # rows are independent storage (the caller may edit a row)
    mask[0, 0] = False
    assert bool(mask[1, 0]) and bool(eligible[0])


@pytest.mark.parametrize("window", [AllSteps(), OneRandomStep(), SlidingWindow(2)])
def test_bad_eligible_raises(window) -> None:
    with pytest.raises(ValueError):
        window.mask(2, torch.zeros(4, dtype=torch.bool), 0, None)  # nothing eligible
    with pytest.raises(ValueError):
        window.mask(2, torch.ones(4), 0, None)  # not bool
    with pytest.raises(ValueError):
        window.mask(2, torch.ones(2, 4, dtype=torch.bool), 0, None)  # not [K]


# --------------------------------------------------------------------------------------------
# OneRandomStep
# --------------------------------------------------------------------------------------------


def test_one_random_step_one_per_row_among_eligible_and_uniform() -> None:
    eligible = _eligible(1, 0, 1, 1, 0, 1)
    n = 40_000
    mask = OneRandomStep().mask(n, eligible, iteration=0, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (n, 6) and mask.dtype == torch.bool
    assert bool((mask.sum(dim=1) == 1).all())
    assert not bool(mask[:, ~eligible].any())
    counts = mask.sum(dim=0)[eligible].double()
    expected = n / 4
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # chi-square with 3 dof: P(chi2 > 25) ~ 1.6e-5.
    assert chi2 < 25.0, counts
    # each count within 5 % of n / 4 (its standard error is ~0.9 %)
    assert bool(((counts / expected - 1).abs() < 0.05).all())


def test_one_random_step_single_eligible() -> None:
    eligible = _eligible(0, 0, 1, 0)
    mask = OneRandomStep().mask(5, eligible, 0, torch.Generator().manual_seed(1))
    assert mask.tolist() == [[False, False, True, False]] * 5


def test_one_random_step_generator_determinism() -> None:
    eligible = _eligible(1, 1, 1, 1, 1, 1, 1, 0)
    a = OneRandomStep().mask(64, eligible, 0, torch.Generator().manual_seed(5))
    b = OneRandomStep().mask(64, eligible, 0, torch.Generator().manual_seed(5))
    c = OneRandomStep().mask(64, eligible, 0, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# SlidingWindow: progressive
# --------------------------------------------------------------------------------------------


def test_progressive_start_follows_closed_form() -> None:
    k, size, interval, stride = 10, 3, 5, 2
    w = SlidingWindow(size, "progressive", shift_interval=interval, stride=stride)
    for it in range(80):
        assert w.start(k, it) == min((it // interval) * stride, k - size), it


def test_progressive_hand_table() -> None:
    w = SlidingWindow(3, "progressive", shift_interval=5, stride=2)
    # iterations 0-4 -> 0, 5-9 -> 2, 10-14 -> 4, 15-19 -> 6, then clipped at K - size = 7.
    table = {0: 0, 4: 0, 5: 2, 9: 2, 10: 4, 14: 4, 15: 6, 19: 6, 20: 7, 24: 7, 25: 7, 1000: 7}
    assert {it: w.start(10, it) for it in table} == table


def test_progressive_mask_is_window_and_eligible() -> None:
    eligible = _eligible(1, 1, 1, 1, 1, 1, 1, 1, 1, 0)  # last step deterministic (CPS)
    w = SlidingWindow(3, "progressive", shift_interval=5, stride=2)
    # E = 9 eligible steps: positions 0, 2, 4, then clipped at E - size = 6
    for it, begin in [(0, 0), (7, 2), (12, 4), (17, 6), (100, 6)]:
        mask = w.mask(4, eligible, it, None)
        assert mask.shape == (4, 10)
        expected = _window_mask(begin, 3, eligible)
        assert bool((mask == expected).all()), (it, mask[0], expected)
        assert int(mask[0].sum()) == 3
    # at the end the window holds the last 3 eligible steps, not the ineligible last step
    assert w.mask(1, eligible, 100, None)[0].tolist() == [False] * 6 + [True, True, True, False]


def test_window_positions_are_ranks_among_eligible_steps() -> None:
    # eligible steps 1, 3, 4 (E = 3); size 2, stride 1: positions 0 then 1 (= E - size)
    eligible = _eligible(0, 1, 0, 1, 1, 0)
    w = SlidingWindow(2, "progressive", shift_interval=1)
    assert w.mask(1, eligible, 0, None)[0].tolist() == [False, True, False, True, False, False]
    for it in (1, 2, 50):
        assert w.mask(1, eligible, it, None)[0].tolist() == [False, False, False, True, True, False]
    roll = SlidingWindow(1, "progressive", shift_interval=2, roll_back=True)
    picked = [int(roll.mask(1, eligible, it, None)[0].nonzero()) for it in range(12)]
    assert picked == [1, 1, 3, 3, 4, 4] * 2  # each eligible step in turn, then back to the first


def test_progressive_roll_back_stride_one_wraps() -> None:
    # K = 6, size 2: starts 0..4, then back to 0.
    w = SlidingWindow(2, "progressive", shift_interval=3, stride=1, roll_back=True)
    for it in range(60):
        assert w.start(6, it) == (it // 3) % 5, it


def test_progressive_roll_back_restarts_at_zero() -> None:
    """Positions 0, stride, 2 stride, ... while below K - size, then K - size (so the last
    step is covered), then with roll_back back to 0.
    K = 10, size 3 (last start 7), stride 3: 0, 3, 6, 7, 0, 3, 6, 7, ..."""
    w = SlidingWindow(3, "progressive", shift_interval=1, stride=3, roll_back=True)
    assert [w.start(10, it) for it in range(9)] == [0, 3, 6, 7, 0, 3, 6, 7, 0]
    stay = SlidingWindow(3, "progressive", shift_interval=1, stride=3)
    assert [stay.start(10, it) for it in range(6)] == [0, 3, 6, 7, 7, 7]


def test_size_larger_than_chain_covers_everything() -> None:
    eligible = _eligible(1, 1, 1)
    w = SlidingWindow(5, "progressive", shift_interval=1)
    assert w.start(3, 10) == 0
    assert w.mask(2, eligible, 10, None).all()
    # larger than the eligible steps: it holds all E of them
    assert w.mask(1, _eligible(0, 1, 1, 0), 10, None)[0].tolist() == [False, True, True, False]


def test_window_always_lands_on_eligible_steps() -> None:
    """Once past the eligible steps the window stays on the last ones: it never runs out."""
    eligible = _eligible(1, 1, 0, 0)
    w = SlidingWindow(1, "progressive", shift_interval=1)
    assert w.mask(1, eligible, 0, None)[0].tolist() == [True, False, False, False]
    for it in (1, 2, 3, 100):  # the old window [2, 3) held no eligible step from iteration 2
        assert w.mask(1, eligible, it, None)[0].tolist() == [False, True, False, False], it
    two = SlidingWindow(2, "progressive", shift_interval=1)
    for it in range(6):
        assert two.mask(1, eligible, it, None)[0].tolist() == [True, True, False, False], it
    rand = SlidingWindow(1, "random", seed=4)
    picks = {int(rand.mask(1, eligible, it, None)[0].nonzero()) for it in range(200)}
    assert picks == {0, 1}  # both eligible steps, never steps 2 or 3 (miss prob 2 * 2**-200)


@pytest.mark.parametrize(("k", "size"), [(2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (10, 1), (10, 2)])
def test_cps_sliding_window_never_runs_out_of_eligible_steps(k, size) -> None:
    """Regression: CPS with a sliding window of size 1 crashed mid-run. The old window's last
    position was K - size over all K steps, but CPS never makes the step into t = 1 stochastic,
    so from iteration (K - 1) * shift_interval (progressive), or on ~1/K of the iterations
    (random), the window held no eligible step. Every mask must hold exactly ``size`` eligible
    steps and no ineligible one, and over a run the window must visit every eligible step."""
    eligible = CPSConverter(0.7).eligible(time_grid(k))
    assert eligible.tolist() == [True] * (k - 1) + [False]  # the CPS eligibility, as the sampler sees it
    interval, batch = 3, 2
    windows = {
        "progressive": (SlidingWindow(size, "progressive", shift_interval=interval), range((k + 2) * interval + 1)),
        "roll_back": (SlidingWindow(size, "progressive", shift_interval=interval, roll_back=True), range(60)),
        "decay": (SlidingWindow(size, "decay", shift_interval=4, decay_rate=0.5), range(40)),
        "random": (SlidingWindow(size, "random", seed=5), range(400)),
    }
    for mode, (w, iterations) in windows.items():
        visited = torch.zeros(k, dtype=torch.bool)
        for it in iterations:
            mask = w.mask(batch, eligible, it, torch.Generator().manual_seed(it))
            assert mask.shape == (batch, k), (mode, it)
            assert bool((mask == mask[0]).all()), (mode, it)  # batch-wide
            assert int(mask[0, eligible].sum()) == size, (mode, it, mask[0].tolist())
            assert not bool(mask[0, ~eligible].any()), (mode, it, mask[0].tolist())
            steps = mask[0].nonzero().flatten()
            # consecutive among the eligible steps (here steps 0..K-2)
            assert steps.tolist() == list(range(int(steps[0]), int(steps[0]) + size)), (mode, it)
            visited |= mask[0]
        assert torch.equal(visited, eligible), (mode, visited.tolist())
    # progressive: the window reaches the last eligible step and stays there
    last = SlidingWindow(size, "progressive", shift_interval=interval).mask(1, eligible, 10_000, None)[0]
    assert last.nonzero().flatten().tolist() == list(range(k - 1 - size, k - 1))


# --------------------------------------------------------------------------------------------
# SlidingWindow: random
# --------------------------------------------------------------------------------------------


def test_random_mode_deterministic_given_seed_and_iteration() -> None:
    k, size = 10, 3
    eligible = torch.ones(k, dtype=torch.bool)
    a = SlidingWindow(size, "random", seed=11)
    b = SlidingWindow(size, "random", seed=11)
    starts_a = [a.start(k, it) for it in range(200)]
    # same (seed, iteration) -> same start, in any order and whatever generator is passed
    assert [b.start(k, it) for it in reversed(range(200))] == starts_a[::-1]
    for it in (0, 17, 199):
        m1 = a.mask(4, eligible, it, torch.Generator().manual_seed(1))
        m2 = b.mask(4, eligible, it, torch.Generator().manual_seed(2))
        assert torch.equal(m1, m2)
        assert bool((m1 == m1[0]).all())  # the same window for the whole batch
        assert torch.equal(m1[0], _window_mask(starts_a[it], size, eligible))
    # valid range and coverage of all K - size + 1 = 8 starts (miss prob ~ 8 (7/8)^200 ~ 2e-11)
    assert set(starts_a) == set(range(k - size + 1))
    # a different seed gives a different sequence
    c = SlidingWindow(size, "random", seed=12)
    assert [c.start(k, it) for it in range(200)] != starts_a


def test_random_mode_roughly_uniform() -> None:
    w = SlidingWindow(2, "random", seed=3)
    n, starts = 4_000, 4  # K = 5, size 2 -> starts 0..3
    counts = [0] * starts
    for it in range(n):
        counts[w.start(5, it)] += 1
    expected = n / starts
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert chi2 < 25.0, counts  # 3 dof


# --------------------------------------------------------------------------------------------
# SlidingWindow: decay
# --------------------------------------------------------------------------------------------


def test_decay_hand_schedule() -> None:
    # shift_interval 16, decay 0.5, min 3: the j-th shift waits max(3, 16 * 0.5**j):
    #   j = 0: 16, j = 1: 8, j = 2: 4, j = 3: max(3, 2) = 3, j = 4: max(3, 1) = 3, j = 5: 3, ...
    # cumulative shift iterations: 16, 24, 28, 31, 34, 37, ...
    # K = 8, size 2 -> last start 6 (reached at iteration 37, then it stays).
    w = SlidingWindow(2, "decay", shift_interval=16, stride=1, decay_rate=0.5, min_shift_interval=3)
    shift_at = [16, 24, 28, 31, 34, 37]
    for it in range(120):
        expected = min(sum(1 for s in shift_at if it >= s), 6)
        assert w.start(8, it) == expected, it
    table = {0: 0, 15: 0, 16: 1, 23: 1, 24: 2, 27: 2, 28: 3, 30: 3, 31: 4, 33: 4, 34: 5, 36: 5, 37: 6, 10_000: 6}
    assert {it: w.start(8, it) for it in table} == table


def test_decay_with_stride() -> None:
    # shift_interval 10, decay 0.5, min 4, stride 2, K = 9, size 3 (last start 6):
    # waits 10, 5, max(4, 2.5) = 4, 4 -> shifts at 10, 15, 19, 23; starts 0, 2, 4, 6, 6 (clipped).
    w = SlidingWindow(3, "decay", shift_interval=10, stride=2, decay_rate=0.5, min_shift_interval=4)
    table = {0: 0, 9: 0, 10: 2, 14: 2, 15: 4, 18: 4, 19: 6, 22: 6, 23: 6, 500: 6}
    assert {it: w.start(9, it) for it in table} == table


def test_decay_rate_one_is_progressive() -> None:
    d = SlidingWindow(3, "decay", shift_interval=7, stride=2, decay_rate=1.0)
    for it in range(100):
        assert d.start(12, it) == min((it // 7) * 2, 9), it


# --------------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0},
        {"size": -1},
        {"size": 2, "shift_interval": 0},
        {"size": 2, "stride": 0},
        {"size": 2, "min_shift_interval": 0},
        {"size": 2, "decay_rate": 0.0},
        {"size": 2, "decay_rate": -0.5},
        {"size": 2, "decay_rate": 1.5},
        {"size": 2, "decay_rate": math.nan},
    ],
)
def test_bad_args_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SlidingWindow(**kwargs)


def test_unknown_mode_raises() -> None:
    with pytest.raises(ValueError):
        SlidingWindow(2, mode="spiral").start(10, 0)  # type: ignore[arg-type]
