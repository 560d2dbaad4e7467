"""PPO over an env MDP for every policy family: ReinFlow (flow policies), DPPO (diffusion
policies) and Gaussian PPO.

One env step executes an action chunk. The policy's ``sample_unit`` decides what one PPO
sample is: a whole denoising chain with its joint log-prob (ReinFlow, Gaussian) or each
stochastic denoising step with its env step's advantage (DPPO, MixGRPO-style windows).
GAE runs over env steps with a critic on observations and bootstraps through time-limit
truncations. Options: a running reward scale (training from scratch), running observation
statistics (policy.obs_norm: running), a W2 regulariser that keeps the policy near the one
it started from, critic warm-up, and early stopping on approx KL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowrl.algos.policy_gradient import (
    MetricHistory,
    PolicyGradientAlgorithm,
    PolicyOptimizer,
    guarded_step,
    normalise_advantages,
    pg_samples,
    run_epochs,
    update_obs_stats,
)
from flowrl.config import PPOConfig
from flowrl.core.advantages import gae
from flowrl.core.batch import TensorBatch
from flowrl.core.losses import clipped_surrogate, value_loss
from flowrl.models.networks import ObsNormalizer
from flowrl.models.policy import Policy, frozen_copy
from flowrl.rollout.rollout import Collector, Rollout
from flowrl.runtime import derive_seed


class RewardScaler:
    """Divides rewards by a running std of the discounted return (CleanRL's NormalizeReward),
    so that the critic sees returns of order 1 whatever the env's reward scale."""

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma
        self.running: Tensor | None = None  # discounted return so far, per env
        self.stats = ObsNormalizer(1)

    def __call__(self, rewards: Tensor, dones: Tensor) -> Tensor:
        """rewards, dones ``[T, N]`` -> scaled rewards ``[T, N]``."""
        if self.running is None or self.running.shape[0] != rewards.shape[1]:
            self.running = torch.zeros(rewards.shape[1], dtype=torch.float64)
        returns = torch.empty_like(rewards, dtype=torch.float64)
        for t in range(rewards.shape[0]):
            self.running = self.running * self.gamma + rewards[t].double()
            returns[t] = self.running
            self.running = torch.where(dones[t], torch.zeros_like(self.running), self.running)
        self.stats.update(returns.reshape(-1, 1))
        return rewards / torch.sqrt(self.stats.var + 1e-8).to(rewards.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"running": self.running, "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running = state["running"]
        self.stats.load_state_dict(state["stats"])


@dataclass
class PPOBatch:
    """One rollout, flattened over (time, env): ``[B]`` env steps (B = T * N)."""

    cond: Tensor
    samples: TensorBatch
    advantages: Tensor
    returns: Tensor
    values: Tensor


class PPO(PolicyGradientAlgorithm):
    """Policy + critic + optimisers. ``collect`` -> ``prepare`` (GAE) -> ``update`` (epochs)."""

    name = "PPO"
    # the checkpoint's keys, in order (reward_scaler and reference only where configured)
    checkpoint_state = ("policy", "critic", "actor_opt", "critic_opt", "generator", "reward_scaler", "reference")

    def __init__(
        self,
        policy: Policy,
        critic: nn.Module,
        cfg: PPOConfig,
        device: torch.device,
        seed: int,
        running_obs_stats: bool = False,
    ) -> None:
        self.policy, self.critic, self.cfg, self.device = policy, critic, cfg, device
        self.running_obs_stats = running_obs_stats
        self.critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr)
        self.optimizer = PolicyOptimizer(policy, cfg, extra=[self.critic_opt])
        self.generator = torch.Generator().manual_seed(derive_seed(seed, 2))
        self.reward_scaler = RewardScaler(cfg.gamma) if cfg.normalize_rewards else None
        # The policy fine-tuning started from, for the W2 regulariser.
        self.reference = frozen_copy(policy) if cfg.w2_coef > 0 else None

    def collect(self, collector: Collector, policy: Policy, iteration: int) -> Rollout:
        """``steps_per_iteration`` policy steps in every env; episodes run on across iterations."""
        return collector.collect(policy, self.cfg.steps_per_iteration, iteration)

    def prepare(self, rollout: Rollout) -> PPOBatch:
        """Critic values and GAE over env steps, flattened to ``[T * N]``."""
        cfg, dev = self.cfg, self.device
        T, N = rollout.rewards.shape
        dones = rollout.terminated | rollout.truncated
        rewards = rollout.rewards if self.reward_scaler is None else self.reward_scaler(rollout.rewards, dones)
        obs, next_obs = rollout.obs.to(dev), rollout.next_obs.to(dev)
        with torch.no_grad():
            values = self.critic(obs.flatten(0, 1)).view(T, N)
            next_values = self.critic(next_obs.flatten(0, 1)).view(T, N)
        adv, returns = gae(
            rewards.to(dev), values, next_values, rollout.terminated.to(dev), dones.to(dev), cfg.gamma, cfg.gae_lambda
        )
        if cfg.normalize_advantages == "batch":
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        return PPOBatch(
            cond=obs.flatten(0, 1),
            samples=rollout.samples.flatten(0, 1).to(dev),
            advantages=adv.flatten(),
            returns=returns.flatten(),
            values=values.flatten(),
        )

    def update(self, batch: PPOBatch, iteration: int) -> dict[str, float]:
        """Epochs of minibatch updates over env steps; the first ``critic_warmup_iterations``
        train only the critic (a fresh critic next to a pretrained actor)."""
        train_actor = iteration >= self.cfg.critic_warmup_iterations
        history = MetricHistory()
        run = run_epochs(
            batch.advantages.shape[0],
            self.cfg,
            self.generator,
            self.device,
            lambda mb: self._minibatch(batch, mb, iteration, train_actor, history),
            self.data_parallel,
        )
        metrics = history.summary()
        with torch.no_grad():
            _, v_metrics = value_loss(self.critic(batch.cond), batch.returns)
        if self.running_obs_stats:
            update_obs_stats(batch.cond, self.policy, self.critic)
        metrics.update(
            {
                "train/skipped_updates": float(self.optimizer.guard.pop_skipped()),
                **run.metrics(),
                "train/explained_variance": v_metrics["explained_variance"],
                "train/advantage_std": batch.advantages.std().item(),
                "train/value_mean": batch.values.mean().item(),
            }
        )
        return metrics

    def _minibatch(
        self, batch: PPOBatch, mb: Tensor, iteration: int, train_actor: bool, history: MetricHistory
    ) -> dict[str, float]:
        """An actor step (its loss computed, the step skipped while the critic warms up) and a
        critic step on the env steps ``mb`` ``[m]``; returns the surrogate's metrics."""
        cfg = self.cfg
        mb_adv = batch.advantages[mb]
        if cfg.normalize_advantages == "minibatch":
            mb_adv = normalise_advantages(mb_adv, self.data_parallel)
        terms = pg_samples(self.policy, batch.cond[mb], batch.samples[mb], mb_adv)
        pg_loss, pg_metrics = clipped_surrogate(terms.log_prob, terms.old_log_prob, terms.advantages, cfg.clip)
        entropy_mean = terms.evaluation.entropy.mean()
        loss = pg_loss - cfg.entropy_coef * entropy_mean
        logged = {"losses/policy": pg_loss.item(), "losses/entropy": entropy_mean.item()}
        if self.reference is not None:
            w2 = self.w2_distance(batch.cond[mb])
            loss = loss + cfg.w2_coef * w2
            logged["losses/w2"] = w2.item()
        grad_norm = self.optimizer.step(loss, iteration) if train_actor else 0.0

        v_loss, _ = value_loss(self.critic(batch.cond[mb]), batch.returns[mb], batch.values[mb], cfg.value_clip)
        guarded_step(
            self.critic_opt, self.critic.parameters(), v_loss, cfg.max_grad_norm, self.optimizer.guard,
            iteration, "value",
        )  # fmt: skip

        history.add({**logged, "losses/value": v_loss.item()}, grad_norm, pg_metrics)
        return pg_metrics

    def w2_distance(self, cond: Tensor) -> Tensor:
        """Mean squared action distance per dimension between the policy and the reference,
        both fed the same noise: an upper bound on W2² / (Ta * Da) of the two policies."""
        assert self.reference is not None
        noise = torch.randn((cond.shape[0], *self.policy.event_shape), generator=self.generator).to(cond.device)
        with torch.no_grad():
            target = self.reference.coupled_actions(cond, noise)
        return ((self.policy.coupled_actions(cond, noise) - target) ** 2).mean()
