"""Tests of flowrl.core.steps.

Oracles: torch.distributions.Normal, the step formulas of DESIGN.md written out by hand in the
tests, and Monte-Carlo integration of exact velocity fields whose marginals are known in closed
form (convention: t = 0 noise, t = 1 data, x_t = (1 - t) eps + t x1, v* = x1 - eps).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.distributions import Normal

from flowrl.core.grids import time_grid
from flowrl.core.steps import (
    StepOutput,
    cps_step,
    euler_step,
    flow_sde_std_scale,
    flow_sde_step,
    gaussian_entropy,
    gaussian_log_prob,
    gaussian_step,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The Monte-Carlo loops run thousands of small element-wise ops; intra-op threads on a busy
    2-core machine slow them down ~10x (barrier contention), a single thread does not."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rand(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _normal_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Oracle: sum over event dims of Normal(mean, std).log_prob(x)."""
    std = torch.broadcast_to(torch.as_tensor(std, dtype=mean.dtype), mean.shape)
    return Normal(mean, std).log_prob(x).flatten(1).sum(1)


# --------------------------------------------------------------------------------------------
# Gaussian log-prob and entropy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("std_shape", [(5, 4, 2), (5, 1, 1), (1, 4, 2), (4, 2), ()])
def test_gaussian_log_prob_matches_normal(std_shape: tuple[int, ...]) -> None:
    x = _rand(5, 4, 2, seed=0)
    mean = _rand(5, 4, 2, seed=1)
    std = 0.1 + _rand(*std_shape, seed=2).abs() if std_shape else torch.tensor(0.37, dtype=F64)
    lp = gaussian_log_prob(x, mean, std)
    assert lp.shape == (5,)
    torch.testing.assert_close(lp, _normal_log_prob(x, mean, std), rtol=1e-12, atol=1e-12)


def test_gaussian_log_prob_hand_value() -> None:
    # One sample, two dims: x = (1, 0), mean = (0, 0), std = (1, 2):
    # log N(1; 0, 1) + log N(0; 0, 4) = (-1/2 - log sqrt(2 pi)) + (-log 2 - log sqrt(2 pi)).
    lp = gaussian_log_prob(
        torch.tensor([[1.0, 0.0]], dtype=F64), torch.zeros(1, 2, dtype=F64), torch.tensor([[1.0, 2.0]], dtype=F64)
    )
    expected = -0.5 - math.log(2.0) - math.log(2.0 * math.pi)
    assert lp.item() == pytest.approx(expected, abs=1e-14)


@pytest.mark.parametrize("std_shape", [(5, 4, 2), (5, 1, 1), (5, 4, 1)])
def test_gaussian_entropy_matches_normal(std_shape: tuple[int, ...]) -> None:
    std = 0.05 + _rand(*std_shape, seed=3).abs()
    ent = gaussian_entropy(std, (4, 2))
    assert ent.shape == (5,)
    expected = Normal(torch.zeros(5, 4, 2, dtype=F64), torch.broadcast_to(std, (5, 4, 2))).entropy().flatten(1).sum(1)
    torch.testing.assert_close(ent, expected, rtol=1e-12, atol=1e-12)


def test_gaussian_entropy_is_minus_expected_log_prob() -> None:
    # Monte-Carlo: H = -E[log p(x)], standard error of the estimate ~ sqrt(D / 2 / N).
    std = torch.tensor([[[0.3], [2.0]]], dtype=F64)  # [1, 2, 1] -> event (2, 3)
    n = 100_000
    mean = torch.zeros(n, 2, 3, dtype=F64)
    x = mean + std * _rand(n, 2, 3, seed=4)
    mc = -gaussian_log_prob(x, mean, std).mean().item()
    ent = gaussian_entropy(std, (2, 3)).item()
    assert mc == pytest.approx(ent, abs=5 * math.sqrt(6 / 2 / n))


# --------------------------------------------------------------------------------------------
# Euler (ODE) step
# --------------------------------------------------------------------------------------------


