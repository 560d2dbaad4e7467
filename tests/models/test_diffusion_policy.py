"""Tests of flowrl.models.diffusion_policy (DiffusionPolicy, the DPPO baseline).

Oracles: diffusers' DDPMScheduler / DDIMScheduler (schedule, timesteps, one DDIM step with a
given noise, the DDPM posterior, a full deterministic DDIM loop); torch.distributions.Normal
for log-probs and entropies; the closed-form epsilon predictor of 1-D Gaussian data, whose
DDIM sampler must give back the data's mean and std. Convention: DDPM timesteps, tau = T-1
noise, tau = 0 data; the denoiser sees t = (tau + 1) / T.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn
from torch.distributions import Normal

from flowrl.config import ConfigError, build_config
from flowrl.core.transitions import Transitions, unit_values
from flowrl.models.diffusion_policy import (
    DiffusionPolicy,
    cosine_alphas_cumprod,
    ddim_step,
    ddim_timesteps,
)
from flowrl.models.networks import VelocityMLP

O, TA, DA, B = 2, 2, 3, 5
F64 = torch.float64


def make_policy(
    train_steps: int = 20, num_steps: int = 5, min_std: float = 0.1, clip: float | None = 1.0, seed: int = 0
) -> DiffusionPolicy:
    torch.manual_seed(seed)
    denoiser = VelocityMLP(O, TA, DA, hidden_dims=(16,), time_dim=8)
    return DiffusionPolicy(denoiser, train_steps, num_steps, min_std=min_std, denoised_clip=clip)


def _obs(n: int = B, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, O, generator=torch.Generator().manual_seed(seed))


def _rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ddim_scheduler(train_steps: int, num_steps: int, clip: float | None) -> DDIMScheduler:
    sched = DDIMScheduler(
        num_train_timesteps=train_steps,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=clip is not None,
        clip_sample_range=1.0 if clip is None else clip,
        set_alpha_to_one=True,
        prediction_type="epsilon",
        timestep_spacing="trailing",
    )
    sched.set_timesteps(num_steps)
    # The oracle runs in float64. diffusers keeps its schedule in float32: the capped last beta
    # (0.999 -> 0.99900001) moves alpha_bar[T-1] by 1.3e-5 relative, and at tau = T-1 both
    # x0 = (x - ...) / sqrt(alpha_bar) (sqrt ~ 5e-4) and sqrt(1 - alpha_bar_prev - sigma²) (a
    # difference of numbers near 1 that is ~1e-5) amplify float32 rounding to ~4e-5 in the first
    # step. The schedule itself is compared with diffusers' above; here we test the step.
    sched.alphas_cumprod = cosine_alphas_cumprod(train_steps)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=F64)
    return sched


def diffusers_transition(
    sched: DDIMScheduler, eps, tau: int, x, min_std: float, use_clipped: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of diffusers' eta = 1 DDIM step, read off with noise 0 and 1; std floored.
    float64 (the inputs are converted)."""
    eps, x = eps.to(F64), x.to(F64)
    mean = sched.step(
        eps, tau, x, eta=1.0, use_clipped_model_output=use_clipped, variance_noise=torch.zeros_like(x)
    ).prev_sample
    plus = sched.step(
        eps, tau, x, eta=1.0, use_clipped_model_output=use_clipped, variance_noise=torch.ones_like(x)
    ).prev_sample
    return mean, (plus - mean).clamp(min=min_std)


