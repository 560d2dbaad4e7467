"""Policy families: a shortcut model samples a bimodal target in one step, rectified flow cannot;
the MeanFlow loss against exact average-velocity fields (point mass, Gaussian) and its one-step
sampling after training."""

from __future__ import annotations

import pytest
import torch

from flowrl.algos.bc import demo_batches, fit
from flowrl.algos.flow_bc import flow_matching_loss, meanflow_loss, shortcut_loss
from flowrl.config import PretrainConfig, build_config
from flowrl.models.build import actor_record, build_actor, load_actor
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.networks import SinusoidalTimeEmbedding, VelocityMLP
from flowrl.models.sampler import ChainSampler


def _bimodal(n: int = 4096):
    """Chunks of one scalar action, +1 or -1 with equal odds (tiny noise), the same observation."""
    g = torch.Generator().manual_seed(0)
    chunks = (torch.randint(0, 2, (n, 1, 1), generator=g).float() * 2 - 1) + 0.02 * torch.randn(n, 1, 1, generator=g)
    return torch.zeros(n, 1), chunks


def _one_step_samples(method: str) -> torch.Tensor:
    obs, chunks = _bimodal()
    torch.manual_seed(0)
    velocity = VelocityMLP(1, 1, 1, (64, 64), 16, step_conditioned=method == "shortcut")
    cfg = PretrainConfig(steps=1500, batch_size=256, lr=1e-3, ema_decay=0.99)

    def loss(v, o, c, g):
        return shortcut_loss(v, o, c, 0.25, g) if method == "shortcut" else flow_matching_loss(v, o, c, g)

    ema, _ = fit(
        velocity, demo_batches(obs, chunks, cfg.batch_size, torch.device("cpu")), loss, cfg, seed=0, progress=False
    )
    policy = FlowPolicy(ema, ChainSampler(num_steps=1))
    return policy.act(torch.zeros(4000, 1), torch.Generator().manual_seed(1)).flatten()


def test_shortcut_model_samples_both_modes_in_one_step():
    """Oracle: with K = 1, rectified flow returns x_0 + v(x_0, 0) = E[data] = 0 for every x_0
    (the data is independent of the noise at t = 0), so its samples sit between the modes; a
    shortcut model has learned the whole step and lands on +-1."""

    def near_modes(x):
        return (((x - 1).abs() < 0.25) | ((x + 1).abs() < 0.25)).float().mean().item()

    shortcut, flow = _one_step_samples("shortcut"), _one_step_samples("rectified_flow")
    assert near_modes(flow) < 0.1
    assert flow.abs().mean() < 0.3
    assert near_modes(shortcut) > 0.6
    assert 0.3 < (shortcut > 0).float().mean().item() < 0.7, "both modes are kept"