def test_euler_step_scalar_time_hand() -> None:
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=F64)
    v = torch.tensor([[4.0, 1.0], [-1.0, 2.0]], dtype=F64)
    out = euler_step(x, v, 0.25, 0.75)  # h = 0.5
    assert isinstance(out, StepOutput)
    expected = torch.tensor([[3.0, -1.5], [0.0, 4.0]], dtype=F64)
    torch.testing.assert_close(out.next_x, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(out.mean, expected, rtol=0, atol=1e-15)
    assert bool((out.std == 0).all())
    assert out.log_prob.shape == (2,)
    assert bool((out.log_prob == 0).all())


def test_euler_step_tensor_scalar_time() -> None:
    x = _rand(3, 4, 2, seed=5)
    v = _rand(3, 4, 2, seed=6)
    out = euler_step(x, v, torch.tensor(0.1), torch.tensor(0.35))
    torch.testing.assert_close(out.next_x, x + 0.25 * v, rtol=1e-6, atol=1e-7)


def test_euler_step_per_sample_time_hand() -> None:
    x = torch.tensor([[1.0, 1.0], [2.0, -2.0], [0.0, 5.0]], dtype=F64)
    v = torch.tensor([[1.0, -1.0], [2.0, 2.0], [3.0, 1.0]], dtype=F64)
    t = torch.tensor([0.0, 0.5, 0.9], dtype=F64)
    t_next = torch.tensor([0.25, 1.0, 1.0], dtype=F64)  # h = 0.25, 0.5, 0.1
    out = euler_step(x, v, t, t_next)
    expected = torch.tensor([[1.25, 0.75], [3.0, -1.0], [0.3, 5.1]], dtype=F64)
    torch.testing.assert_close(out.next_x, expected, rtol=0, atol=1e-14)
    assert bool((out.log_prob == 0).all()) and out.log_prob.shape == (3,)
    assert bool((out.std == 0).all())


def test_step_rejects_bad_time_shape() -> None:
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError):
        euler_step(x, x, torch.zeros(4), 1.0)
    with pytest.raises(ValueError):
        gaussian_step(x, x, 0.0, torch.ones(3, 1), 0.1)


def test_low_precision_input_returns_input_dtype() -> None:
    x = _rand(4, 3, seed=7, dtype=torch.float32).to(torch.bfloat16)
    v = _rand(4, 3, seed=8, dtype=torch.float32).to(torch.bfloat16)
    out = euler_step(x, v, 0.2, 0.6)
    assert out.next_x.dtype == torch.bfloat16
    assert out.mean.dtype == torch.float32  # arithmetic in float32
    expected = x.float() + 0.4 * v.float()
    torch.testing.assert_close(out.mean, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.next_x, out.mean.to(torch.bfloat16))


# --------------------------------------------------------------------------------------------
# Gaussian (ReinFlow / Flow-Noise) step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_element_std", [False, True])
def test_gaussian_step_with_given_noise(per_element_std: bool) -> None:
    x, v, noise = _rand(6, 4, 2, seed=10), _rand(6, 4, 2, seed=11), _rand(6, 4, 2, seed=12)
    # 0.25 is exact in float32 too (a python-float std's precision is tested separately).
    std = 0.05 + 0.3 * _rand(6, 4, 2, seed=13).abs() if per_element_std else 0.25
    out = gaussian_step(x, v, 0.3, 0.55, std, noise=noise)
    mean = x + 0.25 * v  # h = 0.25
    std_t = torch.broadcast_to(torch.as_tensor(std, dtype=F64), mean.shape)
    torch.testing.assert_close(out.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.next_x, mean + std_t * noise, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.broadcast_to(out.std, mean.shape), std_t)
    torch.testing.assert_close(out.log_prob, _normal_log_prob(out.next_x, mean, std_t), rtol=1e-10, atol=1e-10)


