"""Policy families: a shortcut model samples a bimodal target in one step, rectified flow cannot."""

from __future__ import annotations

import pytest
import torch

from flowrl.algos.bc import behaviour_clone
from flowrl.algos.flow_bc import flow_matching_loss, shortcut_loss
from flowrl.config import PretrainConfig, build_config
from flowrl.models.build import actor_record, build_actor, load_actor
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.networks import VelocityMLP


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

    ema, _ = behaviour_clone(velocity, obs, chunks, loss, cfg, seed=0, progress=False)
    return FlowPolicy(ema, num_steps=1).act(torch.zeros(4000, 1), torch.Generator().manual_seed(1)).flatten()


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
