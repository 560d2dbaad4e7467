"""PPO: the ratio check before the first update, bad rewards, parameter updates; the reward
scaler against a hand computation; DPPO's per-step samples; Gaussian PPO with the W2
regulariser (closed-form W2 of diagonal Gaussians) and running observation statistics.

An iteration runs as the Trainer runs it: check_rewards -> PPO.prepare -> check_ratio -> PPO.update."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flowrl.algos.policy_gradient import RatioCheckError, check_ratio, pg_samples
from flowrl.algos.ppo import PPO, RewardScaler
from flowrl.algos.trainer import EnvRewardError, check_rewards
from flowrl.config import build_config
from flowrl.core.grids import time_grid
from flowrl.errors import RewardError
from flowrl.models.build import build_actor, build_critic, build_policy
from flowrl.models.networks import ObsNormalizer, ValueMLP
from flowrl.models.policy import Evaluation
from flowrl.rollout.collector import InProcessCollector
from flowrl.rollout.shard import EnvSpec


def _setup(converter: dict, window: dict | None = None, **algo):
    cfg = build_config(
        {
            "name": "t",
            "env": {"num_envs": 4},
            "policy": {"hidden_dims": [16], "time_embed_dim": 8},
            "mdp": {"converter": converter, "window": window or {"type": "all"}},
            "algo": {"type": "ppo", "minibatch_size": 8, "epochs": 2, **algo},
        }
    )
    torch.manual_seed(0)
    policy = build_policy(cfg, build_actor(cfg.policy, 2, 2))
    ppo = PPO(policy, ValueMLP(2, (16,)), cfg.algo, torch.device("cpu"), seed=0)
    collector = InProcessCollector(EnvSpec(cfg.env.id, cfg.policy.horizon, cfg.env.num_envs, seed=0))
    rollout = collector.collect(policy, 6, iteration=0)
    collector.close()
    return policy, ppo, rollout


def _iteration(ppo: PPO, rollout, iteration: int = 0) -> tuple[float, dict[str, float]]:
    """What the Trainer does with a fresh rollout; returns (ratio check deviation, update metrics)."""
    check_rewards(rollout)
    batch = ppo.prepare(rollout)
    checked = check_ratio(ppo.policy, batch.cond, batch.samples, ppo.cfg.ratio_check_tol, ppo.name)
    return checked["train/ratio_check_dev"], ppo.update(batch, iteration)


CONVERTERS = [{"type": "reinflow"}, {"type": "flow_noise"}, {"type": "flow_sde"}, {"type": "cps"}]


@pytest.mark.parametrize("converter", CONVERTERS, ids=lambda c: c["type"])
def test_update_moves_the_policy_after_an_exact_ratio_check(converter):
    policy, ppo, rollout = _setup(converter, {"type": "one_random"} if converter["type"] == "flow_sde" else None)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    deviation, metrics = _iteration(ppo, rollout)
    assert deviation <= 1e-5
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if v == v)
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("velocity.") for k in changed)
    if converter["type"] in ("reinflow", "flow_noise"):
        assert any(k.startswith("sampler.converter.noise_net.") for k in changed)


def test_ratio_check_reports_the_flow_sde_stds_of_the_closed_form():
    """noise/std_* of a Flow-SDE rollout on the uniform grid, window all: std_k = a sqrt((1 - t_k) /
    max(t_k, 1/K)) sqrt(1/K), largest (= a) at k = 0, smallest at k = K - 1; every step weighs the same."""
    a = 0.7
    policy, ppo, rollout = _setup({"type": "flow_sde", "noise_level": a})
    k = policy.num_steps
    t = torch.arange(k, dtype=torch.float64) / k
    stds = a * torch.sqrt((1 - t) / t.clamp(min=1 / k)) * (1 / k) ** 0.5
    batch = ppo.prepare(rollout)
    checked = check_ratio(policy, batch.cond, batch.samples, ppo.cfg.ratio_check_tol, ppo.name)
    assert checked["noise/std_max"] == pytest.approx(a, rel=1e-5)
    assert checked["noise/std_min"] == pytest.approx(stds.min().item(), rel=1e-5)
    assert checked["noise/std_mean"] == pytest.approx(stds.mean().item(), rel=1e-5)


def test_ratio_check_reports_reinflow_stds_inside_the_configured_range():
    policy, ppo, rollout = _setup({"type": "reinflow", "std_min": 0.11, "std_max": 0.19})
    batch = ppo.prepare(rollout)
    checked = check_ratio(policy, batch.cond, batch.samples, ppo.cfg.ratio_check_tol, ppo.name)
    assert 0.11 <= checked["noise/std_min"] < checked["noise/std_mean"] < checked["noise/std_max"] <= 0.19


def test_mismatched_time_grid_fails_the_ratio_check():
    """ReinFlow's issue #5: sampling on linspace(0, 1, K+1) but re-evaluating on a shifted grid."""
    policy, ppo, rollout = _setup({"type": "reinflow"})
    k = policy.num_steps
    policy.sampler.grid = torch.linspace(0, 1 - 1 / k, k + 1)
    with pytest.raises(RatioCheckError, match="ratio is not 1 before the first update"):
        _iteration(ppo, rollout)
    policy.sampler.grid = time_grid(k)
    _iteration(ppo, rollout)  # the right grid passes


