"""Tests of flowrl.models.flow_policy (FlowPolicy and its converters) and flowrl.models.build.

Oracles: the chain log-prob recomputed step by step from the stored chain with
torch.distributions.Normal and the transition formulas of DESIGN.md written out here; a
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
from flowrl.core.windows import AllSteps, OneRandomStep, SlidingWindow
from flowrl.models.build import CheckpointError, actor_record, build_actor, build_policy, load_actor
from flowrl.models.flow_policy import ChainSample, CPSConverter, FlowPolicy, FlowSDEConverter, ReinFlowConverter
from flowrl.models.networks import ReinFlowNoiseNet, VelocityMLP

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
    kind: str | None, window: str = "all", reduce: str = "mean", shift: float = 1.0, seed: int = 0, k: int = K
) -> FlowPolicy:
    torch.manual_seed(seed)
    velocity = VelocityMLP(O, TA, DA, hidden_dims=(16,), time_dim=8)
    converter = _converter(kind) if kind is not None else None
    return FlowPolicy(
        velocity, k, converter, _window(window), grid_kind="shifted", grid_shift=shift, log_prob_reduce=reduce
    )


def _obs(n: int = B, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, O, generator=torch.Generator().manual_seed(seed))


def oracle_transition(policy: FlowPolicy, kind: str, obs, x, k: int, grid32: torch.Tensor) -> Normal:
    """The Gaussian transition of step k, written out from DESIGN.md (float64 arithmetic)."""
    t32, tn32 = grid32[k], grid32[k + 1]
    t, t_next, t1 = float(t32), float(tn32), float(grid32[1])
    v = policy.velocity(obs, x, t32).to(F64)
    xd = x.to(F64)
    h = t_next - t
    if kind in ("reinflow", "flow_noise"):
        mean = xd + h * v
        net = policy.converter.noise_net
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


def oracle_chain_log_prob(policy, kind, obs, chain, mask, reduce, shift):
    grid32 = time_grid(K, "shifted", shift)
    total = torch.zeros(obs.shape[0], dtype=F64)
    entropy = torch.zeros(obs.shape[0], dtype=F64)
    for k in range(K):
        if not bool(mask[:, k].any()):
            continue
        dist = oracle_transition(policy, kind, obs, chain[:, k], k, grid32)
        lp = dist.log_prob(chain[:, k + 1].to(F64)).sum(dim=(1, 2))
        total = total + torch.where(mask[:, k], lp, torch.zeros_like(lp))
        ent = dist.entropy().mean(dim=(1, 2))
        entropy = entropy + torch.where(mask[:, k], ent, torch.zeros_like(ent))
    n = mask.sum(dim=1).to(F64)
    if reduce == "mean":
        total = total / (n * TA * DA)
    return total, entropy / n


# --------------------------------------------------------------------------------------------
# log-prob: sample vs re-evaluation vs the oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("kind", CONVERTERS)
def test_log_prob_matches_sample_and_oracle(kind, window, reduce, shift) -> None:
    policy = make_policy(kind, window, reduce, shift)
    obs = _obs()
    s = policy.sample(obs, ITERATION, torch.Generator().manual_seed(2))
    assert s.chain.shape == (B, K + 1, TA, DA) and s.mask.shape == (B, K) and s.log_prob.shape == (B,)
    assert torch.equal(s.actions, s.chain[:, -1])
    lp, _ = policy.log_prob(obs, s)
    assert lp.shape == (B,)
    torch.testing.assert_close(lp, s.log_prob, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        expected, _ = oracle_chain_log_prob(policy, kind, obs, s.chain, s.mask, reduce, shift)
        torch.testing.assert_close(lp.detach().to(F64), expected, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(s.log_prob.to(F64), expected, rtol=1e-5, atol=2e-5)

        # re-evaluation under changed parameters (what PPO does) still follows the oracle
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        lp2, _ = policy.log_prob(obs, s)
        expected2, _ = oracle_chain_log_prob(policy, kind, obs, s.chain, s.mask, reduce, shift)
        assert not torch.allclose(lp2.to(F64), expected, atol=1e-4)
        torch.testing.assert_close(lp2.to(F64), expected2, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("kind", CONVERTERS)
def test_chain_is_ode_euler_at_non_stochastic_steps(kind, window, shift) -> None:
    policy = make_policy(kind, window, shift=shift)
    obs = _obs()
    s = policy.sample(obs, ITERATION, torch.Generator().manual_seed(3))
    grid = time_grid(K, "shifted", shift)
    checked = 0
    with torch.no_grad():
        for k in range(K):
            x = s.chain[:, k]
            euler = x + (grid[k + 1] - grid[k]) * policy.velocity(obs, x, grid[k])
            det = ~s.mask[:, k]
            assert torch.equal(s.chain[det, k + 1], euler[det])
            # stochastic steps really are noisy (they differ from the Euler step)
            if bool(s.mask[:, k].any()):
                assert bool((s.chain[s.mask[:, k], k + 1] != euler[s.mask[:, k]]).all())
            checked += int(det.sum())
    if window != "all" or kind == "cps":
        assert checked > 0


@pytest.mark.parametrize("kind", CONVERTERS)
def test_masks_per_window(kind) -> None:
    obs = _obs(64)
    all_mask = make_policy(kind, "all").sample(obs, ITERATION, torch.Generator().manual_seed(0)).mask
    expected = torch.ones(64, K, dtype=torch.bool)
    if kind == "cps":
        expected[:, -1] = False  # the step into t = 1 has std 0
    assert torch.equal(all_mask, expected)

    one = make_policy(kind, "one").sample(obs, ITERATION, torch.Generator().manual_seed(0)).mask
    assert bool((one.sum(dim=1) == 1).all())
    if kind == "cps":
        assert not bool(one[:, -1].any())
    assert int(one.any(dim=0).sum()) >= 2  # the step is random per row, not one fixed step

    sliding = make_policy(kind, "sliding").sample(obs, ITERATION, torch.Generator().manual_seed(0)).mask
    assert sliding.tolist() == [[False, True, True, False]] * 64


@pytest.mark.parametrize("kind", CONVERTERS)
def test_stochastic_steps_are_distributed_as_the_oracle(kind) -> None:
    """Monte Carlo: standardized residuals of sampled steps are N(0, 1)."""
    n = 4000
    policy = make_policy(kind, "all", shift=3.0)
    obs = _obs(n)
    s = policy.sample(obs, 0, torch.Generator().manual_seed(4))
    grid = time_grid(K, "shifted", 3.0)
    with torch.no_grad():
        for k in range(K):
            if not bool(s.mask[:, k].any()):
                continue
            dist = oracle_transition(policy, kind, obs, s.chain[:, k], k, grid)
            z = ((s.chain[:, k + 1].to(F64) - dist.mean) / dist.stddev).flatten()
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


def _chains(chain: torch.Tensor, mask: torch.Tensor) -> ChainSample:
    return ChainSample(actions=chain[:, -1], chain=chain, mask=mask, log_prob=torch.zeros(chain.shape[0]))


def test_ode_only_policy_acts_but_cannot_sample() -> None:
    policy = make_policy(None)
    obs = _obs()
    assert policy.act(obs, torch.Generator().manual_seed(0)).shape == (B, TA, DA)
    with pytest.raises(RuntimeError):
        policy.sample(obs)
    with pytest.raises(RuntimeError):
        policy.log_prob(obs, _chains(torch.zeros(B, K + 1, TA, DA), torch.ones(B, K, dtype=torch.bool)))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        make_policy("reinflow", reduce="max")
    policy = make_policy("reinflow")
    obs = _obs()
    with pytest.raises(ValueError):
        policy.log_prob(obs, _chains(torch.zeros(B, K, TA, DA), torch.ones(B, K, dtype=torch.bool)))
    with pytest.raises(ValueError):
        policy.log_prob(obs, _chains(torch.zeros(B, K + 2, TA, DA), torch.ones(B, K + 1, dtype=torch.bool)))


# --------------------------------------------------------------------------------------------
# gradients and entropy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CONVERTERS)
def test_gradients_reach_velocity_and_noise_net(kind) -> None:
    policy = make_policy(kind, "all")
    obs = _obs()
    s = policy.sample(obs, 0, torch.Generator().manual_seed(5))
    lp, ent = policy.log_prob(obs, s)
    lp.mean().backward(retain_graph=True)
    for name, p in policy.velocity.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert any(float(p.grad.abs().max()) > 0 for p in policy.velocity.parameters())
    # the first layer of the velocity sees every input: its gradient is non-zero
    assert float(policy.velocity.net[0].weight.grad.abs().sum()) > 0
    if kind in ("reinflow", "flow_noise"):
        net = policy.converter.noise_net
        for name, p in net.named_parameters():
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        # the entropy also depends on the learned std
        net.zero_grad()
        ent.mean().backward()
        assert float(net.net[-1].weight.grad.abs().sum()) > 0
        # a finite-difference check of d log_prob / d (noise-net output bias)
        bias = net.net[-1].bias
        g = torch.autograd.grad(policy.log_prob(obs, s)[0].sum(), bias)[0]
        eps = 1e-3
        with torch.no_grad():
            e = torch.zeros_like(bias)
            e[0] = eps
            bias.add_(e)
            up = policy.log_prob(obs, s)[0].sum()
            bias.sub_(2 * e)
            down = policy.log_prob(obs, s)[0].sum()
            bias.add_(e)
        fd = (up - down) / (2 * eps)
        assert abs(float(fd) - float(g[0])) < 1e-2 * max(1.0, abs(float(g[0])))


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("kind", ["reinflow", "flow_noise"])
def test_entropy_matches_normal_entropy(kind, window) -> None:
    policy = make_policy(kind, window)
    obs = _obs()
    s = policy.sample(obs, ITERATION, torch.Generator().manual_seed(6))
    _, ent = policy.log_prob(obs, s)
    assert ent.shape == (B,)
    with torch.no_grad():
        _, expected = oracle_chain_log_prob(policy, kind, obs, s.chain, s.mask, "mean", 1.0)
    torch.testing.assert_close(ent.detach().to(F64), expected, rtol=1e-5, atol=1e-5)
    # per-dimension entropy of a std in [STD_MIN, STD_MAX]
    lo = Normal(0.0, STD_MIN).entropy().item()
    hi = Normal(0.0, STD_MAX).entropy().item()
    assert bool(((ent >= lo - 1e-5) & (ent <= hi + 1e-5)).all())


# --------------------------------------------------------------------------------------------
# time grid
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_policy_grid_is_the_shared_time_grid(shift) -> None:
    policy = make_policy("flow_sde", shift=shift)
    torch.testing.assert_close(policy.grid, time_grid(K, "shifted", shift), rtol=0, atol=0)
    if shift == 1.0:
        torch.testing.assert_close(policy.grid, torch.linspace(0, 1, K + 1), rtol=0, atol=1e-7)
    else:
        # SD3 shift in sigma = 1 - t: sigma' = s sigma / (1 + (s - 1) sigma), by hand
        sig = [1 - j / K for j in range(K + 1)]
        expected = [1 - shift * x / (1 + (shift - 1) * x) for x in sig]
        torch.testing.assert_close(policy.grid, torch.tensor(expected), rtol=0, atol=1e-6)
        assert float(policy.grid[1]) < 1 / K  # more steps near the noise end


# --------------------------------------------------------------------------------------------
# build.py: policies from the config, velocity checkpoints
# --------------------------------------------------------------------------------------------


def _cfg(converter: dict | None = None, window: dict | None = None, reduce: str = "mean", hidden=(16,), seed: int = 3):
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
        "mdp": {"log_prob_reduce": reduce},
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
    assert policy.velocity is vel and policy.num_steps == K and policy.log_prob_reduce == "sum"
    assert isinstance(policy.converter, ReinFlowConverter) and policy.converter.noise_net.condition_on_x
    assert (policy.converter.noise_net.std_min, policy.converter.noise_net.std_max) == (0.05, 0.2)
    assert isinstance(policy.window, OneRandomStep)
    torch.testing.assert_close(policy.grid, time_grid(K, "shifted", 3.0), rtol=0, atol=0)
    obs = _obs()
    s = policy.sample(obs, 0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(policy.log_prob(obs, s)[0], s.log_prob, rtol=1e-5, atol=1e-5)

    p = build_policy(_cfg({"type": "reinflow"}), vel)
    assert isinstance(p.converter, ReinFlowConverter) and not p.converter.noise_net.condition_on_x
    assert isinstance(p.window, AllSteps) and p.log_prob_reduce == "mean"

    p = build_policy(_cfg({"type": "flow_sde", "noise_level": 0.4}), vel)
    assert isinstance(p.converter, FlowSDEConverter) and p.converter.noise_level == 0.4

    sliding = {"type": "sliding", "size": 2, "mode": "progressive", "shift_interval": 3, "stride": 2}
    p = build_policy(_cfg({"type": "cps", "noise_level": 0.5}, sliding, seed=11), vel)
    assert isinstance(p.converter, CPSConverter) and p.converter.noise_level == 0.5
    assert p.window == SlidingWindow(2, "progressive", 3, 2, seed=11)


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
