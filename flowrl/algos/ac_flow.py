"""AC-Flow (Fan et al. 2025, "Fine-tuning Flow Matching Generative Models with Intermediate
Feedback"): an actor-critic for flow policies that needs no log-prob ratio.

- **Critic over the chain.** ``ChainCritic`` values the intermediate states of the denoising
  chain, V(x_t, t, obs), not only the final action chunk: it regresses the (shaped)
  reward-to-go G of the env step at every stored state x_t, so an advantage can say which
  denoising steps moved the chain toward a good outcome (credit assignment across steps).
- **Reward shaping.** G is standardised over the iteration's env steps (mean 0, std 1), so
  the critic's target and the advantages stay of order 1 whatever the env's reward scale.
- **Dual stability.** Advantages along the chain (GAE over the denoising steps,
  ``chain_lambda``) are clipped to ``[-adv_clip, adv_clip]``, and the first
  ``critic_warmup_iterations`` train only the critic: the actor is steered only by a critic
  that has matured.
- **Generalised critic weighting + W2.** The actor minimises
  ``E[w(A) ||v(x̃_t, t) - (x_1 - x_0)||² + w2_coef ||v(x̃_t, t) - v_ref(x̃_t, t)||²]`` over the
  policy's own final samples x_1, at the times t of the chain's stored steps, with fresh noise
  x_0 and x̃_t = (1 - t) x_0 + t x_1 (the flow-matching path), ``w(A) = exp(A / temperature)``.
  With ``w = exp(beta * reward)`` this is ORW-CFM-W2 (Fan et al., ICLR 2025), reward-weighted
  regression for flows; the critic's advantage replaces the outcome reward. The second term
  bounds W2 between the policy's and the initial policy's samples (their velocities compared
  at the same points), which keeps the policy's diversity.

Exploration comes from the policy's fixed-noise converter (flow_sde or cps), whose stored
chains also carry log-probs: the trainer's ratio = 1 check still verifies them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowrl.algos.policy_gradient import NonFiniteGuard, PolicyGradientAlgorithm, guarded_step, update_obs_stats
from flowrl.config import ACFlowConfig
from flowrl.core.batch import TensorBatch
from flowrl.models.networks import ObsNormalizer, SinusoidalTimeEmbedding, copy_obs_stats
from flowrl.models.policy import Policy, frozen_copy
from flowrl.models.text_image import PAD, TextImageVelocity
from flowrl.rollout.rollout import Collector, Rollout
from flowrl.runtime import derive_seed


class ChainCritic(nn.Module):
    """V(x_t, t, obs): ``obs [B, O], x [B, *E], t [B] -> [B]``; an MLP with LayerNorm (the
    paper's lightweight critic) on the normalised observation, the flattened state and sinusoidal
    time features."""

    def __init__(
        self, obs_dim: int, event_shape: Sequence[int], hidden_dims: Sequence[int], time_embed_dim: int = 32
    ) -> None:
        super().__init__()
        self.obs_norm = ObsNormalizer(obs_dim)
        self.time_embed = SinusoidalTimeEmbedding(time_embed_dim)
        dim = obs_dim + int(np.prod(event_shape)) + time_embed_dim
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers += [nn.Linear(dim, width), nn.LayerNorm(width), nn.SiLU()]
            dim = width
        layers.append(nn.Linear(dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: Tensor, x: Tensor, t: Tensor) -> Tensor:
        features = torch.cat([self.obs_norm(obs), x.flatten(1), self.time_embed(t)], dim=1)
        return self.net(features).squeeze(-1)


class ImageChainCritic(nn.Module):
    """V(x_t, t, caption) for the image model: ``ids [B, L], x [B, C, H, W], t [B] -> [B]``. The
    caption's mean token embedding, a strided CNN's features of the image being denoised and
    time features go through an MLP with LayerNorm."""

    def __init__(
        self, vocab_size: int, image_size: int, image_channels: int, hidden_dims: Sequence[int], width: int = 16
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width, padding_idx=PAD)
        self.conv = nn.Sequential(
            nn.Conv2d(image_channels, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
        )
        self.time_embed = SinusoidalTimeEmbedding(32)
        dim = width + width * (image_size // 4) ** 2 + 32
        layers: list[nn.Module] = []
        for hidden in hidden_dims:
            layers += [nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.SiLU()]
            dim = hidden
        layers.append(nn.Linear(dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, ids: Tensor, x: Tensor, t: Tensor) -> Tensor:
        keep = (ids != PAD).unsqueeze(-1).to(x.dtype)
        caption = (self.tokens(ids) * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # the empty caption pools to 0
        features = torch.cat([caption, self.conv(x), self.time_embed(t)], dim=1)
        return self.net(features).squeeze(-1)


def chain_critic(actor: nn.Module, hidden_dims: Sequence[int]) -> ChainCritic | ImageChainCritic:
    """A critic for ``actor``'s chains: on captions and images for the image model, else on
    observations normalised with the actor's statistics."""
    if isinstance(actor, TextImageVelocity):
        c = actor.config
        return ImageChainCritic(c["vocab_size"], c["image_size"], c["image_channels"], hidden_dims)
    critic = ChainCritic(actor.obs_dim, actor.event_shape, hidden_dims)
    copy_obs_stats(actor, critic)
    return critic


# --------------------------------------------------------------------------- pure functions
def reward_to_go(rewards: Tensor, valid: Tensor, gamma: float) -> Tensor:
    """``rewards, valid [T, N] -> [T, N]``: sum_{j >= t} gamma^(j - t) r_j over each env's
    episode (invalid steps count 0: the episode ended, or was cut at the step budget)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        running = torch.where(valid[t], rewards[t] + gamma * running, torch.zeros_like(running))
        out[t] = running
    return out


def shape_rewards(returns: Tensor, how: str, eps: float = 1e-8) -> Tensor:
    """AC-Flow's reward shaping: ``standardize`` makes ``returns [B]`` mean 0, std 1 (population
    std; all equal -> all 0); ``none`` returns them as they are."""
    if how == "none":
        return returns
    centred = returns - returns.mean()
    return centred / (centred.pow(2).mean().sqrt() + eps)


def chain_advantages(values: Tensor, outcome: Tensor, lam: float) -> Tensor:
    """GAE over the denoising chain: ``values [B, S]`` of the stored states (in step order) and
    the shaped ``outcome [B]`` as the value after the last step (no reward in between).
    delta_s = V_{s+1} - V_s, A_s = sum_j lam^(j - s) delta_j. lam = 1: A_s = outcome - V_s."""
    next_values = torch.cat([values[:, 1:], outcome.unsqueeze(1)], dim=1)
    deltas = next_values - values
    adv = torch.zeros_like(values)
    running = torch.zeros_like(outcome)
    for s in reversed(range(values.shape[1])):
        running = deltas[:, s] + lam * running
        adv[:, s] = running
    return adv


def critic_weights(advantages: Tensor, clip: float, temperature: float, form: str) -> tuple[Tensor, dict[str, float]]:
    """Clipped advantages -> critic weights of the same shape (see ``ACFlowConfig.weighting``);
    returns ``(weights, metrics)`` with the fraction of clipped advantages."""
    clipped = advantages.clamp(-clip, clip)
    weights = torch.exp(clipped / temperature)
    if form == "normalized_exp":
        weights = weights / weights.mean()
    metrics = {
        "acflow/adv_clip_frac": float((advantages.abs() > clip).float().mean()),
        "acflow/weight_mean": float(weights.mean()),
        "acflow/weight_max": float(weights.max()),
    }
    return weights, metrics


VelocityFn = Callable[[Any, Tensor, Tensor], Tensor]  # (cond, x [M, *E], t [M]) -> [M, *E]


def critic_weighted_loss(
    velocity: VelocityFn,
    reference: VelocityFn | None,
    cond: Any,
    final: Tensor,
    t: Tensor,
    weights: Tensor,
    noise: Tensor,
    w2_coef: float,
) -> tuple[Tensor, dict[str, float]]:
    """The actor's loss on M points: ``final [M, *E]`` the samples x_1, ``t [M]``, ``weights [M]``,
    ``noise [M, *E]`` the x_0 of the path x̃_t = (1 - t) x_0 + t x_1, ``cond`` M rows.

    mean_m( w_m * mean_dims (v(x̃_t) - (x_1 - x_0))² + w2_coef * mean_dims (v(x̃_t) - v_ref(x̃_t))² )."""
    tb = t.view(-1, *([1] * (final.ndim - 1)))
    x_t = (1.0 - tb) * noise + tb * final
    v = velocity(cond, x_t, t)
    fm = (v - (final - noise)).pow(2).flatten(1).mean(1)
    loss = (weights * fm).mean()
    metrics = {"losses/fm": float(fm.mean().detach()), "losses/policy": float(loss.detach())}
    if reference is not None and w2_coef > 0:
        with torch.no_grad():
            v_ref = reference(cond, x_t, t)
        w2 = (v - v_ref).pow(2).flatten(1).mean(1).mean()
        loss = loss + w2_coef * w2
        metrics["losses/w2"] = float(w2.detach())
    return loss, metrics


# --------------------------------------------------------------------------- the algorithm
@dataclass
class ACFlowBatch:
    """The valid env steps of one rollout, flattened: ``[B]`` rows, each with its chain's S
    stored states. times ``[B, S]``; returns ``[B]`` shaped; weights ``[B, S]`` critic weights."""

    cond: Tensor
    samples: TensorBatch
    times: Tensor
    returns: Tensor
    weights: Tensor


class _Optimizers:
    """Adam for the actor's network and the critic, the learning-rate schedule, the guard."""

    def __init__(self, policy: Policy, critic: nn.Module, cfg: ACFlowConfig) -> None:
        groups = policy.param_groups()
        if set(groups) != {"actor"}:
            raise ValueError("AC-Flow trains no noise net: use a fixed-noise converter (flow_sde or cps)")
        self.opt = torch.optim.Adam(groups["actor"], lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr)
        self.cfg = cfg
        self.guard = NonFiniteGuard(
            cfg.max_skipped_updates, f"the learning rates are likely too high (algo.actor_lr={cfg.actor_lr:g})"
        )
        for opt in (self.opt, self.critic_opt):
            for group in opt.param_groups:
                group["base_lr"] = group["lr"]

    def set_progress(self, fraction_done: float) -> None:
        scale = 1.0 - fraction_done if self.cfg.lr_schedule == "linear" else 1.0
        for opt in (self.opt, self.critic_opt):
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale


