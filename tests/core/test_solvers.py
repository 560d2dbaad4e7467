"""Tests of flowrl.core.solvers.

Oracle: 1-D Gaussian data x ~ N(mu, s^2) with independent noise eps ~ N(0, 1). Along the path
x_t = (1 - t) eps + t x everything is jointly Gaussian, so the marginal velocity is affine in x:
x_t ~ N(t mu, S_t^2) with S_t^2 = (1 - t)^2 + t^2 s^2, Cov(x - eps, x_t) = t s^2 - (1 - t), and

    v(x, t) = E[x - eps | x_t = x] = mu + (t s^2 - (1 - t)) / S_t^2 * (x - t mu).

Since S_t S_t' = t s^2 - (1 - t), the ODE solution from noise z at t = 0 is x(t) = t mu + S_t z,
ending at x(1) = mu + s z (the monotone transport map). Both facts are checked below
independently of the solvers (Monte-Carlo regression, derivative of the closed form, a
hand-written fine Euler loop). The other oracle is diffusers' DPMSolverMultistepScheduler.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from flowrl.core.grids import time_grid
from flowrl.core.solvers import SOLVERS, dpm_solver_2m_step, heun_step, ode_solve
from flowrl.core.steps import euler_step

F64 = torch.float64
# (mu, s): a narrow target off the origin and a wide one with a negative mean.
CASES = [(0.7, 0.3), (-1.0, 2.0)]
Z = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.5, 1.0, 2.0], dtype=F64).view(-1, 1)  # [B, 1] initial noise


def gaussian_velocity(mu: float, s: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Exact marginal velocity of the N(mu, s^2) target; ignores t_next (a plain flow field)."""

    def velocity(x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        var = (1.0 - t) ** 2 + t * t * s * s
        return mu + (t * s * s - (1.0 - t)) / var * (x - t * mu)

    return velocity


def exact_state(mu: float, s: float, t: float | torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x(t) = t mu + S_t z on the ODE trajectory started from noise z at t = 0."""
    t = torch.as_tensor(t, dtype=z.dtype)
    return t * mu + torch.sqrt((1.0 - t) ** 2 + t * t * s * s) * z


def solve_error(mu: float, s: float, solver: str, k: int, t0: float = 0.0, t1: float = 1.0) -> float:
    """Max over the z batch of |x_K - x(t1)| for a K-step solve on a uniform grid over [t0, t1]."""
    grid = torch.linspace(t0, t1, k + 1, dtype=F64)
    x_end, _ = ode_solve(gaussian_velocity(mu, s), exact_state(mu, s, t0, Z), grid, solver)
    return (x_end - exact_state(mu, s, t1, Z)).abs().max().item()


def ratios(errors: list[float]) -> list[float]:
    return [a / b for a, b in zip(errors[:-1], errors[1:], strict=True)]


# --------------------------------------------------------------------------------------------
# The oracle itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mu", "s"), CASES)
@pytest.mark.parametrize("t", [0.2, 0.5, 0.9])
def test_velocity_is_the_conditional_mean(mu: float, s: float, t: float) -> None:
    """Least squares of (x - eps) on x_t over Monte-Carlo pairs recovers v's slope and intercept."""
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x = mu + s * torch.randn(n, generator=g, dtype=F64)
    eps = torch.randn(n, generator=g, dtype=F64)
    x_t = (1.0 - t) * eps + t * x
    design = torch.stack([torch.ones_like(x_t), x_t], dim=1)
    coef = torch.linalg.lstsq(design, (x - eps).unsqueeze(1)).solution.squeeze(1)
    v = gaussian_velocity(mu, s)
    tt = torch.tensor(t, dtype=F64)
    intercept = v(torch.zeros((), dtype=F64), tt, tt)
    slope = v(torch.ones((), dtype=F64), tt, tt) - intercept
    torch.testing.assert_close(coef, torch.stack([intercept, slope]), atol=0.02, rtol=0.0)


@pytest.mark.parametrize(("mu", "s"), CASES)
def test_closed_form_trajectory_solves_the_ode(mu: float, s: float) -> None:
    t = torch.linspace(0.0, 1.0, 21, dtype=F64)[1:-1].requires_grad_(True)
    z = torch.full_like(t, 1.3)
    x = exact_state(mu, s, t, z)
    (dx_dt,) = torch.autograd.grad(x.sum(), t)
    torch.testing.assert_close(dx_dt, gaussian_velocity(mu, s)(x.detach(), t.detach(), t.detach()))
    torch.testing.assert_close(exact_state(mu, s, 0.0, Z), Z)
    torch.testing.assert_close(exact_state(mu, s, 1.0, Z), mu + s * Z)


@pytest.mark.parametrize(("mu", "s"), CASES)
def test_fine_euler_converges_to_the_transport_map(mu: float, s: float) -> None:
    """A hand-written 4096-step Euler loop (not the code under test) ends at mu + s z."""
    k = 4096
    v = gaussian_velocity(mu, s)
    x = Z.clone()
    for i in range(k):
        t = torch.tensor(i / k, dtype=F64)
        x = x + v(x, t, t) / k
    torch.testing.assert_close(x, mu + s * Z, atol=3e-3, rtol=0.0)


# --------------------------------------------------------------------------------------------
# Convergence order
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mu", "s"), CASES)
def test_euler_is_first_order(mu: float, s: float) -> None:
    r = ratios([solve_error(mu, s, "euler", k) for k in (8, 16, 32)])
    assert all(1.7 < q < 2.3 for q in r), r


@pytest.mark.parametrize(("mu", "s"), CASES)
def test_heun_is_second_order_on_the_full_interval(mu: float, s: float) -> None:
    r = ratios([solve_error(mu, s, "heun", k) for k in (32, 64, 128)])
    assert all(3.3 < q < 4.7 for q in r), r


@pytest.mark.parametrize("solver", ["heun", "dpm_solver_2m"])
@pytest.mark.parametrize(("mu", "s"), CASES)
def test_second_order_on_an_interior_interval(solver: str, mu: float, s: float) -> None:
    """On [0.1, 0.9], started from the exact x(0.1), both solvers show the clean ratio 4."""
    r = ratios([solve_error(mu, s, solver, k, 0.1, 0.9) for k in (64, 128, 256)])
    assert all(3.3 < q < 4.7 for q in r), r


@pytest.mark.parametrize(("mu", "s"), CASES)
def test_dpm_solver_2m_full_interval_is_second_order_up_to_a_log(mu: float, s: float) -> None:
    """On a grid uniform in t, lambda = logit(t) runs to -inf/+inf, so the steps next to t = 0 and
    t = 1 stay O(1) long in lambda whatever K. Their local errors are ~1/(K^2 j) (j: steps from the
    end), which sums to ~log(K)/K^2: the ratio approaches 4 only like 4 log(K)/log(2K) (3.6 at
    K = 512). Far from first order, though; and the log-corrected ratio is close to 4."""
    ks = (128, 256, 512)
    errors = [solve_error(mu, s, "dpm_solver_2m", k) for k in ks]
    r = ratios(errors)
    assert all(3.1 < q < 4.0 for q in r), r
    corrected = [q * math.log(2 * k) / math.log(k) for q, k in zip(r, ks[:-1], strict=True)]
    assert all(3.6 < q < 4.4 for q in corrected), corrected


@pytest.mark.parametrize(("mu", "s"), CASES)
@pytest.mark.parametrize("k", [16, 32])
def test_second_order_beats_euler_at_equal_nfe(mu: float, s: float, k: int) -> None:
    euler_k, euler_2k = solve_error(mu, s, "euler", k), solve_error(mu, s, "euler", 2 * k)
    heun, dpm = solve_error(mu, s, "heun", k), solve_error(mu, s, "dpm_solver_2m", k)
    assert heun < euler_2k / 3, (heun, euler_2k)
    assert dpm < euler_k / 3, (dpm, euler_k)


# --------------------------------------------------------------------------------------------
# ode_solve bookkeeping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_nfe_counts_velocity_calls(solver: str, k: int) -> None:
    calls: list[tuple[float, float]] = []
    field = gaussian_velocity(0.7, 0.3)

    def counted(x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        assert t.ndim == 0 and t_next.ndim == 0
        calls.append((t.item(), t_next.item()))
        return field(x, t, t_next)

    grid = torch.linspace(0.0, 1.0, k + 1, dtype=F64)
    _, nfe = ode_solve(counted, Z.clone(), grid, solver)
    assert nfe == len(calls) == {"euler": k, "heun": 2 * k, "dpm_solver_2m": k}[solver]
    g = grid.tolist()
    if solver == "heun":
        # predictor at (t_i, t_{i+1}), corrector's instantaneous velocity at (t_{i+1}, t_{i+1})
        expected = [pair for i in range(k) for pair in ((g[i], g[i + 1]), (g[i + 1], g[i + 1]))]
    else:
        expected = [(g[i], g[i + 1]) for i in range(k)]
    assert calls == expected


def test_unknown_solver_raises_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="euler, heun, dpm_solver_2m"):
        ode_solve(gaussian_velocity(0.0, 1.0), Z.clone(), torch.linspace(0.0, 1.0, 5), "rk4")  # type: ignore[arg-type]


def test_bad_grid_raises() -> None:
    with pytest.raises(ValueError, match="grid"):
        ode_solve(gaussian_velocity(0.0, 1.0), Z.clone(), torch.zeros(1))


def test_euler_solve_matches_hand_loop() -> None:
    grid = time_grid(7, "shifted", 3.0, dtype=F64)
    v = gaussian_velocity(-1.0, 2.0)
    x = Z.clone()
    for i in range(7):
        x = x + (grid[i + 1] - grid[i]) * v(x, grid[i], grid[i + 1])
    out, _ = ode_solve(v, Z.clone(), grid, "euler")
    torch.testing.assert_close(out, x, atol=1e-12, rtol=0.0)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_result_keeps_input_dtype(solver: str, dtype: torch.dtype) -> None:
    x = Z.to(dtype).view(-1, 1, 1).expand(-1, 2, 3).contiguous()  # [B, *E] with E = (2, 3)
    out, _ = ode_solve(gaussian_velocity(0.7, 0.3), x, time_grid(6), solver)
    assert out.dtype == dtype and out.shape == x.shape
    ref = exact_state(0.7, 0.3, 1.0, Z).view(-1, 1, 1).expand(-1, 2, 3)
    torch.testing.assert_close(out.double(), ref, atol=0.2, rtol=0.0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_gradients_are_finite(solver: str) -> None:
    """The first-order fallbacks at t = 0 and t = 1 must not leak inf/NaN into backward."""
    x = Z.clone().requires_grad_(True)
    out, _ = ode_solve(gaussian_velocity(-1.0, 2.0), x, time_grid(6, dtype=F64), solver)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all()
    # x(1) = mu + s z: d x(1) / dz = s = 2 up to the discretisation error
    torch.testing.assert_close(grad, torch.full_like(grad, 2.0), atol=0.5, rtol=0.0)


# --------------------------------------------------------------------------------------------
# Single steps
# --------------------------------------------------------------------------------------------


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_heun_step_formula() -> None:
    x, v, v_next = _rand(4, 3, 2, seed=0), _rand(4, 3, 2, seed=1), _rand(4, 3, 2, seed=2)
    torch.testing.assert_close(heun_step(x, v, v_next, 0.25, 0.5), x + 0.125 * (v + v_next))
    t, t_next = torch.tensor([0.0, 0.1, 0.5, 0.9], dtype=F64), torch.tensor([0.2, 0.3, 0.6, 1.0], dtype=F64)
    h = (t_next - t).view(-1, 1, 1)
    torch.testing.assert_close(heun_step(x, v, v_next, t, t_next), x + 0.5 * h * (v + v_next))


def test_heun_is_exact_on_a_linear_in_time_velocity() -> None:
    """dx/dt = a + b t: the trapezoid rule integrates it exactly."""
    x, a, b = _rand(3, 2, seed=0), _rand(3, 2, seed=1), _rand(3, 2, seed=2)
    out, _ = ode_solve(lambda x_, t, t_next: a + b * t, x, time_grid(3, dtype=F64), "heun")
    torch.testing.assert_close(out, x + a + 0.5 * b)


@pytest.mark.parametrize(("t", "t_next"), [(0.0, 0.25), (0.3, 0.5), (0.75, 1.0)])
def test_dpm_first_order_is_euler_exactly(t: float, t_next: float) -> None:
    x, v = _rand(4, 3, 2, seed=0), _rand(4, 3, 2, seed=1)
    next_x, x0 = dpm_solver_2m_step(x, v, t, t_next)
    assert torch.equal(next_x, euler_step(x, v, t, t_next).next_x)
    torch.testing.assert_close(x0, x + (1.0 - t) * v)


@pytest.mark.parametrize(("t_prev", "t", "t_next"), [(0.5, 0.75, 1.0), (0.0, 0.25, 0.5)])
def test_dpm_falls_back_to_euler_at_the_ends(t_prev: float, t: float, t_next: float) -> None:
    """t_next = 1 (sigma_next = 0, lower order final) or t_prev = 0 (lambda_prev = -inf)."""
    x, v, x0_prev = _rand(4, 3, 2, seed=0), _rand(4, 3, 2, seed=1), _rand(4, 3, 2, seed=2)
    next_x, _ = dpm_solver_2m_step(x, v, t, t_next, x0_prev, t_prev)
    assert torch.equal(next_x, euler_step(x, v, t, t_next).next_x)


def test_dpm_solver_1_formula_equals_euler() -> None:
    """The docstring's algebra: (sigma'/sigma) x - alpha' (exp(-h) - 1) x0 = x + (t' - t) v."""
    x, v = _rand(5, 2, seed=0), _rand(5, 2, seed=1)
    for t, tn in [(0.1, 0.2), (0.4, 0.9), (0.05, 0.95)]:
        h = math.log(tn / (1 - tn)) - math.log(t / (1 - t))
        dpm1 = (1 - tn) / (1 - t) * x - tn * (math.exp(-h) - 1) * (x + (1 - t) * v)
        torch.testing.assert_close(dpm1, euler_step(x, v, t, tn).next_x, atol=1e-12, rtol=0.0)


def test_dpm_second_order_formula() -> None:
    x, v, x0_prev = _rand(4, 3, seed=0), _rand(4, 3, seed=1), _rand(4, 3, seed=2)
    tp, t, tn = 0.2, 0.35, 0.6
    lam = [math.log(u / (1 - u)) for u in (tp, t, tn)]
    h = lam[2] - lam[1]
    r = (lam[1] - lam[0]) / h
    x0 = x + (1 - t) * v
    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    expected = (1 - tn) / (1 - t) * x - tn * (math.exp(-h) - 1) * d
    next_x, x0_out = dpm_solver_2m_step(x, v, t, tn, x0_prev, tp)
    torch.testing.assert_close(next_x, expected)
    torch.testing.assert_close(x0_out, x0)
    # with x0_prev = x0 (constant data prediction) the second-order step reduces to the first-order one
    same, _ = dpm_solver_2m_step(x, v, t, tn, x0, tp)
    torch.testing.assert_close(same, euler_step(x, v, t, tn).next_x)


def test_dpm_per_sample_times_match_scalar_calls() -> None:
    """[B] times mixing second-order rows with each fallback equal the row-by-row scalar calls."""
    x, v, x0_prev = _rand(5, 3, 2, seed=0), _rand(5, 3, 2, seed=1), _rand(5, 3, 2, seed=2)
    t_prev = torch.tensor([0.2, 0.0, 0.5, 0.1, 0.3], dtype=F64)
    t = torch.tensor([0.35, 0.25, 0.75, 0.4, 0.3], dtype=F64)
    t_next = torch.tensor([0.6, 0.5, 1.0, 0.45, 0.7], dtype=F64)
    next_x, x0 = dpm_solver_2m_step(x, v, t, t_next, x0_prev, t_prev)
    for i in range(5):
        row, row_x0 = dpm_solver_2m_step(x[i : i + 1], v[i : i + 1], t[i], t_next[i], x0_prev[i : i + 1], t_prev[i])
        torch.testing.assert_close(next_x[i : i + 1], row, atol=1e-14, rtol=0.0)
        torch.testing.assert_close(x0[i : i + 1], row_x0, atol=1e-14, rtol=0.0)


def test_dpm_requires_t_prev_with_history() -> None:
    x = _rand(2, 3, seed=0)
    with pytest.raises(ValueError, match="t_prev"):
        dpm_solver_2m_step(x, x, 0.3, 0.5, x0_prev=x)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' numpy-2 notice
@pytest.mark.parametrize(("kind", "shift", "k"), [("uniform", 1.0, 10), ("shifted", 3.0, 10), ("uniform", 1.0, 20)])
def test_dpm_solve_matches_diffusers(kind: str, shift: float, k: int) -> None:
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, flow sigmas) on our
    grid: its sigma is 1 - t and its flow_prediction output is eps - x = -v."""
    diffusers = pytest.importorskip("diffusers")
    grid = time_grid(k, kind, shift)  # float32, as diffusers computes
    field = gaussian_velocity(-1.0, 2.0)
    z = Z.to(torch.float32)
    ours, _ = ode_solve(field, z.clone(), grid, "dpm_solver_2m")

    scheduler = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2, algorithm_type="dpmsolver++"
    )
    scheduler.set_timesteps(k)
    scheduler.sigmas = (1.0 - grid).to(torch.float32)  # replace its schedule by ours
    x = z.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(-field(x, grid[i], grid[i + 1]), timestep, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)
