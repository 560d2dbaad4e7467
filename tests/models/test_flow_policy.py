"""Tests of flowrl.models.flow_policy (FlowPolicy on a ChainSampler and its converters) and flowrl.models.build.

Oracles: every stored step's log-prob recomputed from the stored (x_in, x_out) with
torch.distributions.Normal and the transition formulas of DESIGN.md written out here; the
chain rebuilt by hand from the initial noise (Euler between the stored stochastic steps); a
hand-written Euler integration; Monte-Carlo checks of the sampled transitions; the shared
time grid flowrl.core.time_grid. Convention: t = 0 noise, t = 1 data.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from flowrl.config import build_config
from flowrl.core import time_grid
from flowrl.core.transitions import Transitions, unit_values
from flowrl.core.windows import AllSteps, OneRandomStep, SlidingWindow
from flowrl.models.build import CheckpointError, actor_record, build_actor, build_policy, load_actor
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.networks import ReinFlowNoiseNet, VelocityMLP
from flowrl.models.policy import frozen_copy
from flowrl.models.sampler import ChainSampler, CPSConverter, FlowSDEConverter, ReinFlowConverter

O, TA, DA, K, B = 2, 2, 3, 4, 6
STD_MIN, STD_MAX = 0.1, 0.3
NOISE_LEVEL = 0.7
CONVERTERS = ("reinflow", "flow_noise", "flow_sde", "cps")
WINDOWS = ("all", "one", "sliding")
ITERATION = 7  # sliding window of size 2 moving every 5 iterations: steps {1, 2} at iteration 7
F64 = torch.float64


def _window(name: str):
    return {"all": AllSteps(), "one": OneRandomStep(), "sliding": SlidingWindow(2, shift_interval=5)}[name]


def _converter(kind: str):
    if kind in ("reinflow", "flow_noise"):
        net = ReinFlowNoiseNet(
            O, TA, DA, STD_MIN, STD_MAX, hidden_dims=(8,), time_dim=4, condition_on_x=kind == "flow_noise"
        )
        return ReinFlowConverter(net)
    if kind == "flow_sde":
        return FlowSDEConverter(NOISE_LEVEL)
    return CPSConverter(NOISE_LEVEL)


def make_policy(
    kind: str | None,
    window: str = "all",
    reduce: str = "mean",
    shift: float = 1.0,
    seed: int = 0,
    k: int = K,
    unit: str = "chain",
) -> FlowPolicy:
    torch.manual_seed(seed)
    velocity = VelocityMLP(O, TA, DA, hidden_dims=(16,), time_dim=8)
    converter = _converter(kind) if kind is not None else None
    sampler = ChainSampler(k, converter, _window(window), grid_kind="shifted", grid_shift=shift)
    return FlowPolicy(velocity, sampler, sample_unit=unit, log_prob_reduce=reduce)


def _obs(n: int = B, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, O, generator=torch.Generator().manual_seed(seed))


def _num_stochastic(kind: str, window: str) -> int:
    """S by hand: every eligible step (CPS never makes the step into t = 1 stochastic), one
    random step, or the sliding window's 2 steps."""
    return {"all": K - 1 if kind == "cps" else K, "one": 1, "sliding": 2}[window]


