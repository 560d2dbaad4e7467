"""AC-Flow: reward shaping, advantages along the chain and their clipping, the critic weights,
the critic-weighted flow-matching loss and its W2 term against independent computations, the
critic warm-up (the actor does not move, the critic does), configuration errors, and a
learning run on the TwoGoal task."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowrl.algos.ac_flow import (
    ACFlow,
    ACFlowBatch,
    chain_advantages,
    chain_critic,
    critic_weighted_loss,
    critic_weights,
    reward_to_go,
    shape_rewards,
)
from flowrl.config import ConfigError, build_config
from flowrl.core.transitions import Transitions
from flowrl.models.build import build_actor, build_policy


def test_reward_to_go_by_hand_stops_at_the_episode_end() -> None:
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 5.0]])
    valid = torch.tensor([[True, True], [True, True], [True, False]])
    g = 0.5
    expected = torch.tensor([[1 + g * 0 + g * g * 3, 0 + g * 2], [0 + g * 3, 2.0], [3.0, 0.0]])
    torch.testing.assert_close(reward_to_go(rewards, valid, g), expected)


def test_standardize_shaping_gives_mean_zero_std_one() -> None:
    returns = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    shaped = shape_rewards(returns, "standardize")
    mean, std = 0.6, math.sqrt(0.24)  # population std of three ones and two zeros
    torch.testing.assert_close(shaped, (returns - mean) / std, rtol=1e-5, atol=1e-6)
    assert torch.equal(shape_rewards(returns, "none"), returns)
    assert torch.equal(shape_rewards(torch.ones(3), "standardize"), torch.zeros(3))  # no spread: no signal


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_chain_advantages_and_their_clipping_against_a_loop(lam: float) -> None:
    g = torch.Generator().manual_seed(0)
    values, outcome = torch.randn(6, 4, generator=g) * 2, torch.randn(6, generator=g) * 2
    expected = torch.zeros(6, 4)
    for b in range(6):  # a direct computation: A_s = sum_j lam^(j - s) (V_{j+1} - V_j), V_S = outcome
        chain = values[b].tolist() + [float(outcome[b])]
        for s in range(4):
            expected[b, s] = sum(lam ** (j - s) * (chain[j + 1] - chain[j]) for j in range(s, 4))
    adv = chain_advantages(values, outcome, lam)
    torch.testing.assert_close(adv, expected)
    if lam == 1.0:  # Monte Carlo: the outcome minus each state's value
        torch.testing.assert_close(adv, outcome.unsqueeze(1) - values)
    clip, temperature = 1.0, 0.5
    weights, metrics = critic_weights(adv, clip, temperature, "exp")
    by_hand = [[math.exp(max(-clip, min(clip, float(a))) / temperature) for a in row] for row in expected]
    torch.testing.assert_close(weights, torch.tensor(by_hand), rtol=1e-5, atol=1e-6)
    bound = math.exp(clip / temperature)
    assert weights.max() <= bound + 1e-5 and weights.min() >= 1 / bound - 1e-6
    assert metrics["acflow/adv_clip_frac"] == pytest.approx(float((expected.abs() > clip).float().mean()))
    normalised, _ = critic_weights(adv, clip, temperature, "normalized_exp")
    torch.testing.assert_close(normalised, weights / weights.mean())


class _Linear(nn.Module):
    """v(cond, x, t) = x @ W + cond * c + t * d, per-element: small enough to recompute by hand."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(dim, dim, generator=g))
        self.c = nn.Parameter(torch.randn(dim, generator=g))
        self.d = nn.Parameter(torch.randn(dim, generator=g))

    def forward(self, cond, x, t):
        return x @ self.w + cond * self.c + t.unsqueeze(1) * self.d


