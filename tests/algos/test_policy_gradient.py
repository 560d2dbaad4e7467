"""The non-finite guard: skipped updates are counted per network and stop the run after
``limit`` in a row, whichever of the loss and the gradient is non-finite."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowrl.algos.policy_gradient import NonFiniteGuard, NumericalError, guarded_step


def _net_and_opt():
    net = nn.Linear(3, 1)
    return net, torch.optim.SGD(net.parameters(), lr=0.1)


def _loss(net, scale: float = 1.0):
    return net(torch.ones(2, 3)).sum() * scale


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_finite_losses_with_non_finite_gradients_still_stop_the_run():
    net, opt = _net_and_opt()
    guard = NonFiniteGuard(3, "lower the learning rate")
    before = [p.detach().clone() for p in net.parameters()]
    for it in range(2):
        loss = _NanGradient.apply(_loss(net))
        assert math.isfinite(float(loss.detach()))
        assert math.isnan(guarded_step(opt, net.parameters(), loss, 1.0, guard, it))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))  # no step taken
    # a finite update of another network does not end the policy's run of skips
    other, other_opt = _net_and_opt()
    assert math.isfinite(guarded_step(other_opt, other.parameters(), _loss(other), 1.0, guard, 2, "value"))
    with pytest.raises(NumericalError, match="in 3 updates in a row at iteration 3; lower the learning rate"):
        guarded_step(opt, net.parameters(), _NanGradient.apply(_loss(net)), 1.0, guard, 3)
    assert guard.pop_skipped() == 3 and guard.pop_skipped() == 0


def test_a_successful_step_ends_the_run_of_skips():
    net, opt = _net_and_opt()
    guard = NonFiniteGuard(2, "hint")
    nan = torch.tensor(float("nan"))
    assert math.isnan(guarded_step(opt, net.parameters(), _loss(net) * nan, 1.0, guard, 0))
    assert math.isfinite(guarded_step(opt, net.parameters(), _loss(net), 1.0, guard, 1))
    assert math.isnan(guarded_step(opt, net.parameters(), _loss(net) * nan, 1.0, guard, 2))  # 1 in a row again
    with pytest.raises(NumericalError, match="the policy loss was non-finite"):
        guarded_step(opt, net.parameters(), _loss(net) * nan, 1.0, guard, 3)
