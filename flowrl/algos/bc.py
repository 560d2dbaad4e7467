"""Behaviour cloning of any policy family from demonstrations, with EMA weights.

Demonstrations are ``.npz`` files (observations ``[N, O]``, actions ``[N, Da]``,
episode_ends ``[E]``), cut into (observation, next Ta actions) pairs. The family's loss:
rectified flow, shortcut and MeanFlow in ``flow_bc``, DDPM in ``diffusion_bc``, and for a
Gaussian policy the squared error of its mean. The actor's observation normaliser takes the
dataset's mean and std first (policy.obs_norm: dataset).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import envs as flowrl_envs
from flowrl.algos.diffusion_bc import diffusion_loss
from flowrl.algos.flow_bc import flow_matching_loss, meanflow_loss, shortcut_loss
from flowrl.config import DemosConfig, PolicyConfig, PretrainConfig
from flowrl.errors import FlowRLError
from flowrl.models.diffusion_policy import cosine_alphas_cumprod
from flowrl.runtime import progress as progress_bar

DEMO_KEYS = ("observations", "actions", "episode_ends")


class DatasetError(FlowRLError, ValueError):
    """A missing or malformed demonstration file; the message says how to fix it."""


def check_demos(cfg: DemosConfig, env_id: str) -> None:
    """Raises DatasetError when the demonstrations cannot be found (before any work starts)."""
    if cfg.path is None:
        if env_id not in flowrl_envs.DEMONSTRATORS:
            raise DatasetError(
                f"env {env_id} has no scripted demonstrator: set pretrain.demos.path to a demonstration .npz "
                f"(keys {', '.join(DEMO_KEYS)}) or give policy.pretrained"
            )
        return
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"demonstration file not found: {path} (pretrain.demos.path); record one with `flowrl collect "
            f"EXPERT_RUN --out {path}` (README, Locomotion) or point the key at an existing .npz with keys "
            f"{', '.join(DEMO_KEYS)}"
        )


def load_demos(cfg: DemosConfig, env_id: str, seed: int) -> dict[str, np.ndarray]:
    """Demonstrations from ``cfg.path``, or from the env's scripted demonstrator if null."""
    check_demos(cfg, env_id)
    if cfg.path is None:
        return flowrl_envs.DEMONSTRATORS[env_id](cfg.episodes, seed)
    path = Path(cfg.path).expanduser()
    with np.load(path) as data:
        missing = [k for k in DEMO_KEYS if k not in data]
        if missing:
            raise DatasetError(f"{path}: missing arrays {missing}; a demonstration file needs {', '.join(DEMO_KEYS)}")
        demos = {k: np.asarray(data[k]) for k in DEMO_KEYS}
    n = len(demos["observations"])
    ends = demos["episode_ends"]
    if len(demos["actions"]) != n or len(ends) == 0 or ends[-1] != n or np.any(np.diff(ends) <= 0):
        raise DatasetError(
            f"{path}: inconsistent arrays: {n} observations, {len(demos['actions'])} actions, episode_ends must "
            f"increase strictly and end at {n}"
        )
    return demos


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


def behaviour_clone(
    actor: nn.Module,
    obs: Tensor,
    chunks: Tensor,
    loss_fn: LossFn,
    cfg: PretrainConfig,
    seed: int,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, float]]:
    """Train ``actor`` on (obs ``[M, O]``, chunks ``[M, Ta, Da]``); returns its EMA copy and
    the final loss."""
    device = next(actor.parameters()).device
    obs, chunks = obs.to(device), chunks.to(device)
    ema = copy.deepcopy(actor).requires_grad_(False)
    opt = torch.optim.AdamW(actor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(seed)
    losses: list[float] = []
    bar = progress_bar(range(cfg.steps), "pretrain", progress)
    for step in bar:
        idx = torch.randint(len(obs), (min(cfg.batch_size, len(obs)),), generator=gen, device=device)
        loss = loss_fn(actor, obs[idx], chunks[idx], gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step}; lower pretrain.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), actor.parameters(), strict=True):
                p_ema.lerp_(p, 1.0 - cfg.ema_decay)
            for b_ema, b in zip(ema.buffers(), actor.buffers(), strict=True):
                b_ema.copy_(b)
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", refresh=False)
    return ema.requires_grad_(True), {"pretrain/loss": float(np.mean(losses[-100:]))}