def test_changed_weights_fail_the_ratio_check():
    policy, ppo, rollout = _setup({"type": "flow_sde"})
    with torch.no_grad():
        policy.velocity.net[-1].bias.add_(0.5)
    with pytest.raises(RatioCheckError):
        _iteration(ppo, rollout)


def test_non_finite_reward_is_an_error():
    _, ppo, rollout = _setup({"type": "reinflow"})
    rollout.rewards[2, 1] = float("nan")
    with pytest.raises(EnvRewardError, match="reward nan at policy step 2 of env 1") as caught:
        _iteration(ppo, rollout)
    assert isinstance(caught.value, RewardError)  # the shared error class, not a name of its own
    # a step outside every training episode (collect_episodes' tail, padding) is not looked at
    rollout.valid[2, 1] = False
    check_rewards(rollout)


def test_a_wholly_frozen_policy_is_refused():
    policy, _, _ = _setup({"type": "reinflow"})
    policy.requires_grad_(False)  # a partly frozen one trains its other parameters (test_policy_gradient)
    cfg = build_config({"name": "t"})
    with pytest.raises(ValueError, match="frozen"):
        PPO(policy, ValueMLP(2), cfg.algo, torch.device("cpu"), seed=0)


# --------------------------------------------------------------------------- reward scaling
def _hand_returns(rewards: np.ndarray, dones: np.ndarray, gamma: float, running: np.ndarray) -> np.ndarray:
    """Discounted return so far per env, reset after each done; updates ``running`` in place."""
    out = np.zeros_like(rewards, dtype=np.float64)
    for t in range(rewards.shape[0]):
        for n in range(rewards.shape[1]):
            running[n] = running[n] * gamma + rewards[t, n]
            out[t, n] = running[n]
            if dones[t, n]:
                running[n] = 0.0
    return out