class ACFlow(PolicyGradientAlgorithm):
    """Policy + chain critic + a frozen reference (for W2). ``collect`` (one episode per env)
    -> ``prepare`` (shaped reward-to-go, critic advantages, weights) -> ``update``."""

    name = "AC-Flow"
    checkpoint_state = ("policy", "critic", "actor_opt", "critic_opt", "generator", "reference")

    def __init__(
        self,
        policy: Policy,
        critic: ChainCritic | ImageChainCritic,
        cfg: ACFlowConfig,
        device: torch.device,
        seed: int,
        running_obs_stats: bool = False,
    ) -> None:
        self.policy, self.critic, self.cfg, self.device = policy, critic, cfg, device
        self.running_obs_stats = running_obs_stats
        self.optimizer = _Optimizers(policy, critic, cfg)
        self.critic_opt = self.optimizer.critic_opt
        self.generator = torch.Generator().manual_seed(derive_seed(seed, 2))
        self.reference = frozen_copy(policy) if cfg.w2_coef > 0 else None
        self._stats: dict[str, float] = {}

    def _velocity(self, policy: Policy) -> VelocityFn:
        return lambda cond, x, t: policy.velocity(cond, x, t, t)

    def collect(self, collector: Collector, policy: Policy, iteration: int) -> Rollout:
        """One episode per env, of at most ``max_steps`` policy steps."""
        return collector.collect_episodes(policy, self.cfg.max_steps, iteration)

    def prepare(self, rollout: Rollout) -> ACFlowBatch:
        """Shaped reward-to-go of the valid env steps, the critic's values of their chains'
        stored states, advantages along each chain, clipped, and their weights."""
        cfg, dev = self.cfg, self.device
        steps = rollout.valid
        returns = reward_to_go(rollout.rewards.double(), steps, cfg.gamma)[steps].float()
        shaped = shape_rewards(returns, cfg.reward_shaping).to(dev)
        cond, samples = rollout.obs[steps].to(dev), rollout.samples[steps].to(dev)
        times = self.policy.sampler.grid[samples.steps]  # [B, S]
        with torch.no_grad():
            values = self._values(cond, samples.x_in, times)
        adv = chain_advantages(values, shaped, cfg.chain_lambda)
        weights, stats = critic_weights(adv, cfg.adv_clip, cfg.temperature, cfg.weighting)
        stats.update(
            {
                "acflow/return_mean": float(returns.mean()) if returns.numel() else 0.0,
                "acflow/advantage_std": float(adv.std()) if adv.numel() > 1 else 0.0,
                "acflow/value_mean": float(values.mean()) if values.numel() else 0.0,
            }
        )
        self._stats = stats
        return ACFlowBatch(cond=cond, samples=samples, times=times, returns=shaped, weights=weights)

    def _values(self, cond: Tensor, x_in: Tensor, times: Tensor) -> Tensor:
        """V of every stored state: ``cond [B, O], x_in [B, S, *E], times [B, S] -> [B, S]``."""
        b, s = times.shape
        return self.critic(cond.repeat_interleave(s, 0), x_in.flatten(0, 1), times.reshape(-1)).view(b, s)

    def update(self, batch: ACFlowBatch, iteration: int) -> dict[str, float]:
        """Epochs of minibatches: a critic step on each, and an actor step once the critic's
        warm-up is over."""
        cfg = self.cfg
        train_actor = iteration >= cfg.critic_warmup_iterations
        size = batch.returns.shape[0]
        history: dict[str, list[float]] = {}
        for _ in range(cfg.epochs if size else 0):
            perm = torch.randperm(size, generator=self.generator).to(self.device)
            for start in range(0, size, cfg.minibatch_size):
                logged = self._minibatch(batch, perm[start : start + cfg.minibatch_size], iteration, train_actor)
                for key, value in logged.items():
                    history.setdefault(key, []).append(value)
        metrics = {**self._stats, **{k: float(np.mean(v)) for k, v in history.items()}}
        if size:
            with torch.no_grad():
                values = self._values(batch.cond, batch.samples.x_in, batch.times)
            target = batch.returns.unsqueeze(1).expand_as(values)
            metrics["train/explained_variance"] = float(1 - (target - values).var() / (target.var() + 1e-8))
        metrics["acflow/actor_trained"] = float(train_actor)
        metrics["train/skipped_updates"] = float(self.optimizer.guard.pop_skipped())
        if self.running_obs_stats:
            update_obs_stats(batch.cond, self.policy, self.critic)
        return metrics

    def _minibatch(self, batch: ACFlowBatch, mb: Tensor, iteration: int, train_actor: bool) -> dict[str, float]:
        """A critic step (every stored state regresses its env step's shaped return) and, after
        the warm-up, an actor step on the critic-weighted loss at the same chain times."""
        cfg, guard = self.cfg, self.optimizer.guard
        cond, samples, times = batch.cond[mb], batch.samples[mb], batch.times[mb]
        s = times.shape[1]
        values = self._values(cond, samples.x_in, times)
        v_loss = (values - batch.returns[mb].unsqueeze(1)).pow(2).mean()
        guarded_step(self.critic_opt, self.critic.parameters(), v_loss, cfg.max_grad_norm, guard, iteration, "value")
        logged = {"losses/value": float(v_loss.detach())}
        if not train_actor:
            return logged
        final = samples.final.repeat_interleave(s, 0)  # one flow-matching point per stored step
        noise = torch.randn(final.shape, generator=self.generator).to(final.device)
        reference = self._velocity(self.reference) if self.reference is not None else None
        loss, actor_metrics = critic_weighted_loss(
            self._velocity(self.policy),
            reference,
            cond.repeat_interleave(s, 0),
            final,
            times.reshape(-1),
            batch.weights[mb].reshape(-1),
            noise,
            cfg.w2_coef,
        )
        grad_norm = guarded_step(
            self.optimizer.opt, self.optimizer.opt.param_groups[0]["params"], loss, cfg.max_grad_norm, guard, iteration
        )
        return {**logged, **actor_metrics, "train/grad_norm": grad_norm}
