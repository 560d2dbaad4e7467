"""GRPO: group-relative policy optimisation without a critic (Flow-GRPO, MixGRPO, piRL's
GRPO on robots).

On robots every env runs one episode per iteration; groups of ``env.group_size`` envs reset
from the same seed and so start from the same state. An episode's outcome (its return or
its success) normalised within its group, ``(r - mean_g) / (std_g + eps)``, is the advantage
of every step of that episode. Groups whose outcomes all tie carry no signal and are
dropped (and counted). The loss is the clipped surrogate over the policy's samples (whole
chains or single denoising steps, ``mdp.sample_unit``), plus ``beta`` times the KL of each
stochastic step's Gaussian to the reference policy's, ``||mean - mean_ref||² / (2 std²)``
when the stds agree (Flow-GRPO), minus an optional entropy bonus for a learned noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.algos.policy_gradient import (
    MetricHistory,
    PolicyGradientAlgorithm,
    PolicyOptimizer,
    event_numel,
    pg_samples,
    run_epochs,
    update_obs_stats,
)
from flowrl.config import GRPOConfig
from flowrl.core.advantages import group_advantages
from flowrl.core.batch import TensorBatch
from flowrl.core.losses import clipped_surrogate
from flowrl.core.steps import gaussian_kl
from flowrl.core.transitions import unit_values
from flowrl.errors import FlowRLError
from flowrl.models.policy import Evaluation, Policy, frozen_copy
from flowrl.rewards.multi import combined_group_advantages
from flowrl.rollout.rollout import Collector, Rollout
from flowrl.runtime import derive_seed


def episode_advantages(
    outcome: Tensor, group: Tensor, group_size: int, eps: float, std: str = "group"
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Group-normalised outcomes of N episodes.

    outcome ``[N]``; group ``[N]`` (group ids, ``group_size`` consecutive envs each). ``std``:
    "group" divides by each group's std, "global" by the (population) std of all N outcomes
    (Flow-GRPO's ``global_std``); the mean is the group's either way.
    Returns ``(advantages [N], keep [N] bool, stats)``: ``keep`` is False for the episodes of
    groups whose outcomes all tie (no signal).
    """
    _check_groups(group, group_size)
    grouped = outcome.view(-1, group_size).double()
    adv, has_signal = group_advantages(grouped, eps)
    if std == "global":
        centred = grouped - grouped.mean(dim=1, keepdim=True)
        adv = centred / (grouped.std(unbiased=False) + eps)
    return adv.reshape(-1).to(outcome.dtype), *_kept(has_signal, group_size)


