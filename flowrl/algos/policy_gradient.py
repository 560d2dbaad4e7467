"""What PPO and GRPO share: turning stored samples into policy-gradient samples, the
optimiser over the policy's parameter groups, and the ratio = 1 check."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from flowrl.config import PolicyGradientConfig
from flowrl.core.batch import TensorBatch
from flowrl.core.transitions import unit_values
from flowrl.errors import FlowRLError
from flowrl.models.networks import ObsNormalizer
from flowrl.models.policy import Evaluation, Policy

log = logging.getLogger("flowrl")


class RatioCheckError(FlowRLError, RuntimeError):
    """Re-evaluated log-probs of a fresh rollout differ from the sampled ones."""


class NumericalError(FlowRLError, FloatingPointError):
    """Losses, gradients or weights stayed non-finite: the run stops rather than write them."""


class DataParallel(Protocol):
    """How one rank of a data-parallel learner (flowrl.algos.distributed) takes part in an
    update; None everywhere in the one-process learner."""

    def local(self, mb: Tensor) -> Tensor:
        """This rank's share ``[m_r]`` of a global minibatch's indices ``[m]``."""
        ...

    def global_mean(self, value: float) -> float:
        """The whole minibatch's mean of a per-sample mean over this rank's share."""
        ...

    def normalise(self, adv: Tensor) -> Tensor:
        """This rank's advantages normalised with the whole minibatch's mean and std."""
        ...

    def before_backward(self, loss: Tensor, network: str) -> Tensor:
        """The share's loss scaled and passed through the network's DDP module, whose mean
        over the ranks' gradients is then the whole minibatch's gradient."""
        ...


class NonFiniteGuard:
    """Skips updates whose loss or gradient norm is non-finite, logs each, and stops the run
    after ``limit`` skipped updates of one network in a row (a diverging learning rate,
    exploding observations or rewards)."""

    def __init__(self, limit: int, hint: str) -> None:
        self.limit, self.hint = limit, hint
        self.in_a_row: dict[str, int] = {}  # per network: skipped updates since its last step
        self.skipped = 0  # since the last ``pop_skipped``
        # On a data-parallel rank: every rank must skip the same steps (flowrl.algos.distributed)
        self.data_parallel: DataParallel | None = None

    def ok(self, quantity: str, value: float, iteration: int, network: str = "policy") -> bool:
        """True when ``value`` is finite (the update may go ahead); else count and log a skip."""
        if math.isfinite(value):
            return True
        self.in_a_row[network] = self.in_a_row.get(network, 0) + 1
        self.skipped += 1
        log.warning(
            "%s is %s at iteration %d: update skipped (%d in a row, the run stops at %d)",
            quantity, value, iteration, self.in_a_row[network], self.limit,
        )  # fmt: skip
        if self.in_a_row[network] >= self.limit:
            raise NumericalError(
                f"{quantity} was non-finite ({value}) in {self.in_a_row[network]} updates in a row at iteration "
                f"{iteration}; {self.hint}. The last good checkpoint is kept: resume it with lower learning rates "
                "(flowrl train --resume RUN algo.actor_lr=...)"
            )
        return False

    def stepped(self, network: str = "policy") -> None:
        """``network`` took an optimiser step: its run of skipped updates ends."""
        self.in_a_row[network] = 0

    def pop_skipped(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped


@dataclass
class PGSamples:
    """The policy-gradient samples of a batch of stored policy samples, all ``[M]``: one per
    chain (``sample_unit: chain``) or per stochastic step (``step``, row-major)."""

    log_prob: Tensor
    old_log_prob: Tensor
    advantages: Tensor
    evaluation: Evaluation


def event_numel(policy: Policy) -> int:
    return math.prod(policy.event_shape)


def pg_samples(policy: Policy, cond, samples: TensorBatch, advantages: Tensor) -> PGSamples:
    """Re-evaluate ``samples`` (``[B, ...]``) and pair every policy-gradient sample with its
    old log-prob and advantage (an env step's advantage repeated over its S steps)."""
    evaluation = policy.evaluate(cond, samples)
    unit, reduce, numel = policy.sample_unit, policy.log_prob_reduce, event_numel(policy)
    new = unit_values(evaluation.log_prob, unit, reduce, numel)
    old = unit_values(samples.log_prob, unit, reduce, numel)
    if unit == "step":
        advantages = advantages.repeat_interleave(samples.log_prob.shape[1])
    return PGSamples(new, old, advantages, evaluation)


@torch.no_grad()
def check_ratio(policy: Policy, cond, samples: TensorBatch, tol: float, algo: str) -> dict[str, float]:
    """Before any update, re-evaluated log-probs must reproduce the sampled ones (ratio = 1).

    Returns ``train/ratio_check_dev`` (max |ratio - 1|) and the noise std of the rollout's
    stochastic steps (``noise/std_min|mean|max``), so a learned std drifting to a bound shows."""
    b = samples.log_prob.shape[0]
    if b == 0:  # nothing kept (GRPO: every group tied): nothing to check
        return {"train/ratio_check_dev": 0.0}
    terms = pg_samples(policy, cond, samples, torch.zeros(b, device=samples.log_prob.device))
    new, old = terms.log_prob, terms.old_log_prob
    dev = ((new - old).exp() - 1.0).abs()
    worst = float(dev.max()) if dev.numel() else 0.0
    if not bool(torch.isfinite(new).all() and torch.isfinite(old).all()):
        i = int((~(torch.isfinite(new) & torch.isfinite(old))).nonzero()[0])
        raise NumericalError(
            f"{algo}: a log-prob of the fresh rollout is non-finite (sample {i}: sampled {old[i].item()}, "
            f"re-evaluated {new[i].item()}): the policy's weights or the observations are non-finite"
        )
    if not worst <= tol:
        i = int(dev.nan_to_num(nan=math.inf).argmax())
        raise RatioCheckError(
            f"{algo} ratio is not 1 before the first update: |ratio - 1| = {worst:.3g} > {tol} (sample {i}: "
            f"sampled log-prob {old[i].item():.6g}, re-evaluated {new[i].item():.6g}). Sampling and re-evaluation "
            "disagree (time grid, window or noise state); raise algo.ratio_check_tol only if this is float round-off"
        )
    std = terms.evaluation.std
    return {
        "train/ratio_check_dev": worst,
        "noise/std_min": std.min().item(),
        "noise/std_mean": std.mean().item(),
        "noise/std_max": std.max().item(),
    }


def check_ratio_of(policy: Policy, cond, samples: TensorBatch, cfg: Any, algo: str) -> dict[str, float]:
    """``check_ratio`` on the samples ``cfg.ratio_check`` names: all of them, or the first
    ``cfg.minibatch_size`` (one minibatch's no-grad pass instead of the whole rollout's; a
    sampling / re-evaluation mismatch shows on any sample)."""
    rows = cfg.minibatch_size if getattr(cfg, "ratio_check", "all") == "first_minibatch" else None
    return check_ratio(policy, cond[:rows], samples[:rows], cfg.ratio_check_tol, algo)


class PolicyOptimizer:
    """Adam over the trainable parameters of the policy's groups (``actor`` at actor_lr, ``noise``
    at noise_lr; parameters with requires_grad False stay fixed), gradient clipping, and the
    learning-rate schedule. ValueError when every parameter is frozen."""

    def __init__(self, policy: Policy, cfg: PolicyGradientConfig, extra: list[torch.optim.Optimizer] = ()) -> None:
        self.guard = NonFiniteGuard(
            cfg.max_skipped_updates,
            f"the learning rates are likely too high (algo.actor_lr={cfg.actor_lr:g}), or the observations or "
            "rewards explode",
        )
        lrs = {"actor": cfg.actor_lr, "noise": cfg.noise_lr}
        # Frozen parameters (requires_grad False: a frozen text encoder, the base weights under a
        # LoRA adapter) are left out: Adam, clipping and the gradient norm see only what trains.
        trainable = {name: [p for p in params if p.requires_grad] for name, params in policy.param_groups().items()}
        groups: list[dict[str, Any]] = [
            {"params": params, "lr": lrs[name], "name": name} for name, params in trainable.items() if params
        ]
        if not groups:
            raise ValueError(
                "every policy parameter is frozen (requires_grad=False): nothing to train; unfreeze some "
                "(requires_grad_(True)) or train an adapter"
            )
        self.params = [p for group in groups for p in group["params"]]
        self.policy, self.cfg = policy, cfg
        self.opt = torch.optim.Adam(groups)
        self.schedule = [self.opt, *extra]
        for opt in self.schedule:
            for group in opt.param_groups:
                group["base_lr"] = group["lr"]

    def set_progress(self, fraction_done: float) -> None:
        """Learning rates for the ``lr_schedule`` at this point of training (0 = start)."""
        scale = 1.0 - fraction_done if self.cfg.lr_schedule == "linear" else 1.0
        for opt in self.schedule:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale

    def step(self, loss: Tensor, iteration: int) -> float:
        """Backward, clip, step; returns the gradient norm before clipping. A non-finite
        loss or gradient norm skips the step (NonFiniteGuard) and returns NaN."""
        return guarded_step(self.opt, self.params, loss, self.cfg.max_grad_norm, self.guard, iteration)


class CheckpointState:
    """An algorithm's checkpoint from the names of its stateful members in ``checkpoint_state``
    (Stable-Baselines3's ``_get_torch_save_params``): modules, optimisers and ``torch.Generator``s.
    ``state_dict`` saves each under its name, ``load_state_dict`` restores each; a member that
    is None in this configuration (no reward scaler, no reference) is neither saved nor loaded."""

    checkpoint_state: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        state = {}
        for name in self.checkpoint_state:
            member = getattr(self, name)
            if isinstance(member, torch.Generator):
                state[name] = member.get_state()
            elif member is not None:
                state[name] = member.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores every declared member; a missing one is a KeyError naming it."""
        for name in self.checkpoint_state:
            member = getattr(self, name)
            if isinstance(member, torch.Generator):
                member.set_state(state[name])
            elif member is not None:
                member.load_state_dict(state[name])


class PolicyGradientAlgorithm(CheckpointState):
    """What PPO and GRPO share: the learning-rate schedule and the checkpoint (``CheckpointState``)."""

    optimizer: PolicyOptimizer

    @property
    def data_parallel(self) -> DataParallel | None:
        """Set on the ranks of a data-parallel learner (flowrl.algos.distributed), else None."""
        return self.optimizer.guard.data_parallel

    @data_parallel.setter
    def data_parallel(self, value: DataParallel | None) -> None:
        self.optimizer.guard.data_parallel = value

    @property
    def actor_opt(self) -> torch.optim.Optimizer:
        """The policy's optimiser (the checkpoint's ``actor_opt``)."""
        return self.optimizer.opt

    def set_progress(self, fraction_done: float) -> None:
        self.optimizer.set_progress(fraction_done)


class EpochsRun(NamedTuple):
    """What ``run_epochs`` did: the epochs begun, and whether ``target_kl`` ended them early."""

    epochs: int
    kl_stop: bool

    def metrics(self) -> dict[str, float]:
        return {"train/epochs": float(self.epochs), "train/kl_stop": float(self.kl_stop)}


def minibatches(perm: Tensor, minibatch_size: int) -> tuple[Tensor, ...]:
    """``perm`` ``[B]`` cut into ``round(B / minibatch_size)`` (at least one) near-equal
    minibatches: a batch that is not a multiple of the size gets no small remainder minibatch,
    whose few samples would give a noisy step (and noisy per-minibatch statistics)."""
    count = max(1, round(perm.shape[0] / minibatch_size))
    return torch.tensor_split(perm, count)


def run_epochs(
    size: int,
    cfg: PolicyGradientConfig,
    generator: torch.Generator,
    device: torch.device,
    minibatch_step: Callable[[Tensor], dict[str, float]],
    data_parallel: DataParallel | None = None,
) -> EpochsRun:
    """``cfg.epochs`` passes over ``size`` samples, each in a fresh shuffle (drawn with
    ``generator``) cut by ``minibatches`` into index tensors ``[m]`` for ``minibatch_step``,
    which returns the minibatch's surrogate metrics. A minibatch whose ``approx_kl`` exceeds
    ``cfg.target_kl`` ends the update (DPPO's and ReinFlow's early stop).

    ``data_parallel``: every rank draws the same shuffle and steps on its share of each
    minibatch; the early stop looks at the whole minibatch's approx KL, so all ranks stop together."""
    for epoch in range(cfg.epochs):
        perm = torch.randperm(size, generator=generator).to(device)
        for mb in minibatches(perm, cfg.minibatch_size):
            pg_metrics = minibatch_step(mb if data_parallel is None else data_parallel.local(mb))
            if data_parallel is not None and cfg.target_kl is not None:
                pg_metrics = {**pg_metrics, "approx_kl": data_parallel.global_mean(pg_metrics["approx_kl"])}
            if cfg.target_kl is not None and pg_metrics["approx_kl"] > cfg.target_kl:
                return EpochsRun(epoch + 1, True)
    return EpochsRun(cfg.epochs, False)


