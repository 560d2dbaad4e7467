"""PPO fine-tuning of a flow policy over an env MDP (ReinFlow-style).

One env step executes an action chunk; the policy's log-prob is the log-prob of its
denoising chain over the stochastic steps (see FlowPolicy). GAE runs over env steps with
a critic on observations and bootstraps through time-limit truncations.

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
from flowrl.models.build import velocity_record
from flowrl.models.flow_policy import FlowPolicy
from flowrl.rollout.collector import Collector, InProcessCollector, Rollout, evaluate_policy
from flowrl.runlog import RunLog, atomic_save
from flowrl.runtime import derive_seed
from flowrl.runtime import progress as progress_bar


class RatioCheckError(FlowRLError, RuntimeError):
    """Re-evaluated log-probs of a fresh rollout differ from the sampled ones."""


class RewardError(FlowRLError, RuntimeError):
    """The env returned a non-finite reward."""


class FlowPPO:
    """The learner: policy + critic + optimizers; ``update(rollout)`` returns metrics."""

    def __init__(self, policy: FlowPolicy, critic: nn.Module, cfg: PPOConfig, device: torch.device, seed: int) -> None:
        self.policy, self.critic, self.cfg, self.device = policy, critic, cfg, device
        frozen = [name for name, p in policy.named_parameters() if not p.requires_grad]
        if frozen:
            raise ValueError(f"FlowPPO: policy parameters are frozen (requires_grad=False): {frozen[:3]}")
        groups: list[dict[str, Any]] = [{"params": list(policy.velocity.parameters()), "lr": cfg.actor_lr}]
        noise_params = list(policy.converter.parameters()) if policy.converter is not None else []
        if noise_params:
            groups.append({"params": noise_params, "lr": cfg.noise_lr})
        self.actor_opt = torch.optim.Adam(groups)
        self.critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr)
        self.generator = torch.Generator().manual_seed(derive_seed(seed, 2))
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
        return {
            "policy": self.policy.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.critic.load_state_dict(state["critic"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.generator.set_state(state["generator"])

    def update(self, rollout: Rollout) -> dict[str, float]:
        cfg, dev = self.cfg, self.device
        if not torch.isfinite(rollout.rewards).all():
            t, n = (~torch.isfinite(rollout.rewards)).nonzero()[0].tolist()
            raise RewardError(
                f"the env returned reward {rollout.rewards[t, n].item()} at policy step {t} of env {n}; "
                "fix the env's reward (flowrl does not replace bad rewards)"
            )
        T, N = rollout.rewards.shape
        obs, next_obs = rollout.obs.to(dev), rollout.next_obs.to(dev)
        with torch.no_grad():
            values = self.critic(obs.flatten(0, 1)).view(T, N)
            next_values = self.critic(next_obs.flatten(0, 1)).view(T, N)
        dones = rollout.terminated | rollout.truncated
        adv, returns = gae(
            rollout.rewards.to(dev),
            values,
            next_values,
            rollout.terminated.to(dev),
            dones.to(dev),
            cfg.gamma,
            cfg.gae_lambda,
        )
        b_obs, b_chains = obs.flatten(0, 1), rollout.chains.to(dev).flatten(0, 1)
        b_masks, b_old_lp = rollout.masks.to(dev).flatten(0, 1), rollout.log_probs.to(dev).flatten(0, 1)
        b_adv, b_ret, b_val = adv.flatten(), returns.flatten(), values.flatten()
        ratio_dev = self.check_ratio(b_obs, b_chains, b_masks, b_old_lp)

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
                log_prob, entropy = self.policy.log_prob(b_obs[mb], b_chains[mb], b_masks[mb])
                pg_loss, pg_metrics = clipped_surrogate(log_prob, b_old_lp[mb], mb_adv, cfg.clip)
                entropy_mean = entropy.mean()
                loss = pg_loss - cfg.entropy_coef * entropy_mean
                self.actor_opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.actor_opt.step()

                v_loss, v_metrics = value_loss(self.critic(b_obs[mb]), b_ret[mb], b_val[mb], cfg.value_clip)
                self.critic_opt.zero_grad(set_to_none=True)
                v_loss.backward()
                nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
                self.critic_opt.step()

                for key, value in {
                    "losses/policy": pg_loss.item(),
                    "losses/value": v_loss.item(),
                    "losses/entropy": entropy_mean.item(),
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

    @torch.no_grad()
    def check_ratio(self, obs: Tensor, chains: Tensor, masks: Tensor, old_log_prob: Tensor) -> float:
        """Before any update, recomputed log-probs must reproduce the sampled ones (ratio = 1)."""
        new_log_prob, _ = self.policy.log_prob(obs, chains, masks)
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
    policy: FlowPolicy,
    critic: nn.Module,
    device: torch.device,
    resume: dict[str, Any] | None = None,
    progress: bool = True,
    collector: Collector | None = None,
) -> dict[str, Any]:
    """Fine-tune ``policy`` with PPO; returns {"before": eval metrics, "after": eval metrics}.

    ``resume``: a checkpoint written by this function; training continues after its iteration.
    """
    env = cfg.env
    policy.to(device)
    critic.to(device)
    learner = FlowPPO(policy, critic, cfg.ppo, device, cfg.seed)
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
                **velocity_record(policy.velocity, cfg.policy),
            },
            run_dir / "checkpoints" / "last.pt",
        )

    try:
        if before is None:
            before = evaluate()
            log.log(0, before, iteration=0)
            tqdm.write(
                f"before fine-tuning: success {before['eval/success_rate']:.2f}, return {before['eval/return']:.3f}"
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
            metrics = learner.update(rollout)
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
    atomic_save(velocity_record(policy.velocity, cfg.policy), run_dir / "policy.pt")
    return {"before": before, "after": last_eval}
