"""Tests of flowrl.core.transitions: ``unit_values``, ``unit_count``, ``steps_from_mask``.

Oracles: explicit small tensors with the expected values summed by hand in the comments.
"""

from __future__ import annotations

import pytest
import torch

from flowrl.core.transitions import Transitions, steps_from_mask, unit_count, unit_values

# Two samples (rows) with three stochastic steps each (columns); values differ per entry so
# that any mix-up of rows, columns or order shows.
PER_STEP = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
NUMEL = 2  # the event dims every per-step value was summed over


def test_chain_sum_is_the_row_sum() -> None:
    # 1 + 2 + 3 = 6, 4 + 5 + 6 = 15
    out = unit_values(PER_STEP, "chain", "sum", NUMEL)
    torch.testing.assert_close(out, torch.tensor([6.0, 15.0]), rtol=0, atol=0)


def test_chain_mean_divides_by_steps_times_event_numel() -> None:
    # 6 / (3 steps * 2 dims) = 1, 15 / 6 = 2.5
    out = unit_values(PER_STEP, "chain", "mean", NUMEL)
    torch.testing.assert_close(out, torch.tensor([1.0, 2.5]), rtol=0, atol=0)


def test_step_sum_is_row_major() -> None:
    # one value per (sample, step), sample by sample: not the column-major [1, 4, 2, 5, 3, 6]
    out = unit_values(PER_STEP, "step", "sum", NUMEL)
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), rtol=0, atol=0)


def test_step_mean_divides_by_event_numel_only() -> None:
    out = unit_values(PER_STEP, "step", "mean", NUMEL)
    torch.testing.assert_close(out, torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0]), rtol=0, atol=0)


def test_single_step_chain_and_step_units_agree() -> None:
    # S = 1 (one random step, a Gaussian policy): chain and step give the same values
    per_step = torch.tensor([[-3.0], [7.0], [0.5]])
    for reduce, expected in (("sum", [-3.0, 7.0, 0.5]), ("mean", [-1.0, 7.0 / 3.0, 0.5 / 3.0])):
        for unit in ("chain", "step"):
            out = unit_values(per_step, unit, reduce, 3)
            torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-7, atol=0)


def test_unit_values_keeps_gradients() -> None:
    per_step = PER_STEP.clone().requires_grad_(True)
    unit_values(per_step, "chain", "mean", NUMEL).sum().backward()
    # d/dx of sum_b (sum_s x_bs) / (3 * 2) = 1/6 everywhere
    torch.testing.assert_close(per_step.grad, torch.full_like(PER_STEP, 1.0 / 6.0))


def test_unit_values_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="per-step"):
        unit_values(PER_STEP.reshape(-1), "chain", "sum", NUMEL)
    with pytest.raises(ValueError, match="per-step"):
        unit_values(PER_STEP.reshape(2, 3, 1), "step", "sum", NUMEL)
    with pytest.raises(ValueError, match="sample_unit"):
        unit_values(PER_STEP, "episode", "sum", NUMEL)  # type: ignore[arg-type]


def test_unit_count() -> None:
    assert unit_count(2, PER_STEP, "chain") == 2
    assert unit_count(2, PER_STEP, "step") == 6


def test_steps_from_mask_picks_true_entries_in_increasing_order() -> None:
    mask = torch.tensor(
        [
            [False, True, True, False],
            [True, False, False, True],
            [False, False, True, True],
        ]
    )
    steps = steps_from_mask(mask)
    assert steps.dtype == torch.int64
    assert steps.tolist() == [[1, 2], [0, 3], [2, 3]]


def test_steps_from_mask_uniform_masks() -> None:
    k = 5
    all_true = torch.ones(3, k, dtype=torch.bool)
    assert steps_from_mask(all_true).tolist() == [list(range(k))] * 3
    one_each = torch.zeros(4, k, dtype=torch.bool)
    one_each[torch.arange(4), torch.tensor([4, 0, 2, 2])] = True
    assert steps_from_mask(one_each).tolist() == [[4], [0], [2], [2]]


def test_steps_from_mask_rejects_rows_with_different_counts() -> None:
    mask = torch.tensor([[True, True, False], [True, False, False]])
    with pytest.raises(ValueError, match="same number"):
        steps_from_mask(mask)
    # a row with no step among rows with one is also a different count
    mask = torch.tensor([[False, True, False], [False, False, False]])
    with pytest.raises(ValueError, match="same number"):
        steps_from_mask(mask)


def test_steps_from_mask_rejects_an_all_false_mask() -> None:
    with pytest.raises(ValueError, match="no stochastic step"):
        steps_from_mask(torch.zeros(3, 4, dtype=torch.bool))


def test_transitions_index_and_flatten_keep_fields_aligned() -> None:
    b, s, e = 3, 2, (2, 1)
    x_in = torch.arange(b * s * 2, dtype=torch.float32).view(b, s, *e)
    tr = Transitions(
        final=torch.arange(b * 2, dtype=torch.float32).view(b, *e),
        x_in=x_in,
        x_out=x_in + 100.0,
        steps=torch.tensor([[0, 1], [1, 2], [0, 2]]),
        log_prob=torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
        nfe=torch.tensor([4.0, 5.0, 6.0]),
    )
    sub = tr[torch.tensor([2, 0])]
    assert sub.steps.tolist() == [[0, 2], [0, 1]]
    assert sub.log_prob.tolist() == [[5.0, 6.0], [1.0, 2.0]]
    assert sub.nfe.tolist() == [6.0, 4.0]
    torch.testing.assert_close(sub.x_out, x_in[[2, 0]] + 100.0)
