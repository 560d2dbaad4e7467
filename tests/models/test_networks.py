"""Tests of flowrl.models.networks: shapes, the squashed std range, argument checks, and the
observation normaliser against numpy statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowrl.models.networks import (
    GaussianActor,
    ObsNormalizer,
    ReinFlowNoiseNet,
    SinusoidalTimeEmbedding,
    ValueMLP,
    VelocityMLP,
    copy_obs_stats,
)

B, O, TA, DA = 5, 3, 4, 2


def _extreme_inputs():
    """Observations, times and samples far outside the training range (saturate the tanh MLP)."""
    obs = torch.cat([torch.full((2, O), 1e6), torch.full((2, O), -1e6), torch.zeros(1, O)])
    obs[0, 1] = -1e6
    x = torch.cat([torch.full((3, TA, DA), 1e5), torch.full((2, TA, DA), -1e5)])
    return obs, x


@pytest.mark.parametrize("condition_on_x", [False, True])
@pytest.mark.parametrize("std_range", [(0.08, 0.16), (1e-3, 2.0)])
def test_noise_net_std_in_range_for_extreme_inputs(condition_on_x, std_range) -> None:
    torch.manual_seed(0)
    lo, hi = std_range
    net = ReinFlowNoiseNet(O, TA, DA, lo, hi, hidden_dims=(16,), time_dim=8, condition_on_x=condition_on_x)
    # large weights push the pre-sigmoid output to both saturated ends
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(50.0)
    obs, x = _extreme_inputs()
    stds = []
    for t in (0.0, 1.0, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]), -10.0, 10.0):
        with torch.no_grad():
            std = net(obs, t, x if condition_on_x else None)
        assert std.shape == (B, TA, DA)
        assert bool(torch.isfinite(std).all())
        stds.append(std)
    std = torch.stack(stds)
    slack = 1e-6 * hi  # float32 rounding of lo + (hi - lo) * sigmoid(.)
    assert float(std.min()) >= lo - slack
    assert float(std.max()) <= hi + slack
    # the extreme inputs reach (close to) both ends of the range: the squashing is what keeps it inside
    assert float(std.min()) < lo + 0.01 * (hi - lo)
    assert float(std.max()) > hi - 0.01 * (hi - lo)


def test_noise_net_ordinary_inputs_shape_and_interior() -> None:
    torch.manual_seed(1)
    net = ReinFlowNoiseNet(O, TA, DA, 0.1, 0.2, hidden_dims=(8, 8), time_dim=4)
    std = net(torch.randn(B, O), torch.rand(B))
    assert std.shape == (B, TA, DA)
    assert bool(((std > 0.1) & (std < 0.2)).all())


@pytest.mark.parametrize("lo, hi", [(0.2, 0.1), (0.1, 0.1), (0.0, 0.1), (-0.05, 0.1), (-0.2, -0.1)])
def test_noise_net_bad_range_raises(lo, hi) -> None:
    with pytest.raises(ValueError, match="std_min"):
        ReinFlowNoiseNet(O, TA, DA, lo, hi)


def test_noise_net_condition_on_x_requires_x() -> None:
    net = ReinFlowNoiseNet(O, TA, DA, 0.1, 0.2, hidden_dims=(8,), time_dim=4, condition_on_x=True)
    with pytest.raises(ValueError):
        net(torch.randn(B, O), 0.5)
    # with x it works, and the output depends on x (it is actually conditioned on it)
    torch.manual_seed(2)
    obs = torch.randn(B, O)
    a = net(obs, 0.5, torch.randn(B, TA, DA))
    b = net(obs, 0.5, torch.randn(B, TA, DA))
    assert not torch.allclose(a, b)


def test_noise_net_without_x_ignores_x() -> None:
    torch.manual_seed(3)
    net = ReinFlowNoiseNet(O, TA, DA, 0.1, 0.2, hidden_dims=(8,), time_dim=4)
    obs = torch.randn(B, O)
    assert torch.equal(net(obs, 0.3), net(obs, 0.3, torch.randn(B, TA, DA)))


def test_velocity_shape_and_scalar_vs_batch_time() -> None:
    torch.manual_seed(4)
    vel = VelocityMLP(O, TA, DA, hidden_dims=(16, 16), time_dim=8)
    obs, x = torch.randn(B, O), torch.randn(B, TA, DA)
    out = vel(obs, x, 0.3)
    assert out.shape == (B, TA, DA)
    torch.testing.assert_close(vel(obs, x, torch.full((B,), 0.3)), out, rtol=0, atol=1e-6)
    torch.testing.assert_close(vel(obs, x, torch.tensor(0.3)), out, rtol=0, atol=1e-6)
    # per-sample times: row i equals the single-sample evaluation at t_i
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    batched = vel(obs, x, t)
    for i in range(B):
        torch.testing.assert_close(
            batched[i : i + 1], vel(obs[i : i + 1], x[i : i + 1], float(t[i])), rtol=1e-5, atol=1e-6
        )
    # time actually matters
    assert not torch.allclose(vel(obs, x, 0.1), vel(obs, x, 0.9))


def test_value_mlp_shape() -> None:
    torch.manual_seed(5)
    critic = ValueMLP(O, hidden_dims=(8,))
    assert critic(torch.randn(B, O)).shape == (B,)
    assert critic(torch.randn(1, O)).shape == (1,)


def test_time_embedding_closed_form_and_bad_dim() -> None:
    emb = SinusoidalTimeEmbedding(6, max_freq=100.0)
    t = torch.tensor([0.0, 0.3, 1.0])
    freqs = torch.tensor([1.0, 10.0, 100.0])  # geometric from 1 to max_freq, dim // 2 of them
    args = t[:, None] * freqs
    expected = torch.cat([args.sin(), args.cos()], dim=-1)
    torch.testing.assert_close(emb(t), expected, rtol=1e-5, atol=1e-5)
    for dim in (0, 1, 3, 7):
        with pytest.raises(ValueError):
            SinusoidalTimeEmbedding(dim)


def test_obs_normalizer_running_stats_equal_numpy_over_uneven_batches() -> None:
    """Parallel-Welford updates over batches of 1, 7, 2, 50 and 0 rows = numpy's population
    mean and variance of their concatenation (float64 oracle)."""
    rng = np.random.default_rng(0)
    scale, shift = np.array([0.5, 3.0, 20.0]), np.array([1.0, -4.0, 100.0])
    batches = [rng.normal(size=(n, O)) * scale + shift for n in (1, 7, 2, 50, 0)]
    norm = ObsNormalizer(O)
    for b in batches:
        norm.update(torch.as_tensor(b, dtype=torch.float32))
    data = np.concatenate([b.astype(np.float32) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(norm.mean.numpy(), data.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.var.numpy(), data.var(0), rtol=1e-4)  # ddof=0: population
    assert float(norm.count) == 60
    # a [T, N, O] batch is folded row by row, like [T * N, O]
    a, b = ObsNormalizer(O), ObsNormalizer(O)
    x = torch.randn(4, 5, O)
    a.update(x)
    b.update(x.reshape(20, O))
    assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)


def test_obs_normalizer_forward_after_set_stats_is_clipped_standardisation() -> None:
    mean, std = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.5, 1e-3])
    norm = ObsNormalizer(O, clip=5.0)
    norm.set_stats(mean, std, count=10)
    obs = torch.tensor([[1.0, -2.0, 0.5], [5.0, -1.0, 0.501], [-100.0, -4.0, 0.4], [3.0, 0.0, 0.5]])
    # the documented 1e-8 inside the square root matters for the tiny std of the last dimension
    expected = ((obs.double() - mean.double()) / torch.sqrt(std.double() ** 2 + 1e-8)).clamp(-5.0, 5.0)
    torch.testing.assert_close(norm(obs).double(), expected, rtol=1e-4, atol=1e-4)
    assert float(norm(obs).abs().max()) == 5.0  # the clip is reached (row 2)
    assert float(norm.count) == 10
    # the defaults leave observations unchanged apart from the clip
    default = ObsNormalizer(O, clip=10.0)
    x = torch.tensor([[0.3, -7.0, 50.0]])
    torch.testing.assert_close(default(x), torch.tensor([[0.3, -7.0, 10.0]]), rtol=1e-6, atol=1e-6)


def test_obs_stats_travel_in_the_state_dict() -> None:
    torch.manual_seed(6)
    src = VelocityMLP(O, TA, DA, hidden_dims=(8,), time_dim=4)
    src.obs_norm.update(torch.randn(30, O) * 4 + 2)
    state = src.state_dict()
    for name in ("obs_norm.mean", "obs_norm.var", "obs_norm.count"):
        assert name in state
    dst = VelocityMLP(O, TA, DA, hidden_dims=(8,), time_dim=4)
    dst.load_state_dict(state)
    for name in ("mean", "var", "count"):
        assert torch.equal(getattr(dst.obs_norm, name), getattr(src.obs_norm, name))
    obs, x = torch.randn(B, O), torch.randn(B, TA, DA)
    assert torch.equal(dst(obs, x, 0.4), src(obs, x, 0.4))


def test_copy_obs_stats_reaches_every_normaliser_of_the_targets() -> None:
    torch.manual_seed(7)
    src = GaussianActor(O, TA, DA, hidden_dims=(8,))
    src.obs_norm.set_stats(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.1, 0.2, 0.3]), count=5)
    critic = ValueMLP(O, (8,))
    # a target holding two normalisers (nested modules)
    both = torch.nn.ModuleList([VelocityMLP(O, TA, DA, (8,), 4), ReinFlowNoiseNet(O, TA, DA, 0.1, 0.2, (4,), 4)])
    copy_obs_stats(src, critic, both)
    targets = [m for t in (critic, both) for m in t.modules() if isinstance(m, ObsNormalizer)]
    assert len(targets) == 3
    for m in targets:
        torch.testing.assert_close(m.mean, torch.tensor([1.0, 2.0, 3.0]))
        torch.testing.assert_close(m.var, torch.tensor([0.01, 0.04, 0.09]))
        assert float(m.count) == 5
    # copies, not shared tensors
    src.obs_norm.mean.add_(1.0)
    assert float(critic.obs_norm.mean[0]) == 1.0


def test_gaussian_actor_shapes_and_initial_std() -> None:
    torch.manual_seed(8)
    actor = GaussianActor(O, TA, DA, hidden_dims=(16, 16), init_std=0.3)
    mean, std = actor(torch.randn(B, O))
    assert mean.shape == (B, TA, DA) and std.shape == (TA, DA)
    torch.testing.assert_close(std, torch.full((TA, DA), 0.3))
    assert float(mean.detach().abs().max()) < 0.1  # small initial means (last layer scaled by 0.01)
    assert actor.log_std.requires_grad
    with pytest.raises(ValueError, match="init_std"):
        GaussianActor(O, TA, DA, init_std=0.0)