# --------------------------------------------------------------------------------------------
# schedule and timesteps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_steps", [1, 2, 7, 20, 100, 1000])
def test_schedule_matches_diffusers(train_steps) -> None:
    ours = cosine_alphas_cumprod(train_steps)
    theirs = DDPMScheduler(num_train_timesteps=train_steps, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    assert ours.shape == (train_steps,) and ours.dtype == F64
    # diffusers stores the betas in float32; the capped beta 0.999 rounds to 0.99900001, which
    # moves 1 - beta (and every later alpha_bar) by 1.3e-5 relative. Elsewhere ~1e-7.
    torch.testing.assert_close(ours, theirs.to(F64), rtol=2e-5, atol=0.0)
    assert bool((ours[1:] < ours[:-1]).all()) and 0 < float(ours[-1]) <= float(ours[0]) < 1
    if train_steps >= 2:
        assert float(ours[-1] / ours[-2]) == pytest.approx(0.001, rel=1e-9)  # the capped last beta


@pytest.mark.parametrize(("train_steps", "num_steps"), [(1, 1), (20, 1), (20, 4), (20, 20), (100, 10), (1000, 50)])
def test_timesteps_match_diffusers_trailing(train_steps, num_steps) -> None:
    ours = ddim_timesteps(train_steps, num_steps)
    assert torch.equal(ours, _ddim_scheduler(train_steps, num_steps, 1.0).timesteps)
    assert int(ours[0]) == train_steps - 1 and int(ours[-1]) == train_steps // num_steps - 1
    assert bool((ours[:-1] - ours[1:] == train_steps // num_steps).all())


def test_timesteps_when_k_does_not_divide_t() -> None:
    # diffusers' trailing spacing accumulates a float step and can even emit K+1 timesteps
    # (T=15, K=13 ends in -1); ours rounds (K - k) T / K directly.
    for t, k in [(7, 6), (15, 13), (10, 3), (100, 7)]:
        ts = ddim_timesteps(t, k)
        assert ts.shape == (k,) and int(ts[0]) == t - 1 and int(ts[-1]) >= 0
        assert bool((ts[:-1] > ts[1:]).all())
        expected = [round((k - i) * t / k) - 1 for i in range(k)]  # Python's round is half-to-even too
        assert ts.tolist() == expected
    assert ddim_timesteps(10, 10).tolist() == list(range(9, -1, -1))


# --------------------------------------------------------------------------------------------
# one step against diffusers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.5, None])
@pytest.mark.parametrize(("train_steps", "num_steps"), [(20, 4), (100, 10), (30, 30)])
def test_stochastic_step_matches_diffusers_ddim(train_steps, num_steps, clip) -> None:
    policy = make_policy(train_steps, num_steps, min_std=0.0, clip=clip)
    sched = _ddim_scheduler(train_steps, num_steps, clip)
    assert torch.equal(sched.timesteps, policy.timesteps)
    obs = _obs()
    clipped_somewhere = False
    with torch.no_grad():
        for k in range(num_steps):
            tau = int(policy.timesteps[k])
            x = _rand(B, TA, DA, seed=10 + k, scale=1.5)
            z = _rand(B, TA, DA, seed=100 + k)
            eps = policy.denoiser(obs, x, (tau + 1) / train_steps)
            out = ddim_step(
                x, eps, policy.step_alpha[k], policy.step_alpha_prev[k], eta=1.0, denoised_clip=clip, noise=z
            )
            theirs = sched.step(
                eps.to(F64), tau, x.to(F64), eta=1.0, use_clipped_model_output=True, variance_noise=z.to(F64)
            ).prev_sample
            torch.testing.assert_close(out.next_x.to(F64), theirs, rtol=1e-5, atol=1e-5)
            mean, std = diffusers_transition(sched, eps, tau, x, 0.0)
            torch.testing.assert_close(out.mean.to(F64), mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.broadcast_to(out.std, mean.shape).to(F64), std, rtol=1e-5, atol=1e-7)
            if clip is not None and k < num_steps - 1:  # the last step's mean is x0: eps plays no part
                x0 = (x - (1 - policy.step_alpha[k]).sqrt() * eps) / policy.step_alpha[k].sqrt()
                if bool((x0.abs() > clip).any()):
                    clipped_somewhere = True
                    # the eps recomputed from the clipped x0 matters (the test can tell)
                    unclipped_eps = sched.step(
                        eps.to(F64), tau, x.to(F64), eta=1.0, use_clipped_model_output=False, variance_noise=z.to(F64)
                    ).prev_sample
                    assert (out.next_x.to(F64) - unclipped_eps).abs().max() > 1e-3
    assert clip is None or clipped_somewhere
    # the last step goes to alpha_bar = 1: sigma = 0 and the mean is the (clipped) x0
    assert float(out.std.max()) == 0.0


def test_ddpm_k_equals_t_matches_ddpm_posterior() -> None:
    t_steps, clip = 12, 0.8
    policy = make_policy(t_steps, t_steps, min_std=0.0, clip=clip)
    sched = DDPMScheduler(
        num_train_timesteps=t_steps,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        clip_sample_range=clip,
        variance_type="fixed_small",
        prediction_type="epsilon",
    )
    sched.set_timesteps(t_steps)
    assert torch.equal(sched.timesteps, policy.timesteps)
    obs = _obs()
    betas, abar = sched.betas.to(F64), sched.alphas_cumprod.to(F64)
    with torch.no_grad():
        for k in range(t_steps):
            tau = int(policy.timesteps[k])
            x = _rand(B, TA, DA, seed=20 + k, scale=1.5)
            eps = policy.denoiser(obs, x, (tau + 1) / t_steps)
            theirs = sched.step(eps, tau, x, generator=torch.Generator().manual_seed(k)).prev_sample
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(k))  # diffusers' draw
            out = ddim_step(
                x, eps, policy.step_alpha[k], policy.step_alpha_prev[k], eta=1.0, denoised_clip=clip, noise=z
            )
            torch.testing.assert_close(out.next_x, theirs, rtol=1e-5, atol=1e-5)
            # posterior variance beta_tilde = (1 - abar_prev) / (1 - abar) * beta, 0 at tau = 0
            abar_prev = abar[tau - 1] if tau > 0 else torch.tensor(1.0, dtype=F64)
            beta_tilde = (1 - abar_prev) / (1 - abar[tau]) * betas[tau]
            assert float(out.std) ** 2 == pytest.approx(float(beta_tilde), rel=1e-4, abs=1e-12)


def test_step_reevaluates_a_stored_sample_and_floors_the_std() -> None:
    x, eps, nxt = _rand(B, TA, DA, seed=0), _rand(B, TA, DA, seed=1), _rand(B, TA, DA, seed=2)
    abar, abar_prev = torch.tensor([0.3, 0.5, 0.7, 0.9, 0.95]), torch.tensor([0.5, 0.6, 0.99, 1.0, 0.999])
    out = ddim_step(x, eps, abar, abar_prev, eta=1.0, min_std=0.12, denoised_clip=1.0, next_x=nxt)
    assert out.next_x is nxt
    sigma = torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    std = torch.maximum(sigma, torch.tensor(0.12))
    assert (sigma < 0.12).any() and (sigma > 0.12).any()  # both sides of the floor
    torch.testing.assert_close(out.std.reshape(-1), std, rtol=1e-5, atol=1e-7)
    expected = Normal(out.mean, std.view(-1, 1, 1).expand_as(out.mean)).log_prob(nxt).sum(dim=(1, 2))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)
    # a deterministic step (eta = 0) returns its mean and log-prob 0, drawing nothing
    g = torch.Generator().manual_seed(3)
    det = ddim_step(x, eps, abar, abar_prev, eta=0.0, generator=g)
    assert torch.equal(det.next_x, det.mean) and torch.equal(det.log_prob, torch.zeros(B))
    assert torch.equal(torch.randn(2, generator=g), torch.randn(2, generator=torch.Generator().manual_seed(3)))


# --------------------------------------------------------------------------------------------
# the policy: sampling, log-probs, entropy
# --------------------------------------------------------------------------------------------


def oracle_steps(policy: DiffusionPolicy, obs, sample: Transitions, clip):
    """Over the stored steps, from diffusers: per-dimension log-probs ``[B, S]`` (the sum over
    the chunk divided by Ta*Da), the mean per-dimension entropy ``[B]``, and each step's mean
    and (floored) std ``[B, S, Ta, Da]``."""
    sched = _ddim_scheduler(policy.train_steps, policy.num_steps, clip)
    lps, ents, means, stds = [], [], [], []
    for j in range(sample.steps.shape[1]):
        k = int(sample.steps[0, j])
        assert bool((sample.steps[:, j] == k).all())  # every chain stores the same steps
        tau = int(sched.timesteps[k])
        x = sample.x_in[:, j]
        eps = policy.denoiser(obs, x, (tau + 1) / policy.train_steps)
        mean, std = diffusers_transition(sched, eps, tau, x, policy.min_std)
        dist = Normal(mean.to(F64), std.to(F64))
        lps.append(dist.log_prob(sample.x_out[:, j].to(F64)).mean(dim=(1, 2)))
        ents.append(dist.entropy().mean(dim=(1, 2)))
        means.append(mean)
        stds.append(std)
    return torch.stack(lps, 1), torch.stack(ents, 1).mean(1), torch.stack(means, 1), torch.stack(stds, 1)


def _per_dim(policy: DiffusionPolicy, per_step: torch.Tensor) -> torch.Tensor:
    """DPPO's per-step samples: each step's log-prob per action dimension, back in ``[B, S]``."""
    assert policy.sample_unit == "step" and policy.log_prob_reduce == "mean"
    b, s = per_step.shape
    return unit_values(per_step, policy.sample_unit, policy.log_prob_reduce, TA * DA).view(b, s)


@pytest.mark.parametrize(
    ("train_steps", "num_steps", "min_std", "clip"), [(20, 5, 0.1, 1.0), (20, 20, 0.05, 0.7), (50, 10, 0.3, None)]
)
def test_sample_and_log_prob_match_oracle(train_steps, num_steps, min_std, clip) -> None:
    policy = make_policy(train_steps, num_steps, min_std=min_std, clip=clip)
    obs = _obs()
    s = policy.sample(obs, 0, torch.Generator().manual_seed(2))
    assert isinstance(s, Transitions)
    # with a floor every step is stochastic and stored: S = K, in order
    assert s.x_in.shape == (B, num_steps, TA, DA) and s.x_out.shape == (B, num_steps, TA, DA)
    assert s.log_prob.shape == (B, num_steps) and s.final.shape == (B, TA, DA)
    assert s.steps.tolist() == [list(range(num_steps))] * B
    assert torch.equal(s.nfe, torch.full((B,), float(num_steps)))
    # the stored steps are one chain: each starts where the last ended, from x_T to the actions
    assert torch.equal(s.x_in[:, 0], torch.randn(B, TA, DA, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(s.x_in[:, 1:], s.x_out[:, :-1])
    assert torch.equal(s.final, s.x_out[:, -1])
    ev = policy.evaluate(obs, s)
    assert ev.log_prob.shape == (B, num_steps) and ev.entropy.shape == (B,)
    assert ev.mean.shape == (B, num_steps, TA, DA) and ev.std.shape == (B, num_steps, TA, DA)
    with torch.no_grad():
        expected_lp, expected_ent, mean, std = oracle_steps(policy, obs, s, clip)
    # Without a clip an untrained denoiser (eps ~ 0) blows the chain up to |x| ~ 1e3, where the
    # float32 rounding of the stored chain alone moves a per-dimension log-prob by ~ulp(x) / std.
    biggest = float(torch.cat([s.x_in, s.x_out], 1).abs().max())
    atol = 1e-4 + 3e-7 * biggest / min_std
    torch.testing.assert_close(_per_dim(policy, s.log_prob).to(F64), expected_lp, rtol=1e-4, atol=atol)
    torch.testing.assert_close(_per_dim(policy, ev.log_prob).detach().to(F64), expected_lp, rtol=1e-4, atol=atol)
    torch.testing.assert_close(ev.entropy.detach().to(F64), expected_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ev.std.detach().to(F64), std, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ev.mean.detach().to(F64), mean, rtol=1e-4, atol=1e-4 + 1e-6 * biggest)
    # the floor really is used: the last step (sigma = 0) samples with std = min_std
    assert float(policy.sample_std[-1]) == pytest.approx(min_std)
    # a given x_T (a GRPO group's) replaces the generator's first draw
    noise = _rand(B, TA, DA, seed=3)
    assert torch.equal(policy.sample(obs, 0, torch.Generator().manual_seed(2), noise=noise).x_in[:, 0], noise)


def test_sampled_steps_are_distributed_as_the_oracle() -> None:
    """Monte Carlo: standardized residuals under diffusers' (mean, max(sigma, min_std)) are N(0, 1)."""
    n, min_std = 2000, 0.1
    policy = make_policy(20, 5, min_std=min_std, clip=1.0)
    sched = _ddim_scheduler(20, 5, 1.0)
    obs = _obs(n)
    s = policy.sample(obs, 0, torch.Generator().manual_seed(4))
    assert float(policy.sample_std.min()) == pytest.approx(min_std)  # at least one floored step
    assert s.steps.tolist() == [list(range(5))] * n
    with torch.no_grad():
        for k in range(5):
            tau = int(sched.timesteps[k])
            eps = policy.denoiser(obs, s.x_in[:, k], (tau + 1) / 20)
            mean, std = diffusers_transition(sched, eps, tau, s.x_in[:, k], min_std)
            z = ((s.x_out[:, k] - mean) / std).flatten().to(F64)
            assert abs(float(z.mean())) < 0.03, (k, float(z.mean()))  # SE = 1/sqrt(12000) ~ 0.009
            assert abs(float(z.std()) - 1.0) < 0.03, (k, float(z.std()))


@pytest.mark.parametrize(("train_steps", "num_steps"), [(20, 2), (20, 5), (12, 12)])
def test_without_a_floor_the_last_step_is_deterministic(train_steps, num_steps) -> None:
    """min_std = 0: the step into alpha_bar = 1 has std 0, so it is not stored (S = K - 1)."""
    policy = make_policy(train_steps, num_steps, min_std=0.0, clip=1.0)
    assert policy.stochastic_steps().tolist() == [True] * (num_steps - 1) + [False]
    obs = _obs()
    s = policy.sample(obs, 0, torch.Generator().manual_seed(5))
    s_num = num_steps - 1
    assert s.steps.tolist() == [list(range(s_num))] * B
    assert s.x_in.shape == (B, s_num, TA, DA) and s.x_out.shape == (B, s_num, TA, DA)
    assert s.log_prob.shape == (B, s_num) and bool(torch.isfinite(s.log_prob).all())
    assert bool(s.final.abs().max() <= 1.0)  # the last step returns the clipped x0
    # the last, unstored step is the deterministic one from the last stored state: its mean
    k = num_steps - 1
    with torch.no_grad():
        eps = policy.denoiser(obs, s.x_out[:, -1], policy.step_time[k])
        last = ddim_step(s.x_out[:, -1], eps, policy.step_alpha[k], 1.0, eta=1.0, denoised_clip=1.0)
    assert float(last.std.max()) == 0.0
    torch.testing.assert_close(s.final, last.mean.to(s.final.dtype), rtol=1e-6, atol=1e-6)
    ev = policy.evaluate(obs, s)
    assert ev.log_prob.shape == (B, s_num)
    assert bool((ev.std > 0).all())  # every stored step is stochastic
    torch.testing.assert_close(ev.log_prob, s.log_prob, rtol=1e-5, atol=1e-5)


def test_config_rejects_one_step_without_a_floor() -> None:
    """denoising_steps 1 with min_std 0 has no stochastic step: rejected at load time, naming the fix."""

    def cfg(**policy):
        return build_config(
            {"name": "x", "policy": {"type": "diffusion", **policy}, "pretrain": {"steps": 10, "batch_size": 8}}
        )

    with pytest.raises(ConfigError, match=r"min_std > 0 or denoising_steps >= 2") as err:
        cfg(denoising_steps=1, min_std=0.0)
    assert "policy" in str(err.value)
    # either fix is accepted
    assert cfg(denoising_steps=1, min_std=0.05).policy.min_std == 0.05
    assert cfg(denoising_steps=2, min_std=0.0).policy.denoising_steps == 2


def test_reevaluation_reproduces_fresh_log_probs() -> None:
    policy = make_policy(100, 10, min_std=0.1)
    obs = _obs(64)
    s = policy.sample(obs, 3, torch.Generator().manual_seed(6))
    lp = _per_dim(policy, policy.evaluate(obs, s).log_prob)
    old = _per_dim(policy, s.log_prob)
    # per-dimension log-probs: Ta*Da times the ratio tolerance of a summed log-prob
    ratio = torch.exp(lp - old)
    assert float((ratio - 1).abs().max().detach()) < 1e-5
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        lp2 = _per_dim(policy, policy.evaluate(obs, s).log_prob)
    assert float((torch.exp(lp2 - old) - 1).abs().max()) > 1e-3


@pytest.mark.parametrize("clip", [None, 5.0])
def test_gradients_reach_the_denoiser(clip) -> None:
    # An untrained denoiser predicts eps ~ 0, so x0 ~ x / sqrt(alpha_bar) and a clip of 1 would
    # clamp every deterministic x0 (zero gradient, correctly); a wide clip keeps x0 inside.
    policy = make_policy(20, 4, clip=clip)
    obs = _obs()
    s = policy.sample(obs, 0, torch.Generator().manual_seed(7))
    params = dict(policy.denoiser.named_parameters())
    assert params
    lp = policy.evaluate(obs, s).log_prob
    grads = torch.autograd.grad(lp.sum(), list(params.values()))
    for name, g in zip(params, grads, strict=True):
        assert bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0, name
    noise = torch.randn(B, TA, DA, generator=torch.Generator().manual_seed(8))
    actions = policy.coupled_actions(obs, noise)
    grads = torch.autograd.grad(actions.pow(2).sum(), list(params.values()))
    for name, g in zip(params, grads, strict=True):
        assert bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0, name
    # one parameter group: the exploration noise is the fixed DDPM variance with its floor
    groups = policy.param_groups()
    assert set(groups) == {"actor"} and [id(p) for p in groups["actor"]] == [id(p) for p in params.values()]
    assert policy.network is policy.denoiser and policy.event_shape == (TA, DA)


# --------------------------------------------------------------------------------------------
# deterministic DDIM (act / coupled_actions)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("train_steps", "num_steps", "clip"), [(20, 5, 1.0), (20, 20, 0.6), (100, 10, None)])
def test_act_is_diffusers_ddim_eta0(train_steps, num_steps, clip) -> None:
    policy = make_policy(train_steps, num_steps, clip=clip)
    obs = _obs()
    got = policy.act(obs, torch.Generator().manual_seed(9))
    assert torch.equal(got, policy.act(obs, torch.Generator().manual_seed(9)))
    assert not torch.allclose(got, policy.act(obs, torch.Generator().manual_seed(10)))
    sched = _ddim_scheduler(train_steps, num_steps, clip)
    x = torch.randn(B, TA, DA, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(policy.coupled_actions(obs, x), got, rtol=0, atol=0)
        x = x.to(F64)
        for tau in sched.timesteps.tolist():
            eps = policy.denoiser(obs, x.float(), (tau + 1) / train_steps)
            x = sched.step(eps.to(F64), tau, x, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(got.to(F64), x, rtol=1e-4, atol=1e-4)


class GaussianEpsOracle(nn.Module):
    """The exact epsilon predictor E[eps | x_tau] of data N(m, s²) in every dimension.

    x_tau = sqrt(ab) a + sqrt(1 - ab) eps has variance v = ab s² + 1 - ab and
    Cov(eps, x_tau) = sqrt(1 - ab), so E[eps | x] = sqrt(1 - ab) (x - sqrt(ab) m) / v.
    """

    def __init__(self, m: float, s: float, train_steps: int, horizon: int = 1, action_dim: int = 1) -> None:
        super().__init__()
        self.m, self.s, self.horizon, self.action_dim = m, s, horizon, action_dim
        self.register_buffer("abar", cosine_alphas_cumprod(train_steps))
        self.train_steps = train_steps
        self.dummy = nn.Parameter(torch.zeros(()))  # a policy module needs no parameters, but mimic a net

    @property
    def event_shape(self) -> tuple[int, int]:  # as VelocityMLP's: the chunk (Ta, Da)
        return (self.horizon, self.action_dim)

    def forward(self, obs, x, t, t_next=None):
        tau = torch.round(torch.as_tensor(t, dtype=F64) * self.train_steps).long() - 1
        ab = self.abar[tau].expand(x.shape[0]).view(-1, 1, 1) if tau.ndim == 0 else self.abar[tau].view(-1, 1, 1)
        xd = x.to(F64)
        eps = (1 - ab).sqrt() * (xd - ab.sqrt() * self.m) / (ab * self.s**2 + 1 - ab)
        return eps.to(x.dtype) + 0 * self.dummy


def _ddim_law(policy: DiffusionPolicy) -> tuple[float, float]:
    """DDIM with eta = 0 is an affine map for Gaussian data: actions = a x_T + b, with b the
    image of x_T = 0 and a that of 1 minus b, so its output law is exactly N(b, a²)."""
    with torch.no_grad():
        ends = policy.coupled_actions(torch.zeros(2, 1), torch.tensor([0.0, 1.0]).view(2, 1, 1))
    ends = ends.to(F64).flatten()
    return float(ends[0]), abs(float(ends[1] - ends[0]))


def test_exact_eps_ddim_reproduces_gaussian_data() -> None:
    """Deterministic DDIM with the exact eps of N(m, s²) data gives back m and s.

    DDIM's discretization shrinks the std, the more so the coarser the steps and the narrower
    the data. Measured (T = 1000, m = 0.3, s = 0.2): K = 1000 mean 0.29999, std 0.19925
    (-0.4%); K = 50 mean 0.29999, std 0.18654 (-6.7%); K = 10 std 0.1406 (-30%).
    """
    t_steps, m, s = 1000, 0.3, 0.2
    errors = {}
    for num_steps, tol_mean, tol_std in [(1000, 1e-3, 0.01 * s), (50, 1e-3, 0.08 * s)]:
        policy = DiffusionPolicy(GaussianEpsOracle(m, s, t_steps), t_steps, num_steps, min_std=0.1, denoised_clip=None)
        b, a = _ddim_law(policy)
        assert abs(b - m) < tol_mean, (num_steps, b, m)
        assert abs(a - s) < tol_std, (num_steps, a, s)
        errors[num_steps] = abs(a - s)
        # and through act's own noise (Monte Carlo, n = 4000: SE of the mean 0.0032, of the std 0.0022)
        acts = policy.act(torch.zeros(4000, 1), torch.Generator().manual_seed(11)).to(F64).flatten()
        assert abs(float(acts.mean()) - m) < tol_mean + 4 * s / math.sqrt(4000)
        assert abs(float(acts.std()) - s) < tol_std + 4 * s / math.sqrt(8000)
    assert errors[1000] < errors[50] / 5  # it is the discretization: finer steps, smaller error


def test_exact_eps_stochastic_sampling_reproduces_gaussian_data() -> None:
    """DDPM (K = T = 1000, eta = 1, no floor) with the exact eps samples N(m, s²) too.

    Measured: mean -0.1969, std 0.3024 for m = -0.2, s = 0.3 (n = 8000, SE 0.0034 / 0.0024). At
    T = 100 the fixed-small (posterior) variance loses ~6% of the std (0.2825).
    """
    t_steps, m, s, n = 1000, -0.2, 0.3, 8000
    policy = DiffusionPolicy(GaussianEpsOracle(m, s, t_steps), t_steps, t_steps, min_std=0.0, denoised_clip=None)
    acts = policy.sample(torch.zeros(n, 1), 0, torch.Generator().manual_seed(12)).final.to(F64).flatten()
    assert abs(float(acts.mean()) - m) < 4 * s / math.sqrt(n)
    assert abs(float(acts.std()) - s) < 4 * s / math.sqrt(2 * n) + 0.005


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------


def test_bad_arguments_raise() -> None:
    denoiser = VelocityMLP(O, TA, DA, hidden_dims=(8,), time_dim=4)
    for kwargs in (
        dict(train_steps=10, num_steps=11),
        dict(train_steps=10, num_steps=0),
        dict(train_steps=0, num_steps=0),
        dict(train_steps=10, num_steps=5, min_std=-0.1),
        dict(train_steps=10, num_steps=5, min_std=float("nan")),
        dict(train_steps=10, num_steps=5, denoised_clip=0.0),
        dict(train_steps=10, num_steps=5, denoised_clip=-1.0),
    ):
        with pytest.raises(ValueError):
            DiffusionPolicy(denoiser, **kwargs)
    with pytest.raises(ValueError):
        DiffusionPolicy(VelocityMLP(O, TA, DA, hidden_dims=(8,), time_dim=4, step_conditioned=True), 10, 5)
    with pytest.raises(ValueError):
        cosine_alphas_cumprod(0)
    policy = make_policy(20, 5)
    s = policy.sample(_obs(), 0, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        make_policy(20, 4).evaluate(_obs(), s)  # step index 4 does not fit K = 4
    wrong_event = Transitions(
        final=s.final[:, :1],
        x_in=s.x_in[:, :, :1],
        x_out=s.x_out[:, :, :1],
        steps=s.steps,
        log_prob=s.log_prob,
        nfe=s.nfe,
    )
    with pytest.raises(ValueError):
        policy.evaluate(_obs(), wrong_event)
