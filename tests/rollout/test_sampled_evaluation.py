"""``evaluate_policy(sampled=True)`` / ``flowrl eval --sampled``: the evaluation's episodes with
the stochastic policy fine-tuning collects with. Oracle: the deterministic evaluation, which the
sampled one must equal as the noise vanishes and leave as it grows. Pendulum in one action chunk
of 200 (its whole episode), so one policy call decides an episode and the two evaluations draw
the same initial noise."""

from __future__ import annotations

import pytest
import torch

from flowrl.config import build_config
from flowrl.models.build import build_actor, build_policy
from flowrl.rollout.evaluation import evaluate_policy


def _returns(std: float) -> tuple[float, float]:
    cfg = build_config(
        {
            "name": "t",
            "env": {"id": "Pendulum-v1"},
            "policy": {"horizon": 200, "hidden_dims": [16], "time_embed_dim": 8},
            "mdp": {"converter": {"type": "flow_noise", "std_min": std, "std_max": std * 1.001}},
        }
    )
    torch.manual_seed(0)
    policy = build_policy(cfg, build_actor(cfg.policy, 3, 1))
    ode = evaluate_policy(policy, cfg.env.id, 200, 3, seed=0)
    sampled = evaluate_policy(policy, cfg.env.id, 200, 3, seed=0, sampled=True)
    assert ode["eval/episode_length"] == sampled["eval/episode_length"] == 200
    return ode["eval/return"], sampled["eval/return"]


def test_sampled_evaluation_equals_the_ode_as_the_noise_vanishes_and_leaves_it_as_it_grows() -> None:
    ode, sampled = _returns(1e-7)
    assert sampled == pytest.approx(ode, rel=1e-4)
    ode, sampled = _returns(0.5)
    assert abs(sampled - ode) > 1.0