def test_critic_weighted_loss_matches_a_per_sample_computation() -> None:
    g = torch.Generator().manual_seed(3)
    m, dim = 5, 3
    policy, ref = _Linear(dim, 1), _Linear(dim, 2)
    cond, final, noise = (torch.randn(m, dim, generator=g) for _ in range(3))
    t, weights = torch.rand(m, generator=g), torch.rand(m, generator=g) * 3
    alpha = 0.7
    loss, metrics = critic_weighted_loss(policy, ref, cond, final, t, weights, noise, alpha)
    total = 0.0
    for i in range(m):  # one sample at a time, sums written out
        x = [(1 - float(t[i])) * float(noise[i, k]) + float(t[i]) * float(final[i, k]) for k in range(dim)]
        xt = torch.tensor([x])
        v = policy(cond[i : i + 1], xt, t[i : i + 1])[0].tolist()
        vr = ref(cond[i : i + 1], xt, t[i : i + 1])[0].tolist()
        target = [float(final[i, k] - noise[i, k]) for k in range(dim)]
        fm = sum((v[k] - target[k]) ** 2 for k in range(dim)) / dim
        w2 = sum((v[k] - vr[k]) ** 2 for k in range(dim)) / dim
        total += float(weights[i]) * fm + alpha * w2
    assert float(loss.detach()) == pytest.approx(total / m, rel=1e-5)
    assert metrics["losses/policy"] + alpha * metrics["losses/w2"] == pytest.approx(float(loss.detach()), rel=1e-5)
    # the gradient flows into the policy only
    loss.backward()
    assert policy.w.grad is not None and ref.w.grad is None


class _Constant(nn.Module):
    """The velocity of the flow x_1 = x_0 + mu: it carries N(0, I) to N(mu, I)."""

    def __init__(self, mu: torch.Tensor) -> None:
        super().__init__()
        self.mu = nn.Parameter(mu.clone())

    def forward(self, cond, x, t):
        return self.mu.expand_as(x)


def test_w2_term_of_two_gaussian_flows_is_their_w2_distance() -> None:
    """Flows carrying N(0, I) to N(a, I) and N(b, I): W2² = ||a - b||², and the W2 term (per
    dimension) is exactly W2² / D."""
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 2.5])
    g = torch.Generator().manual_seed(0)
    final, noise = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    _, metrics = critic_weighted_loss(
        _Constant(a), _Constant(b), torch.zeros(8, 3), final, torch.rand(8, generator=g), torch.ones(8), noise, 1.0
    )
    w2_squared = float(((a - b) ** 2).sum())  # closed form between N(a, I) and N(b, I)
    assert metrics["losses/w2"] == pytest.approx(w2_squared / 3, rel=1e-6)


def _config(**algo):
    return build_config(
        {
            "name": "acflow-test",
            "env": {"id": "flowrl/TwoGoal-v0", "num_envs": 4, "num_workers": 1},
            "policy": {"horizon": 4, "denoising_steps": 4, "hidden_dims": [16, 16]},
            "mdp": {"converter": {"type": "flow_sde"}},
            "algo": {"type": "ac_flow", "critic_hidden_dims": [16], "minibatch_size": 8, **algo},
            "ray": {"enabled": False},
        }
    )


