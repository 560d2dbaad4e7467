"""Demonstration datasets: made by a policy (``flowrl collect``), checked and loaded for
pretraining (``check_demos``, ``load_demos``: a file, or the env's scripted demonstrator).

No D4RL downloads: a policy trained with flowrl (any family) acts in the env and every
primitive step is recorded. Like D4RL's "medium" datasets, the locomotion recipe is a partly
trained policy acting with its own stochasticity (``actions="sample"``: a Gaussian policy's
N(mean, std²), a flow or diffusion policy's stochastic sampler); ``"deterministic"`` records
its evaluation actions (mean, ODE, DDIM eta = 0), optionally with extra Gaussian
``action_noise``. Same policy, seed and settings give the same file.

The file format (``save_demos``, ``read_demos``, ``read_metadata``, its provenance fields) is
flowrl/core/demos_file.py's.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch

import envs as flowrl_envs
from flowrl.config import DemosConfig
from flowrl.core.demos_file import DEMO_KEYS, ENV_KEY, read_demos, read_recorded
from flowrl.errors import DatasetError
from flowrl.models.policy import Policy
from flowrl.runtime import derive_seed
from flowrl.runtime import progress as progress_bar

log = logging.getLogger("flowrl")

Actions = Literal["deterministic", "sample"]


def check_demos(cfg: DemosConfig, env_id: str, dims: tuple[int, int] | None = None) -> None:
    """Raises DatasetError when the demonstrations cannot be used, before any work starts.

    Scripted demos (path null) need the env to have a demonstrator. A file is opened and fully
    checked (as ``load_demos`` does): recorded in ``env_id`` when it says where it was recorded;
    with ``dims`` = (obs dim, action dim) of the env, its arrays' widths must match them.
    """
    if cfg.path is None:
        if env_id not in flowrl_envs.DEMONSTRATORS:
            raise DatasetError(
                f"env {env_id} has no scripted demonstrator: set pretrain.demos.path to a demonstration .npz "
                f"(keys {', '.join(DEMO_KEYS)}) or give policy.pretrained"
            )
        return
    read_demos(cfg.path, env_id, dims)


def load_demos(cfg: DemosConfig, env_id: str, seed: int, dims: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Demonstrations from ``cfg.path`` (checked, see ``read_demos``), or from the env's scripted
    demonstrator if null. A file that does not say which env it was recorded in (hand-made, or
    not from ``flowrl collect``) is used with a logged warning."""
    if cfg.path is None:
        check_demos(cfg, env_id)
        return flowrl_envs.DEMONSTRATORS[env_id](cfg.episodes, seed)
    demos, recorded = read_recorded(cfg.path, env_id, dims)
    if recorded is None:
        log.warning(
            "%s does not say which env it was recorded in (no %s array); using it for %s as it is. Files from "
            "`flowrl collect` carry it; for a hand-made file add %s=np.array(%r) to np.savez",
            cfg.path,
            ENV_KEY,
            env_id,
            ENV_KEY,
            env_id,
        )
    return demos


def collect_demos(
    policy: Policy,
    env_id: str,
    episodes: int,
    seed: int,
    action_noise: float = 0.0,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    actions: Actions = "deterministic",
) -> dict[str, np.ndarray]:
    """Run ``episodes`` episodes (all envs side by side, one policy batch per step).

    The policy plans a chunk of Ta actions and executes it: ``actions="deterministic"``, its
    evaluation actions (``act``: the mean, the ODE, DDIM eta = 0); ``"sample"``, a draw from
    its own stochastic policy (``sample``: a Gaussian policy's N(mean, std²), a flow's or
    diffusion's fine-tuning sampler), as D4RL's datasets were recorded. ``action_noise`` adds
    N(0, action_noise²) to every primitive action; then the env's bounds clip it. The recorded
    action is the executed (clipped) one.

    Returns observations ``[N, O]``, actions ``[N, Da]``, episode_ends ``[E]`` (cumulative
    lengths), episode_returns ``[E]``.
    """
    _check_collect_args(episodes, action_noise, actions)
    recording = _Recording([gym.make(env_id, **(env_kwargs or {})) for _ in range(episodes)], derive_seed(seed, 7))
    generator = torch.Generator().manual_seed(derive_seed(seed, 7, 1))
    noise_rng = np.random.default_rng(derive_seed(seed, 7, 2))
    horizon = policy.event_shape[0]
    bar = progress_bar(None, "collect", progress, total=episodes, unit="episode")
    while recording.active.any():
        cond = torch.as_tensor(recording.obs)  # every env, ended ones too: common random numbers
        chunk = policy.sample(cond, generator=generator).final if actions == "sample" else policy.act(cond, generator)
        chunks = chunk.numpy()
        for j in range(horizon):
            noise = noise_rng.normal(0.0, action_noise, chunks[:, j].shape) if action_noise > 0 else 0.0
            recording.step(chunks[:, j] + noise, bar)
            if not recording.active.any():
                break
    bar.close()
    return recording.close()


def _check_collect_args(episodes: int, action_noise: float, actions: str) -> None:
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if action_noise < 0:
        raise ValueError(f"action noise must be >= 0, got {action_noise}")
    if actions not in ("deterministic", "sample"):
        raise ValueError(f"actions must be 'deterministic' or 'sample', got {actions!r}")


class _Recording:
    """Episodes recorded side by side, one per env, env i reset with seed ``base + i``: each
    episode's observations and executed actions so far, its return, whether it still runs."""

    def __init__(self, env_list: list[gym.Env], base: int) -> None:
        self.envs = env_list
        self.low, self.high = env_list[0].action_space.low, env_list[0].action_space.high
        self.obs = np.stack([env.reset(seed=base + i)[0] for i, env in enumerate(env_list)]).astype(np.float32)
        self.records: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in env_list]
        self.returns = np.zeros(len(env_list))
        self.active = np.ones(len(env_list), dtype=bool)

    def step(self, actions: np.ndarray, bar: Any) -> None:
        """One primitive action ``[E, Da]``, clipped to the env's bounds, in every env still running
        (the executed action is the one recorded); ``bar`` counts the episodes that end."""
        executed = np.clip(actions, self.low, self.high).astype(np.float32)
        for i in np.flatnonzero(self.active):
            self.records[i][0].append(self.obs[i].copy())
            self.records[i][1].append(executed[i])
            o, r, term, trunc, _ = self.envs[i].step(executed[i])
            self.obs[i] = o
            self.returns[i] += r
            if term or trunc:
                self.active[i] = False
                bar.update(1)

    def close(self) -> dict[str, np.ndarray]:
        """Closes the envs; returns the demonstrations (see ``collect_demos``)."""
        for env in self.envs:
            env.close()
        lengths = np.array([len(r[0]) for r in self.records])
        return {
            "observations": np.concatenate([np.stack(r[0]) for r in self.records]).astype(np.float32),
            "actions": np.concatenate([np.stack(r[1]) for r in self.records]).astype(np.float32),
            "episode_ends": np.cumsum(lengths),
            "episode_returns": self.returns,
        }


__all__ = ["Actions", "check_demos", "collect_demos", "load_demos"]