def oracle_transition(policy: FlowPolicy, kind: str, obs, x, k: int, grid32: torch.Tensor) -> Normal:
    """The Gaussian transition of step k, written out from DESIGN.md (float64 arithmetic)."""
    t32, tn32 = grid32[k], grid32[k + 1]
    t, t_next, t1 = float(t32), float(tn32), float(grid32[1])
    v = policy.velocity(obs, x, t32).to(F64)
    xd = x.to(F64)
    h = t_next - t
    if kind in ("reinflow", "flow_noise"):
        mean = xd + h * v
        net = policy.sampler.converter.noise_net
        std = net(obs, t32, x if kind == "flow_noise" else None).to(F64)
    elif kind == "flow_sde":
        s = NOISE_LEVEL * math.sqrt((1.0 - t) / max(t, t1))
        score = -(xd - t * v) / (1.0 - t)
        mean = xd + h * (v + 0.5 * s * s * score)
        std = torch.full_like(mean, s * math.sqrt(h))
    else:  # cps
        x_hat = xd + (1.0 - t) * v
        eps_hat = xd - t * v
        sd = (1.0 - t_next) * math.sin(NOISE_LEVEL * math.pi / 2.0)
        mean = t_next * x_hat + math.sqrt((1.0 - t_next) ** 2 - sd * sd) * eps_hat
        std = torch.full_like(mean, sd)
    return Normal(mean, std)


def oracle_steps(policy, kind, obs, sample: Transitions, shift):
    """The oracle over the stored steps: log-prob ``[B, S]`` (summed over the chunk), mean
    per-dimension entropy ``[B, S]``, mean and std ``[B, S, Ta, Da]``, all float64."""
    grid32 = time_grid(K, "shifted", shift)
    b, s = sample.steps.shape
    lp = torch.full((b, s), math.nan, dtype=F64)
    ent = torch.full((b, s), math.nan, dtype=F64)
    mean = torch.full((b, s, TA, DA), math.nan, dtype=F64)
    std = torch.full((b, s, TA, DA), math.nan, dtype=F64)
    for k in range(K):
        rows, slots = (sample.steps == k).nonzero(as_tuple=True)
        if len(rows) == 0:
            continue
        dist = oracle_transition(policy, kind, obs[rows], sample.x_in[rows, slots], k, grid32)
        lp[rows, slots] = dist.log_prob(sample.x_out[rows, slots].to(F64)).sum(dim=(1, 2))
        ent[rows, slots] = dist.entropy().mean(dim=(1, 2))
        mean[rows, slots] = dist.mean
        std[rows, slots] = dist.stddev
    assert not bool(lp.isnan().any()), "a stored step index outside 0..K-1"
    return lp, ent, mean, std


def oracle_chain(per_step: torch.Tensor, reduce: str) -> torch.Tensor:
    """One chain's log-prob: the sum over its S steps, per dimension and step for ``mean``."""
    total = per_step.sum(dim=1)
    return total / (per_step.shape[1] * TA * DA) if reduce == "mean" else total