def test_self_consistency_target_is_two_half_steps():
    """With a field whose average velocity is exact for point-mass data (u = (c - x) / (1 - t),
    straight lines to c), the shortcut loss is 0: two half steps equal one full step."""
    c = 0.7

    class StraightToC(torch.nn.Module):
        step_conditioned = True

        def forward(self, obs, x, t, t_next):
            return (c - x) / (1.0 - torch.as_tensor(t).view(-1, 1, 1))

    chunks = torch.full((64, 1, 1), c)
    loss = shortcut_loss(StraightToC(), torch.zeros(64, 1), chunks, 0.5, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10


def test_step_conditioned_field_needs_the_step_and_survives_a_checkpoint(tmp_path):
    velocity = VelocityMLP(2, 4, 2, (16,), 8, step_conditioned=True)
    with pytest.raises(ValueError, match="needs t_next"):
        velocity(torch.zeros(3, 2), torch.zeros(3, 4, 2), torch.zeros(3))
    cfg = build_config({"name": "t", "policy": {"type": "shortcut", "hidden_dims": [16], "time_embed_dim": 8}})
    torch.save(actor_record(velocity, cfg.policy), tmp_path / "v.pt")
    loaded = load_actor(tmp_path / "v.pt", cfg.policy, 2, 2)
    assert loaded.step_conditioned
    x, t = torch.randn(3, 4, 2), torch.rand(3)
    assert torch.equal(loaded(torch.ones(3, 2), x, t, t + 0.25), velocity(torch.ones(3, 2), x, t, t + 0.25))
    assert build_actor(cfg.policy, 2, 2).step_conditioned
    assert not build_actor(cfg.policy.model_copy(update={"type": "rectified_flow"}), 2, 2).step_conditioned


# --------------------------------------------------------------------------- MeanFlow
class _StraightTo(torch.nn.Module):
    """u(x, t, r) = (c - x) / (1 - t) + wrong * (r - t): exact average velocity for data at c when wrong = 0."""

    step_conditioned = True

    def __init__(self, c: float, wrong: float = 0.0) -> None:
        super().__init__()
        self.c, self.wrong = c, wrong

    def forward(self, obs, x, t, t_next):
        t, r = torch.as_tensor(t).view(-1, 1, 1), torch.as_tensor(t_next).view(-1, 1, 1)
        return (self.c - x) / (1.0 - t) + self.wrong * (r - t)


def test_meanflow_loss_vanishes_for_the_exact_field_of_a_point_mass():
    """Point mass at c: trajectories are straight, u = (c - x) / (1 - t) for every r, and the
    JVP's two parts (v . du/dx and du/dt) cancel, so the target is v and the loss is 0."""
    for c, seed in ((0.7, 0), (-1.3, 1)):
        chunks = torch.full((512, 2, 1), c)
        gen = torch.Generator().manual_seed(seed)
        assert meanflow_loss(_StraightTo(c), torch.zeros(512, 1), chunks, 0.5, gen).item() < 1e-10
    chunks = torch.full((512, 2, 1), 0.7)
    for wrong in (_StraightTo(0.0), _StraightTo(0.7, wrong=0.5)):  # wrong data point; r-dependent error
        loss = meanflow_loss(wrong, torch.zeros(512, 1), chunks, 0.5, torch.Generator().manual_seed(0))
        assert loss.item() > 0.05


class _GaussianAverageVelocity(torch.nn.Module):
    """Exact average velocity over [t, r] for 1-D data N(m, s²) and noise N(0, 1), plus
    ``delta`` times features (the direction of the gradient check).

    x_t = (1 - t) eps + t a ~ N(m t, sigma_t²), sigma_t² = (1 - t)² + t² s². The ODE's flow map is
    affine, x_r = m r + (sigma_r / sigma_t)(x_t - m t), so u = (x_r - x_t) / (r - t)
    = m + (x_t - m t) ((1 + s²)(r + t) - 2) / (sigma_t (sigma_t + sigma_r)) (no 0/0 at r = t,
    where it is the instantaneous velocity). ``ignore_interval`` gives that instantaneous
    velocity v(x, t) for every r (what rectified flow learns).
    """

    step_conditioned = True

    def __init__(self, m: float, s: float, ignore_interval: bool = False) -> None:
        super().__init__()
        self.m, self.s, self.ignore_interval = m, s, ignore_interval
        self.delta = torch.nn.Parameter(torch.zeros(4))

    def forward(self, obs, x, t, t_next):
        t = torch.as_tensor(t).view(-1, 1, 1).double()
        r = torch.as_tensor(t_next).view(-1, 1, 1).double()
        x64, m, s = x.double(), self.m, self.s
        r_eff = t if self.ignore_interval else r

        def sigma(u):
            return torch.sqrt((1 - u) ** 2 + u**2 * s**2)

        u = m + (x64 - m * t) * ((1 + s**2) * (r_eff + t) - 2) / (sigma(t) * (sigma(t) + sigma(r_eff)))
        features = torch.stack([torch.ones_like(x64), x64, x64 * t, (r - t) * x64], dim=-1)
        return (u + (features * self.delta.double()).sum(-1)).to(x.dtype)


def _meanflow_gradient_t_stats(field: torch.nn.Module, m: float, s: float, batches: int = 10, n: int = 20000):
    """Gradient of the MeanFlow loss w.r.t. ``field.delta`` at delta = 0, per batch of fresh
    data; returns mean / standard error per component (a t statistic)."""
    grads = []
    for j in range(batches):
        gen = torch.Generator().manual_seed(100 + j)
        data = m + s * torch.randn(n, 1, 1, generator=gen)
        field.delta.grad = None
        meanflow_loss(field, torch.zeros(n, 1), data, 0.75, gen).backward()
        grads.append(field.delta.grad.clone())
    g = torch.stack(grads)
    return g.mean(0) / (g.std(0) / batches**0.5)


def test_exact_gaussian_average_velocity_is_a_stationary_point_of_the_meanflow_loss():
    """For Gaussian data the loss is not 0 at the exact field (the target uses the conditional
    velocity a - eps, random given x_t); its minimiser is. Oracle: the loss's gradient in every
    direction of a small feature family vanishes at the closed-form average velocity (up to
    Monte-Carlo error, |t| < 4), and not at the instantaneous velocity (what a plain flow
    learns) or at the field of the wrong data std. This checks the JVP target: a wrong sign of
    (r - t), a missing tangent or a wrong weighting would move the stationary point."""
    m, s = 0.5, 0.3
    exact = _meanflow_gradient_t_stats(_GaussianAverageVelocity(m, s), m, s)
    assert exact.abs().max().item() < 4.0, exact
    instantaneous = _meanflow_gradient_t_stats(_GaussianAverageVelocity(m, s, ignore_interval=True), m, s)
    wrong_std = _meanflow_gradient_t_stats(_GaussianAverageVelocity(m, 0.6), m, s)
    assert instantaneous.abs().max().item() > 20.0, instantaneous
    assert wrong_std.abs().max().item() > 20.0, wrong_std


def test_meanflow_policy_samples_a_conditional_gaussian_in_one_step():
    """Behaviour cloning with the MeanFlow loss, then ONE Euler step of the average velocity
    (x_1 = x_0 + u(x_0, 0, 1)) for two observations: N(-0.5, 0.5²) and N(0.7, 0.8²). One-step
    rectified flow would collapse onto the mean (std ~0). Measured (1200 steps): mean error
    0.001 / 0.022, std ratio 0.84 / 0.89; asserted: |mean error| < 0.08, std ratio in [0.7, 1.2].

    The field uses time features up to frequency 5 and the plain squared error (weight_power
    0). With VelocityMLP's default features (up to frequency 100) the JVP target is unstable
    (plain loss: diverges, loss ~135) and the adaptive weighting learns slowly (one-step std
    ratio 0.23, mean error 0.2 at this budget)."""
    means, stds, contexts = torch.tensor([-0.5, 0.7]), torch.tensor([0.5, 0.8]), torch.tensor([-1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    which = torch.randint(0, 2, (6000,), generator=g)
    obs = contexts[which].view(-1, 1)
    chunks = (means[which] + stds[which] * torch.randn(6000, generator=g)).view(-1, 1, 1)
    torch.manual_seed(0)
    velocity = VelocityMLP(1, 1, 1, (32, 32), 16, step_conditioned=True)
    velocity.time_embed = SinusoidalTimeEmbedding(16, max_freq=5.0)
    cfg = PretrainConfig(steps=1200, batch_size=256, lr=3e-3, ema_decay=0.99)

    def loss(v, o, c, gen):
        return meanflow_loss(v, o, c, 0.75, gen, weight_power=0.0)

    ema, _ = fit(
        velocity, demo_batches(obs, chunks, cfg.batch_size, torch.device("cpu")), loss, cfg, seed=0, progress=False
    )
    policy = FlowPolicy(ema, ChainSampler(num_steps=1))
    for context, mean, std in zip(contexts.tolist(), means.tolist(), stds.tolist(), strict=True):
        x = policy.act(torch.full((4000, 1), context), torch.Generator().manual_seed(1)).flatten()
        assert abs(x.mean().item() - mean) < 0.08, (context, x.mean().item())
        assert 0.7 < x.std().item() / std < 1.2, (context, x.std().item())
