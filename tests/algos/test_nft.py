"""DiffusionNFT: the implicit velocities and the loss against hand computations, the loss's
minimiser on a closed-form Gaussian flow, the old policy's soft update, and a learning run on
the TwoGoal task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowrl.algos.likelihood_free import mode_advantages
from flowrl.algos.nft import implicit_velocities, nft_error, nft_loss, optimality_probability
from flowrl.config import build_config


def test_optimality_probability_maps_clipped_advantages_onto_0_1() -> None:
    adv = torch.tensor([-9.0, -5.0, -2.5, 0.0, 1.0, 5.0, 7.0])
    r = optimality_probability(adv, 5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0]))


def test_implicit_velocities_by_hand() -> None:
    v_theta = torch.tensor([[1.0, -2.0]], requires_grad=True)
    v_old = torch.tensor([[3.0, 0.5]])
    pos, neg = implicit_velocities(v_theta, v_old, 0.25)
    torch.testing.assert_close(pos, torch.tensor([[0.75 * 3 + 0.25 * 1, 0.75 * 0.5 - 0.25 * 2]]))
    torch.testing.assert_close(neg, torch.tensor([[1.25 * 3 - 0.25 * 1, 1.25 * 0.5 + 0.25 * 2]]))
    # the two are reflections of each other about v_old, and only v_theta carries a gradient
    torch.testing.assert_close((pos + neg) / 2, v_old)
    (pos.sum() + neg.sum()).backward()
    torch.testing.assert_close(v_theta.grad, torch.zeros_like(v_theta))


@pytest.mark.parametrize("adaptive", [False, True])
def test_nft_loss_matches_an_elementwise_numpy_computation(adaptive: bool) -> None:
    g = torch.Generator().manual_seed(0)
    b, e = 5, (2, 3)
    v_theta, v_old, target = (torch.randn((b, *e), generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(b, generator=g, dtype=torch.float64)
    r = torch.rand(b, generator=g, dtype=torch.float64)
    beta = 0.3
    got = nft_loss(v_theta, v_old, target, t, r, beta, adaptive)

    want = []
    for i in range(b):
        vt, vo, u = v_theta[i].numpy(), v_old[i].numpy(), target[i].numpy()
        terms = []
        for v in ((1 - beta) * vo + beta * vt, (1 + beta) * vo - beta * vt):
            if adaptive:  # the clean-sample estimate x_t + (1 - t) v against x_t + (1 - t) u
                err = (1 - t[i].item()) * (v - u)
                terms.append(np.mean(err**2) / max(np.mean(np.abs(err)), 1e-5))
            else:
                terms.append(np.mean((v - u) ** 2))
        want.append((r[i].item() * terms[0] + (1 - r[i].item()) * terms[1]) / beta)
    np.testing.assert_allclose(got.numpy(), np.array(want), rtol=1e-12)


def test_adaptive_error_is_a_rescaled_squared_error_with_the_same_gradient_direction() -> None:
    """The adaptive weight is detached: its gradient is the plain one times (1 - t)^2 / scale."""
    v = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    target, t = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([0.25])
    nft_error(v, target, t, adaptive=True).sum().backward()
    scale = 0.75 * (0.5 + 1.0 + 1.0) / 3
    torch.testing.assert_close(v.grad, 0.75**2 * 2 * (v.detach() - target) / 3 / scale)


def _gaussian_posterior(x: float, t: float, mean: float, std: float) -> tuple[float, float, float]:
    """For x1 ~ N(mean, std^2) and x_t = (1 - t) eps + t x1: the density of x_t at x and the mean
    and std of x1 given x_t = x (jointly Gaussian)."""
    var = t * t * std**2 + (1 - t) ** 2
    density = math.exp(-((x - t * mean) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)
    post_mean = mean + t * std**2 * (x - t * mean) / var
    post_var = std**2 - (t * std**2) ** 2 / var
    return density, post_mean, math.sqrt(post_var)


@pytest.mark.parametrize("mode", ["all", "positive"])
@pytest.mark.parametrize(("x", "t", "beta"), [(0.3, 0.4, 1.0), (-0.8, 0.6, 0.5), (1.5, 0.25, 0.1)])
def test_nft_loss_minimiser_on_a_gaussian_flow_is_the_policy_improvement(
    x: float, t: float, beta: float, mode: str
) -> None:
    """1-D data: positive samples ~ N(1, 0.5^2) (advantage +c), negative ~ N(-1, 0.7^2)
    (advantage -c), mixed 40/60, the old field the mixture's exact velocity. At a point (x, t)
    of the forward process, every clean sample consistent with x_t = x is drawn from its exact
    posterior; minimising the plain NFT loss over the one velocity value v there must give, by
    the closed form v* = v_old + mean[(2 r - 1)(v_target - v_old)] / beta: with adv_mode all
    (r = 1 and 0) v_old + (2 p / beta)(u+ - v_old), p = P(positive | x_t = x), u+ the positives'
    velocity; with adv_mode positive (r = 1 and 1/2: the negatives hold v_old) half that step."""
    pos, neg, share = (1.0, 0.5), (-1.0, 0.7), 0.4
    d_pos, m_pos, s_pos = _gaussian_posterior(x, t, *pos)
    d_neg, m_neg, s_neg = _gaussian_posterior(x, t, *neg)
    p = share * d_pos / (share * d_pos + (1 - share) * d_neg)

    def velocity(x1_mean: float) -> float:  # E[x1 - eps | x_t = x] with eps = (x - t x1) / (1 - t)
        return x1_mean - (x - t * x1_mean) / (1 - t)

    u_pos, u_neg = velocity(m_pos), velocity(m_neg)
    v_old = p * u_pos + (1 - p) * u_neg
    step = 2 * p if mode == "all" else p
    closed_form = v_old + step / beta * (u_pos - v_old)

    g = torch.Generator().manual_seed(1)
    n = 400_000
    positive = torch.rand(n, generator=g, dtype=torch.float64) < p
    z = torch.randn(n, generator=g, dtype=torch.float64)
    x1 = torch.where(positive, m_pos + s_pos * z, m_neg + s_neg * z)
    eps = (x - t * x1) / (1 - t)
    target = (x1 - eps).view(n, 1)
    clip = 2.0
    r = optimality_probability(mode_advantages(torch.where(positive, clip, -clip), mode), clip)
    t_rows = torch.full((n,), t, dtype=torch.float64)

    old_rows = torch.full((n, 1), v_old, dtype=torch.float64)

    def mean_loss(v: float) -> float:
        v_theta = torch.full((n, 1), v, dtype=torch.float64)
        return float(nft_loss(v_theta, old_rows, target, t_rows, r, beta, False).mean())

    # the loss is a parabola in v: its vertex from three values
    a, b, c = (mean_loss(v) for v in (-1.0, 0.0, 1.0))
    vertex = 0.5 * (a - c) / (a - 2 * b + c)
    scale = abs(u_pos - v_old) * step / beta + 1.0
    assert vertex == pytest.approx(closed_form, abs=0.02 * scale), (vertex, closed_form)


def _config(algo: dict, **sections) -> object:
    return build_config(
        {
            "name": "nft-test",
            "seed": 0,
            "env": {"id": "flowrl/TwoGoal-v0", "num_envs": 16, "num_workers": 1, "group_size": 8},
            "policy": {"horizon": 4, "denoising_steps": 4, "hidden_dims": [16, 16]},
            "pretrain": {"demos": {"episodes": 10}, "steps": 5},
            "algo": {"type": "nft", **algo},
            "ray": {"enabled": False},
            **sections,
        }
    )


def test_old_policy_follows_with_the_papers_schedule() -> None:
    """old <- d old + (1 - d) theta, d = min(rate * iteration, max)."""
    from flowrl.algos.nft import NFT
    from flowrl.models.build import build_actor, build_policy

    cfg = _config({"old_decay_rate": 0.1, "old_decay_max": 0.25})
    policy = build_policy(cfg, build_actor(cfg.policy, 2, 2))
    algo = NFT(policy, cfg.algo, torch.device("cpu"), 0, 8)
    old0 = [p.detach().clone() for p in algo.old.velocity.parameters()]
    with torch.no_grad():
        for p in policy.velocity.parameters():
            p.add_(1.0)
    assert algo.after_update(2)["nft/old_decay"] == pytest.approx(0.2)
    for o, before, p in zip(algo.old.velocity.parameters(), old0, policy.velocity.parameters(), strict=True):
        torch.testing.assert_close(o, 0.2 * before + 0.8 * p.detach())
    assert algo.after_update(10)["nft/old_decay"] == pytest.approx(0.25)  # capped
    assert algo.after_update(0)["nft/old_decay"] == 0.0
    for o, p in zip(algo.old.velocity.parameters(), policy.velocity.parameters(), strict=True):
        torch.testing.assert_close(o, p.detach())  # d = 0: the old policy is the trained one


def test_nft_learns_the_two_goal_task(tmp_path) -> None:
    """The bimodal pretrained policy moves to the rewarded goal (deterministic ODE sampling),
    with the quickstart's recipe (32 groups of 4, adv_mode positive, c = 1, lr 1e-3) on a smaller
    budget; success on 50 held-out episodes before and after."""
    from flowrl.experiment import train

    cfg = build_config(
        {
            "name": "nft-test",
            "seed": 0,
            "env": {"id": "flowrl/TwoGoal-v0", "num_envs": 128, "num_workers": 1, "group_size": 4},
            "policy": {"horizon": 4, "denoising_steps": 4, "hidden_dims": [64, 64]},
            "mdp": {"solver": "dpm_solver_2m"},
            "pretrain": {"demos": {"episodes": 200}, "steps": 800},
            "algo": {
                "type": "nft",
                "iterations": 15,
                "max_steps": 8,
                "epochs": 10,
                "minibatch_size": 128,
                "actor_lr": 1e-3,
                "adv_mode": "positive",
                "adv_clip_max": 1.0,
            },
            "eval": {"episodes": 50, "every": 15},
            "checkpoint_every": 15,
            "ray": {"enabled": False},
        }
    )
    result = train(cfg, tmp_path, progress=False)
    before, after = result["before"]["eval/success_rate"], result["after"]["eval/success_rate"]
    assert before <= 0.7
    assert after >= before + 0.4, (before, after)