# --------------------------------------------------------------------------------------------
# log-prob: sample vs re-evaluation vs the oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("kind", CONVERTERS)
def test_log_prob_matches_sample_and_oracle(kind, window, reduce, shift) -> None:
    policy = make_policy(kind, window, reduce, shift)
    assert policy.log_prob_reduce == reduce and policy.sample_unit == "chain"
    obs = _obs()
    s = policy.sample(obs, ITERATION, torch.Generator().manual_seed(2))
    n = _num_stochastic(kind, window)
    assert isinstance(s, Transitions)
    assert s.final.shape == (B, TA, DA)
    assert s.x_in.shape == (B, n, TA, DA) and s.x_out.shape == (B, n, TA, DA)
    assert s.steps.shape == (B, n) and s.steps.dtype == torch.int64 and s.log_prob.shape == (B, n)
    assert torch.equal(s.nfe, torch.full((B,), float(K)))  # Euler: one evaluation per step
    ev = policy.evaluate(obs, s)
    assert ev.log_prob.shape == (B, n) and ev.entropy.shape == (B,)
    assert ev.mean.shape == (B, n, TA, DA) and ev.std.shape == (B, n, TA, DA)
    torch.testing.assert_close(ev.log_prob, s.log_prob, rtol=1e-5, atol=1e-5)

    def chain(per_step):
        return unit_values(per_step, "chain", policy.log_prob_reduce, TA * DA)

    with torch.no_grad():
        expected, _, mean, std = oracle_steps(policy, kind, obs, s, shift)
        torch.testing.assert_close(ev.log_prob.detach().to(F64), expected, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(s.log_prob.to(F64), expected, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(ev.mean.to(F64), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ev.std.to(F64), std, rtol=1e-5, atol=1e-6)
        # one chain = one sample: the joint log-prob, reduced as the policy says
        torch.testing.assert_close(chain(ev.log_prob).to(F64), oracle_chain(expected, reduce), rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(chain(s.log_prob).to(F64), oracle_chain(expected, reduce), rtol=1e-5, atol=2e-5)
        # one step = one sample: each step's log-prob, per dimension for mean
        per_step = unit_values(ev.log_prob, "step", reduce, TA * DA).to(F64)
        scale = TA * DA if reduce == "mean" else 1
        torch.testing.assert_close(per_step, (expected / scale).reshape(-1), rtol=1e-5, atol=2e-5)

        # re-evaluation under changed parameters (what PPO does) still follows the oracle
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        lp2 = policy.evaluate(obs, s).log_prob
        expected2, *_ = oracle_steps(policy, kind, obs, s, shift)
        assert not torch.allclose(lp2.to(F64), expected, atol=1e-4)
        torch.testing.assert_close(lp2.to(F64), expected2, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("kind", CONVERTERS)
def test_chain_is_ode_euler_at_non_stochastic_steps(kind, window, shift) -> None:
    """Rebuild the chain from its initial noise: Euler at every step outside the window, the
    stored x_out at the stored steps, whose x_in must be the chain's state there."""
    policy = make_policy(kind, window, shift=shift)
    obs = _obs()
    noise = torch.randn(B, TA, DA, generator=torch.Generator().manual_seed(30))
    s = policy.sample(obs, ITERATION, torch.Generator().manual_seed(3), noise=noise)
    grid = time_grid(K, "shifted", shift)
    x = noise.clone()
    slot = torch.zeros(B, dtype=torch.long)
    deterministic = 0
    with torch.no_grad():
        for k in range(K):
            euler = x + (grid[k + 1] - grid[k]) * policy.velocity(obs, x, grid[k])
            rows = (s.steps == k).any(dim=1).nonzero().flatten()
            assert torch.equal(s.x_in[rows, slot[rows]], x[rows])
            # stochastic steps really are noisy (they differ from the Euler step)
            assert bool((s.x_out[rows, slot[rows]] != euler[rows]).all())
            x = euler.clone()
            x[rows] = s.x_out[rows, slot[rows]]
            slot[rows] += 1
            deterministic += B - len(rows)
    assert torch.equal(s.final, x)
    assert torch.equal(slot, torch.full((B,), s.steps.shape[1]))  # every stored step was visited, in order
    if window != "all" or kind == "cps":
        assert deterministic > 0


def test_sampling_noise_and_generator() -> None:
    policy = make_policy("flow_sde", "one")
    obs = _obs()
    a = policy.sample(obs, 0, torch.Generator().manual_seed(4))
    b = policy.sample(obs, 0, torch.Generator().manual_seed(4))
    c = policy.sample(obs, 0, torch.Generator().manual_seed(5))
    for name in ("final", "x_in", "x_out", "steps", "log_prob"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.final, c.final)
    # the same initial noise (a GRPO group) with other step noise: the chains start alike and diverge
    noise = torch.randn(1, TA, DA).expand(B, TA, DA).clone()
    one_step = make_policy("flow_sde", "sliding")
    g = one_step.sample(obs[:1].expand(B, O), 0, torch.Generator().manual_seed(6), noise=noise)
    assert bool((g.steps == 0).any(dim=1).all())  # the window [0, 2) holds the first step
    assert torch.equal(g.x_in[:, 0], noise)
    assert not torch.equal(g.final[0], g.final[1])
    with pytest.raises(ValueError):
        policy.sample(obs, 0, noise=torch.zeros(B, TA + 1, DA))


@pytest.mark.parametrize("kind", CONVERTERS)
def test_stored_steps_per_window(kind) -> None:
    obs = _obs(64)
    all_steps = make_policy(kind, "all").sample(obs, ITERATION, torch.Generator().manual_seed(0)).steps
    expected = list(range(K - 1)) if kind == "cps" else list(range(K))  # the step into t = 1 has std 0
    assert all_steps.tolist() == [expected] * 64

    one = make_policy(kind, "one").sample(obs, ITERATION, torch.Generator().manual_seed(0)).steps
    assert one.shape == (64, 1)
    assert bool(((one >= 0) & (one < K)).all())
    if kind == "cps":
        assert not bool((one == K - 1).any())
    assert len(one.unique()) >= 2  # the step is random per row, not one fixed step

    sliding = make_policy(kind, "sliding").sample(obs, ITERATION, torch.Generator().manual_seed(0)).steps
    assert sliding.tolist() == [[1, 2]] * 64


@pytest.mark.parametrize("kind", CONVERTERS)
def test_stochastic_steps_are_distributed_as_the_oracle(kind) -> None:
    """Monte Carlo: standardized residuals of sampled steps are N(0, 1)."""
    n = 4000
    policy = make_policy(kind, "all", shift=3.0)
    obs = _obs(n)
    s = policy.sample(obs, 0, torch.Generator().manual_seed(4))
    grid = time_grid(K, "shifted", 3.0)
    assert s.steps.shape[1] == _num_stochastic(kind, "all")
    with torch.no_grad():
        for j in range(s.steps.shape[1]):
            k = int(s.steps[0, j])
            assert bool((s.steps[:, j] == k).all())
            dist = oracle_transition(policy, kind, obs, s.x_in[:, j], k, grid)
            z = ((s.x_out[:, j].to(F64) - dist.mean) / dist.stddev).flatten()
            assert abs(float(z.mean())) < 0.03, (k, float(z.mean()))  # SE = 1/sqrt(24000) ~ 0.0065
            assert abs(float(z.std()) - 1.0) < 0.03, (k, float(z.std()))


def test_act_is_hand_written_euler() -> None:
    for shift in (1.0, 3.0):
        policy = make_policy("reinflow", shift=shift)
        obs = _obs()
        got = policy.act(obs, torch.Generator().manual_seed(9))
        grid = time_grid(K, "shifted", shift)
        x = torch.randn((B, TA, DA), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            for k in range(K):
                x = x + (grid[k + 1] - grid[k]) * policy.velocity(obs, x, grid[k])
        torch.testing.assert_close(got, x, rtol=0, atol=1e-6)
        # the ODE is deterministic given the initial noise, and the noise comes from the generator
        assert torch.equal(got, policy.act(obs, torch.Generator().manual_seed(9)))
        assert not torch.allclose(got, policy.act(obs, torch.Generator().manual_seed(10)))


def _transitions(steps: torch.Tensor) -> Transitions:
    b, s = steps.shape
    zeros = torch.zeros(b, s, TA, DA)
    return Transitions(
        final=torch.zeros(b, TA, DA),
        x_in=zeros,
        x_out=zeros.clone(),
        steps=steps,
        log_prob=torch.zeros(b, s),
        nfe=torch.full((b,), float(K)),
    )


def test_ode_only_policy_acts_but_cannot_sample() -> None:
    policy = make_policy(None)
    obs = _obs()
    assert policy.act(obs, torch.Generator().manual_seed(0)).shape == (B, TA, DA)
    with pytest.raises(RuntimeError):
        policy.sample(obs)
    with pytest.raises(RuntimeError):
        policy.evaluate(obs, _transitions(torch.arange(K).expand(B, K).clone()))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        make_policy("reinflow", reduce="max")
    with pytest.raises(ValueError):
        make_policy("reinflow", unit="token")
    with pytest.raises(ValueError):
        ChainSampler(K, solver="rk4")
    with pytest.raises(ValueError):
        ChainSampler(K, steps_after_window=0)
    policy = make_policy("reinflow")
    obs = _obs()
    # stored step indices that do not fit K
    with pytest.raises(ValueError):
        policy.evaluate(obs, _transitions(torch.full((B, 1), K)))
    with pytest.raises(ValueError):
        policy.evaluate(obs, _transitions(torch.full((B, 1), -1)))


# --------------------------------------------------------------------------------------------
# gradients, entropy, parameter groups
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CONVERTERS)
def test_gradients_reach_velocity_and_noise_net(kind) -> None:
    policy = make_policy(kind, "all")
    obs = _obs()
    s = policy.sample(obs, 0, torch.Generator().manual_seed(5))
    ev = policy.evaluate(obs, s)
    lp, ent = ev.log_prob, ev.entropy
    lp.mean().backward(retain_graph=True)
    for name, p in policy.velocity.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert any(float(p.grad.abs().max()) > 0 for p in policy.velocity.parameters())
    # the first layer of the velocity sees every input: its gradient is non-zero
    assert float(policy.velocity.net[0].weight.grad.abs().sum()) > 0
    if kind in ("reinflow", "flow_noise"):
        net = policy.sampler.converter.noise_net
        for name, p in net.named_parameters():
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        # the entropy also depends on the learned std
        net.zero_grad()
        ent.mean().backward()
        assert float(net.net[-1].weight.grad.abs().sum()) > 0
        # a finite-difference check of d log_prob / d (noise-net output bias)
        bias = net.net[-1].bias
        g = torch.autograd.grad(policy.evaluate(obs, s).log_prob.sum(), bias)[0]
        eps = 1e-3
        with torch.no_grad():
            e = torch.zeros_like(bias)
            e[0] = eps
            bias.add_(e)
            up = policy.evaluate(obs, s).log_prob.sum()
            bias.sub_(2 * e)
            down = policy.evaluate(obs, s).log_prob.sum()
            bias.add_(e)
        fd = (up - down) / (2 * eps)
        assert abs(float(fd) - float(g[0])) < 1e-2 * max(1.0, abs(float(g[0])))


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("kind", ["reinflow", "flow_noise"])
def test_entropy_matches_normal_entropy(kind, window) -> None:
    policy = make_policy(kind, window)
    obs = _obs()
    s = policy.sample(obs, ITERATION, torch.Generator().manual_seed(6))
    ent = policy.evaluate(obs, s).entropy
    assert ent.shape == (B,)
    with torch.no_grad():
        _, per_step, _, _ = oracle_steps(policy, kind, obs, s, 1.0)
    # the mean over the stored steps of the mean per-dimension entropy
    torch.testing.assert_close(ent.detach().to(F64), per_step.mean(dim=1), rtol=1e-5, atol=1e-5)
    # per-dimension entropy of a std in [STD_MIN, STD_MAX]
    lo = Normal(0.0, STD_MIN).entropy().item()
    hi = Normal(0.0, STD_MAX).entropy().item()
    assert bool(((ent >= lo - 1e-5) & (ent <= hi + 1e-5)).all())


@pytest.mark.parametrize("kind", CONVERTERS)
def test_network_and_param_groups(kind) -> None:
    policy = make_policy(kind)
    assert policy.network is policy.velocity
    assert policy.event_shape == (TA, DA) and policy.num_steps == K
    groups = policy.param_groups()
    assert [id(p) for p in groups["actor"]] == [id(p) for p in policy.velocity.parameters()]
    if kind in ("reinflow", "flow_noise"):
        assert set(groups) == {"actor", "noise"}
        noise_net = policy.sampler.converter.noise_net
        assert [id(p) for p in groups["noise"]] == [id(p) for p in noise_net.parameters()]
    else:
        assert set(groups) == {"actor"}  # a fixed noise level has nothing to learn
    # together, every parameter of the policy exactly once
    grouped = [id(p) for ps in groups.values() for p in ps]
    assert sorted(grouped) == sorted(id(p) for p in policy.parameters())


def test_frozen_copy_is_an_independent_reference() -> None:
    policy = make_policy("reinflow", "one")
    obs = _obs()
    s = policy.sample(obs, 0, torch.Generator().manual_seed(7))
    ref = frozen_copy(policy)
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    torch.testing.assert_close(ref.evaluate(obs, s).log_prob, policy.evaluate(obs, s).log_prob, rtol=0, atol=0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1)
    assert not torch.allclose(ref.evaluate(obs, s).log_prob, policy.evaluate(obs, s).log_prob)
    torch.testing.assert_close(ref.evaluate(obs, s).log_prob, s.log_prob, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# time grid
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_policy_grid_is_the_shared_time_grid(shift) -> None:
    policy = make_policy("flow_sde", shift=shift)
    grid = policy.sampler.grid
    torch.testing.assert_close(grid, time_grid(K, "shifted", shift), rtol=0, atol=0)
    if shift == 1.0:
        torch.testing.assert_close(grid, torch.linspace(0, 1, K + 1), rtol=0, atol=1e-7)
    else:
        # SD3 shift in sigma = 1 - t: sigma' = s sigma / (1 + (s - 1) sigma), by hand
        sig = [1 - j / K for j in range(K + 1)]
        expected = [1 - shift * x / (1 + (shift - 1) * x) for x in sig]
        torch.testing.assert_close(grid, torch.tensor(expected), rtol=0, atol=1e-6)
        assert float(grid[1]) < 1 / K  # more steps near the noise end


# --------------------------------------------------------------------------------------------
# build.py: policies from the config, velocity checkpoints
# --------------------------------------------------------------------------------------------


def _cfg(
    converter: dict | None = None,
    window: dict | None = None,
    reduce: str = "mean",
    hidden=(16,),
    seed: int = 3,
    **mdp,
):
    data = {
        "name": "t",
        "seed": seed,
        "policy": {
            "horizon": TA,
            "denoising_steps": K,
            "time_shift": 3.0,
            "hidden_dims": list(hidden),
            "time_embed_dim": 8,
        },
        "mdp": {"log_prob_reduce": reduce, **mdp},
    }
    if converter is not None:
        data["mdp"]["converter"] = converter
    if window is not None:
        data["mdp"]["window"] = window
    return build_config(data)


def test_build_actor_architecture() -> None:
    cfg = _cfg(hidden=(16, 12))
    vel = build_actor(cfg.policy, O, DA)
    assert (vel.obs_dim, vel.horizon, vel.action_dim) == (O, TA, DA)
    linears = [m for m in vel.net if isinstance(m, torch.nn.Linear)]
    assert [m.in_features for m in linears] == [O + TA * DA + 8, 16, 12]
    assert linears[-1].out_features == TA * DA
    assert vel(_obs(), torch.zeros(B, TA, DA), 0.5).shape == (B, TA, DA)


def test_build_policy_from_config() -> None:
    cfg = _cfg(
        {"type": "flow_noise", "std_min": 0.05, "std_max": 0.2, "hidden_dims": [8]},
        {"type": "one_random"},
        reduce="sum",
    )
    vel = build_actor(cfg.policy, O, DA)
    policy = build_policy(cfg, vel)
    assert isinstance(policy, FlowPolicy) and isinstance(policy.sampler, ChainSampler)
    assert policy.velocity is vel and policy.network is vel and policy.num_steps == K
    assert policy.log_prob_reduce == "sum" and policy.sample_unit == "chain"
    converter = policy.sampler.converter
    assert isinstance(converter, ReinFlowConverter) and converter.noise_net.condition_on_x
    assert (converter.noise_net.std_min, converter.noise_net.std_max) == (0.05, 0.2)
    assert isinstance(policy.sampler.window, OneRandomStep)
    assert policy.sampler.solver == "euler" and policy.sampler.steps_after_window is None
    torch.testing.assert_close(policy.sampler.grid, time_grid(K, "shifted", 3.0), rtol=0, atol=0)
    obs = _obs()
    s = policy.sample(obs, 0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(policy.evaluate(obs, s).log_prob, s.log_prob, rtol=1e-5, atol=1e-5)

    p = build_policy(_cfg({"type": "reinflow"}), vel)
    assert isinstance(p.sampler.converter, ReinFlowConverter) and not p.sampler.converter.noise_net.condition_on_x
    assert isinstance(p.sampler.window, AllSteps) and p.log_prob_reduce == "mean"

    p = build_policy(_cfg({"type": "flow_sde", "noise_level": 0.4}), vel)
    assert isinstance(p.sampler.converter, FlowSDEConverter) and p.sampler.converter.noise_level == 0.4

    sliding = {"type": "sliding", "size": 2, "mode": "progressive", "shift_interval": 3, "stride": 2}
    p = build_policy(_cfg({"type": "cps", "noise_level": 0.5}, sliding, seed=11), vel)
    assert isinstance(p.sampler.converter, CPSConverter) and p.sampler.converter.noise_level == 0.5
    assert p.sampler.window == SlidingWindow(2, "progressive", 3, 2, seed=11)

    # the mdp's sample unit, solver and Flash compression reach the policy and its sampler
    p = build_policy(_cfg(None, sliding, sample_unit="step", solver="heun", steps_after_window=1), vel)
    assert p.sample_unit == "step" and p.sampler.solver == "heun" and p.sampler.steps_after_window == 1


def test_velocity_checkpoint_roundtrip(tmp_path) -> None:
    cfg = _cfg()
    torch.manual_seed(0)
    vel = build_actor(cfg.policy, O, DA)
    path = tmp_path / "ckpt.pt"
    torch.save(actor_record(vel, cfg.policy), path)
    loaded = load_actor(path, cfg.policy, O, DA)
    assert loaded is not vel
    obs, x = _obs(), torch.randn(B, TA, DA)
    t = torch.rand(B)
    with torch.no_grad():
        assert torch.equal(loaded(obs, x, t), vel(obs, x, t))
    # a freshly built (differently initialised) velocity gives other outputs: the weights were loaded
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.allclose(build_actor(cfg.policy, O, DA)(obs, x, t), vel(obs, x, t))


@pytest.mark.parametrize(
    "change, key",
    [({"hidden": (32,)}, "hidden_dims"), ({"obs_dim": O + 1}, "obs_dim"), ({"action_dim": DA + 1}, "action_dim")],
)
def test_velocity_checkpoint_mismatch_names_the_key(tmp_path, change, key) -> None:
    cfg = _cfg()
    vel = build_actor(cfg.policy, O, DA)
    path = tmp_path / "ckpt.pt"
    torch.save(actor_record(vel, cfg.policy), path)
    other = _cfg(hidden=change.get("hidden", (16,)))
    with pytest.raises(CheckpointError, match=key):
        load_actor(path, other.policy, change.get("obs_dim", O), change.get("action_dim", DA))


def test_velocity_checkpoint_horizon_and_time_embed_mismatch(tmp_path) -> None:
    cfg = _cfg()
    path = tmp_path / "ckpt.pt"
    torch.save(actor_record(build_actor(cfg.policy, O, DA), cfg.policy), path)
    for key, value in (("horizon", TA + 1), ("time_embed_dim", 16)):
        other = cfg.policy.model_copy(update={key: value})
        with pytest.raises(CheckpointError, match=key):
            load_actor(path, other, O, DA)


def test_velocity_checkpoint_missing_or_foreign_file(tmp_path) -> None:
    cfg = _cfg()
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt"):
        load_actor(missing, cfg.policy, O, DA)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError):
        load_actor(foreign, cfg.policy, O, DA)
    assert issubclass(CheckpointError, ValueError)
