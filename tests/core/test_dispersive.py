"""Tests of flowrl.core.dispersive and its use in flow behaviour cloning.

Oracles: each variant written out again with explicit Python loops over pairs and features
(math module, no torch), on a small batch; for the gradients, one small gradient step on two nearby
embeddings must move them apart (the covariance variant: across a correlated batch, the only
direction in which it repels; see the module doc).
"""

from __future__ import annotations

import math

import pytest
import torch

from flowrl.algos.bc import bc_loss, demo_batches, fit
from flowrl.config import build_config
from flowrl.core.dispersive import VARIANTS, dispersive_loss, layers_loss
from flowrl.models.build import build_actor

TAU, MARGIN = 0.7, 1.3


def _batch() -> list[list[float]]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, generator=g, dtype=torch.float64).tolist()


def _sqdist(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a)


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _oracle(z: list[list[float]], variant: str) -> float:
    n, d = len(z), len(z[0])
    if variant == "infonce_l2":
        return math.log(sum(math.exp(-_sqdist(a, b) / TAU) for a in z for b in z) / n**2)
    if variant == "infonce_cosine":
        return math.log(sum(math.exp(_cos(a, b) / TAU) for a in z for b in z) / n**2)
    if variant == "hinge":
        return sum(max(0.0, MARGIN - _sqdist(a, b)) ** 2 for a in z for b in z) / n**2
    unit = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in z]
    mean = [sum(row[k] for row in unit) / n for k in range(d)]
    total = 0.0
    for m in range(d):
        for k in range(d):
            if m != k:
                cov = sum((row[m] - mean[m]) * (row[k] - mean[k]) for row in unit) / (n - 1)
                total += cov**2
    return total


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_matches_a_direct_computation(variant: str) -> None:
    z = _batch()
    got = dispersive_loss(torch.tensor(z, dtype=torch.float64), variant, temperature=TAU, margin=MARGIN)
    assert got.item() == pytest.approx(_oracle(z, variant), rel=1e-5, abs=1e-7)


def _pair_and_context(variant: str) -> tuple[torch.Tensor, float]:
    """Two nearby embeddings (rows 0 and 1) and the rest of the batch; the step size used."""
    if variant == "covariance":
        # a batch correlated along (1, 1, 0); the pair differs across it, along (1, -1, 0)
        line = [[s, s, 0.3] for s in (-1.0, -0.5, 0.5, 1.0)]
        return torch.tensor([[0.8, 0.78, 0.3], [0.78, 0.8, 0.3], *line], dtype=torch.float64), 0.05
    return torch.tensor([[1.0, 0.2, -0.5], [1.02, 0.21, -0.49], [-1.0, 0.5, 0.3]], dtype=torch.float64), 0.05


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_gradient_pushes_two_nearby_embeddings_apart(variant: str) -> None:
    z, lr = _pair_and_context(variant)
    z.requires_grad_(True)
    dispersive_loss(z, variant, temperature=TAU, margin=MARGIN).backward()
    after = (z - lr * z.grad).detach()
    if variant in ("infonce_cosine", "covariance"):  # these see directions only: the angle grows
        before_sim = torch.cosine_similarity(z[0], z[1], dim=0).item()
        assert torch.cosine_similarity(after[0], after[1], dim=0).item() < before_sim - 1e-9
    else:
        assert (after[0] - after[1]).norm().item() > (z[0] - z[1]).norm().item() + 1e-9


def test_infonce_l2_of_a_collapsed_batch_is_zero_and_of_a_spread_one_negative() -> None:
    assert dispersive_loss(torch.ones(4, 3), "infonce_l2").item() == pytest.approx(0.0, abs=1e-7)
    assert dispersive_loss(torch.eye(4) * 3, "infonce_l2").item() < -0.5


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        dispersive_loss(torch.ones(1, 3), "hinge")
    with pytest.raises(ValueError, match="unknown dispersive variant"):
        dispersive_loss(torch.ones(2, 3), "nope")


def test_layers_loss_is_the_mean_over_the_chosen_layers() -> None:
    g = torch.Generator().manual_seed(1)
    hidden = [torch.randn(6, 4, generator=g), torch.randn(6, 8, generator=g)]
    both = layers_loss(hidden, [0, -1], "infonce_l2")
    each = [dispersive_loss(h, "infonce_l2").item() for h in hidden]
    assert both.item() == pytest.approx(sum(each) / 2, rel=1e-6)


# ------------------------------------------------------------------------------ in flow BC
def _cfg(family: str, **dispersive):
    return build_config(
        {
            "name": "t",
            "policy": {"type": family, "hidden_dims": [16, 16], "horizon": 2},
            "pretrain": {"steps": 60, "batch_size": 32, "ema_decay": 0.0, "dispersive": dispersive},
        }
    )


@pytest.mark.parametrize("family", ["rectified_flow", "shortcut", "meanflow"])
def test_every_flow_family_logs_and_applies_the_dispersive_term(family: str) -> None:
    g = torch.Generator().manual_seed(0)
    obs, chunks = torch.randn(64, 3, generator=g), torch.randn(64, 2, 2, generator=g)
    finals = {}
    for weight in (None, 5.0):
        cfg = _cfg(family, weight=weight)
        torch.manual_seed(0)
        actor = build_actor(cfg.policy, 3, 2)
        draw = demo_batches(obs, chunks, 32, torch.device("cpu"))
        _, metrics = fit(actor, draw, bc_loss(cfg.policy, cfg.pretrain), cfg.pretrain, 0, progress=False)
        finals[weight] = metrics
    assert "pretrain/dispersive" not in finals[None] and "pretrain/flow" in finals[5.0]
    on = finals[5.0]
    assert math.isfinite(on["pretrain/dispersive"])
    assert on["pretrain/loss"] == pytest.approx(on["pretrain/flow"] + 5.0 * on["pretrain/dispersive"], rel=1e-5)


def test_a_heavy_dispersive_weight_spreads_the_hidden_activations() -> None:
    """Same seed and data, with and without the regulariser: the last hidden layer's activations
    on a batch end further apart (mean squared pair distance per feature) with it."""
    g = torch.Generator().manual_seed(0)
    obs, chunks = torch.randn(64, 3, generator=g), torch.randn(64, 2, 2, generator=g) * 0.1
    spread = {}
    for weight in (None, 2.0):
        cfg = _cfg("rectified_flow", weight=weight)
        torch.manual_seed(0)
        actor = build_actor(cfg.policy, 3, 2)
        draw = demo_batches(obs, chunks, 32, torch.device("cpu"))
        ema, _ = fit(actor, draw, bc_loss(cfg.policy, cfg.pretrain), cfg.pretrain, 0, progress=False)
        with torch.no_grad():
            _, hidden = ema.forward_with_hidden(obs, torch.zeros(64, 2, 2), 0.5, 0.5)
        h = hidden[-1]
        spread[weight] = ((h[:, None] - h[None]) ** 2).mean().item()
    assert spread[2.0] > 1.5 * spread[None]


def test_config_rejects_a_layer_outside_the_network_and_non_flow_policies() -> None:
    with pytest.raises(ValueError, match="outside the 2 hidden layers"):
        _cfg("rectified_flow", weight=1.0, layers=[2])
    with pytest.raises(ValueError, match="pretrain.dispersive only applies to flow policies"):
        build_config({"name": "t", "policy": {"type": "gaussian"}, "pretrain": {"dispersive": {"weight": 1.0}}})
    with pytest.raises(ValueError, match="margin only applies to variant: hinge"):
        _cfg("rectified_flow", weight=1.0, margin=2.0)
