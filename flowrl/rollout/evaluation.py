"""Deterministic evaluation of a policy in the env: ``evaluate_policy`` and the success the console shows."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from flowrl.errors import EnvError, FlowRLError, brief
from flowrl.models.policy import Policy
from flowrl.runtime import derive_seed

if TYPE_CHECKING:
    from envs.wrappers import FrameSink

T = TypeVar("T")


def headline_success(metrics: dict[str, float]) -> float:
    """The success rate the console shows: ``eval/success_once`` where the env reports whether
    any step succeeded (ManiSkill's measure; with ``terminate_on_success: false`` the success at
    the end can be 0 after a success), else ``eval/success_rate``."""
    return metrics.get("eval/success_once", metrics["eval/success_rate"])


def evaluate_policy(
    policy: Policy,
    env_id: str,
    horizon: int,
    episodes: int,
    seed: int,
    env_kwargs: dict | None = None,
    on_frame: Mapping[int, FrameSink] | None = None,
) -> dict[str, float]:
    """Deterministic (ODE) evaluation: ``episodes`` envs, one episode each, fixed seeds.

    ``eval/success_rate`` is the success at the episode's end; envs that report whether any step
    succeeded (ManiSkill's ``success_once``) also give ``eval/success_once``, ManiSkill's fair
    measure (every env runs exactly one episode: no partial resets).

    The seeds and the initial noise are the same at every call, so successive evaluations
    of a changing policy are compared on common random numbers.

    ``on_frame``: episode index -> a function handed that episode's rendered frames ``[H, W, 3]``
    uint8 and fps, the reset's and one per primitive step (flowrl.rollout.video). Recording here, in the
    evaluation itself, is what makes a video show episode i of this evaluation: a policy step
    draws the initial noise of all ``episodes`` envs at once, so an episode depends on how many
    run beside it.
    """
    import envs as flowrl_envs

    frames = on_frame or {}
    env_list: list[Any] = []
    try:  # the envs made so far are closed however the evaluation ends (ManiSkill's hold ~0.5 GB each)
        for i in range(episodes):
            env_list.append(flowrl_envs.make_env(env_id, horizon, env_kwargs, frames.get(i)))
        returns, lengths, success, success_once = _run_episodes(policy, env_list, env_id, seed)
    finally:
        for env in env_list:
            env.close()
    middle = np.sort(returns)[episodes // 4 : episodes - episodes // 4]  # the interquartile mean's half
    once = {} if success_once is None else {"eval/success_once": float(success_once.mean())}
    return {
        **once,
        "eval/return": float(returns.mean()),
        "eval/return_std": float(returns.std()),
        "eval/return_iqm": float(middle.mean()),
        "eval/success_rate": float(success.mean()),
        "eval/episode_length": float(lengths.mean()),
    }


def _run_episodes(
    policy: Policy, env_list: list[Any], env_id: str, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """One episode in each env, all side by side: returns, lengths (primitive steps), success at
    the end, and success at any step (None unless the env reports ``success_once``), each ``[E]``."""
    episodes = len(env_list)
    base = derive_seed(seed, 10**6)
    obs = np.stack([_call(env_id, "reset", i, env.reset, seed=base + i)[0] for i, env in enumerate(env_list)])
    obs = obs.astype(np.float32)
    generator = torch.Generator().manual_seed(derive_seed(seed, 10**6, 1))
    returns, lengths = np.zeros(episodes), np.zeros(episodes)
    success = np.zeros(episodes, dtype=bool)
    success_once: np.ndarray | None = None  # envs whose info says whether any step succeeded (ManiSkill)
    active = np.ones(episodes, dtype=bool)
    while active.any():
        actions = policy.act(torch.as_tensor(obs), generator).numpy()
        for i in np.flatnonzero(active):
            o, r, term, trunc, info = _call(env_id, "step", i, env_list[i].step, actions[i])
            if not (np.isfinite(r) and np.isfinite(o).all()):
                what = f"reward {r}" if not np.isfinite(r) else "a non-finite observation"
                raise FlowRLError(
                    f"evaluation: {env_id} returned {what} in episode {i}; fix the env (flowrl does not replace "
                    "bad values)"
                )
            obs[i] = o
            returns[i] += r
            lengths[i] += info["chunk_steps"]
            if term or trunc:
                active[i] = False
                success[i] = bool(info.get("success", False))
                if "success_once" in info:
                    success_once = np.zeros(episodes, dtype=bool) if success_once is None else success_once
                    success_once[i] = bool(info["success_once"])
    return returns, lengths, success, success_once


def _call(env_id: str, call: str, episode: int, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``method(*args, **kwargs)`` of an evaluation env; an exception it raises (other than a
    FlowRLError, already one line) becomes an EnvError naming the env, the call and the episode."""
    try:
        return method(*args, **kwargs)
    except FlowRLError:
        raise
    except Exception as exc:
        raise EnvError(
            f"evaluation: env {env_id} raised in {call} (episode {episode}): {brief(exc, 200)}; fix the env "
            "(evaluation episodes run in this process, with Ray or without)"
        ) from exc


__all__ = ["evaluate_policy", "headline_success"]
