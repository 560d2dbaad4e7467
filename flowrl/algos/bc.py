"""Behaviour cloning of any policy family from demonstrations, with EMA weights.

Demonstrations (flowrl.core.demos_file reads and checks them: observations ``[N, O]``,
actions ``[N, Da]``, episode_ends ``[E]``) are cut into (observation, next Ta actions) pairs. The family's loss:
rectified flow, shortcut and MeanFlow in ``flow_bc``, DDPM in ``diffusion_bc``, and for a
Gaussian policy the squared error of its mean. The actor's observation normaliser takes the
dataset's mean and std first (policy.obs_norm: dataset).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from flowrl.algos.diffusion_bc import diffusion_loss
from flowrl.algos.flow_bc import flow_matching_loss, meanflow_loss, shortcut_loss
from flowrl.config import PolicyConfig, PretrainConfig
from flowrl.core.demos_file import DEMO_KEYS
from flowrl.core.dispersive import layers_loss as dispersive_layers_loss
from flowrl.errors import DatasetError, FlowRLError, Interrupted
from flowrl.models.diffusion_policy import cosine_alphas_cumprod
from flowrl.rollout.demos import check_demos, load_demos
from flowrl.runlog import RunLog, atomic_save
from flowrl.runtime import progress as progress_bar
from flowrl.runtime import stop_requested


def action_chunks(demos: dict[str, np.ndarray], horizon: int) -> tuple[Tensor, Tensor]:
    """Training pairs (obs ``[M, O]``, chunk ``[M, Ta, Da]``): the Ta actions following each
    observation, padded at the end of an episode by repeating its last action."""
    obs, actions, ends = demos["observations"], demos["actions"], demos["episode_ends"]
    starts = np.concatenate([[0], ends[:-1]])
    index = []
    for start, end in zip(starts, ends, strict=True):
        steps = np.arange(start, end)
        index.append(np.minimum(steps[:, None] + np.arange(horizon)[None], end - 1))
    idx = np.concatenate(index)
    return (torch.as_tensor(obs[idx[:, 0]], dtype=torch.float32), torch.as_tensor(actions[idx], dtype=torch.float32))


def dataset_obs_stats(obs: Tensor, min_std: float = 1e-2) -> tuple[Tensor, Tensor]:
    """Mean and std ``[O]`` of the observations; dimensions that barely vary get std
    ``min_std`` instead of blowing up (constant entries of MuJoCo observations)."""
    return obs.mean(0), obs.std(0).clamp(min=min_std)


# loss(actor, condition, target, generator) -> the loss, or (the loss, extra metrics to log)
LossFn = Callable[[nn.Module, Tensor, Tensor, torch.Generator], Tensor | tuple[Tensor, dict[str, Tensor]]]


def bc_loss(policy: PolicyConfig, pretrain: PretrainConfig) -> LossFn:
    """The loss of ``policy.type``: ``loss(actor, obs [B, O], chunks [B, Ta, Da], generator)``;
    a flow family with ``pretrain.dispersive`` on adds its weighted dispersive term (and returns it
    as ``pretrain/dispersive``)."""
    if policy.type in ("rectified_flow", "shortcut", "meanflow"):
        return _flow_loss(policy.type, pretrain)
    if policy.type == "diffusion":
        alphas = cosine_alphas_cumprod(policy.train_steps)
        return lambda actor, o, c, g: diffusion_loss(actor, o, c, alphas.to(c.device), g)

    def gaussian_mean_loss(actor: nn.Module, o: Tensor, c: Tensor, g: torch.Generator) -> Tensor:
        return ((actor(o)[0] - c) ** 2).mean()

    return gaussian_mean_loss


def _flow_loss(family: str, pretrain: PretrainConfig) -> LossFn:
    """The flow family's loss, plus the dispersive term on the hidden activations of its own pass
    (then ``pretrain/loss`` is their weighted sum, logged beside ``pretrain/flow`` and
    ``pretrain/dispersive``)."""
    disp, fraction = pretrain.dispersive, pretrain.consistency_fraction

    def flow(actor: nn.Module, o: Tensor, c: Tensor, g: torch.Generator, hidden: list[Tensor] | None) -> Tensor:
        if family == "shortcut":
            return shortcut_loss(actor, o, c, fraction, g, hidden=hidden)
        if family == "meanflow":
            return meanflow_loss(actor, o, c, fraction, g, hidden=hidden)
        return flow_matching_loss(actor, o, c, g, hidden=hidden)

    if not disp.enabled:
        return lambda actor, o, c, g: flow(actor, o, c, g, None)

    def regularised(actor: nn.Module, o: Tensor, c: Tensor, g: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        hidden: list[Tensor] = []
        loss = flow(actor, o, c, g, hidden)
        term = dispersive_layers_loss(hidden, disp.layers, disp.variant, disp.temperature, disp.margin)
        return loss + disp.weight * term, {"pretrain/flow": loss.detach(), "pretrain/dispersive": term.detach()}

    return regularised


class PretrainError(FlowRLError, FloatingPointError):
    """Behaviour cloning diverged (a non-finite loss)."""


Draw = Callable[[int, torch.Generator], tuple[Any, Tensor]]


def demo_batches(obs: Tensor, chunks: Tensor, batch_size: int, device: torch.device) -> Draw:
    """Batches of demonstration pairs for ``fit``: ``draw(step, generator) -> (obs [b, O],
    chunks [b, Ta, Da])`` on ``device``, ``b = min(batch_size, M)`` pairs drawn uniformly
    (with replacement) from obs ``[M, O]`` and chunks ``[M, Ta, Da]``."""
    obs, chunks = obs.to(device), chunks.to(device)

    def draw(step: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(obs), (min(batch_size, len(obs)),), generator=gen, device=device)
        return obs[idx], chunks[idx]

    return draw


class _Pretraining:
    """The state of a behaviour-cloning run, all of which its checkpoint holds: the weights,
    their EMA, the optimiser, the generator, the step and the last 100 losses."""

    def __init__(self, actor: nn.Module, cfg: PretrainConfig, seed: int) -> None:
        device = next(actor.parameters()).device
        self.actor, self.cfg = actor, cfg
        self.ema = copy.deepcopy(actor).requires_grad_(False)
        self.opt = torch.optim.AdamW(actor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.step = 0
        self.losses: list[float] = []
        self.extras: dict[str, list[float]] = {}  # the loss's extra metrics (pretrain/dispersive), last 100

    def train_step(self, draw: Draw, loss_fn: LossFn) -> None:
        """One AdamW step on a fresh batch, then the EMA; a non-finite loss stops the run."""
        cond, target = draw(self.step, self.gen)
        loss = loss_fn(self.actor, cond, target, self.gen)
        if isinstance(loss, tuple):
            loss, extra = loss
            for key, value in extra.items():
                self.extras[key] = [*self.extras.get(key, []), float(value)][-100:]
        if not torch.isfinite(loss):
            raise PretrainError(
                f"the pretraining loss is {loss.item()} at step {self.step}: lower pretrain.lr (now {self.cfg.lr:g})"
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.actor.parameters(), strict=True):
                p_ema.lerp_(p, 1.0 - self.cfg.ema_decay)
            for b_ema, b in zip(self.ema.buffers(), self.actor.buffers(), strict=True):
                b_ema.copy_(b)
        self.losses = [*self.losses, loss.item()][-100:]
        self.step += 1

    def mean_loss(self) -> float:
        return float(np.mean(self.losses[-100:]))

    def metrics(self) -> dict[str, float]:
        """The mean loss and extra metrics of the last 100 steps."""
        return {"pretrain/loss": self.mean_loss(), **{k: float(np.mean(v)) for k, v in self.extras.items()}}

    def save(self, path: Path) -> None:
        state = {"step": self.step, "actor": self.actor.state_dict(), "ema": self.ema.state_dict()}
        state |= {"opt": self.opt.state_dict(), "generator": self.gen.get_state(), "losses": self.losses[-100:]}
        atomic_save(state, path)

    def checkpoint_when_due(self, path: Path) -> None:
        """Save to ``path`` (``RUN/checkpoints/pretrain.pt``) every ``checkpoint_every`` steps
        before the last, and when a stop was requested, which then stops here."""
        if self.step >= self.cfg.steps or not (self.step % self.cfg.checkpoint_every == 0 or stop_requested()):
            return
        self.save(path)
        if stop_requested():
            run_dir = path.parent.parent
            raise Interrupted(
                f"stopped pretraining at step {self.step} of {self.cfg.steps} (checkpoint saved); resume with: "
                f"flowrl train --resume {run_dir} (or flowrl pretrain --resume {run_dir})"
            )

    def load(self, path: Path) -> None:
        state = _load_pretrain_checkpoint(path)
        self.actor.load_state_dict(state["actor"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["generator"])
        self.step, self.losses = int(state["step"]), list(state["losses"])


def fit(
    actor: nn.Module,
    draw: Draw,
    loss_fn: LossFn,
    cfg: PretrainConfig,
    seed: int,
    progress: bool = True,
    run_dir: Path | None = None,
    desc: str = "pretrain",
) -> tuple[nn.Module, dict[str, float]]:
    """Behaviour cloning of ``actor`` on batches ``draw(step, generator) -> (condition,
    target)`` (``demo_batches`` of demonstrations, or image-caption pairs drawn fresh) with
    AdamW for ``cfg.steps``; returns its EMA copy and the final loss. ``desc`` names the progress bar.

    With ``run_dir``: the mean loss of every 100 steps goes to ``pretrain_metrics.jsonl`` and
    ``tensorboard/pretrain``; a checkpoint (weights, EMA, optimiser, generator) is written to
    ``checkpoints/pretrain.pt`` every ``cfg.checkpoint_every`` steps and when a stop is
    requested (SIGINT/SIGTERM), and an existing one is resumed: a killed pretraining redoes at
    most ``checkpoint_every`` steps and ends with the same weights as an uninterrupted one.
    """
    run = _Pretraining(actor, cfg, seed)
    checkpoint = run_dir / "checkpoints" / "pretrain.pt" if run_dir is not None else None
    if checkpoint is not None and checkpoint.exists():
        run.load(checkpoint)
        tqdm.write(f"resuming pretraining from {checkpoint} (step {run.step} of {cfg.steps})")
    log = None
    if run_dir is not None:  # records a killed run wrote after its checkpoint are dropped (-1: all of them)
        log = RunLog(run_dir, resume_after=run.step if run.step else -1, name="pretrain", step_key="step")
    bar = progress_bar(range(run.step, cfg.steps), desc, progress, initial=run.step, total=cfg.steps)
    try:
        for _ in bar:
            run.train_step(draw, loss_fn)
            if run.step % 100 == 0:
                bar.set_postfix(loss=f"{run.mean_loss():.4f}", refresh=False)
                if log is not None:
                    log.log(run.step, run.metrics())
            if checkpoint is not None:
                run.checkpoint_when_due(checkpoint)
    finally:
        if log is not None:
            log.close()
    return run.ema.requires_grad_(True), run.metrics()


def _load_pretrain_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: say which and what to do
        raise PretrainError(
            f"{path} is unreadable ({type(exc).__name__}); delete it to restart pretraining from step 0"
        ) from None
    if not isinstance(state, dict) or not {"step", "actor", "ema", "opt", "generator", "losses"} <= set(state):
        raise PretrainError(f"{path} is not a flowrl pretraining checkpoint; delete it to restart pretraining")
    return state


__all__ = [
    "DEMO_KEYS",
    "DatasetError",
    "action_chunks",
    "bc_loss",
    "check_demos",
    "dataset_obs_stats",
    "demo_batches",
    "fit",
    "load_demos",
]
