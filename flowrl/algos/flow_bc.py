"""Flow-matching behaviour cloning (rectified flow) of an action-chunk policy, with EMA.

Loss: t ~ U(0, 1), eps ~ N(0, I), x_t = (1 - t) eps + t a, || v(obs, x_t, t) - (a - eps) ||^2,
where ``a`` is the demonstrated action chunk ``[Ta, Da]`` that follows ``obs``.
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
    return ((velocity(obs, x_t, t) - (chunks - eps)) ** 2).mean()


def pretrain_flow(
    velocity: VelocityMLP, obs: Tensor, chunks: Tensor, cfg: PretrainConfig, seed: int, progress: bool = True
) -> tuple[VelocityMLP, dict[str, float]]:
    """Train ``velocity`` by flow matching; returns the EMA copy and final metrics."""
    device = next(velocity.parameters()).device
    obs, chunks = obs.to(device), chunks.to(device)
    ema = copy.deepcopy(velocity).requires_grad_(False)
    opt = torch.optim.AdamW(velocity.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(seed)
    losses: list[float] = []
    bar = progress_bar(range(cfg.steps), "pretrain", progress)
    for step in bar:
        idx = torch.randint(len(obs), (min(cfg.batch_size, len(obs)),), generator=gen, device=device)
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
