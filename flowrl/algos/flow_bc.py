"""Flow-matching behaviour cloning of an action-chunk policy, with EMA weights.

``a`` is the demonstrated action chunk ``[Ta, Da]`` that follows ``obs``; t ~ U(0, 1),
eps ~ N(0, I), x_t = (1 - t) eps + t a, and v = a - eps is the conditional velocity.

- rectified_flow: || v_theta(obs, x_t, t) - v ||^2.
- shortcut (Frans et al. 2024): a field u(x, t, t + d) conditioned on the step size d. Part of
  each batch learns flow matching at d = 0; the rest learns self-consistency: one step of 2d
  equals two steps of d, target (u(x_t, t, t+d) + u(x', t+d, t+2d)) / 2 with x' = x_t + d u(...).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import envs as flowrl_envs
from flowrl.config import DemosConfig, PretrainConfig
from flowrl.errors import FlowRLError
from flowrl.models.networks import VelocityMLP
from flowrl.runtime import progress as progress_bar

DEMO_KEYS = ("observations", "actions", "episode_ends")


class DatasetError(FlowRLError, ValueError):
    """A missing or malformed demonstration file; the message says how to fix it."""


def load_demos(cfg: DemosConfig, env_id: str, seed: int) -> dict[str, np.ndarray]:
    """Demonstrations from ``cfg.path``, or from the env's scripted demonstrator if null."""
    if cfg.path is None:
        if env_id not in flowrl_envs.DEMONSTRATORS:
            raise DatasetError(
                f"env {env_id} has no scripted demonstrator: set pretrain.demos.path to a demonstration .npz "
                f"(keys {', '.join(DEMO_KEYS)}) or give policy.pretrained"
            )
        return flowrl_envs.DEMONSTRATORS[env_id](cfg.episodes, seed)
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"demonstration file not found: {path} (pretrain.demos.path); create it or point the key at an "
            f"existing .npz with keys {', '.join(DEMO_KEYS)}"
        )
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


def flow_matching_loss(
    velocity: VelocityMLP, obs: Tensor, chunks: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Rectified-flow loss on a batch: obs ``[B, O]``, chunks ``[B, Ta, Da]``."""
    b = chunks.shape[0]
    t = torch.rand(b, generator=generator, device=chunks.device)
    eps = torch.randn(chunks.shape, generator=generator, device=chunks.device)
    tb = t.view(-1, 1, 1)
    x_t = (1.0 - tb) * eps + tb * chunks
    return ((velocity(obs, x_t, t, t) - (chunks - eps)) ** 2).mean()


def shortcut_loss(
    velocity: VelocityMLP,
    obs: Tensor,
    chunks: Tensor,
    consistency_fraction: float,
    generator: torch.Generator | None = None,
    max_halvings: int = 7,
) -> Tensor:
    """Shortcut-model loss: flow matching at d = 0 plus self-consistency at d = 2^-k."""
    b, dev = chunks.shape[0], chunks.device
    n_sc = min(b - 1, max(1, round(b * consistency_fraction)))
    eps = torch.randn(chunks.shape, generator=generator, device=dev)
    # Self-consistency part: d = 2^-k (k = 1..max_halvings), t on the d-grid with t + 2d <= 1.
    k = torch.randint(1, max_halvings + 1, (n_sc,), generator=generator, device=dev)
    d = 2.0 ** (-k.float())
    t_sc = torch.floor(torch.rand(n_sc, generator=generator, device=dev) * (1.0 / d - 1.0)) * d
    # Flow-matching part: continuous t, step size 0.
    t_fm = torch.rand(b - n_sc, generator=generator, device=dev)
    t = torch.cat([t_sc, t_fm])
    x_t = (1.0 - t.view(-1, 1, 1)) * eps + t.view(-1, 1, 1) * chunks
    o_sc, x_sc = obs[:n_sc], x_t[:n_sc]
    with torch.no_grad():
        first = velocity(o_sc, x_sc, t_sc, t_sc + d)
        x_mid = x_sc + d.view(-1, 1, 1) * first
        second = velocity(o_sc, x_mid, t_sc + d, t_sc + 2 * d)
        sc_target = 0.5 * (first + second)
    pred_sc = velocity(o_sc, x_sc, t_sc, t_sc + 2 * d)
    pred_fm = velocity(obs[n_sc:], x_t[n_sc:], t_fm, t_fm)
    fm_target = chunks[n_sc:] - eps[n_sc:]
    errors = torch.cat([(pred_sc - sc_target).flatten(1), (pred_fm - fm_target).flatten(1)])
    return (errors**2).mean()


def pretrain_flow(
    velocity: VelocityMLP, obs: Tensor, chunks: Tensor, cfg: PretrainConfig, seed: int, progress: bool = True
) -> tuple[VelocityMLP, dict[str, float]]:
    """Train ``velocity`` with ``cfg.method``; returns the EMA copy and final metrics."""
    if velocity.step_conditioned != (cfg.method != "rectified_flow"):
        raise ValueError(
            f"pretrain.method {cfg.method} needs a velocity field with step_conditioned="
            f"{cfg.method != 'rectified_flow'}"
        )
    device = next(velocity.parameters()).device
    obs, chunks = obs.to(device), chunks.to(device)
    ema = copy.deepcopy(velocity).requires_grad_(False)
    opt = torch.optim.AdamW(velocity.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(seed)
    losses: list[float] = []
    bar = progress_bar(range(cfg.steps), "pretrain", progress)
    for step in bar:
        idx = torch.randint(len(obs), (min(cfg.batch_size, len(obs)),), generator=gen, device=device)
        if cfg.method == "shortcut":
            loss = shortcut_loss(velocity, obs[idx], chunks[idx], cfg.self_consistency_fraction, gen)
        else:
            loss = flow_matching_loss(velocity, obs[idx], chunks[idx], gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step}; lower pretrain.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), velocity.parameters(), strict=True):
                p_ema.lerp_(p, 1.0 - cfg.ema_decay)
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", refresh=False)
    return ema.requires_grad_(True), {"pretrain/loss": float(np.mean(losses[-100:]))}