def test_reward_scaler_divides_by_the_std_of_hand_computed_returns():
    gamma = 0.9
    rng = np.random.default_rng(0)
    batches = [(rng.normal(1.0, 2.0, size=(5, 3)).astype(np.float32), rng.random((5, 3)) < 0.3) for _ in range(3)]
    scaler = RewardScaler(gamma)
    running, seen = np.zeros(3), []
    for rewards, dones in batches[:2]:
        got = scaler(torch.as_tensor(rewards), torch.as_tensor(dones))
        seen.append(_hand_returns(rewards, dones, gamma, running))
        std = np.sqrt(np.concatenate(seen).var() + 1e-8)  # population variance of every return so far
        np.testing.assert_allclose(got.numpy(), rewards / std, rtol=1e-5)
        assert got.dtype == torch.float32
    # the state (running returns and statistics) survives a checkpoint (torch.save, weights_only load)
    buffer = io.BytesIO()
    torch.save(scaler.state_dict(), buffer)
    buffer.seek(0)
    restored = RewardScaler(gamma)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    rewards, dones = batches[2]
    seen.append(_hand_returns(rewards, dones, gamma, running))
    expected = rewards / np.sqrt(np.concatenate(seen).var() + 1e-8)
    np.testing.assert_allclose(restored(torch.as_tensor(rewards), torch.as_tensor(dones)).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(scaler(torch.as_tensor(rewards), torch.as_tensor(dones)).numpy(), expected, rtol=1e-5)
    # a scaler without that state scales differently
    fresh = RewardScaler(gamma)(torch.as_tensor(rewards), torch.as_tensor(dones)).numpy()
    assert not np.allclose(fresh, expected, rtol=1e-3)


# --------------------------------------------------------------------------- DPPO samples
def _fake_policy(new_log_prob: torch.Tensor, unit: str, reduce: str, event_shape=(2, 3)):
    """A policy whose re-evaluation returns the given per-step log-probs ``[B, S]``."""
    b, s = new_log_prob.shape
    zeros = torch.zeros(b, s, *event_shape)
    evaluation = Evaluation(new_log_prob, torch.zeros(b), zeros, zeros)
    return SimpleNamespace(
        evaluate=lambda cond, sample: evaluation, sample_unit=unit, log_prob_reduce=reduce, event_shape=event_shape
    )


def test_pg_samples_of_per_step_log_probs_are_the_stored_steps():
    g = torch.Generator().manual_seed(0)
    b, s, numel = 5, 3, 6  # 5 chains of 3 stochastic steps over events [2, 3]
    new, old = torch.randn(b, s, generator=g), torch.randn(b, s, generator=g)
    adv = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])
    cond = torch.zeros(b, 2)
    sample = SimpleNamespace(log_prob=old)
    # DPPO (step, mean): one sample per stored step, row by row in step order, per-dimension log-probs,
    # each with its env step's advantage
    got = pg_samples(_fake_policy(new, "step", "mean"), cond, sample, adv)
    pairs = [(i, j) for i in range(b) for j in range(s)]
    assert torch.equal(got.log_prob, torch.stack([new[i, j] / numel for i, j in pairs]))
    assert torch.equal(got.old_log_prob, torch.stack([old[i, j] / numel for i, j in pairs]))
    assert torch.equal(got.advantages, torch.tensor([adv[i] for i, _ in pairs]))
    got = pg_samples(_fake_policy(new, "step", "sum"), cond, sample, adv)
    assert torch.equal(got.log_prob, new.reshape(-1)) and torch.equal(got.old_log_prob, old.reshape(-1))
    # a chain (ReinFlow: mean): one sample per chain, the joint log-prob of its steps per dimension
    got = pg_samples(_fake_policy(new, "chain", "mean"), cond, sample, adv)
    torch.testing.assert_close(got.log_prob, torch.stack([sum(new[i, j] for j in range(s)) for i in range(b)]) / 18)
    torch.testing.assert_close(got.old_log_prob, old.sum(1) / (s * numel))
    assert got.advantages is adv
    # per-env-step log-probs (Gaussian: one step, summed) pass through unchanged
    lp, old1 = torch.randn(b, 1, generator=g), torch.randn(b, 1, generator=g)
    got = pg_samples(_fake_policy(lp, "chain", "sum"), cond, SimpleNamespace(log_prob=old1), adv)
    assert torch.equal(got.log_prob, lp[:, 0]) and torch.equal(got.old_log_prob, old1[:, 0])
    assert got.advantages is adv


# --------------------------------------------------------------------------- Gaussian PPO
def _gaussian_setup(running_obs_stats: bool = False, **algo):
    cfg = build_config(
        {
            "name": "t",
            "env": {"num_envs": 4},
            "policy": {"type": "gaussian", "hidden_dims": [16]},
            "algo": {"type": "ppo", "minibatch_size": 8, "epochs": 2, "actor_lr": 3e-3, **algo},
        }
    )
    torch.manual_seed(0)
    actor = build_actor(cfg.policy, 2, 2)
    policy, critic = build_policy(cfg, actor), build_critic(actor, (16,))
    ppo = PPO(policy, critic, cfg.algo, torch.device("cpu"), seed=0, running_obs_stats=running_obs_stats)
    collector = InProcessCollector(EnvSpec(cfg.env.id, cfg.policy.horizon, cfg.env.num_envs, seed=0))
    return policy, ppo, collector


