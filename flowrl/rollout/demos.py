"""Demonstration datasets made by a policy: ``flowrl collect``.

No D4RL downloads: an expert trained with flowrl's own Gaussian PPO (or any flowrl policy)
acts in the env, optionally with Gaussian action noise to lower its quality to a
"medium" dataset, and every primitive step is recorded. Same policy, seed and noise give
the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import envs as flowrl_envs  # noqa: F401  (registers flowrl's envs)
from flowrl.models.policy import Policy
from flowrl.runtime import derive_seed
from flowrl.runtime import progress as progress_bar


def collect_demos(
    policy: Policy,
    env_id: str,
    episodes: int,
    seed: int,
    action_noise: float = 0.0,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run ``episodes`` episodes (all envs side by side, one policy batch per step).

    The policy plans a chunk of Ta actions with its deterministic ``act`` and executes it;
    ``action_noise`` adds N(0, action_noise²) to every primitive action before the env's
    bounds clip it. The recorded action is the executed (clipped) one.

    Returns observations ``[N, O]``, actions ``[N, Da]``, episode_ends ``[E]`` (cumulative
    lengths), episode_returns ``[E]``.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if action_noise < 0:
        raise ValueError(f"action noise must be >= 0, got {action_noise}")
    env_list = [gym.make(env_id, **(env_kwargs or {})) for _ in range(episodes)]
    low, high = env_list[0].action_space.low, env_list[0].action_space.high
    base = derive_seed(seed, 7)
    obs = np.stack([env.reset(seed=base + i)[0] for i, env in enumerate(env_list)]).astype(np.float32)
    generator = torch.Generator().manual_seed(derive_seed(seed, 7, 1))
    noise_rng = np.random.default_rng(derive_seed(seed, 7, 2))
    horizon = policy.event_shape[0]
    records: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in range(episodes)]
    returns = np.zeros(episodes)
    active = np.ones(episodes, dtype=bool)
    bar = progress_bar(None, "collect", progress, total=episodes, unit="episode")
    while active.any():
        chunks = policy.act(torch.as_tensor(obs), generator).numpy()  # every env, for common random numbers
        for j in range(horizon):
            noise = noise_rng.normal(0.0, action_noise, chunks[:, j].shape) if action_noise > 0 else 0.0
            actions = np.clip(chunks[:, j] + noise, low, high).astype(np.float32)
            for i in np.flatnonzero(active):
                records[i][0].append(obs[i].copy())
                records[i][1].append(actions[i])
                o, r, term, trunc, _ = env_list[i].step(actions[i])
                obs[i] = o
                returns[i] += r
                if term or trunc:
                    active[i] = False
                    bar.update(1)
            if not active.any():
                break
    bar.close()
    for env in env_list:
        env.close()
    lengths = np.array([len(r[0]) for r in records])
    return {
        "observations": np.concatenate([np.stack(r[0]) for r in records]).astype(np.float32),
        "actions": np.concatenate([np.stack(r[1]) for r in records]).astype(np.float32),
        "episode_ends": np.cumsum(lengths),
        "episode_returns": returns,
    }


def save_demos(demos: dict[str, np.ndarray], path: str | Path, **metadata: Any) -> Path:
    """Write the dataset (and its provenance as 0-d string arrays) atomically."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **demos, **{f"meta_{k}": np.array(str(v)) for k, v in metadata.items()})
    tmp.replace(path)
    return path
