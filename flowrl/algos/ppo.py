"""PPO over an env MDP for every policy family: ReinFlow (flow policies), DPPO (diffusion
policies) and Gaussian PPO.

One env step executes an action chunk. A flow policy's log-prob is its denoising chain's
over the stochastic steps (ReinFlow); a diffusion policy gives one log-prob per denoising
step and each step is its own clipped PPO sample with the env step's advantage (DPPO); a
Gaussian policy's is the chunk's. GAE runs over env steps with a critic on observations and
bootstraps through time-limit truncations. Options: a running reward scale (training from
scratch), running observation statistics (policy.obs_norm: running), and a W2 regulariser
that keeps the policy near the one it started from.

The loop in ``train_ppo`` reads top to bottom: collect -> advantages -> epochs of
minibatch updates -> log -> evaluate -> checkpoint.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from flowrl.config import ExperimentConfig, PPOConfig
from flowrl.core.advantages import gae
from flowrl.core.losses import clipped_surrogate, value_loss
from flowrl.errors import FlowRLError
from flowrl.models.build import actor_record
from flowrl.models.networks import ObsNormalizer
from flowrl.models.policy import Policy
from flowrl.rollout.collector import Collector, InProcessCollector, Rollout, evaluate_policy
from flowrl.runlog import RunLog, atomic_save
from flowrl.runtime import derive_seed
from flowrl.runtime import progress as progress_bar


class RatioCheckError(FlowRLError, RuntimeError):
    """Re-evaluated log-probs of a fresh rollout differ from the sampled ones."""


class RewardError(FlowRLError, RuntimeError):
    """The env returned a non-finite reward."""


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


class PPOLearner:
    """The learner: policy + critic + optimizers; ``update(rollout)`` returns metrics.

    ``running_obs_stats``: after each update, fold the rollout's observations into every
    observation normaliser of the policy and the critic (the next rollout samples with the
    new statistics, so stored log-probs always match the statistics they were sampled with).
    """

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
        frozen = [name for name, p in policy.named_parameters() if not p.requires_grad]
        if frozen:
            raise ValueError(f"PPO: policy parameters are frozen (requires_grad=False): {frozen[:3]}")
        groups: list[dict[str, Any]] = [{"params": list(policy.actor.parameters()), "lr": cfg.actor_lr}]
        noise_params = policy.noise_parameters()
        if noise_params:
            groups.append({"params": noise_params, "lr": cfg.noise_lr})
        self.actor_opt = torch.optim.Adam(groups)
        self.critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr)
        self.generator = torch.Generator().manual_seed(derive_seed(seed, 2))
        self.reward_scaler = RewardScaler(cfg.gamma) if cfg.normalize_rewards else None
        # The policy fine-tuning started from, for the W2 regulariser.
        self.reference = copy.deepcopy(policy).requires_grad_(False) if cfg.w2_coef > 0 else None
        for opt in (self.actor_opt, self.critic_opt):
            for group in opt.param_groups:
                group["base_lr"] = group["lr"]

    def set_progress(self, fraction_done: float) -> None:
        """Learning rates for the ``lr_schedule`` at this point of training (0 = start)."""
        scale = 1.0 - fraction_done if self.cfg.lr_schedule == "linear" else 1.0
        for opt in (self.actor_opt, self.critic_opt):
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale

    def state_dict(self) -> dict[str, Any]:
        state = {
            "policy": self.policy.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "generator": self.generator.get_state(),
        }
        if self.reward_scaler is not None:
            state["reward_scaler"] = self.reward_scaler.state_dict()
        if self.reference is not None:
            state["reference"] = self.reference.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.critic.load_state_dict(state["critic"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.generator.set_state(state["generator"])
        if self.reward_scaler is not None:
            self.reward_scaler.load_state_dict(state["reward_scaler"])
        if self.reference is not None:
            self.reference.load_state_dict(state["reference"])

    def update(self, rollout: Rollout, train_actor: bool = True) -> dict[str, float]:
        """Epochs of minibatch updates on one rollout; ``train_actor=False`` trains only the
        critic (warm-up of a fresh critic before a pretrained actor moves)."""
        cfg, dev = self.cfg, self.device
        if not torch.isfinite(rollout.rewards).all():
            t, n = (~torch.isfinite(rollout.rewards)).nonzero()[0].tolist()
            raise RewardError(
                f"the env returned reward {rollout.rewards[t, n].item()} at policy step {t} of env {n}; "
                "fix the env's reward (flowrl does not replace bad rewards)"
            )
        T, N = rollout.rewards.shape
        dones = rollout.terminated | rollout.truncated
        rewards = rollout.rewards if self.reward_scaler is None else self.reward_scaler(rollout.rewards, dones)
        obs, next_obs = rollout.obs.to(dev), rollout.next_obs.to(dev)
        with torch.no_grad():
            values = self.critic(obs.flatten(0, 1)).view(T, N)
            next_values = self.critic(next_obs.flatten(0, 1)).view(T, N)
        adv, returns = gae(
            rewards.to(dev),
            values,
            next_values,
            rollout.terminated.to(dev),
            dones.to(dev),
            cfg.gamma,
            cfg.gae_lambda,
        )
        b_obs, b_samples = obs.flatten(0, 1), rollout.samples.flatten(0, 1).to(dev)
        b_adv, b_ret, b_val = adv.flatten(), returns.flatten(), values.flatten()
        ratio_dev = self.check_ratio(b_obs, b_samples)

        batch = T * N
        history: dict[str, list[float]] = {}
        epochs_done = 0
        for _ in range(cfg.epochs):
            perm = torch.randperm(batch, generator=self.generator).to(dev)
            kl_stop = False
            for start in range(0, batch, cfg.minibatch_size):
                mb = perm[start : start + cfg.minibatch_size]
                mb_adv = b_adv[mb]
                if cfg.normalize_advantages and len(mb) > 1:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                mb_samples = b_samples[mb]
                log_prob, entropy = self.policy.log_prob(b_obs[mb], mb_samples)
                pg_loss, pg_metrics = clipped_surrogate(*_ppo_samples(log_prob, mb_samples, mb_adv), cfg.clip)
                entropy_mean = entropy.mean()
                loss = pg_loss - cfg.entropy_coef * entropy_mean
                terms = {"losses/policy": pg_loss.item(), "losses/entropy": entropy_mean.item()}
                if self.reference is not None:
                    w2 = self.w2_distance(b_obs[mb])
                    loss = loss + cfg.w2_coef * w2
                    terms["losses/w2"] = w2.item()
                self.actor_opt.zero_grad(set_to_none=True)
                grad_norm = torch.zeros(())
                if train_actor:
                    loss.backward()
                    grad_norm = nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                    self.actor_opt.step()

                v_loss, v_metrics = value_loss(self.critic(b_obs[mb]), b_ret[mb], b_val[mb], cfg.value_clip)
                self.critic_opt.zero_grad(set_to_none=True)
                v_loss.backward()
                nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
                self.critic_opt.step()

                for key, value in {
                    **terms,
                    "losses/value": v_loss.item(),
                    "train/grad_norm": float(grad_norm),
                    **{f"train/{k}": v for k, v in pg_metrics.items()},
                }.items():
                    history.setdefault(key, []).append(value)
                if cfg.target_kl is not None and pg_metrics["approx_kl"] > cfg.target_kl:
                    kl_stop = True
                    break
            epochs_done += 1
            if kl_stop:
                break
        metrics = {k: float(np.mean(v)) for k, v in history.items()}
        metrics["train/ratio_max"] = float(np.max(history["train/ratio_max"]))
        metrics["train/ratio_min"] = float(np.min(history["train/ratio_min"]))
        with torch.no_grad():
            _, v_metrics = value_loss(self.critic(b_obs), b_ret)
        if self.running_obs_stats:
            for module in (*self.policy.modules(), *self.critic.modules()):
                if isinstance(module, ObsNormalizer):
                    module.update(b_obs)
        metrics.update(
            {
                "train/epochs": float(epochs_done),
                "train/ratio_check_dev": ratio_dev,
                "train/explained_variance": v_metrics["explained_variance"],
                "train/advantage_std": b_adv.std().item(),
                "train/value_mean": b_val.mean().item(),
            }
        )
        return metrics

    def w2_distance(self, obs: Tensor) -> Tensor:
        """Mean squared action distance per dimension between the policy and the reference,
        both fed the same noise: an upper bound on W2² / (Ta * Da) of the two policies."""
        assert self.reference is not None
        noise = torch.randn((obs.shape[0], *self.policy.event_shape), generator=self.generator).to(obs.device)
        with torch.no_grad():
            target = self.reference.coupled_actions(obs, noise)
        return ((self.policy.coupled_actions(obs, noise) - target) ** 2).mean()

    @torch.no_grad()
    def check_ratio(self, obs: Tensor, samples) -> float:
        """Before any update, recomputed log-probs must reproduce the sampled ones (ratio = 1)."""
        new_log_prob, _ = self.policy.log_prob(obs, samples)
        new_log_prob, old_log_prob, _ = _ppo_samples(
            new_log_prob, samples, torch.zeros(obs.shape[0], device=obs.device)
        )
        dev = ((new_log_prob - old_log_prob).exp() - 1.0).abs()
        worst = float(dev.max())
        if not worst <= self.cfg.ratio_check_tol:
            i = int(dev.argmax())
            raise RatioCheckError(
                f"PPO ratio is not 1 before the first update: |ratio - 1| = {worst:.3g} > {self.cfg.ratio_check_tol} "
                f"(sample {i}: sampled log-prob {old_log_prob[i].item():.6g}, re-evaluated "
                f"{new_log_prob[i].item():.6g}). Sampling and re-evaluation disagree (time grid, window or noise "
                "state); raise ppo.ratio_check_tol only if this is float round-off"
            )
        return worst


def _ppo_samples(log_prob: Tensor, samples, advantages: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The PPO samples of a batch as ``[M]`` (log_prob, old log_prob, advantage): one per env
    step, or, for per-step log-probs ``[B, K]`` (DPPO), one per stochastic denoising step,
    each with its env step's advantage."""
    if log_prob.ndim == 1:
        return log_prob, samples.log_prob, advantages
    mask = samples.mask
    return log_prob[mask], samples.log_prob[mask], advantages.unsqueeze(1).expand_as(mask)[mask]


