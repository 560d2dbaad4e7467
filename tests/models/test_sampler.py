"""Tests of flowrl.models.sampler.ChainSampler (with FlowPolicy on top of it).

Oracles, all written out here rather than taken from flowrl:

- the chain rebuilt by hand: an Euler (or Heun) loop with the velocity callable over the
  uniform grid t_k = k / K, from the initial noise up to the first stochastic step and from
  the last stored x_out to the end;
- the Gaussian transition of each stored step, with mean and std recomputed from the
  formulas of the steps.py docstrings and ``torch.distributions.Normal``;
- a counting wrapper around the velocity that records every call (which samples, which
  times), for the network evaluations the sampler reports;
- a 1-D Gaussian data distribution, whose flow-matching velocity and ODE endpoint are
  closed-form, for the deterministic solvers.

Convention: t = 0 noise, t = 1 data.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Normal

from flowrl.core.transitions import Transitions, unit_values
from flowrl.core.windows import AllSteps, OneRandomStep, SlidingWindow
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.networks import ReinFlowNoiseNet, VelocityMLP
from flowrl.models.sampler import ChainSampler, CPSConverter, FlowSDEConverter, ReinFlowConverter

O, TA, DA = 2, 2, 3  # observation dim, action chunk [Ta, Da]
C, H, W = 2, 4, 4  # image-like event [C, H, W]
B, K = 6, 4
STD_MIN, STD_MAX = 0.1, 0.3
NOISE_LEVEL = 0.7
F64 = torch.float64
SOLVERS = ("euler", "heun", "dpm_solver_2m")
EXACT = {"rtol": 0.0, "atol": 0.0}
# Re-evaluation runs the networks once on the B * S flattened steps, sampling on the B rows of
# each step: the matmuls' blocking may differ by an ulp, so "ratio 1" is to float32 round-off.
ROUND_OFF = {"rtol": 1e-6, "atol": 1e-6}


class ConvVelocity(nn.Module):
    """A tiny velocity field over images: forward(cond [B, D], x [B, C, H, W], t, t_next) -> [B, C, H, W]."""

    def __init__(self, cond_dim: int, channels: int, height: int, width: int, hidden: int = 4) -> None:
        super().__init__()
        self.event_shape = (channels, height, width)
        self.inp = nn.Conv2d(channels + 1, hidden, 3, padding=1)
        self.cond = nn.Linear(cond_dim, hidden)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, cond: Tensor, x: Tensor, t: Tensor | float, t_next: Tensor | float) -> Tensor:
        b, _, h, w = x.shape
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        t_map = t.view(b, 1, 1, 1).expand(b, 1, h, w)
        hid = self.inp(torch.cat([x, t_map], dim=1)) + self.cond(cond)[:, :, None, None]
        return self.out(torch.tanh(hid))


def grid_of(k: int) -> Tensor:
    """The uniform grid t_j = j / k (float32, as the sampler's)."""
    return (torch.arange(k + 1, dtype=F64) / k).to(torch.float32)


def make_velocity(event: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if event == "chunk":
        return VelocityMLP(O, TA, DA, hidden_dims=(16,), time_dim=4)
    return ConvVelocity(O, C, H, W)


def make_converter(kind: str, seed: int = 1):
    if kind in ("reinflow", "flow_noise"):
        torch.manual_seed(seed)
        net = ReinFlowNoiseNet(
            O, TA, DA, STD_MIN, STD_MAX, hidden_dims=(8,), time_dim=4, condition_on_x=kind == "flow_noise"
        )
        return ReinFlowConverter(net)
    if kind == "flow_sde":
        return FlowSDEConverter(NOISE_LEVEL)
    if kind == "cps":
        return CPSConverter(NOISE_LEVEL)
    raise AssertionError(kind)


# name -> (window, iteration); for K = 4 the progressive window covers steps {1, 2} at iteration 1
WINDOWS = {
    "all": (AllSteps(), 0),
    "one": (OneRandomStep(), 0),
    "sliding_progressive": (SlidingWindow(2, "progressive", shift_interval=1), 1),
    "sliding_random": (SlidingWindow(2, "random", seed=3), 5),
}


def obs_of(batch: int = B, seed: int = 2) -> Tensor:
    return torch.randn(batch, O, generator=torch.Generator().manual_seed(seed))


class Counting:
    """Velocity wrapper counting calls per sample. The condition's last column holds the
    sample's index (the wrapper strips it before calling the network)."""

    def __init__(self, velocity, batch: int) -> None:
        self.velocity = velocity
        self.per_sample = torch.zeros(batch)
        self.calls: list[tuple[float, float, int]] = []  # (t, t_next, rows)

    def __call__(self, cond: Tensor, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        assert t.ndim == 0 and t_next.ndim == 0, "the sampler calls with the grid's scalar times"
        ids = cond[:, -1].round().long()
        assert ids.unique().numel() == ids.numel()
        self.per_sample[ids] += 1.0
        self.calls.append((float(t), float(t_next), x.shape[0]))
        return self.velocity(cond[:, :-1], x, t, t_next)


def with_ids(obs: Tensor) -> Tensor:
    return torch.cat([obs, torch.arange(obs.shape[0], dtype=obs.dtype).unsqueeze(1)], dim=1)


@torch.no_grad()
def euler_loop(velocity, cond: Tensor, x: Tensor, times: list[Tensor]) -> Tensor:
    """Hand-written Euler over consecutive ``times``."""
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        x = x + (t_next - t) * velocity(cond, x, t, t_next)
    return x


@torch.no_grad()
def heun_loop(velocity, cond: Tensor, x: Tensor, times: list[Tensor]) -> Tensor:
    """Hand-written Heun (trapezoid with an Euler predictor) over consecutive ``times``."""
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        h = t_next - t
        v = velocity(cond, x, t, t_next)
        v_pred = velocity(cond, x + h * v, t_next, t_next)
        x = x + 0.5 * h * (v + v_pred)
    return x


# --- (a) what a sample stores ---------------------------------------------------------------------------------------

K8 = 8
# name -> (converter, window, iteration, expected steps of every sample or None for one random step)
MEMORY_CASES = {
    "sliding_at_start": ("flow_sde", SlidingWindow(2, shift_interval=1), 0, [0, 1]),
    "sliding_in_middle": ("reinflow", SlidingWindow(2, shift_interval=1), 3, [3, 4]),
    "one_random_step": ("flow_sde", OneRandomStep(), 0, None),
    "all_steps": ("flow_noise", AllSteps(), 0, list(range(K8))),
    "cps_all_steps": ("cps", AllSteps(), 0, list(range(K8 - 1))),  # CPS never makes the step into t = 1 stochastic
}


@pytest.mark.parametrize("case", MEMORY_CASES)
def test_transitions_store_only_the_window(case) -> None:
    kind, window, iteration, expected = MEMORY_CASES[case]
    velocity = make_velocity("chunk")
    sampler = ChainSampler(K8, make_converter(kind), window)
    obs = obs_of()
    noise = torch.randn(B, TA, DA, generator=torch.Generator().manual_seed(9))
    tr = sampler.sample(velocity, obs, (TA, DA), B, iteration, torch.Generator().manual_seed(4), noise)

    s = 1 if expected is None else len(expected)
    assert tr.x_in.shape == tr.x_out.shape == (B, s, TA, DA)  # S, not K = 8
    assert tr.steps.shape == tr.log_prob.shape == (B, s)
    assert tr.steps.dtype == torch.int64
    assert tr.final.shape == (B, TA, DA)
    assert tr.nfe.shape == (B,)
    if expected is None:
        assert bool(((tr.steps >= 0) & (tr.steps < K8)).all())
        assert tr.steps.unique().numel() > 1  # a step per sample, not one for the batch (seeded)
    else:
        assert tr.steps.tolist() == [expected] * B
    assert bool(torch.isfinite(tr.log_prob).all()) and bool((tr.log_prob != 0).all())

    grid = grid_of(K8)
    times = list(grid)
    for b in range(B):
        steps = tr.steps[b].tolist()
        cond = obs[b : b + 1]
        # chain consistency: a step's sampled state is what the next (consecutive) step enters
        for j in range(s - 1):
            if steps[j + 1] == steps[j] + 1:
                torch.testing.assert_close(tr.x_out[b, j], tr.x_in[b, j + 1], **EXACT)
        # before the window: Euler from the initial noise
        x_first = euler_loop(velocity, cond, noise[b : b + 1], times[: steps[0] + 1])
        torch.testing.assert_close(tr.x_in[b, 0], x_first[0], rtol=1e-6, atol=1e-6)
        # after the window: Euler from the last stored x_out to t = 1 reproduces final
        final = euler_loop(velocity, cond, tr.x_out[b : b + 1, -1], times[steps[-1] + 1 :])
        torch.testing.assert_close(tr.final[b], final[0], rtol=1e-6, atol=1e-6)
    if case == "all_steps":
        torch.testing.assert_close(tr.final, tr.x_out[:, -1], **EXACT)  # the last step is the last state
    if case == "sliding_at_start":
        torch.testing.assert_close(tr.x_in[:, 0], noise, **EXACT)


# --- (b) the first ratio is exactly 1, and the log-probs are the Gaussian transition's ---------------------------


def _sample_and_evaluate(event: str, kind: str, window: str, solver: str) -> tuple[Transitions, Tensor, Tensor, int]:
    win, iteration = WINDOWS[window]
    sampler = ChainSampler(K, make_converter(kind), win, solver=solver)
    velocity = make_velocity(event)
    obs = obs_of()
    gen = torch.Generator().manual_seed(11)
    if event == "chunk":
        policy = FlowPolicy(velocity, sampler)
        tr = policy.sample(obs, iteration, gen)
        evaluated = policy.evaluate(obs, tr).log_prob
        numel = TA * DA
    else:
        tr = sampler.sample(velocity, obs, (C, H, W), B, iteration, gen)
        rows, out = sampler.evaluate(velocity, obs, tr)
        assert rows.tolist() == [b for b in range(B) for _ in range(tr.steps.shape[1])]
        evaluated = out.log_prob.view(tr.steps.shape)
        numel = C * H * W
    return tr, evaluated, obs, numel


# ReinFlowNoiseNet is an MLP over (obs, t[, flattened x]) whose output has the action chunk's
# shape [Ta, Da]: it has no image form, so [C, H, W] events run with Flow-SDE and CPS only.
RATIO_CASES = [("chunk", kind) for kind in ("reinflow", "flow_noise", "flow_sde", "cps")] + [
    ("image", kind) for kind in ("flow_sde", "cps")
]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("unit", ["chain", "step"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize(("event", "kind"), RATIO_CASES)
def test_first_ratio_is_exactly_one(event, kind, window, unit, solver) -> None:
    tr, evaluated, _, numel = _sample_and_evaluate(event, kind, window, solver)
    assert evaluated.shape == tr.log_prob.shape
    torch.testing.assert_close(evaluated, tr.log_prob, **ROUND_OFF)
    for reduce in ("sum", "mean"):
        new = unit_values(evaluated, unit, reduce, numel)
        old = unit_values(tr.log_prob, unit, reduce, numel)
        assert new.shape == ((B,) if unit == "chain" else (B * tr.steps.shape[1],))
        torch.testing.assert_close(torch.exp(new - old), torch.ones_like(new), **ROUND_OFF)


def _oracle_mean_std(
    kind: str, sampler: ChainSampler, velocity, cond: Tensor, x: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Mean and std (float64) of the stochastic step k from x, by the steps.py formulas."""
    t32, tn32 = grid_of(K)[k], grid_of(K)[k + 1]
    v = velocity(cond, x, t32, tn32).to(F64)
    x, t, tn = x.to(F64), k / K, (k + 1) / K
    h = tn - t
    if kind in ("reinflow", "flow_noise"):
        noise_net = sampler.converter.noise_net
        std = noise_net(cond, t32, x.float() if kind == "flow_noise" else None).to(F64)
        return x + h * v, std
    a = NOISE_LEVEL
    if kind == "flow_sde":
        t_floor = 1.0 / K  # the first positive grid point
        s = a * math.sqrt((1.0 - t) / max(t, t_floor))
        score = -(x - t * v) / (1.0 - t)
        return x + h * (v + 0.5 * s * s * score), torch.full_like(x, s * math.sqrt(h))
    # cps
    x_hat, eps_hat = x + (1.0 - t) * v, x - t * v
    std = (1.0 - tn) * math.sin(a * math.pi / 2.0)
    return tn * x_hat + math.sqrt((1.0 - tn) ** 2 - std**2) * eps_hat, torch.full_like(x, std)


@pytest.mark.parametrize("window", ["all", "one", "sliding_progressive"])
@pytest.mark.parametrize(("event", "kind"), RATIO_CASES)
def test_log_prob_is_the_normal_density_of_the_step(event, kind, window) -> None:
    win, iteration = WINDOWS[window]
    sampler = ChainSampler(K, make_converter(kind), win)
    velocity = make_velocity(event)
    obs = obs_of()
    shape = (TA, DA) if event == "chunk" else (C, H, W)
    tr = sampler.sample(velocity, obs, shape, B, iteration, torch.Generator().manual_seed(12))
    with torch.no_grad():
        for b in range(B):
            for j, k in enumerate(tr.steps[b].tolist()):
                mean, std = _oracle_mean_std(kind, sampler, velocity, obs[b : b + 1], tr.x_in[b : b + 1, j], k)
                expected = Normal(mean, std).log_prob(tr.x_out[b : b + 1, j].to(F64)).sum()
                torch.testing.assert_close(tr.log_prob[b, j].to(F64), expected, rtol=1e-5, atol=1e-4)
    # the sampled states are not the means: the steps really are stochastic
    assert not torch.allclose(tr.x_out, tr.x_in, atol=1e-3)


# --- (c) network evaluations -------------------------------------------------------------------------------------


# The counting wrapper adds a column to the condition, which only the velocity strips: converters
# that read the condition (ReinFlow's noise net) are left out here.
NFE_WINDOWS = {
    "all": ("flow_sde", AllSteps(), 0),
    "one": ("flow_sde", OneRandomStep(), 0),
    "sliding": ("cps", SlidingWindow(2, shift_interval=1), 1),
    "cps_all": ("cps", AllSteps(), 0),
}


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("window", NFE_WINDOWS)
def test_nfe_counts_every_velocity_call(window, solver) -> None:
    kind, win, iteration = NFE_WINDOWS[window]
    sampler = ChainSampler(K, make_converter(kind), win, solver=solver)
    counting = Counting(make_velocity("chunk"), B)
    tr = sampler.sample(counting, with_ids(obs_of()), (TA, DA), B, iteration, torch.Generator().manual_seed(3))
    torch.testing.assert_close(tr.nfe, counting.per_sample, **EXACT)
    s = tr.steps.shape[1]
    if solver == "heun":  # one extra (corrector) call per deterministic step of the sample
        expected = torch.full((B,), float(K + (K - s)))
    else:
        expected = torch.full((B,), float(K))
    torch.testing.assert_close(tr.nfe, expected, **EXACT)
    if window == "cps_all" and solver == "heun":
        assert tr.nfe.tolist() == [K + 1.0] * B  # the step into t = 1 is the only deterministic one


@pytest.mark.parametrize("solver", SOLVERS)
def test_steps_after_window_compresses_the_tail(solver) -> None:
    m, size = 3, 2
    sampler = ChainSampler(
        K8, make_converter("flow_sde"), SlidingWindow(size, shift_interval=1), solver=solver, steps_after_window=m
    )
    velocity = make_velocity("chunk")
    counting = Counting(velocity, B)
    obs = obs_of()
    tr = sampler.sample(counting, with_ids(obs), (TA, DA), B, 0, torch.Generator().manual_seed(5))
    assert tr.steps.tolist() == [[0, 1]] * B
    per_step = 2.0 if solver == "heun" else 1.0
    expected_nfe = size + m * per_step  # window end (steps 0, 1) + M compressed steps
    torch.testing.assert_close(tr.nfe, torch.full((B,), expected_nfe), **EXACT)
    torch.testing.assert_close(counting.per_sample, tr.nfe, **EXACT)

    # every time the velocity saw is a grid point; the predictor steps chain up to t = 1
    grid = grid_of(K8).tolist()
    for t, t_next, _ in counting.calls:
        assert any(t == g for g in grid) and any(t_next == g for g in grid), (t, t_next)
    steps = [(t, tn) for t, tn, _ in counting.calls if tn != t]  # Heun's corrector calls have t == t_next
    assert len(steps) == size + m
    assert steps[0][0] == 0.0 and steps[-1][1] == 1.0
    assert all(a[1] == b[0] for a, b in zip(steps[:-1], steps[1:], strict=True))
    assert [t for t, _ in steps[:size]] == grid[:size]
    assert all(tn - t > 1.0 / K8 for t, tn in steps[size:])  # fewer, larger steps than the grid's

    # the tail rebuilt by hand over the schedule the sampler used
    times = [torch.tensor(t) for t, _ in steps[size:]] + [torch.tensor(1.0)]
    if solver == "euler":
        torch.testing.assert_close(tr.final, euler_loop(velocity, obs, tr.x_out[:, -1], times), rtol=1e-6, atol=1e-6)
    elif solver == "heun":
        torch.testing.assert_close(tr.final, heun_loop(velocity, obs, tr.x_out[:, -1], times), rtol=1e-6, atol=1e-6)


def test_steps_after_window_keeps_short_tails() -> None:
    # the window ends at step 2: 6 steps remain, which M = 6 does not compress
    sampler = ChainSampler(K8, make_converter("flow_sde"), SlidingWindow(2), steps_after_window=6)
    counting = Counting(make_velocity("chunk"), B)
    tr = sampler.sample(counting, with_ids(obs_of()), (TA, DA), B, 0, torch.Generator().manual_seed(5))
    assert tr.nfe.tolist() == [float(K8)] * B
    assert [t for t, _, _ in counting.calls] == grid_of(K8)[:-1].tolist()


def test_steps_after_window_needs_a_batch_wide_window() -> None:
    # rejected when built, whatever the steps one batch happens to draw
    with pytest.raises(ValueError, match="batch"):
        ChainSampler(K8, make_converter("flow_sde"), OneRandomStep(), steps_after_window=2)

    class PerSampleWindow:  # any window whose steps differ between samples
        def mask(self, batch, eligible, iteration, generator):
            mask = torch.zeros(batch, eligible.shape[0], dtype=torch.bool)
            mask[torch.arange(batch), torch.arange(batch) % eligible.shape[0]] = True
            return mask

    sampler = ChainSampler(K8, make_converter("flow_sde"), PerSampleWindow(), steps_after_window=2)
    with pytest.raises(ValueError, match="batch"):
        sampler.sample(make_velocity("chunk"), obs_of(), (TA, DA), B, 0, torch.Generator().manual_seed(0))


def test_bad_sampler_arguments_raise() -> None:
    with pytest.raises(ValueError, match="solver"):
        ChainSampler(K, make_converter("flow_sde"), solver="rk4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps_after_window"):
        ChainSampler(K, make_converter("flow_sde"), steps_after_window=0)
    ode_only = ChainSampler(K)
    with pytest.raises(RuntimeError, match="converter"):
        ode_only.sample(make_velocity("chunk"), obs_of(), (TA, DA), B)
    sampler = ChainSampler(K, make_converter("flow_sde"))
    with pytest.raises(ValueError, match="noise"):
        sampler.sample(make_velocity("chunk"), obs_of(), (TA, DA), B, noise=torch.zeros(B, DA, TA))


# --- (d) initial noise and reproducibility --------------------------------------------------------------------------


@pytest.mark.parametrize("window", ["all", "sliding_at_start"])
def test_shared_initial_noise_within_a_group(window) -> None:
    win = AllSteps() if window == "all" else SlidingWindow(2, shift_interval=1)
    sampler = ChainSampler(K, make_converter("flow_sde"), win)
    group = 3
    z0 = torch.randn(B // group, TA, DA, generator=torch.Generator().manual_seed(1))
    z = z0.repeat_interleave(group, dim=0)
    obs = obs_of(B // group).repeat_interleave(group, dim=0)  # one prompt per group, as GRPO
    tr = sampler.sample(make_velocity("chunk"), obs, (TA, DA), B, 0, torch.Generator().manual_seed(2), z)
    assert tr.steps[:, 0].tolist() == [0] * B
    torch.testing.assert_close(tr.x_in[:, 0], z, **EXACT)
    for g in range(B // group):
        members = slice(g * group, (g + 1) * group)
        x_in, x_out = tr.x_in[members, 0], tr.x_out[members, 0]
        torch.testing.assert_close(x_in, x_in[:1].expand_as(x_in), **EXACT)
        for i in range(group):  # independent step noise: every member steps elsewhere
            for j in range(i + 1, group):
                assert (x_out[i] - x_out[j]).abs().min() > 0
                assert not torch.equal(tr.final[g * group + i], tr.final[g * group + j])


@pytest.mark.parametrize("window", ["all", "one", "sliding_random"])
def test_generator_makes_sampling_reproducible(window) -> None:
    win, iteration = WINDOWS[window]
    sampler = ChainSampler(K, make_converter("flow_noise"), win)
    velocity, obs = make_velocity("chunk"), obs_of()

    def draw(seed: int) -> Transitions:
        return sampler.sample(velocity, obs, (TA, DA), B, iteration, torch.Generator().manual_seed(seed))

    a, b, c = draw(7), draw(7), draw(8)
    for name in ("final", "x_in", "x_out", "steps", "log_prob", "nfe"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), **EXACT)
    assert not torch.allclose(a.x_out, c.x_out)
    if window == "all":  # the default initial state is N(0, I) drawn first from the generator
        expected = torch.randn(B, TA, DA, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(a.x_in[:, 0], expected, **EXACT)


# --- (e) the deterministic solvers on a closed-form flow ------------------------------------------------------------

MU, SIGMA = 1.5, 0.5  # data N(MU, SIGMA^2); path x_t = (1 - t) eps + t x_1


def gaussian_velocity(cond, x: Tensor, t, t_next) -> Tensor:
    """E[x_1 - eps | x_t = x] for 1-D Gaussian data (elementwise over the event)."""
    t = torch.as_tensor(t, dtype=x.dtype)
    var = (1.0 - t) ** 2 + t**2 * SIGMA**2
    return MU + (t * SIGMA**2 - (1.0 - t)) / var * (x - t * MU)


def test_ode_solvers_on_a_closed_form_flow() -> None:
    k = 16
    z = torch.randn(B, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = MU + SIGMA * z  # the flow map of the Gaussian path
    errors, nfes = {}, {}
    for solver in SOLVERS:
        x, nfe = ChainSampler(k, solver=solver).ode(gaussian_velocity, None, z)
        assert x.shape == z.shape and x.dtype == F64
        errors[solver] = float((x - exact).abs().max())
        nfes[solver] = nfe.tolist()
    assert nfes == {"euler": [float(k)] * B, "heun": [2.0 * k] * B, "dpm_solver_2m": [float(k)] * B}
    # Euler is first order; Heun and DPM-Solver++(2M) are second order: far closer at K = 16
    assert errors["euler"] > 1e-3, errors
    assert errors["heun"] < errors["euler"] / 4, errors
    assert errors["dpm_solver_2m"] < errors["euler"] / 4, errors
    # the Euler ODE is the hand-written Euler loop
    x_euler, _ = ChainSampler(k).ode(gaussian_velocity, None, z)
    by_hand = euler_loop(gaussian_velocity, None, z, list(grid_of(k)))
    torch.testing.assert_close(x_euler, by_hand, rtol=1e-12, atol=1e-12)


def test_ode_is_differentiable() -> None:
    velocity = make_velocity("chunk")
    z = torch.randn(B, TA, DA, generator=torch.Generator().manual_seed(0))
    for solver in SOLVERS:
        x, _ = ChainSampler(K, solver=solver).ode(velocity, obs_of(), z)
        grad = torch.autograd.grad(x.square().sum(), velocity.net[-1].bias)[0]
        assert bool(torch.isfinite(grad).all()) and bool((grad != 0).any())
