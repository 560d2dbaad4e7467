"""Tests of flowrl.core.losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from flowrl.core.losses import clipped_surrogate, value_loss

F64 = torch.float64


def test_clipped_surrogate_hand_case() -> None:
    clip = 0.2
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1, 0.9]
    advantages = torch.tensor([2.0, -1.0, 1.0, -3.0, 4.0, -2.0], dtype=F64)
    old = torch.tensor([-1.0, 0.3, 2.0, -0.7, 0.0, 1.2], dtype=F64)
    log_prob = (old + torch.log(torch.tensor(ratios, dtype=F64))).requires_grad_(True)
    loss, m = clipped_surrogate(log_prob, old, advantages, clip)
    # per sample min(r A, clip(r, 0.8, 1.2) A):
    #   r=1.5, A= 2: min( 3.0,  2.4) =  2.4   (clipped, no gradient)
    #   r=1.5, A=-1: min(-1.5, -1.2) = -1.5   (unclipped: pessimistic side)
    #   r=0.5, A= 1: min( 0.5,  0.8) =  0.5   (unclipped)
    #   r=0.5, A=-3: min(-1.5, -2.4) = -2.4   (clipped, no gradient)
    #   r=1.1, A= 4: 4.4 (inside the range)
    #   r=0.9, A=-2: -1.8 (inside the range)
    # mean = (2.4 - 1.5 + 0.5 - 2.4 + 4.4 - 1.8) / 6 = 1.6 / 6
    assert loss.item() == pytest.approx(-1.6 / 6, abs=1e-12)
    assert m["clip_fraction"] == pytest.approx(4 / 6)
    kl = sum((r - 1) - math.log(r) for r in ratios) / 6
    assert m["approx_kl"] == pytest.approx(kl, rel=1e-6)
    assert m["ratio_mean"] == pytest.approx(1.0, rel=1e-9)
    assert m["ratio_min"] == pytest.approx(0.5, rel=1e-9)
    assert m["ratio_max"] == pytest.approx(1.5, rel=1e-9)
    # d loss / d log_prob_i = -A_i r_i / B where the unclipped term is chosen, else 0.
    loss.backward()
    grad = [0.0, 1.0 * 1.5 / 6, -1.0 * 0.5 / 6, 0.0, -4.0 * 1.1 / 6, 2.0 * 0.9 / 6]
    torch.testing.assert_close(log_prob.grad, torch.tensor(grad, dtype=F64), rtol=1e-10, atol=1e-12)
    for value in m.values():
        assert isinstance(value, float)


def test_clipped_surrogate_ratio_one_is_minus_mean_advantage() -> None:
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(32, generator=g, dtype=F64)
    adv = torch.randn(32, generator=g, dtype=F64)
    loss, m = clipped_surrogate(lp, lp.clone(), adv, 0.2)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-12)
    assert m["clip_fraction"] == 0.0
    assert m["approx_kl"] == pytest.approx(0.0, abs=1e-15)
    assert m["ratio_mean"] == m["ratio_min"] == m["ratio_max"] == 1.0


def test_clipped_surrogate_approx_kl_nonnegative() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        lp = torch.randn(16, generator=g, dtype=F64)
        old = lp + 0.5 * torch.randn(16, generator=g, dtype=F64)
        _, m = clipped_surrogate(lp, old, torch.randn(16, generator=g, dtype=F64), 0.1)
        assert m["approx_kl"] > 0.0


def test_clipped_surrogate_shape_error() -> None:
    with pytest.raises(ValueError):
        clipped_surrogate(torch.zeros(4), torch.zeros(4), torch.zeros(5), 0.2)
    with pytest.raises(ValueError):
        clipped_surrogate(torch.zeros(4), torch.zeros(3), torch.zeros(4), 0.2)


def test_value_loss_plain_hand() -> None:
    values = torch.tensor([1.0, 3.0, 0.0], dtype=F64)
    returns = torch.tensor([2.0, 2.0, 0.5], dtype=F64)
    loss, m = value_loss(values, returns)
    # 0.5 * mean(1, 1, 0.25) = 0.375
    assert loss.item() == pytest.approx(0.375, abs=1e-12)
    # explained variance = 1 - Var(R - V) / Var(R): R - V = (1, -1, 0.5) -> pop. var 78/108;
    # R = (2, 2, 0.5) -> pop. var 0.5; 1 - (78/108) / 0.5 = -4/9
    assert m["explained_variance"] == pytest.approx(-4 / 9, abs=1e-12)


def test_value_loss_clipped_hand() -> None:
    values = torch.tensor([1.0, 3.0, 0.0], dtype=F64)
    old_values = torch.tensor([0.5, 2.0, 0.2], dtype=F64)
    returns = torch.tensor([2.0, 2.0, 0.5], dtype=F64)
    loss, _ = value_loss(values, returns, old_values=old_values, clip=0.3)
    # sample 0: unclipped (1 - 2)^2 = 1;   clipped V = 0.5 + 0.3 = 0.8 -> (0.8 - 2)^2 = 1.44 -> 1.44
    # sample 1: unclipped (3 - 2)^2 = 1;   clipped V = 2.0 + 0.3 = 2.3 -> 0.09            -> 1
    # sample 2: unclipped (0 - 0.5)^2 = .25; clipped V = 0.2 - 0.2 = 0.0 -> 0.25          -> 0.25
    assert loss.item() == pytest.approx(0.5 * (1.44 + 1.0 + 0.25) / 3, abs=1e-12)


def test_value_loss_perfect_and_constant_returns() -> None:
    r = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    loss, m = value_loss(r.clone(), r)
    assert loss.item() == 0.0
    assert m["explained_variance"] == pytest.approx(1.0)
    _, m = value_loss(torch.tensor([0.0, 1.0]), torch.tensor([3.0, 3.0]))
    assert math.isnan(m["explained_variance"])


def test_value_loss_errors() -> None:
    with pytest.raises(ValueError):
        value_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError):
        value_loss(torch.zeros(3), torch.zeros(3), clip=0.2)