def test_gaussian_step_per_sample_time() -> None:
    x, v, noise = _rand(3, 2, seed=14), _rand(3, 2, seed=15), _rand(3, 2, seed=16)
    t = torch.tensor([0.0, 0.2, 0.6], dtype=F64)
    t_next = torch.tensor([0.1, 0.6, 1.0], dtype=F64)
    out = gaussian_step(x, v, t, t_next, torch.tensor(0.1, dtype=F64), noise=noise)
    mean = x + torch.tensor([[0.1], [0.4], [0.4]], dtype=F64) * v
    torch.testing.assert_close(out.next_x, mean + 0.1 * noise, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.log_prob, _normal_log_prob(out.next_x, mean, torch.tensor(0.1, dtype=F64)))


def test_gaussian_step_python_float_std_keeps_float64_precision() -> None:
    """With float64 states the arithmetic runs in float64; a python-float std (0.2 is not a
    float32 number) must not be rounded to float32 on the way."""
    x, v, noise = _rand(3, 2, seed=18), _rand(3, 2, seed=19), _rand(3, 2, seed=20)
    out = gaussian_step(x, v, 0.0, 0.5, 0.2, noise=noise)
    assert torch.broadcast_to(out.std, x.shape).eq(0.2).all(), out.std.item() - 0.2
    torch.testing.assert_close(out.next_x, x + 0.5 * v + 0.2 * noise, rtol=1e-13, atol=1e-13)


def test_gaussian_step_sample_is_standard_normal_around_mean() -> None:
    # Monte-Carlo: z = (next - mean) / std must be N(0, 1) per element.
    n = 50_000
    x = torch.zeros(n, 2, dtype=F64)
    v = torch.ones(n, 2, dtype=F64)
    std = torch.tensor([0.5, 2.0], dtype=F64)
    out = gaussian_step(x, v, 0.0, 0.5, std, generator=torch.Generator().manual_seed(17))
    z = (out.next_x - 0.5) / std
    se_mean, se_var = 1 / math.sqrt(n), math.sqrt(2 / n)
    assert bool((z.mean(0).abs() < 5 * se_mean).all())
    assert bool(((z.var(0) - 1).abs() < 5 * se_var).all())


# --------------------------------------------------------------------------------------------
# Re-evaluation with a stored sample, generators
# --------------------------------------------------------------------------------------------


def _call(kind: str, x: torch.Tensor, v: torch.Tensor, t, t_next, **kw) -> StepOutput:
    if kind == "gaussian":
        return gaussian_step(x, v, t, t_next, 0.15, **kw)
    if kind == "flow_sde":
        return flow_sde_step(x, v, t, t_next, 0.7, 0.1, **kw)
    if kind == "cps":
        return cps_step(x, v, t, t_next, 0.7, **kw)
    raise AssertionError(kind)