def _episode_metrics(rollout: Rollout) -> dict[str, float]:
    if not rollout.episode_returns:
        return {}
    return {
        "charts/episode_return": float(np.mean(rollout.episode_returns)),
        "charts/success_rate": float(np.mean(rollout.episode_successes)),
        "charts/episodes": float(len(rollout.episode_returns)),
    }


def train_ppo(
    cfg: ExperimentConfig,
    run_dir: Path,
    policy: Policy,
    critic: nn.Module,
    device: torch.device,
    resume: dict[str, Any] | None = None,
    progress: bool = True,
    collector: Collector | None = None,
) -> dict[str, Any]:
    """Train ``policy`` with PPO; returns {"before": eval metrics, "after": eval metrics}.

    ``resume``: a checkpoint written by this function; training continues after its iteration.
    """
    env = cfg.env
    policy.to(device)
    critic.to(device)
    learner = PPOLearner(policy, critic, cfg.ppo, device, cfg.seed, cfg.policy.obs_norm == "running")
    iteration, env_steps, before, last_eval = 0, 0, None, None
    if resume is not None:
        learner.load_state_dict(resume["learner"])
        iteration, env_steps = resume["iteration"], resume["env_steps"]
        before, last_eval = resume["eval_before"], resume["eval_last"]
    # Rollouts run on the CPU (like remote workers); the learner may sit on the GPU.
    rollout_policy = policy if device.type == "cpu" else copy.deepcopy(policy).cpu()
    collector = collector or InProcessCollector(
        env.id, cfg.policy.horizon, env.num_envs, cfg.seed, num_shards=cfg.ray.num_workers, env_kwargs=env.kwargs
    )
    collector.reset(epoch=iteration)
    log = RunLog(run_dir, resume_after=env_steps if resume is not None else None)

    def evaluate() -> dict[str, float]:
        return evaluate_policy(rollout_policy, env.id, cfg.policy.horizon, cfg.eval.episodes, cfg.seed, env.kwargs)

    def save_checkpoint() -> None:
        atomic_save(
            {
                "iteration": iteration,
                "env_steps": env_steps,
                "eval_before": before,
                "eval_last": last_eval,
                "learner": learner.state_dict(),
                **actor_record(policy.actor, cfg.policy),
            },
            run_dir / "checkpoints" / "last.pt",
        )

    try:
        if before is None:
            before = evaluate()
            log.log(0, before, iteration=0)
            tqdm.write(
                f"before training: return {before['eval/return']:.3f}, success {before['eval/success_rate']:.2f}"
            )
        last_eval = last_eval or before
        bar = progress_bar(
            range(iteration, cfg.ppo.iterations), "ppo", progress, initial=iteration, total=cfg.ppo.iterations
        )
        for it in bar:
            t0 = time.perf_counter()
            rollout = collector.collect(rollout_policy, cfg.ppo.steps_per_iteration, it)
            t1 = time.perf_counter()
            learner.set_progress(it / cfg.ppo.iterations)
            metrics = learner.update(rollout, train_actor=it >= cfg.ppo.critic_warmup_iterations)
            if rollout_policy is not policy:  # the CPU copy that collects and evaluates
                rollout_policy.load_state_dict(policy.state_dict())
            t2 = time.perf_counter()
            iteration, env_steps = it + 1, env_steps + rollout.env_steps
            metrics.update(_episode_metrics(rollout))
            if hasattr(collector, "restarts"):
                metrics["ray/worker_restarts"] = float(collector.restarts)
            if iteration % cfg.eval.every == 0 or iteration == cfg.ppo.iterations:
                last_eval = evaluate()
                metrics.update(last_eval)
            metrics.update(
                {
                    "time/collect_s": t1 - t0,
                    "time/update_s": t2 - t1,
                    "time/env_steps_per_s": rollout.env_steps / max(t2 - t0, 1e-9),
                }
            )
            log.log(env_steps, metrics, iteration=iteration)
            bar.set_postfix(
                success=f"{last_eval['eval/success_rate']:.2f}", ret=f"{last_eval['eval/return']:.2f}", refresh=False
            )
            if iteration % cfg.checkpoint_every == 0 or iteration == cfg.ppo.iterations:
                save_checkpoint()
    finally:
        log.close()
        collector.close()
    atomic_save(actor_record(policy.actor, cfg.policy), run_dir / "policy.pt")
    return {"before": before, "after": last_eval}
