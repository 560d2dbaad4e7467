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


LossFn = Callable[[nn.Module, Tensor, Tensor, torch.Generator], Tensor]


def bc_loss(policy: PolicyConfig, pretrain: PretrainConfig) -> LossFn:
    """The loss of ``policy.type``: ``loss(actor, obs [B, O], chunks [B, Ta, Da], generator)``."""
    if policy.type == "rectified_flow":
        return flow_matching_loss
    if policy.type == "shortcut":
        return lambda actor, o, c, g: shortcut_loss(actor, o, c, pretrain.consistency_fraction, g)
    if policy.type == "meanflow":
        return lambda actor, o, c, g: meanflow_loss(actor, o, c, pretrain.consistency_fraction, g)
    if policy.type == "diffusion":
        alphas = cosine_alphas_cumprod(policy.train_steps)
        return lambda actor, o, c, g: diffusion_loss(actor, o, c, alphas.to(c.device), g)

    def gaussian_mean_loss(actor: nn.Module, o: Tensor, c: Tensor, g: torch.Generator) -> Tensor:
        return ((actor(o)[0] - c) ** 2).mean()

    return gaussian_mean_loss


class PretrainError(FlowRLError, FloatingPointError):
    """Behaviour cloning diverged (a non-finite loss)."""


def behaviour_clone(
    actor: nn.Module,
    obs: Tensor,
    chunks: Tensor,
    loss_fn: LossFn,
    cfg: PretrainConfig,
    seed: int,
    progress: bool = True,
    run_dir: Path | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """Train ``actor`` on (obs ``[M, O]``, chunks ``[M, Ta, Da]``); returns its EMA copy and
    the final loss.

    With ``run_dir``: the mean loss of every 100 steps goes to ``pretrain_metrics.jsonl`` and
    ``tensorboard/pretrain``; a checkpoint (weights, EMA, optimiser, generator) is written to
    ``checkpoints/pretrain.pt`` every ``cfg.checkpoint_every`` steps and when a stop is
    requested (SIGINT/SIGTERM), and an existing one is resumed: a killed pretraining redoes at
    most ``checkpoint_every`` steps and ends with the same weights as an uninterrupted one.
    """
    device = next(actor.parameters()).device
    obs, chunks = obs.to(device), chunks.to(device)

    def draw(step: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(obs), (min(cfg.batch_size, len(obs)),), generator=gen, device=device)
        return obs[idx], chunks[idx]

    return fit(actor, draw, loss_fn, cfg, seed, progress, run_dir)


Draw = Callable[[int, torch.Generator], tuple[Any, Tensor]]


def fit(
    actor: nn.Module,
    draw: Draw,
    loss_fn: LossFn,
    cfg: PretrainConfig,
    seed: int,
    progress: bool = True,
    run_dir: Path | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """The behaviour-cloning loop over batches ``draw(step, generator) -> (condition, target)``
    (demonstrations, or image-caption pairs drawn fresh): AdamW, EMA, logging, checkpoints and
    resume as ``behaviour_clone`` describes; returns the EMA copy and the final loss."""
    device = next(actor.parameters()).device
    ema = copy.deepcopy(actor).requires_grad_(False)
    opt = torch.optim.AdamW(actor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(seed)
    losses: list[float] = []
    start = 0
    checkpoint = run_dir / "checkpoints" / "pretrain.pt" if run_dir is not None else None
    if checkpoint is not None and checkpoint.exists():
        state = _load_pretrain_checkpoint(checkpoint)
        actor.load_state_dict(state["actor"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["generator"])
        start, losses = int(state["step"]), list(state["losses"])
        tqdm.write(f"resuming pretraining from {checkpoint} (step {start} of {cfg.steps})")
    log = None
    if run_dir is not None:  # records a killed run wrote after its checkpoint are dropped (-1: all of them)
        log = RunLog(run_dir, resume_after=start if start else -1, name="pretrain", step_key="step")

    def save(step: int) -> None:
        assert checkpoint is not None
        state = {"step": step, "actor": actor.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}
        atomic_save({**state, "generator": gen.get_state(), "losses": losses[-100:]}, checkpoint)

    bar = progress_bar(range(start, cfg.steps), "pretrain", progress, initial=start, total=cfg.steps)
    try:
        for step in bar:
            cond, target = draw(step, gen)
            loss = loss_fn(actor, cond, target, gen)
            if not torch.isfinite(loss):
                raise PretrainError(
                    f"the pretraining loss is {loss.item()} at step {step}: lower pretrain.lr (now {cfg.lr:g})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), actor.parameters(), strict=True):
                    p_ema.lerp_(p, 1.0 - cfg.ema_decay)
                for b_ema, b in zip(ema.buffers(), actor.buffers(), strict=True):
                    b_ema.copy_(b)
            losses.append(loss.item())
            losses = losses[-100:]
            done = step + 1
            if done % 100 == 0:
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", refresh=False)
                if log is not None:
                    log.log(done, {"pretrain/loss": float(np.mean(losses))})
            if checkpoint is not None and (done % cfg.checkpoint_every == 0 or stop_requested()) and done < cfg.steps:
                save(done)
                if stop_requested():
                    raise Interrupted(
                        f"stopped pretraining at step {done} of {cfg.steps} (checkpoint saved); resume with: "
                        f"flowrl train --resume {run_dir} (or flowrl pretrain --resume {run_dir})"
                    )
    finally:
        if log is not None:
            log.close()
    return ema.requires_grad_(True), {"pretrain/loss": float(np.mean(losses[-100:]))}


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
    "behaviour_clone",
    "check_demos",
    "dataset_obs_stats",
    "fit",
    "load_demos",
]