KINDS = ["gaussian", "flow_sde", "cps"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_reevaluation_returns_stored_sample_and_same_log_prob(kind: str, dtype: torch.dtype, tol: float) -> None:
    x = _rand(8, 4, 2, seed=20, dtype=dtype)
    v = _rand(8, 4, 2, seed=21, dtype=dtype)
    g = torch.Generator().manual_seed(22)
    first = _call(kind, x, v, 0.3, 0.5, generator=g)
    stored = first.next_x.clone()
    again = _call(kind, x, v, 0.3, 0.5, next_x=stored)
    assert again.next_x is stored or torch.equal(again.next_x, stored)
    assert torch.equal(again.next_x, first.next_x)
    torch.testing.assert_close(again.log_prob, first.log_prob, rtol=tol, atol=tol)
    # The log-prob is that of the stored sample under the step's Gaussian (Normal oracle).
    oracle = _normal_log_prob(stored.to(again.mean.dtype), again.mean, again.std)
    torch.testing.assert_close(again.log_prob, oracle, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", KINDS)
def test_reevaluation_with_bfloat16_state(kind: str) -> None:
    """StepOutput.log_prob is documented as the log-density of next_x, and next_x is returned in
    x's dtype: re-evaluating the returned sample must give back the same log-prob (PPO ratio 1)."""
    x = _rand(8, 4, 2, seed=23, dtype=torch.float32).to(torch.bfloat16)
    v = _rand(8, 4, 2, seed=24, dtype=torch.float32).to(torch.bfloat16)
    first = _call(kind, x, v, 0.3, 0.5, generator=torch.Generator().manual_seed(25))
    assert first.next_x.dtype == torch.bfloat16
    again = _call(kind, x, v, 0.3, 0.5, next_x=first.next_x)
    torch.testing.assert_close(again.log_prob, first.log_prob, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_reevaluation_of_another_sample_uses_that_sample(kind: str) -> None:
    x, v = _rand(5, 3, seed=26), _rand(5, 3, seed=27)
    ref = _call(kind, x, v, 0.2, 0.6, generator=torch.Generator().manual_seed(0))
    other = ref.mean + 0.3 * _rand(5, 3, seed=28)
    out = _call(kind, x, v, 0.2, 0.6, next_x=other)
    torch.testing.assert_close(out.next_x, other, rtol=0, atol=0)
    torch.testing.assert_close(out.log_prob, _normal_log_prob(other, ref.mean, ref.std), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_reevaluation_rejects_wrong_shape(kind: str) -> None:
    x, v = _rand(5, 3, seed=29), _rand(5, 3, seed=30)
    with pytest.raises(ValueError):
        _call(kind, x, v, 0.2, 0.6, next_x=torch.zeros(5, 4, dtype=F64))


@pytest.mark.parametrize("kind", KINDS)
def test_generator_seed_determines_sample(kind: str) -> None:
    x, v = _rand(16, 4, 2, seed=31), _rand(16, 4, 2, seed=32)
    a = _call(kind, x, v, 0.2, 0.4, generator=torch.Generator().manual_seed(123))
    b = _call(kind, x, v, 0.2, 0.4, generator=torch.Generator().manual_seed(123))
    c = _call(kind, x, v, 0.2, 0.4, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a.next_x, b.next_x)
    assert torch.equal(a.log_prob, b.log_prob)
    assert not torch.allclose(a.next_x, c.next_x)


@pytest.mark.parametrize("kind", KINDS)
def test_given_noise_is_used(kind: str) -> None:
    x, v, noise = _rand(4, 3, seed=33), _rand(4, 3, seed=34), _rand(4, 3, seed=35)
    out = _call(kind, x, v, 0.25, 0.5, noise=noise)
    torch.testing.assert_close(out.next_x, out.mean + out.std * noise, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Flow-SDE step: formula by hand
# --------------------------------------------------------------------------------------------


def test_flow_sde_std_scale_hand() -> None:
    t = torch.tensor([0.0, 0.05, 0.2, 0.5, 1.0], dtype=F64)
    s = flow_sde_std_scale(t, 0.7, 0.1)
    # denominators floored at 0.1 for t = 0 and 0.05.
    expected = [0.7 * math.sqrt(1 / 0.1), 0.7 * math.sqrt(0.95 / 0.1), 0.7 * math.sqrt(0.8 / 0.2), 0.7, 0.0]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t,t_next", [(0.0, 0.1), (0.3, 0.45), (0.9, 1.0)])
def test_flow_sde_step_hand_formula(t: float, t_next: float) -> None:
    a, t_floor = 0.6, 0.1
    x, v, noise = _rand(4, 3, 2, seed=40), _rand(4, 3, 2, seed=41), _rand(4, 3, 2, seed=42)
    out = flow_sde_step(x, v, t, t_next, a, t_floor, noise=noise)
    h = t_next - t
    s = a * math.sqrt((1 - t) / max(t, t_floor))
    score = -(x - t * v) / (1 - t)  # -eps_hat / (1 - t)
    mean = x + h * (v + 0.5 * s * s * score)
    std = s * math.sqrt(h)
    torch.testing.assert_close(out.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.broadcast_to(out.std, mean.shape), torch.full_like(mean, std))
    torch.testing.assert_close(out.next_x, mean + std * noise, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.log_prob, _normal_log_prob(out.next_x, mean, torch.tensor(std, dtype=F64)))


def test_flow_sde_step_per_sample_time_matches_scalar_calls() -> None:
    a, t_floor = 0.7, 0.125
    t = torch.tensor([0.0, 0.125, 0.5, 0.875], dtype=F64)
    t_next = torch.tensor([0.125, 0.25, 0.625, 1.0], dtype=F64)
    x, v, noise = _rand(4, 3, seed=43), _rand(4, 3, seed=44), _rand(4, 3, seed=45)
    out = flow_sde_step(x, v, t, t_next, a, t_floor, noise=noise)
    assert out.log_prob.shape == (4,)
    for i in range(4):
        ti, tn = float(t[i]), float(t_next[i])
        s = a * math.sqrt((1 - ti) / max(ti, t_floor))
        mean = x[i] + (tn - ti) * (v[i] - 0.5 * s * s * (x[i] - ti * v[i]) / (1 - ti))
        std = s * math.sqrt(tn - ti)
        torch.testing.assert_close(out.next_x[i], mean + std * noise[i], rtol=1e-12, atol=1e-12)
        lp = Normal(mean, std).log_prob(out.next_x[i]).sum()
        torch.testing.assert_close(out.log_prob[i], lp, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# CPS step: formula by hand, deterministic last step, per-sample times
# --------------------------------------------------------------------------------------------


def test_cps_step_hand_formula() -> None:
    a, t, t_next = 0.7, 0.2, 0.5
    x, v, noise = _rand(4, 3, seed=50), _rand(4, 3, seed=51), _rand(4, 3, seed=52)
    out = cps_step(x, v, t, t_next, a, noise=noise)
    x_hat = x + (1 - t) * v
    eps_hat = x - t * v
    std = (1 - t_next) * math.sin(a * math.pi / 2)
    mean = t_next * x_hat + math.sqrt((1 - t_next) ** 2 - std**2) * eps_hat
    torch.testing.assert_close(out.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.next_x, mean + std * noise, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.log_prob, _normal_log_prob(out.next_x, mean, torch.tensor(std, dtype=F64)))


def test_cps_last_step_is_deterministic() -> None:
    x, v = _rand(5, 2, 2, seed=53), _rand(5, 2, 2, seed=54)
    out = cps_step(x, v, 0.75, 1.0, 0.7, generator=torch.Generator().manual_seed(0))
    x_hat = x + 0.25 * v
    torch.testing.assert_close(out.next_x, x_hat, rtol=1e-12, atol=1e-12)
    assert bool((out.std == 0).all())
    assert bool((out.log_prob == 0).all()) and out.log_prob.shape == (5,)
    # Re-evaluating a stored final sample returns it unchanged with log-prob 0.
    again = cps_step(x, v, 0.75, 1.0, 0.7, next_x=out.next_x)
    assert torch.equal(again.next_x, out.next_x)
    assert bool((again.log_prob == 0).all())


def test_cps_zero_noise_is_ddim() -> None:
    # a = 0: std = 0, next = t' x_hat + (1 - t') eps_hat (deterministic DDIM step), log-prob 0.
    x, v = _rand(4, 3, seed=55), _rand(4, 3, seed=56)
    out = cps_step(x, v, 0.3, 0.6, 0.0)
    expected = 0.6 * (x + 0.7 * v) + 0.4 * (x - 0.3 * v)
    torch.testing.assert_close(out.next_x, expected, rtol=1e-12, atol=1e-12)
    assert bool((out.log_prob == 0).all())


def test_cps_per_sample_time_mixed_final_step() -> None:
    a = 0.7
    sin = math.sin(a * math.pi / 2)
    t = torch.tensor([0.0, 0.5, 0.75, 0.25], dtype=F64)
    t_next = torch.tensor([0.25, 1.0, 0.875, 1.0], dtype=F64)
    x, v, noise = _rand(4, 3, seed=57), _rand(4, 3, seed=58), _rand(4, 3, seed=59)
    out = cps_step(x, v, t, t_next, a, noise=noise)
    assert out.log_prob.shape == (4,)
    for i in range(4):
        ti, tn = float(t[i]), float(t_next[i])
        x_hat, eps_hat = x[i] + (1 - ti) * v[i], x[i] - ti * v[i]
        std = (1 - tn) * sin
        mean = tn * x_hat + math.sqrt(max((1 - tn) ** 2 - std**2, 0.0)) * eps_hat
        if tn == 1.0:
            torch.testing.assert_close(out.next_x[i], x_hat, rtol=1e-12, atol=1e-12)
            assert out.log_prob[i].item() == 0.0
            assert torch.broadcast_to(out.std, x.shape)[i].eq(0).all()
        else:
            torch.testing.assert_close(out.next_x[i], mean + std * noise[i], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(out.log_prob[i], Normal(mean, std).log_prob(out.next_x[i]).sum())
    # Re-evaluation in the mixed case.
    again = cps_step(x, v, t, t_next, a, next_x=out.next_x)
    assert torch.equal(again.next_x, out.next_x)
    torch.testing.assert_close(again.log_prob, out.log_prob, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Monte-Carlo: 1-D Gaussian data, exact velocity field
# --------------------------------------------------------------------------------------------
#
# x1 ~ N(mu, s^2), eps ~ N(0, 1) independent, x_t = (1 - t) eps + t x1.
#   E[x_t] = t mu,  V_t = Var[x_t] = (1 - t)^2 + t^2 s^2.
# The target u = x1 - eps is jointly Gaussian with x_t:
#   E[u] = mu,  Cov(u, x_t) = Cov(x1, t x1) - Cov(eps, (1 - t) eps) = t s^2 - (1 - t),
# so the exact (conditional-mean) velocity is
#   v(x, t) = E[u | x_t = x] = mu + (t s^2 - (1 - t)) / V_t * (x - t mu).
# Check: d/dt V_t = -2 (1 - t) + 2 t s^2 = 2 * slope * V_t, as the ODE x' = v requires.

MU, S = 1.5, 0.5


def _gauss_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    var_t = t * t * S * S + (1 - t) ** 2
    return MU + (t * S * S - (1 - t)) / var_t * (x - t * MU)


@functools.lru_cache(maxsize=4)
def _integrate_flow_sde(num_steps: int, n: int, seed: int, noise_level: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grid = time_grid(num_steps, dtype=F64)
    t_floor = float(grid[1])
    x = torch.randn(n, 1, generator=g, dtype=F64)
    for k in range(num_steps):
        t, t_next = float(grid[k]), float(grid[k + 1])
        x = flow_sde_step(x, _gauss_velocity(x, t), t, t_next, noise_level, t_floor, generator=g).next_x
    return x


def test_flow_sde_monte_carlo_gaussian_marginal() -> None:
    x = _integrate_flow_sde(200, 100_000, seed=60)
    mean, var = x.mean().item(), x.var().item()
    # 2 % of the target (MC standard errors: mean 0.0016 = 0.1 %, variance 0.0011 = 0.45 %).
    assert mean == pytest.approx(MU, rel=0.02)
    assert var == pytest.approx(S * S, rel=0.02)


def test_flow_sde_converges_with_k() -> None:
    # Euler-Maruyama error (largest at the guarded first step) shrinks as K grows. The variance
    # error at K = 10 is several % (measured ~8 %), far above the MC standard error (~0.4 %).
    n = 100_000
    err = {}
    for k in (10, 200):
        x = _integrate_flow_sde(k, n, seed=60)  # K = 200 run shared with the test above
        err[k] = abs(x.var().item() - S * S) / (S * S)
    se = math.sqrt(2 / n)
    assert err[200] < 0.02
    assert err[10] > err[200] + 5 * se


def test_euler_ode_with_exact_field_matches_gaussian_marginal() -> None:
    # The exact field is affine in x, so the Euler map is affine: pushing a standardised sample
    # (mean 0, variance 1 exactly) through it gives the exact mean and variance of the map
    # applied to N(0, 1), free of MC noise. Euler's error is O(1/K).
    n, num_steps = 2_000, 1_000
    x = _rand(n, 1, seed=62)
    x = (x - x.mean()) / x.std(unbiased=False)
    grid = time_grid(num_steps, dtype=F64)
    for k in range(num_steps):
        t, t_next = float(grid[k]), float(grid[k + 1])
        x = euler_step(x, _gauss_velocity(x, t), t, t_next).next_x
    assert x.mean().item() == pytest.approx(MU, rel=2e-3)
    assert x.var(unbiased=False).item() == pytest.approx(S * S, rel=5e-3)


# --------------------------------------------------------------------------------------------
# Monte-Carlo: CPS keeps x_t = t c + (1 - t) N(0, 1) exactly for point-mass data x1 = c
# --------------------------------------------------------------------------------------------
#
# For x1 = c, x_t = t c + (1 - t) eps and the exact velocity is v = c - eps = (c - x) / (1 - t)
# (at t = 1 the state is c and no velocity is needed). Then x_hat = c and eps_hat = eps, and
# next = t' c + sqrt((1 - t')^2 - std^2) eps + std z with eps, z independent N(0, 1): the
# coefficients t' and (1 - t') are kept exactly at any K.

C = torch.tensor([0.8, -0.5, 2.0], dtype=F64)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 7])
@pytest.mark.parametrize("kind", ["uniform", "shifted"])
def test_cps_point_mass_exact_marginals_at_every_grid_point(num_steps: int, kind: str) -> None:
    n = 200_000
    g = torch.Generator().manual_seed(70 + num_steps)
    grid = time_grid(num_steps, kind, shift=3.0, dtype=F64)  # type: ignore[arg-type]
    x = torch.randn(n, 3, generator=g, dtype=F64)
    for k in range(num_steps):
        t, t_next = float(grid[k]), float(grid[k + 1])
        v = (C - x) / (1 - t)
        out = cps_step(x, v, t, t_next, 0.7, generator=g)
        x = out.next_x
        if k == num_steps - 1:
            # last step: deterministic, log-prob 0, reaches c.
            assert t_next == 1.0
            assert bool((out.std == 0).all())
            assert bool((out.log_prob == 0).all())
            torch.testing.assert_close(x, C.expand(n, 3), rtol=0, atol=1e-9)
        else:
            sd = 1 - t_next
            assert bool((out.std > 0).all())
            se_mean = sd / math.sqrt(n)
            se_var = sd * sd * math.sqrt(2 / n)
            mean, var = x.mean(0), x.var(0)
            assert bool(((mean - t_next * C).abs() < 5 * se_mean).all()), (k, mean, t_next * C)
            assert bool(((var - sd * sd).abs() < 5 * se_var).all()), (k, var, sd * sd)


def test_cps_point_mass_per_sample_times() -> None:
    # Four groups of samples at different (t, t') in one batched call, the last one at t' = 1.
    pairs = [(0.0, 0.3), (0.2, 0.45), (0.6, 0.9), (0.5, 1.0)]
    m = 60_000
    t = torch.tensor([p[0] for p in pairs], dtype=F64).repeat_interleave(m)
    t_next = torch.tensor([p[1] for p in pairs], dtype=F64).repeat_interleave(m)
    g = torch.Generator().manual_seed(80)
    eps = torch.randn(4 * m, 3, generator=g, dtype=F64)
    x = t[:, None] * C + (1 - t[:, None]) * eps  # exact marginal at t
    v = (C - x) / (1 - t[:, None])
    out = cps_step(x, v, t, t_next, 0.7, generator=g)
    for i, (_, tn) in enumerate(pairs):
        xs = out.next_x[i * m : (i + 1) * m]
        lp = out.log_prob[i * m : (i + 1) * m]
        if tn == 1.0:
            torch.testing.assert_close(xs, C.expand(m, 3), rtol=0, atol=1e-9)
            assert bool((lp == 0).all())
            continue
        sd = 1 - tn
        assert bool(((xs.mean(0) - tn * C).abs() < 5 * sd / math.sqrt(m)).all())
        assert bool(((xs.var(0) - sd * sd).abs() < 5 * sd * sd * math.sqrt(2 / m)).all())
        assert bool((lp != 0).all())
