"""The PPO learner: ratio check before the first update, bad rewards, parameter updates."""

from __future__ import annotations

import pytest
import torch

from flowrl.algos.flow_ppo import FlowPPO, RatioCheckError, RewardError
from flowrl.config import build_config
from flowrl.core.grids import time_grid
from flowrl.models.build import build_policy, build_velocity
from flowrl.models.networks import ValueMLP
from flowrl.rollout.collector import InProcessCollector


def _setup(converter: dict, window: dict | None = None):
    cfg = build_config(
        {
            "name": "t",
            "env": {"num_envs": 4},
            "policy": {"hidden_dims": [16], "time_embed_dim": 8},
            "mdp": {"converter": converter, "window": window or {"type": "all"}},
            "ppo": {"minibatch_size": 8, "epochs": 2},
        }
    )
    torch.manual_seed(0)
    policy = build_policy(cfg, build_velocity(cfg.policy, 2, 2), 2, 2)
    learner = FlowPPO(policy, ValueMLP(2, (16,)), cfg.ppo, torch.device("cpu"), seed=0)
    collector = InProcessCollector(cfg.env.id, cfg.policy.horizon, cfg.env.num_envs, seed=0)
    rollout = collector.collect(policy, 6, iteration=0)
    collector.close()
    return policy, learner, rollout


CONVERTERS = [{"type": "reinflow"}, {"type": "flow_noise"}, {"type": "flow_sde"}, {"type": "cps"}]


@pytest.mark.parametrize("converter", CONVERTERS, ids=lambda c: c["type"])
def test_update_moves_the_policy_after_an_exact_ratio_check(converter):
    policy, learner, rollout = _setup(converter, {"type": "one_random"} if converter["type"] == "flow_sde" else None)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    metrics = learner.update(rollout)
    assert metrics["train/ratio_check_dev"] <= 1e-5
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if v == v)
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("velocity.") for k in changed)
    if converter["type"] in ("reinflow", "flow_noise"):
        assert any(k.startswith("converter.noise_net.") for k in changed)


def test_mismatched_time_grid_fails_the_ratio_check():
    """ReinFlow's issue #5: sampling on linspace(0, 1, K+1) but re-evaluating on a shifted grid."""
    policy, learner, rollout = _setup({"type": "reinflow"})
    k = policy.num_steps
    policy.grid = torch.linspace(0, 1 - 1 / k, k + 1)
    with pytest.raises(RatioCheckError, match="ratio is not 1 before the first update"):
        learner.update(rollout)
    policy.grid = time_grid(k)
    learner.update(rollout)  # the right grid passes


def test_changed_weights_fail_the_ratio_check():
    policy, learner, rollout = _setup({"type": "flow_sde"})
    with torch.no_grad():
        policy.velocity.net[-1].bias.add_(0.5)
    with pytest.raises(RatioCheckError):
        learner.update(rollout)


def test_non_finite_reward_is_an_error():
    _, learner, rollout = _setup({"type": "reinflow"})
    rollout.rewards[2, 1] = float("nan")
    with pytest.raises(RewardError, match="reward nan at policy step 2 of env 1"):
        learner.update(rollout)


def test_frozen_policy_is_refused():
    policy, _, _ = _setup({"type": "reinflow"})
    policy.velocity.requires_grad_(False)
    cfg = build_config({"name": "t"})
    with pytest.raises(ValueError, match="frozen"):
        FlowPPO(policy, ValueMLP(2), cfg.ppo, torch.device("cpu"), seed=0)