def _algo_and_batch(warmup: int) -> tuple[ACFlow, ACFlowBatch]:
    torch.manual_seed(0)
    cfg = _config(critic_warmup_iterations=warmup, epochs=2)
    actor = build_actor(cfg.policy, 2, 2)
    policy = build_policy(cfg, actor)
    algo = ACFlow(policy, chain_critic(actor, cfg.algo.critic_hidden_dims), cfg.algo, torch.device("cpu"), 0)
    obs = torch.randn(12, 2)
    samples: Transitions = policy.sample(obs)
    rewards = torch.tensor([1.0, 0.0] * 6)
    times = policy.sampler.grid[samples.steps]
    adv = chain_advantages(torch.zeros_like(times), shape_rewards(rewards, "standardize"), 1.0)
    weights, _ = critic_weights(adv, 1.0, 0.5, "exp")
    batch = ACFlowBatch(obs, samples, times, shape_rewards(rewards, "standardize"), weights)
    return algo, batch


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_warmup_trains_the_critic_and_leaves_the_actor_alone() -> None:
    algo, batch = _algo_and_batch(warmup=2)
    actor, critic = _params(algo.policy), _params(algo.critic)
    metrics = algo.update(batch, iteration=1)  # inside the warm-up (iterations 0 and 1)
    assert metrics["acflow/actor_trained"] == 0.0 and "losses/value" in metrics and "losses/fm" not in metrics
    assert all(torch.equal(p, q) for p, q in zip(actor, _params(algo.policy), strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(critic, _params(algo.critic), strict=True))
    metrics = algo.update(batch, iteration=2)  # warm-up over: the actor moves
    assert metrics["acflow/actor_trained"] == 1.0 and "losses/fm" in metrics and "losses/w2" in metrics
    assert any(not torch.equal(p, q) for p, q in zip(actor, _params(algo.policy), strict=True))


def test_checkpoint_round_trip() -> None:
    algo, batch = _algo_and_batch(warmup=0)
    algo.update(batch, iteration=0)
    state = algo.state_dict()
    assert set(state) == {"policy", "critic", "actor_opt", "critic_opt", "generator", "reference"}
    other, _ = _algo_and_batch(warmup=0)
    other.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(_params(algo.critic), _params(other.critic), strict=True))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mdp": {"converter": {"type": "reinflow"}}}, "trains no noise net"),
        ({"policy": {"type": "shortcut"}}, "needs policy.type: rectified_flow"),
        ({"algo": {"type": "ac_flow", "adv_clip": 0}}, "adv_clip"),
        ({"algo": {"type": "ac_flow", "weighting": "softmax"}}, "weighting"),
        ({"algo": {"type": "ac_flow", "iterations": 5, "critic_warmup_iterations": 5}}, "never be trained"),
    ],
)
def test_bad_configs_are_one_clear_error(overrides, message) -> None:
    data = {"name": "x", "mdp": {"converter": {"type": "flow_sde"}}, "algo": {"type": "ac_flow"}, **overrides}
    with pytest.raises(ConfigError, match=message):
        build_config(data)


def test_a_discount_on_images_is_a_dead_key() -> None:
    from tests.image_setup import tiny_config

    assert tiny_config("algo={type: ac_flow, critic_warmup_iterations: 0, iterations: 1}").algo.type == "ac_flow"
    with pytest.raises(ConfigError, match="algo.gamma only applies to gym envs"):
        tiny_config("algo={type: ac_flow, critic_warmup_iterations: 0, iterations: 1, gamma: 0.9}")


def test_ac_flow_learns_the_two_goal_task(tmp_path) -> None:
    """The bimodal pretrained policy moves to the rewarded goal: a critic on the chain's states,
    its warm-up, then critic-weighted flow matching."""
    from flowrl.experiment import train

    cfg = build_config(
        {
            "name": "acflow-learn",
            "seed": 0,
            "env": {"id": "flowrl/TwoGoal-v0", "num_envs": 32, "num_workers": 1},
            "policy": {"horizon": 4, "denoising_steps": 4, "hidden_dims": [64, 64]},
            "mdp": {"converter": {"type": "flow_sde", "noise_level": 0.7}},
            "pretrain": {"demos": {"episodes": 200}, "steps": 800},
            "algo": {
                "type": "ac_flow",
                "iterations": 30,
                "max_steps": 8,
                "epochs": 10,
                "minibatch_size": 64,
                "actor_lr": 1e-3,
                "critic_warmup_iterations": 3,
                "w2_coef": 0.1,
                "critic_hidden_dims": [64, 64],
            },
            "eval": {"episodes": 50, "every": 30},
            "checkpoint_every": 30,
            "ray": {"enabled": False},
        }
    )
    result = train(cfg, tmp_path, progress=False)
    before, after = result["before"]["eval/success_rate"], result["after"]["eval/success_rate"]
    assert before <= 0.7
    assert after >= 0.9, (before, after)
