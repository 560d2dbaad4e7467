"""GRPO: group advantages with ties dropped, the per-step KL to the reference, the kept
steps of a rollout, and a learning run on the TwoGoal task."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from flowrl.algos.grpo import GRPO, episode_advantages, step_kl
from flowrl.config import GRPOConfig, build_config
from flowrl.core.steps import gaussian_kl
from flowrl.models.policy import Evaluation
from flowrl.rollout.rollout import Rollout


def test_group_advantages_by_hand_with_tied_groups_dropped() -> None:
    outcome = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 1.0])
    group = torch.arange(12) // 4
    adv, keep, stats = episode_advantages(outcome, group, 4, eps=1e-4)
    # group 0: mean 0.5, population std 0.5; group 2: mean 1, std sqrt((4 + 1 + 1 + 0) / 4)
    expected0 = [0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001]
    s2 = math.sqrt(6 / 4)
    expected2 = [2 / (s2 + 1e-4), -1 / (s2 + 1e-4), -1 / (s2 + 1e-4), 0.0]
    torch.testing.assert_close(adv[:4], torch.tensor(expected0))
    torch.testing.assert_close(adv[8:], torch.tensor(expected2))
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert stats == {"grpo/groups": 3.0, "grpo/groups_dropped": 1.0}


def test_group_ids_must_be_consecutive_groups() -> None:
    with pytest.raises(ValueError, match="group"):
        episode_advantages(torch.rand(8), torch.tensor([0, 1, 0, 1, 2, 3, 2, 3]), 2, 1e-4)


@pytest.mark.parametrize("equal_std", [True, False])
def test_gaussian_kl_matches_torch_distributions(equal_std: bool) -> None:
    g = torch.Generator().manual_seed(0)
    mean, ref_mean = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    std = torch.rand(5, 3, 4, generator=g) + 0.1
    ref_std = std if equal_std else torch.rand(5, 3, 4, generator=g) + 0.1
    oracle = kl_divergence(Normal(mean, std), Normal(ref_mean, ref_std)).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(mean, std, ref_mean, ref_std), oracle)
    if equal_std:  # Flow-GRPO's form
        flow_grpo = ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).sum(1)
        torch.testing.assert_close(gaussian_kl(mean, std, ref_mean, ref_std), flow_grpo)


class _Shape:
    event_shape = (3, 2)

    def __init__(self, unit: str, reduce: str) -> None:
        self.sample_unit, self.log_prob_reduce = unit, reduce


@pytest.mark.parametrize("unit", ["chain", "step"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_step_kl_is_reduced_like_the_log_probs(unit: str, reduce: str) -> None:
    g = torch.Generator().manual_seed(1)
    b, s = 4, 2
    mean, ref = torch.randn(b, s, 3, 2, generator=g), torch.randn(b, s, 3, 2, generator=g)
    std = torch.full((b, s, 3, 2), 0.3)
    ev = Evaluation(torch.zeros(b, s), torch.zeros(b), mean, std)
    ref_ev = Evaluation(torch.zeros(b, s), torch.zeros(b), ref, std)
    per_step = kl_divergence(Normal(mean, std), Normal(ref, std)).flatten(2).sum(2)  # [B, S]
    if unit == "chain":
        expected = per_step.sum(1) / (1 if reduce == "sum" else s * 6)
    else:
        expected = per_step.reshape(-1) / (1 if reduce == "sum" else 6)
    torch.testing.assert_close(step_kl(_Shape(unit, reduce), ev, ref_ev), expected)


class _Samples:
    """A minimal TensorBatch stand-in: one field."""

    def __init__(self, log_prob: torch.Tensor) -> None:
        self.log_prob = log_prob

    def __getitem__(self, index):
        return _Samples(self.log_prob[index])

    def to(self, device):
        return self


def test_prepare_keeps_the_valid_steps_of_groups_with_signal() -> None:
    t, n = 3, 4
    valid = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    rollout = Rollout(
        obs=torch.arange(t * n, dtype=torch.float32).view(t, n, 1),
        next_obs=torch.zeros(t, n, 1),
        samples=_Samples(torch.arange(t * n, dtype=torch.float32).view(t, n, 1)),
        rewards=torch.zeros(t, n),
        terminated=torch.zeros(t, n, dtype=torch.bool),
        truncated=torch.zeros(t, n, dtype=torch.bool),
        valid=valid,
        group=torch.arange(n) // 2,
        env_steps=0,
        episode_return=torch.tensor([1.0, 0.0, 5.0, 5.0]),  # group 1 ties: dropped
        episode_success=torch.zeros(n, dtype=torch.bool),
        episode_done=torch.ones(n, dtype=torch.bool),
    )
    algo = GRPO.__new__(GRPO)
    algo.cfg = GRPOConfig(type="grpo")
    algo.group_size, algo.device = 2, torch.device("cpu")
    batch = algo.prepare(rollout)
    # kept, row-major over (t, env): env 0 at t = 0 and 1, env 1 at t = 0 (group 1 ties)
    assert batch.cond.flatten().tolist() == [0.0, 1.0, 4.0]
    a = 0.5 / (0.5 + 1e-4)  # outcomes 1, 0: mean 0.5, population std 0.5
    torch.testing.assert_close(batch.advantages, torch.tensor([a, -a, a]))
    assert algo._stats["grpo/groups_dropped"] == 1.0
    assert algo._stats["grpo/kept_steps"] == 3.0


def test_grpo_learns_the_two_goal_task(tmp_path) -> None:
    """Groups sharing a reset seed, no critic: the bimodal pretrained policy moves to the
    rewarded goal within a few iterations."""
    from flowrl.experiment import train

    cfg = build_config(
        {
            "name": "grpo-test",
            "seed": 0,
            "env": {"id": "flowrl/TwoGoal-v0", "num_envs": 32, "num_workers": 1, "group_size": 8},
            "policy": {"horizon": 4, "denoising_steps": 4, "hidden_dims": [64, 64]},
            "mdp": {"converter": {"type": "reinflow", "std_min": 0.1, "std_max": 0.24}},
            "pretrain": {"demos": {"episodes": 200}, "steps": 800},
            "algo": {
                "type": "grpo",
                "iterations": 20,
                "max_steps": 8,
                "epochs": 10,
                "minibatch_size": 64,
                "actor_lr": 3e-3,
                "noise_lr": 3e-3,
            },
            "eval": {"episodes": 50, "every": 20},
            "checkpoint_every": 20,
            "ray": {"enabled": False},
        }
    )
    result = train(cfg, tmp_path, progress=False)
    before, after = result["before"]["eval/success_rate"], result["after"]["eval/success_rate"]
    assert before <= 0.7
    assert after >= before + 0.4, (before, after)  # measured: 0.22 -> 0.82
