"""What DiffusionNFT (nft.py) and AWM (awm.py) share: likelihood-free fine-tuning on the
forward process.

Collection: GRPO's groups (every env runs one episode from its group's shared reset; an
image prompt is drawn ``group_size`` times), each action chunk or image sampled with the
policy's deterministic ODE and its solver (``mdp.solver``: Euler, Heun, DPM-Solver++(2M)).
Nothing but the clean sample is stored: the samples are ``Transitions`` with S = 0
stochastic steps (no log-probs), so the trainer skips its ratio = 1 check
(``stores_log_probs = False``).

Training: every kept sample x (its episode's group-normalised outcome as advantage, GRPO's
``episode_advantages``) is noised again by the forward process at every time t_0..t_{K-1} of
the sampler's grid, with fresh noise eps: x_t = (1 - t) eps + t x, target velocity x - eps
(flowrl's convention, the same as pretraining, ``flowrl.algos.flow_bc``). Each algorithm
turns the velocity predicted there into its loss; optional regularisers ``beta * mean
||v_theta - v_ref||^2`` keep the field near the reference (the initial policy, a frozen copy)
and ``old_coef * mean ||v_theta - v_old||^2`` near the policy that collected the rollout (a
trust region, AWM's ``ema_beta``).

Negative advantages and many steps per rollout. Near a point x_t where most samples have a
negative advantage (local mean weight m < 0), the update's minimiser moves the field away from
those samples by a step proportional to its own distance from them (NFT: v - v* grows by
1 + |m| / nft_beta; AWM with its proximal term: by old_coef / (old_coef - |m|)); the next
rollout starts from there, so over iterations the field runs off geometrically. The papers take
one optimiser step per rollout; with epochs of minibatch steps (the quickstarts: ~40) each
iteration reaches that minimiser. ``adv_mode: positive`` (DiffusionNFT's positive_only)
zeroes the negative advantages: every weight is >= 0 and the update contracts towards the
better samples (README, "Likelihood-free fine-tuning", measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowrl.algos.grpo import kept_group_steps
from flowrl.algos.policy_gradient import CheckpointState, NonFiniteGuard, guarded_step, update_obs_stats
from flowrl.config import LikelihoodFreeConfig
from flowrl.core.batch import TensorBatch
from flowrl.core.transitions import Transitions
from flowrl.models.policy import Policy, frozen_copy
from flowrl.rollout.rollout import Collector, Rollout
from flowrl.runtime import derive_seed


def ode_transitions(final: Tensor, nfe: Tensor) -> Transitions:
    """A sample of the deterministic ODE as ``Transitions`` with no stochastic step:
    ``final [B, *E]``, ``nfe [B]``; x_in, x_out ``[B, 0, *E]``, steps and log_prob ``[B, 0]``."""
    b, event = final.shape[0], final.shape[1:]
    empty = final.new_zeros((b, 0, *event))
    return Transitions(
        final=final,
        x_in=empty,
        x_out=empty.clone(),
        steps=torch.zeros((b, 0), dtype=torch.long, device=final.device),
        log_prob=torch.zeros((b, 0), device=final.device),
        nfe=nfe.to(final.device, torch.float32),
    )


class ODESampling(nn.Module):
    """A flow policy (FlowPolicy, TextImagePolicy) that samples with its deterministic ODE on
    the training grid, with its solver, and stores no log-probs. Collectors (in process, Ray
    env workers, the prompt collector) see a policy whose ``sample`` returns ``Transitions``
    with S = 0."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.policy = policy

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.policy.event_shape)

    @torch.no_grad()
    def sample(
        self, cond, iteration: int = 0, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Transitions:
        """ODE samples for ``cond`` ``[B, ...]`` from ``noise [B, *E]`` (default N(0, I) drawn with
        ``generator``); ``iteration`` is unused (no window)."""
        b = cond.shape[0]
        if noise is None:
            noise = torch.randn((b, *self.event_shape), generator=generator, device=cond.device)
        final, nfe = self.policy.sampler.ode(self.policy.velocity, cond, noise)
        return ode_transitions(final, nfe)


@dataclass
class ForwardBatch:
    """The kept samples, flattened: ``[M]`` (env steps of episodes in groups with signal, or images)."""

    cond: Any
    samples: TensorBatch
    advantages: Tensor


@dataclass
class NoisedRows:
    """Samples noised again by the forward process, one row per (sample, grid time): ``[R]``.

    cond ``[R, ...]``, x1 the clean sample ``[R, *E]``, t ``[R]``, eps ``[R, *E]``, x_t =
    (1 - t) eps + t x1, target = x1 - eps, advantages ``[R]`` (the sample's)."""

    cond: Any
    x1: Tensor
    t: Tensor
    eps: Tensor
    x_t: Tensor
    target: Tensor
    advantages: Tensor


def forward_noise(x1: Tensor, t: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """The forward process at ``t`` ``[R]``: ``(x_t, target)`` with x_t = (1 - t) eps + t x1 and
    the conditional velocity x1 - eps (``[R, *E]``, the pretraining loss's path and target)."""
    tb = t.view(-1, *([1] * (x1.ndim - 1)))
    return (1.0 - tb) * eps + tb * x1, x1 - eps


def noised_rows(cond, x1: Tensor, advantages: Tensor, times: Tensor, generator: torch.Generator) -> NoisedRows:
    """Every sample of ``x1 [m, *E]`` at each of ``times [K]``, sample-major (rows i K .. i K + K - 1
    are sample i), with fresh noise drawn with ``generator`` (on the CPU, moved to x1's device)."""
    m, k = x1.shape[0], times.shape[0]
    idx = torch.arange(m, device=x1.device).repeat_interleave(k)
    t = times.to(x1.device, x1.dtype).repeat(m)
    eps = torch.randn((m * k, *x1.shape[1:]), generator=generator).to(x1.device, x1.dtype)
    x1_rows = x1[idx]
    x_t, target = forward_noise(x1_rows, t, eps)
    return NoisedRows(cond[idx], x1_rows, t, eps, x_t, target, advantages[idx])


def mode_advantages(advantages: Tensor, mode: str) -> Tensor:
    """``adv_mode``: "all" keeps the advantages ``[N]``; "positive" sets those below 0 to 0, so a
    sample worse than its group's mean neither pulls nor pushes (NFT: r = 1/2, whose loss is
    stationary at v_theta = v_old; AWM: weight 0)."""
    return advantages.clamp(min=0.0) if mode == "positive" else advantages


def matching_error(v: Tensor, target: Tensor) -> Tensor:
    """Per-row flow-matching error ``mean over the event dims of (v - target)^2``: ``[R, *E] -> [R]``."""
    return (v - target).pow(2).flatten(1).mean(dim=1)


class LikelihoodFreeAlgorithm(CheckpointState):
    """Collection with the ODE in groups, group advantages, epochs of minibatch steps on
    forward-noised samples; subclasses give ``row_loss`` (and may sample with another policy,
    ``sampling_policy``, and act after each update, ``after_update``).

    Members named in ``checkpoint_state`` (modules, optimisers, generators) are the checkpoint;
    one that is None here (no reference) is neither saved nor loaded.
    """

    name = "likelihood-free"
    stores_log_probs = False  # no log-probs: the trainer's ratio = 1 check does not apply
    checkpoint_state: tuple[str, ...] = ("policy", "actor_opt", "generator", "reference")

    def __init__(
        self,
        policy: Policy,
        cfg: LikelihoodFreeConfig,
        device: torch.device,
        seed: int,
        group_size: int,
        running_obs_stats: bool = False,
        bounds: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """``bounds``: (low, high) broadcastable to a sample ``[*E]`` (a Box action space per
        action dim, the image's pixel range), or None; see ``prepare``."""
        self.policy, self.cfg, self.device, self.group_size = policy, cfg, device, group_size
        self.bounds = None if bounds is None else (bounds[0].to(device), bounds[1].to(device))
        self.running_obs_stats = running_obs_stats
        self.params = list(policy.velocity.parameters())
        self.actor_opt = torch.optim.Adam(self.params, lr=cfg.actor_lr)
        self.guard = NonFiniteGuard(
            cfg.max_skipped_updates, f"the learning rate is likely too high (algo.actor_lr={cfg.actor_lr:g})"
        )
        self.generator = torch.Generator().manual_seed(derive_seed(seed, 2))
        self.reference = frozen_copy(policy) if cfg.beta > 0 else None
        # the proximal term's v_old: the policy that collected the rollout (``anchor_policy``)
        self._snapshot = frozen_copy(policy) if cfg.old_coef > 0 else None
        self._stats: dict[str, float] = {}

    # ------------------------------------------------------------------ the Trainer's protocol
    def set_progress(self, fraction_done: float) -> None:
        scale = 1.0 - fraction_done if self.cfg.lr_schedule == "linear" else 1.0
        for group in self.actor_opt.param_groups:
            group["lr"] = self.cfg.actor_lr * scale

    def sampling_policy(self, policy: Policy) -> Policy:
        """The policy that collects (the trainer's rollout copy of the trained one by default)."""
        return policy

    def collect(self, collector: Collector, policy: Policy, iteration: int) -> Rollout:
        """One episode per env from its group's shared reset state (one image per prompt draw),
        sampled with the deterministic ODE."""
        return collector.collect_episodes(ODESampling(self.sampling_policy(policy)), self.cfg.max_steps, iteration)

    def prepare(self, rollout: Rollout) -> ForwardBatch:
        """Episode outcomes -> group advantages (ties dropped) -> the kept samples, flattened."""
        assert rollout.episode_return is not None and rollout.episode_success is not None
        outcome = rollout.episode_return if self.cfg.outcome == "return" else rollout.episode_success.float()
        adv, steps, self._stats = kept_group_steps(rollout, outcome, self.group_size, self.cfg.adv_eps)
        adv = mode_advantages(adv, self.cfg.adv_mode)
        dev = self.device
        samples = rollout.samples[steps].to(dev)
        if self.bounds is not None:
            # Train on what the env executed (it clips actions, the reward clamps pixels): beyond
            # the bounds an outcome does not change, so nothing would stop samples drifting there.
            samples.final = torch.maximum(torch.minimum(samples.final, self.bounds[1]), self.bounds[0])
        return ForwardBatch(
            cond=rollout.obs[steps].to(dev),
            samples=samples,
            advantages=adv.unsqueeze(0).expand_as(steps)[steps].to(dev),
        )

    def update(self, batch: ForwardBatch, iteration: int) -> dict[str, float]:
        """Epochs of minibatch steps over the kept samples, then ``after_update``; returns metrics."""
        cfg = self.cfg
        size = batch.advantages.shape[0]
        metrics = dict(self._stats)
        if size > 0:
            if self._snapshot is not None:
                self._snapshot.load_state_dict(self.policy.state_dict())
            history: dict[str, list[float]] = {}
            times = self.policy.sampler.grid[:-1]  # the times the sampler queries the field
            for _ in range(cfg.epochs):
                perm = torch.randperm(size, generator=self.generator).to(self.device)
                for start in range(0, size, cfg.minibatch_size):
                    mb = perm[start : start + cfg.minibatch_size]
                    final, adv = batch.samples.final[mb], batch.advantages[mb]
                    rows = noised_rows(batch.cond[mb], final, adv, times, self.generator)
                    for key, value in self._step(rows, iteration).items():
                        history.setdefault(key, []).append(value)
            metrics.update({k: float(np.mean(v)) for k, v in history.items()})
            metrics["train/advantage_std"] = batch.advantages.std().item() if size > 1 else 0.0
            if self.running_obs_stats:
                update_obs_stats(batch.cond, self.policy)
        metrics["train/epochs"] = float(cfg.epochs if size > 0 else 0)
        metrics["train/skipped_updates"] = float(self.guard.pop_skipped())
        metrics.update(self.after_update(iteration))
        return metrics

    # ------------------------------------------------------------------ what subclasses give
    def row_loss(self, rows: NoisedRows, v: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The algorithm's loss (a scalar) from the velocity ``v [R, *E]`` predicted at the rows."""
        raise NotImplementedError

    def after_update(self, iteration: int) -> dict[str, float]:
        """What happens after the update of ``iteration`` (NFT: the old policy's soft update)."""
        return {}

    def anchor_policy(self) -> Policy | None:
        """The policy of the proximal term (``old_coef``): by default a snapshot of the trained
        policy taken before each update, i.e. the one that collected the rollout."""
        return self._snapshot

    # ------------------------------------------------------------------ one step
    def _step(self, rows: NoisedRows, iteration: int) -> dict[str, float]:
        """One optimiser step on ``rows``: the algorithm's loss plus the reference regulariser."""
        v = self.policy.velocity(rows.cond, rows.x_t, rows.t, rows.t)
        loss, logged = self.row_loss(rows, v)
        logged = {"losses/policy": loss.item(), **logged}
        if self.reference is not None:
            with torch.no_grad():
                v_ref = self.reference.velocity(rows.cond, rows.x_t, rows.t, rows.t)
            reg = (v - v_ref).pow(2).mean()
            loss = loss + self.cfg.beta * reg
            logged["losses/kl_ref"] = reg.item()
        anchor = self.anchor_policy() if self.cfg.old_coef > 0 else None
        if anchor is not None:
            with torch.no_grad():
                v_anchor = anchor.velocity(rows.cond, rows.x_t, rows.t, rows.t)
            prox = (v - v_anchor).pow(2).mean()
            loss = loss + self.cfg.old_coef * prox
            logged["losses/old_prox"] = prox.item()
        grad_norm = guarded_step(self.actor_opt, self.params, loss, self.cfg.max_grad_norm, self.guard, iteration)
        return {**logged, "train/grad_norm": grad_norm}