def guarded_step(
    opt: torch.optim.Optimizer,
    params,
    loss: Tensor,
    max_grad_norm: float,
    guard: NonFiniteGuard,
    iteration: int,
    name: str = "policy",
) -> float:
    """One optimiser step unless the loss or the gradient norm is non-finite. On a data-parallel
    rank the loss checked is the whole minibatch's (all ranks skip together) and the gradient
    the ranks' DDP average."""
    opt.zero_grad(set_to_none=True)
    dp = guard.data_parallel
    value = float(loss.detach()) if dp is None else dp.global_mean(float(loss.detach()))
    if not guard.ok(f"the {name} loss", value, iteration, name):
        return math.nan
    if dp is not None:
        loss = dp.before_backward(loss, name)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    # FSDP's sharded gradients give a DTensor norm: the whole gradient's, once gathered
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not guard.ok(f"the {name} gradient norm", grad_norm, iteration, name):
        opt.zero_grad(set_to_none=True)
        return math.nan
    opt.step()
    guard.stepped(name)
    return grad_norm


def normalise_advantages(adv: Tensor, data_parallel: DataParallel | None = None) -> Tensor:
    """A minibatch's advantages ``[m]`` normalised to mean 0, std 1 (unchanged when m = 1); on a
    data-parallel rank with the whole minibatch's statistics."""
    if data_parallel is not None:
        return data_parallel.normalise(adv)
    if len(adv) <= 1:
        return adv
    return (adv - adv.mean()) / (adv.std() + 1e-8)


def update_obs_stats(obs: Tensor, *modules: nn.Module) -> None:
    """Fold observations into every observation normaliser of ``modules`` (policy.obs_norm:
    running); the next rollout samples with the new statistics, so stored log-probs always
    match the statistics they were sampled with."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, ObsNormalizer):
                m.update(obs)


class MetricHistory:
    """Per-minibatch metrics of one update, summarised as means (ratio min and max as extremes)."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, logged: dict[str, float], grad_norm: float, pg_metrics: dict[str, float]) -> None:
        for key, value in {
            **logged,
            "train/grad_norm": grad_norm,
            **{f"train/{k}": v for k, v in pg_metrics.items()},
        }.items():
            self.values.setdefault(key, []).append(value)

    def summary(self) -> dict[str, float]:
        metrics = {k: float(np.mean(v)) for k, v in self.values.items()}
        if "train/ratio_max" in self.values:
            metrics["train/ratio_max"] = float(np.max(self.values["train/ratio_max"]))
            metrics["train/ratio_min"] = float(np.min(self.values["train/ratio_min"]))
        return metrics
