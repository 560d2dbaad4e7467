"""Advantage-Weighted Matching: with every advantage 1 the loss is the pretraining
flow-matching loss (``flowrl.algos.flow_bc``), its gradient flips sign with the advantage,
a positive advantage pulls the field towards the sample and a negative one pushes it away, and
a learning run on the TwoGoal task."""

from __future__ import annotations

import torch

from flowrl.algos.awm import awm_loss
from flowrl.algos.flow_bc import flow_matching_loss
from flowrl.algos.likelihood_free import forward_noise, noised_rows
from flowrl.config import build_config
from flowrl.models.networks import VelocityMLP


def _field() -> VelocityMLP:
    torch.manual_seed(0)
    return VelocityMLP(3, 4, 2, [16, 16], 8)


def test_with_every_advantage_one_it_is_the_pretraining_loss() -> None:
    """Weights w = clip(A, -c, c) / c = 1 (A = 1, c = 1) and the same draws of t and eps as
    ``flow_matching_loss`` (t first, then eps, one generator)."""
    velocity = _field()
    obs, chunks = torch.randn(6, 3), torch.randn(6, 4, 2)
    want = flow_matching_loss(velocity, obs, chunks, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.rand(6, generator=g)
    eps = torch.randn(chunks.shape, generator=g)
    x_t, target = forward_noise(chunks, t, eps)
    got = awm_loss(velocity(obs, x_t, t, t), target, torch.ones(6), clip=1.0)  # w = 1
    torch.testing.assert_close(got, want)


def _grads(advantages: torch.Tensor, clip: float = 5.0) -> list[torch.Tensor]:
    velocity = _field()
    obs, chunks = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.ones(4, 4, 2)
    rows = noised_rows(obs, chunks, advantages, torch.tensor([0.0, 0.5]), torch.Generator().manual_seed(2))
    awm_loss(velocity(rows.cond, rows.x_t, rows.t, rows.t), rows.target, rows.advantages, clip).backward()
    return [p.grad.clone() for p in velocity.parameters()]


def test_gradient_flips_sign_with_the_advantage() -> None:
    plus, minus = _grads(torch.full((4,), 1.5)), _grads(torch.full((4,), -1.5))
    assert any(g.abs().sum() > 0 for g in plus)
    for a, b in zip(plus, minus, strict=True):
        torch.testing.assert_close(a, -b)
    # clipped at +-clip: an advantage of 50 weighs like 5, which is w = 1
    for a, b in zip(_grads(torch.full((4,), 50.0)), _grads(torch.full((4,), 5.0)), strict=True):
        torch.testing.assert_close(a, b)
    one = _grads(torch.full((4,), 5.0), clip=1.0)  # A = 5 with clip 1: w = 1 again
    for a, b in zip(_grads(torch.full((4,), 5.0)), one, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(_grads(torch.full((4,), 2.5)), _grads(torch.full((4,), 0.5), clip=1.0), strict=True):
        torch.testing.assert_close(a, b)  # w = A / clip


def test_a_step_pulls_towards_positive_and_pushes_away_from_negative_samples() -> None:
    obs, chunks = torch.randn(8, 3), torch.full((8, 4, 2), 0.7)
    rows = noised_rows(obs, chunks, torch.ones(8), torch.tensor([0.0, 0.25, 0.5, 0.75]), torch.Generator())

    def error_after_step(sign: float) -> tuple[float, float]:
        velocity = _field()

        @torch.no_grad()
        def error() -> float:
            return float(((velocity(rows.cond, rows.x_t, rows.t, rows.t) - rows.target) ** 2).mean())

        before = error()
        opt = torch.optim.SGD(velocity.parameters(), lr=1e-2)
        awm_loss(velocity(rows.cond, rows.x_t, rows.t, rows.t), rows.target, sign * rows.advantages, 5.0).backward()
        opt.step()
        return before, error()

    before, after = error_after_step(+1.0)
    assert after < before
    before, after = error_after_step(-1.0)
    assert after > before


def test_a_negative_advantage_in_positive_mode_leaves_the_field_alone() -> None:
    """adv_mode positive: a sample below its group's mean has weight 0, so a step on it alone
    (no regulariser) changes no parameter; in mode all it pushes the field away."""
    from flowrl.algos.likelihood_free import mode_advantages

    for mode, moved in (("positive", False), ("all", True)):
        grads = _grads(mode_advantages(torch.full((4,), -1.5), mode))
        assert any(g.abs().sum() > 0 for g in grads) == moved


def test_awm_learns_the_two_goal_task(tmp_path) -> None:
    """The bimodal pretrained policy moves to the rewarded goal (deterministic ODE sampling),
    with the quickstart's recipe (32 groups of 4, adv_mode positive, c = 1, lr 1e-3) on a smaller
    budget; success on 50 held-out episodes before and after."""
    from flowrl.experiment import train

    cfg = build_config(
        {
            "name": "awm-test",
            "seed": 0,
            "env": {"id": "flowrl/TwoGoal-v0", "num_envs": 128, "num_workers": 1, "group_size": 4},
            "policy": {"horizon": 4, "denoising_steps": 4, "hidden_dims": [64, 64]},
            "mdp": {"solver": "dpm_solver_2m"},
            "pretrain": {"demos": {"episodes": 200}, "steps": 800},
            "algo": {
                "type": "awm",
                "iterations": 20,
                "max_steps": 8,
                "epochs": 10,
                "minibatch_size": 128,
                "actor_lr": 1e-3,
                "adv_mode": "positive",
                "adv_clip_max": 1.0,
            },
            "eval": {"episodes": 50, "every": 20},
            "checkpoint_every": 20,
            "ray": {"enabled": False},
        }
    )
    result = train(cfg, tmp_path, progress=False)
    before, after = result["before"]["eval/success_rate"], result["after"]["eval/success_rate"]
    assert before <= 0.7
    assert after >= before + 0.4, (before, after)


def test_prepare_keeps_groups_with_signal_and_clips_samples_to_what_the_env_executes() -> None:
    """GRPO's group advantages (a tied group dropped), and the clean samples clipped to the action
    bounds (an env clips actions: beyond them nothing would hold a sample back)."""
    from flowrl.algos.awm import AWM
    from flowrl.algos.likelihood_free import ode_transitions
    from flowrl.config import AWMConfig
    from flowrl.rollout.rollout import Rollout

    t, n = 2, 4
    final = torch.tensor([[-3.0, 0.5], [0.2, 2.0], [0.0, 0.0], [0.0, 0.0]]).view(1, n, 1, 2).expand(t, n, 1, 2)
    samples = ode_transitions(final.reshape(t * n, 1, 2), torch.ones(t * n)).map(lambda x: x.view(t, n, *x.shape[1:]))
    rollout = Rollout(
        obs=torch.arange(t * n, dtype=torch.float32).view(t, n, 1),
        next_obs=torch.zeros(t, n, 1),
        samples=samples,
        rewards=torch.zeros(t, n),
        terminated=torch.zeros(t, n, dtype=torch.bool),
        truncated=torch.zeros(t, n, dtype=torch.bool),
        valid=torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool),
        group=torch.arange(n) // 2,
        env_steps=0,
        episode_return=torch.tensor([1.0, 0.0, 5.0, 5.0]),  # group 1 ties: dropped
        episode_success=torch.zeros(n, dtype=torch.bool),
        episode_done=torch.ones(n, dtype=torch.bool),
    )
    policy = _Policy()
    bounds = (torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.5]))
    algo = AWM(policy, AWMConfig(type="awm", beta=0.0, old_coef=0.0), torch.device("cpu"), 0, 2, bounds=bounds)
    batch = algo.prepare(rollout)
    assert batch.cond.flatten().tolist() == [0.0, 1.0, 4.0]
    a = 0.5 / (0.5 + 1e-4)
    torch.testing.assert_close(batch.advantages, torch.tensor([a, -a, a]))
    # adv_mode positive: the same steps, the episode below its group's mean weighs 0
    positive = AWM(policy, AWMConfig(type="awm", adv_mode="positive"), torch.device("cpu"), 0, 2, bounds=bounds)
    torch.testing.assert_close(positive.prepare(rollout).advantages, torch.tensor([a, 0.0, a]))
    want = torch.tensor([[[-1.0, 0.5]], [[0.2, 1.5]], [[-1.0, 0.5]]])
    torch.testing.assert_close(batch.samples.final, want)
    assert batch.samples.log_prob.shape == (3, 0)  # no log-probs stored


class _Policy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.velocity = torch.nn.Linear(1, 1)
