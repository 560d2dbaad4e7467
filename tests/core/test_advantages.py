"""Tests of flowrl.core.advantages against hand computations and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from flowrl.core.advantages import gae, group_advantages

F64 = torch.float64


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def test_gae_hand_case_terminated_and_truncated() -> None:
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    # time-major [T = 3, N = 2]; column 0 terminates at t = 1, column 1 is truncated at t = 1.
    rewards = _t([[1.0, 0.0], [2.0, -1.0], [3.0, 2.0]])
    values = _t([[0.5, 1.0], [1.0, 0.0], [1.5, 2.0]])
    next_values = _t([[1.0, 0.5], [1.5, 4.0], [2.0, 1.0]])
    terminated = torch.tensor([[False, False], [True, False], [False, False]])
    truncated = torch.tensor([[False, False], [False, True], [False, False]])
    dones = terminated | truncated
    adv, ret = gae(rewards, values, next_values, terminated, dones, gamma, lam)

    # Column 0 (terminated at t = 1: no bootstrap there, recursion cut):
    #   delta_2 = 3 + 0.9 * 2.0 - 1.5 = 3.3          (rollout ends, bootstraps from next_values)
    #   delta_1 = 2 + 0             - 1.0 = 1.0      (terminated)
    #   delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4
    #   A_2 = 3.3;  A_1 = 1.0 + 0.72 * 0 * 3.3 = 1.0;  A_0 = 1.4 + 0.72 * 1.0 = 2.12
    # Column 1 (truncated at t = 1: bootstraps from next_values[1] = 4.0, recursion cut):
    #   delta_2 = 2 + 0.9 * 1.0 - 2.0 = 0.9
    #   delta_1 = -1 + 0.9 * 4.0 - 0.0 = 2.6
    #   delta_0 = 0 + 0.9 * 0.5 - 1.0 = -0.55
    #   A_2 = 0.9;  A_1 = 2.6 + 0.72 * 0 * 0.9 = 2.6;  A_0 = -0.55 + 0.72 * 2.6 = 1.322
    expected_adv = _t([[2.12, 1.322], [1.0, 2.6], [3.3, 0.9]])
    torch.testing.assert_close(adv, expected_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, expected_adv + values, rtol=0, atol=1e-12)
    # returns written out: column 0: 2.62, 2.0, 4.8; column 1: 2.322, 2.6, 2.9
    torch.testing.assert_close(ret, _t([[2.62, 2.322], [2.0, 2.6], [4.8, 2.9]]), rtol=0, atol=1e-12)


def test_gae_terminated_ignores_next_value_truncated_uses_it() -> None:
    # One step, same data: changing next_values changes the truncated advantage by gamma * dV,
    # and leaves the terminated one unchanged.
    r, v = _t([[1.0, 1.0]]), _t([[0.0, 0.0]])
    term = torch.tensor([[True, False]])
    dones = torch.tensor([[True, True]])
    a1, _ = gae(r, v, _t([[0.0, 0.0]]), term, dones, 0.99, 0.95)
    a2, _ = gae(r, v, _t([[10.0, 10.0]]), term, dones, 0.99, 0.95)
    assert a2[0, 0].item() == pytest.approx(a1[0, 0].item(), abs=1e-12)
    assert a2[0, 1].item() - a1[0, 1].item() == pytest.approx(0.99 * 10.0, abs=1e-12)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value() -> None:
    g = torch.Generator().manual_seed(0)
    t_len, n = 6, 3
    rewards = torch.randn(t_len, n, generator=g, dtype=F64)
    values = torch.randn(t_len, n, generator=g, dtype=F64)
    bootstrap = torch.randn(1, n, generator=g, dtype=F64)
    next_values = torch.cat([values[1:], bootstrap])  # consistent with values, no episode ends
    zeros = torch.zeros(t_len, n, dtype=torch.bool)
    adv, ret = gae(rewards, values, next_values, zeros, zeros, 1.0, 1.0)
    reward_to_go = torch.stack([rewards[t:].sum(0) for t in range(t_len)]) + bootstrap
    torch.testing.assert_close(adv, reward_to_go - values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, reward_to_go, rtol=1e-12, atol=1e-12)


def test_gae_lambda_zero_is_td_error() -> None:
    g = torch.Generator().manual_seed(1)
    r, v, nv = (torch.randn(4, 2, generator=g, dtype=F64) for _ in range(3))
    term = torch.tensor([[0, 0], [1, 0], [0, 0], [0, 1]], dtype=torch.bool)
    adv, _ = gae(r, v, nv, term, term, 0.9, 0.0)
    torch.testing.assert_close(adv, r + 0.9 * (~term).double() * nv - v, rtol=1e-12, atol=1e-12)


def test_gae_matches_explicit_sum_definition() -> None:
    # A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}, the sum stopping after the first done step.
    gamma, lam = 0.97, 0.9
    g = torch.Generator().manual_seed(2)
    t_len, n = 7, 4
    r, v, nv = (torch.randn(t_len, n, generator=g, dtype=F64) for _ in range(3))
    term = torch.rand(t_len, n, generator=g) < 0.15
    trunc = (torch.rand(t_len, n, generator=g) < 0.15) & ~term
    dones = term | trunc
    adv, _ = gae(r, v, nv, term.float(), dones.float(), gamma, lam)
    expected = torch.zeros(t_len, n, dtype=F64)
    for j in range(n):
        for t in range(t_len):
            total = 0.0
            for step in range(t, t_len):
                delta = r[step, j].item() + gamma * (0.0 if term[step, j] else nv[step, j].item()) - v[step, j].item()
                total += (gamma * lam) ** (step - t) * delta
                if dones[step, j]:
                    break
            expected[t, j] = total
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)


def test_gae_shape_errors() -> None:
    a = torch.zeros(3, 2)
    with pytest.raises(ValueError):
        gae(a, torch.zeros(3, 3), a, a, a, 0.9, 0.9)
    with pytest.raises(ValueError):
        gae(a, a, a, torch.zeros(2, 2), a, 0.9, 0.9)
    with pytest.raises(ValueError):
        gae(a, a, a, a, torch.zeros(3), 0.9, 0.9)
    b = torch.zeros(3)
    with pytest.raises(ValueError):
        gae(b, b, b, b, b, 0.9, 0.9)


def test_group_advantages_closed_form_population_std() -> None:
    rewards = _t([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0], [0.0, 1.0, 0.0, 1.0]])
    eps = 1e-4
    adv, has_signal = group_advantages(rewards, eps=eps)
    # group 0: mean 3, deviations (-2, -1, 0, 3), population variance 14 / 4 = 3.5
    s0 = math.sqrt(3.5)
    # group 2: mean 0.5, population std 0.5
    expected = _t(
        [
            [-2 / (s0 + eps), -1 / (s0 + eps), 0.0, 3 / (s0 + eps)],
            [0.0, 0.0, 0.0, 0.0],
            [-0.5 / (0.5 + eps), 0.5 / (0.5 + eps), -0.5 / (0.5 + eps), 0.5 / (0.5 + eps)],
        ]
    )
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    assert has_signal.tolist() == [True, False, True]


def test_group_advantages_uses_population_not_sample_std() -> None:
    # [0, 2]: population std 1 (sample std would be sqrt 2) -> advantages -+1 / (1 + eps).
    adv, _ = group_advantages(_t([[0.0, 2.0]]), eps=0.0)
    torch.testing.assert_close(adv, _t([[-1.0, 1.0]]), rtol=0, atol=1e-15)


def test_group_advantages_default_eps_and_signal() -> None:
    adv, has_signal = group_advantages(_t([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0 + 1e-9]]))
    assert has_signal.tolist() == [False, True]
    assert bool((adv[0] == 0).all())
    # tiny spread: std ~ 4.7e-10 << eps = 1e-4, so advantages stay tiny
    assert adv[1].abs().max().item() < 1e-5


def test_group_advantages_shape_errors() -> None:
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4, 1))