def per_reward_advantages(
    components: dict[str, Tensor], weights: dict[str, float], group: Tensor, group_size: int, eps: float
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """``episode_advantages`` of several rewards (a multi reward with ``advantages:
    per_reward``): each reward's scores ``[N]`` normalised within its group, times its weight,
    summed (``combined_group_advantages``), so a reward of large scale does not drown the
    others. A group is dropped when every reward ties within it."""
    _check_groups(group, group_size)
    adv = combined_group_advantages(components, weights, group, eps)
    grouped = torch.stack(list(components.values())).view(len(components), -1, group_size)  # [R, G, n]
    has_signal = (grouped != grouped[..., :1]).any(dim=2).any(dim=0)
    return adv, *_kept(has_signal, group_size)


def kept_group_steps(
    rollout: Rollout, outcome: Tensor, group_size: int, eps: float, std: str = "group"
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """What GRPO-style algorithms share: each episode's group advantage ``[N]`` (per reward where
    the rollout has reward components; the config allows them only with outcome: return), the
    steps ``[T, N]`` of the groups with signal (tied groups dropped) and the ``grpo/*`` statistics."""
    if rollout.reward_components is not None:
        assert rollout.reward_weights is not None
        adv, keep, stats = per_reward_advantages(
            rollout.reward_components, rollout.reward_weights, rollout.group, group_size, eps
        )
    else:
        adv, keep, stats = episode_advantages(outcome, rollout.group, group_size, eps, std)
    steps = rollout.valid & keep.unsqueeze(0)
    assert rollout.episode_done is not None
    stats["grpo/outcome_mean"] = float(outcome.mean())
    stats["grpo/unfinished_episodes"] = float((~rollout.episode_done).sum())
    stats["grpo/kept_steps"] = float(steps.sum())
    return adv, steps, stats


def _check_groups(group: Tensor, group_size: int) -> None:
    n = group.shape[0]
    if n % group_size or not bool((group == torch.arange(n, device=group.device) // group_size + group[0]).all()):
        raise ValueError("GRPO needs groups of group_size consecutive envs; the rollout's group ids disagree")


def _kept(has_signal: Tensor, group_size: int) -> tuple[Tensor, dict[str, float]]:
    keep = has_signal.repeat_interleave(group_size)
    return keep, {"grpo/groups": float(has_signal.numel()), "grpo/groups_dropped": float((~has_signal).sum())}


def normalised_log_prob(evaluation: Evaluation, old_mean: Tensor) -> Tensor:
    """GRPO-Guard's ratio normalisation: each stochastic step's log-prob ``[B, S]`` plus
    ``||mu_theta - mu_old||^2 / (2 sigma^2)``.

    For a Gaussian step with a fixed std (Flow-SDE, CPS) and x drawn from the old step, the
    log-ratio is ``eps . dmu / sigma - ||dmu||^2 / (2 sigma^2)``: its mean is negative and
    scales with 1 / sigma^2, so it differs from step to step and the clip stops binding where
    sigma is large. Adding the second term back leaves ``(x - mu_old) . dmu / sigma^2``, centred
    at 0 at every step, with the same gradient at the old parameters."""
    var = evaluation.std.pow(2)
    bias = ((evaluation.mean - old_mean).pow(2) / (2 * var)).flatten(2).sum(-1)
    return evaluation.log_prob + bias


def step_kl(policy: Policy, evaluation: Evaluation, reference: Evaluation) -> Tensor:
    """KL of every stochastic step's Gaussian to the reference's, reduced like the log-probs
    (per policy-gradient sample): ``[M]``."""
    b, s = evaluation.log_prob.shape
    kl = gaussian_kl(
        evaluation.mean.flatten(0, 1),
        evaluation.std.flatten(0, 1),
        reference.mean.flatten(0, 1),
        reference.std.flatten(0, 1),
    ).view(b, s)
    return unit_values(kl, policy.sample_unit, policy.log_prob_reduce, event_numel(policy))


@dataclass
class GRPOBatch:
    """The kept env steps, flattened: ``[B]`` (only steps of episodes in groups with signal)."""

    cond: Tensor
    samples: TensorBatch
    advantages: Tensor


class GRPO(PolicyGradientAlgorithm):
    """Policy + optimiser (+ a frozen reference when ``beta > 0``)."""

    name = "GRPO"
    # the checkpoint's keys, in order (reference only with beta > 0, ema only with ema_decay > 0)
    checkpoint_state = ("policy", "actor_opt", "generator", "reference", "ema")

    def __init__(
        self,
        policy: Policy,
        cfg: GRPOConfig,
        device: torch.device,
        seed: int,
        group_size: int,
        running_obs_stats: bool = False,
    ) -> None:
        self.policy, self.cfg, self.device, self.group_size = policy, cfg, device, group_size
        self.running_obs_stats = running_obs_stats
        self.optimizer = PolicyOptimizer(policy, cfg)
        self.generator = torch.Generator().manual_seed(derive_seed(seed, 2))
        self.reference = frozen_copy(policy) if cfg.beta > 0 else None
        self.ema = frozen_copy(policy) if cfg.ema_decay > 0 else None
        self._stats: dict[str, float] = {}
        # how a [B, S] per-step log-prob becomes the policy-gradient samples' (unit_values)
        self._unit = (policy.sample_unit, policy.log_prob_reduce, event_numel(policy))

    @property
    def eval_policy(self) -> Policy | None:
        """What evaluation samples: the EMA of the weights (``ema_decay > 0``), else None (the
        trained policy)."""
        return self.ema

    @torch.no_grad()
    def _update_ema(self) -> None:
        """``ema <- decay * ema + (1 - decay) * theta`` for every floating-point tensor of the state."""
        assert self.ema is not None
        decay = self.cfg.ema_decay
        trained = self.policy.state_dict()
        for name, value in self.ema.state_dict().items():
            if value.is_floating_point():
                value.lerp_(trained[name].to(value.device), 1.0 - decay)
            else:
                value.copy_(trained[name])

    @torch.no_grad()
    def _old_means(self, batch: GRPOBatch) -> Tensor:
        """The mean of every stored stochastic step under the rollout's parameters (before the
        first update), for the ratio normalisation; evaluated a minibatch at a time."""
        size, step = batch.cond.shape[0], self.cfg.minibatch_size
        chunks = [(batch.cond[i : i + step], batch.samples[i : i + step]) for i in range(0, size, step)]
        return torch.cat([self.policy.evaluate(cond, samples).mean for cond, samples in chunks])

    def collect(self, collector: Collector, policy: Policy, iteration: int) -> Rollout:
        """One episode per env from its group's shared reset state."""
        return collector.collect_episodes(policy, self.cfg.max_steps, iteration)

    def prepare(self, rollout: Rollout) -> GRPOBatch:
        """Episode outcomes -> group advantages -> the kept steps, flattened."""
        assert rollout.episode_return is not None and rollout.episode_success is not None
        outcome = self._outcome(rollout)
        adv, steps, self._stats = kept_group_steps(
            rollout, outcome, self.group_size, self.cfg.adv_eps, self.cfg.advantages.std
        )
        dev = self.device
        return GRPOBatch(
            cond=rollout.obs[steps].to(dev),
            samples=rollout.samples[steps].to(dev),
            advantages=adv.unsqueeze(0).expand_as(steps)[steps].to(dev),
        )

    def _outcome(self, rollout: Rollout) -> Tensor:
        """Each episode's score ``[N]`` (``algo.outcome``)."""
        assert rollout.episode_return is not None and rollout.episode_success is not None
        if self.cfg.outcome == "return":
            return rollout.episode_return
        if self.cfg.outcome == "success":
            return rollout.episode_success.float()
        once = getattr(rollout, "episode_success_once", None)
        if once is None:
            raise FlowRLError(
                "algo.outcome: success_once needs an env that reports success_once in its info (the ManiSkill "
                "tasks do); use algo.outcome=success or return for this env"
            )
        return once.float()

    def update(self, batch: GRPOBatch, iteration: int) -> dict[str, float]:
        """Epochs of minibatch policy steps over the kept env steps; returns metrics."""
        cfg = self.cfg
        size = batch.advantages.shape[0]
        metrics = dict(self._stats)
        if size == 0:  # every group tied: nothing to learn from this rollout
            if self.ema is not None:
                self._update_ema()
            return {**metrics, "train/epochs": 0.0, "train/kl_stop": 0.0}
        history = MetricHistory()
        old_mean = self._old_means(batch) if cfg.ratio_norm else None
        run = run_epochs(
            size,
            cfg,
            self.generator,
            self.device,
            lambda mb: self._minibatch(batch, mb, old_mean, iteration, history),
            self.data_parallel,
        )
        metrics.update(history.summary())
        metrics.update(run.metrics())
        metrics["train/skipped_updates"] = float(self.optimizer.guard.pop_skipped())
        metrics["train/advantage_std"] = batch.advantages.std().item() if size > 1 else 0.0
        if self.running_obs_stats:
            update_obs_stats(batch.cond, self.policy)
        if self.ema is not None:
            self._update_ema()
        return metrics

    def _minibatch(
        self, batch: GRPOBatch, mb: Tensor, old_mean: Tensor | None, iteration: int, history: MetricHistory
    ) -> dict[str, float]:
        """One policy step on the env steps ``mb`` ``[m]``; returns the surrogate's metrics."""
        cfg = self.cfg
        cond, samples = batch.cond[mb], batch.samples[mb]
        terms = pg_samples(self.policy, cond, samples, batch.advantages[mb])
        log_prob = terms.log_prob
        if old_mean is not None:
            normalised = normalised_log_prob(terms.evaluation, old_mean[mb])
            log_prob = unit_values(normalised, *self._unit)
        pg_loss, pg_metrics = clipped_surrogate(log_prob, terms.old_log_prob, terms.advantages, cfg.clip)
        entropy_mean = terms.evaluation.entropy.mean()
        loss = pg_loss - cfg.entropy_coef * entropy_mean
        logged = {"losses/policy": pg_loss.item(), "losses/entropy": entropy_mean.item()}
        if self.reference is not None:
            with torch.no_grad():
                ref = self.reference.evaluate(cond, samples)
            kl = step_kl(self.policy, terms.evaluation, ref).mean()
            loss = loss + cfg.beta * kl
            logged["losses/kl_ref"] = kl.item()
        grad_norm = self.optimizer.step(loss, iteration)
        history.add(logged, grad_norm, pg_metrics)
        return pg_metrics