def test_gaussian_ppo_update_passes_the_ratio_check_and_moves_the_policy():
    policy, ppo, collector = _gaussian_setup()
    rollout = collector.collect(policy, 6, iteration=0)
    assert type(rollout.samples).__name__ == "GaussianSample" and rollout.samples.log_prob.shape == (6, 4, 1)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    deviation, metrics = _iteration(ppo, rollout)
    assert deviation <= 1e-6
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])}
    assert "actor.log_std" in changed and "actor.net.0.weight" in changed
    assert "losses/w2" not in metrics and ppo.reference is None
    # the ratio check catches a policy changed between sampling and the update
    rollout = collector.collect(policy, 6, iteration=1)
    with torch.no_grad():
        policy.actor.log_std.add_(0.1)
    with pytest.raises(RatioCheckError):
        _iteration(ppo, rollout, 1)
    collector.close()


def test_w2_regulariser_is_zero_at_the_start_and_matches_the_closed_form_after_an_update():
    policy, ppo, collector = _gaussian_setup(w2_coef=1.0)
    reference_before = {k: v.clone() for k, v in ppo.reference.state_dict().items()}
    rollout = collector.collect(policy, 6, iteration=0)
    obs = rollout.obs.flatten(0, 1)
    assert ppo.w2_distance(obs).item() == 0.0  # policy == reference, same noise
    _, metrics = _iteration(ppo, rollout)
    assert "losses/w2" in metrics and metrics["losses/w2"] >= 0.0
    w2 = ppo.w2_distance(obs)
    assert w2.item() > 0.0 and w2.requires_grad
    # the reference does not move (parameters and buffers)
    assert all(torch.equal(v, reference_before[k]) for k, v in ppo.reference.state_dict().items())
    assert not any(p.requires_grad for p in ppo.reference.parameters())
    # Oracle: the shared-noise distance per action dimension of two diagonal Gaussians has
    # expectation mean_dims((mu1 - mu2)² + (s1 - s2)²); Monte-Carlo over many copies of the obs.
    many = obs.repeat(2000, 1)  # 48000 rows
    with torch.no_grad():
        (m1, s1), (m2, s2) = policy.actor(obs), ppo.reference.actor(obs)
        closed_form = ((m1 - m2) ** 2 + (s1 - s2) ** 2).mean().item()
        mc = ppo.w2_distance(many).item()
    assert closed_form > 0
    assert abs(mc - closed_form) < 0.03 * closed_form, (mc, closed_form)
    collector.close()


def test_running_obs_stats_after_the_first_update_are_the_rollout_stats():
    policy, ppo, collector = _gaussian_setup(running_obs_stats=True)
    critic = ppo.critic
    norms = [m for m in (*policy.modules(), *critic.modules()) if isinstance(m, ObsNormalizer)]
    assert len(norms) == 2 and all(float(m.count) == 0 for m in norms)
    rollout = collector.collect(policy, 6, iteration=0)
    _iteration(ppo, rollout)
    data = rollout.obs.reshape(-1, 2).double().numpy()
    for m in norms:
        np.testing.assert_allclose(m.mean.numpy(), data.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.var.numpy(), data.var(0), rtol=1e-4, atol=1e-9)
        assert float(m.count) == 24
    assert float(data.std(0).min()) > 0.01  # the stats are not the defaults (mean 0, var 1)
    # the next rollout samples with the new statistics: its ratio check passes; the stats fold in
    second = collector.collect(policy, 6, iteration=1)
    deviation, _ = _iteration(ppo, second, 1)
    assert deviation <= 1e-6
    both = np.concatenate([data, second.obs.reshape(-1, 2).double().numpy()])
    for m in norms:
        np.testing.assert_allclose(m.mean.numpy(), both.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.var.numpy(), both.var(0), rtol=1e-4, atol=1e-9)
    collector.close()


def test_critic_warmup_trains_only_the_critic():
    policy, ppo, rollout = _setup({"type": "reinflow"}, critic_warmup_iterations=2)
    actor_before = {k: v.clone() for k, v in policy.state_dict().items()}
    critic_before = {k: v.clone() for k, v in ppo.critic.state_dict().items()}
    for iteration in (0, 1):  # the warm-up iterations
        _iteration(ppo, rollout, iteration)
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in actor_before.items())
    assert any(not torch.equal(v, ppo.critic.state_dict()[k]) for k, v in critic_before.items())
    # after the warm-up the actor trains too
    _iteration(ppo, rollout, 2)
    assert any(not torch.equal(v, policy.state_dict()[k]) for k, v in actor_before.items())
