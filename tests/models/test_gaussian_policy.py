"""Tests of flowrl.models.gaussian_policy.GaussianPolicy.

Oracles: torch.distributions.Normal (log-prob, entropy), and the closed-form W2 distance of
two diagonal Gaussians, which the shared-noise coupling attains exactly.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Normal

from flowrl.core.transitions import unit_values
from flowrl.models.gaussian_policy import GaussianPolicy, GaussianSample
from flowrl.models.networks import GaussianActor

B, O, TA, DA = 6, 3, 2, 2


def _policy(seed: int = 0, init_std: float = 0.5) -> GaussianPolicy:
    torch.manual_seed(seed)
    actor = GaussianActor(O, TA, DA, hidden_dims=(16,), init_std=init_std)
    with torch.no_grad():  # non-trivial means and a per-dimension std
        actor.net[-1].weight.normal_(0.0, 1.0)
        actor.net[-1].bias.normal_(0.0, 0.5)
        actor.log_std.copy_(torch.log(torch.tensor([[0.2, 0.7], [1.3, 0.4]])))
    return GaussianPolicy(actor)


def test_sample_and_log_prob_match_torch_normal():
    policy = _policy()
    obs = torch.randn(B, O)
    sample = policy.sample(obs, generator=torch.Generator().manual_seed(1))
    assert isinstance(sample, GaussianSample)
    # one stochastic "step" per chunk: log_prob [B, 1], summed over the chunk
    assert sample.final.shape == (B, TA, DA) and sample.log_prob.shape == (B, 1)
    mean, std = policy.actor(obs)
    normal = Normal(mean.detach(), std.detach().expand_as(mean))
    expected = normal.log_prob(sample.final).sum(dim=(1, 2))
    torch.testing.assert_close(sample.log_prob[:, 0], expected, rtol=1e-5, atol=1e-5)
    # one sample per chunk with the summed log-prob (CleanRL): the chain value is the column itself
    assert policy.sample_unit == "chain" and policy.log_prob_reduce == "sum"
    chain = unit_values(sample.log_prob, policy.sample_unit, policy.log_prob_reduce, TA * DA)
    assert torch.equal(chain, sample.log_prob[:, 0])
    # re-evaluating a fresh sample reproduces its log-prob exactly (the PPO ratio check)
    ev = policy.evaluate(obs, sample)
    assert ev.log_prob.shape == (B, 1)
    assert torch.equal(ev.log_prob, sample.log_prob)
    # the Gaussian of the (single) step, for a KL to a reference policy
    assert ev.mean.shape == (B, 1, TA, DA) and ev.std.shape == (B, 1, TA, DA)
    torch.testing.assert_close(ev.mean[:, 0].detach(), normal.mean, rtol=0, atol=0)
    torch.testing.assert_close(ev.std[:, 0].detach(), normal.stddev, rtol=0, atol=0)
    # log_prob of arbitrary actions too, and it is differentiable in the actor's parameters
    other = GaussianSample(final=torch.randn(B, TA, DA) * 2, log_prob=torch.zeros(B, 1))
    lp = policy.evaluate(obs, other).log_prob
    torch.testing.assert_close(lp[:, 0].detach(), normal.log_prob(other.final).sum(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    lp.sum().backward()
    assert policy.actor.log_std.grad is not None and policy.actor.net[0].weight.grad is not None
    # entropy per dimension = mean over dimensions of the Normal entropies, for every row
    entropy = ev.entropy
    assert entropy.shape == (B,)
    torch.testing.assert_close(entropy, normal.entropy().mean(dim=(1, 2)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        entropy[0], torch.tensor(0.5 + 0.5 * math.log(2 * math.pi)) + policy.actor.log_std.detach().mean()
    )


def test_sample_statistics_and_generator_determinism():
    """Monte-Carlo: samples for one observation have the actor's mean and std."""
    policy = _policy(1)
    obs = torch.randn(1, O).expand(20000, O)
    g = torch.Generator().manual_seed(2)
    actions = policy.sample(obs, generator=g).final
    mean, std = policy.actor(obs[:1])
    # standard errors: std / sqrt(n) <= 0.01; sample std error ~ std / sqrt(2n)
    torch.testing.assert_close(actions.mean(0), mean[0].detach(), rtol=0, atol=0.04)
    torch.testing.assert_close(actions.std(0), std.detach(), rtol=0.03, atol=0)
    again = policy.sample(obs, generator=torch.Generator().manual_seed(2)).final
    assert torch.equal(actions, again)
    assert not torch.equal(actions, policy.sample(obs, generator=torch.Generator().manual_seed(3)).final)
    # a given noise (a GRPO group's) replaces the generator's draw: actions = mean + std * noise
    noise = torch.randn(4, TA, DA, generator=torch.Generator().manual_seed(4))
    fixed = policy.sample(obs[:4], noise=noise).final
    torch.testing.assert_close(fixed, (mean[0] + std * noise).detach(), rtol=1e-6, atol=1e-6)


def test_act_is_the_mean():
    policy = _policy(2)
    obs = torch.randn(B, O)
    mean, _ = policy.actor(obs)
    assert torch.equal(policy.act(obs, torch.Generator().manual_seed(0)), mean.detach())
    assert torch.equal(policy.act(obs), policy.act(obs))
    assert policy.event_shape == (TA, DA)
    # the network a checkpoint stores, and one parameter group (the std is part of the actor)
    assert policy.network is policy.actor
    groups = policy.param_groups()
    assert set(groups) == {"actor"}
    assert [id(p) for p in groups["actor"]] == [id(p) for p in policy.actor.parameters()]
    assert any(p is policy.actor.log_std for p in groups["actor"])


def test_coupled_actions_attain_the_closed_form_w2():
    """For diagonal Gaussians, W2² = ||mu1 - mu2||² + ||s1 - s2||², and the coupling
    a_i = mu_i + s_i * z (same z) is optimal: E||a1 - a2||² equals it."""
    p1, p2 = _policy(3), _policy(4)
    with torch.no_grad():
        p2.actor.log_std.copy_(torch.log(torch.tensor([[0.5, 0.1], [1.0, 2.0]])))
    obs = torch.randn(1, O)
    n = 40000
    noise = torch.randn((n, TA, DA), generator=torch.Generator().manual_seed(5))
    a1 = p1.coupled_actions(obs.expand(n, O), noise)
    a2 = p2.coupled_actions(obs.expand(n, O), noise)
    mc = ((a1 - a2) ** 2).sum(dim=(1, 2)).mean().item()
    (m1, s1), (m2, s2) = p1.actor(obs), p2.actor(obs)
    w2_sq = (((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum()).item()
    assert w2_sq > 1.0  # the two policies are far apart: a meaningful comparison
    # per sample, a1 - a2 = (m1 - m2) + (s1 - s2) z: the MC mean has relative error ~1 %
    assert abs(mc - w2_sq) < 0.02 * w2_sq, (mc, w2_sq)
    # a policy coupled with itself is at distance 0, and the actions are differentiable
    assert torch.equal(p1.coupled_actions(obs.expand(4, O), noise[:4]), a1[:4])
    assert a1.requires_grad
