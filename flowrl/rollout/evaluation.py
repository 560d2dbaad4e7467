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


class EvalEnvs:
    """The envs of a run's evaluations, kept between them (``eval.keep_envs``): made at the first
    ``get``, reset from the same seeds at every evaluation (a gymnasium env reset with a seed starts
    the episode a fresh env would: tested for MuJoCo and ManiSkill), closed by ``close``, and after
    an evaluation that raised (an env in an unknown state is not reused)."""

    def __init__(self, env_id: str, horizon: int, episodes: int, env_kwargs: dict | None = None) -> None:
        self.env_id, self.horizon, self.episodes, self.env_kwargs = env_id, horizon, episodes, env_kwargs
        self.envs: list[Any] = []
        self.made = 0  # envs made over the run (made once while kept)

    def get(self) -> list[Any]:
        import envs as flowrl_envs

        if not self.envs:
            try:
                for _ in range(self.episodes):
                    self.envs.append(flowrl_envs.make_env(self.env_id, self.horizon, self.env_kwargs))
                    self.made += 1
            except BaseException:
                self.close()
                raise
        return self.envs

    def close(self) -> None:
        envs, self.envs = self.envs, []
        for env in envs:
            env.close()


def evaluate_policy(
    policy: Policy,
    env_id: str,
    horizon: int,
    episodes: int,
    seed: int,
    env_kwargs: dict | None = None,
    on_frame: Mapping[int, FrameSink] | None = None,
    sampled: bool = False,
    kept: EvalEnvs | None = None,
) -> dict[str, float]:
    """Deterministic (ODE) evaluation: ``episodes`` envs, one episode each, fixed seeds.
    ``sampled``: the same episodes with the stochastic policy that fine-tuning collects with
    (its exploration noise), to measure how much success the noise costs.

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

    ``kept``: envs kept between evaluations (its env id, horizon, episodes and kwargs are these);
    None = make the envs now and close them at the end.
    """
    import envs as flowrl_envs

    if kept is not None:
        if on_frame:
            raise ValueError("recording frames needs envs of its own: pass on_frame without kept envs")
        try:
            returns, lengths, final = _run_episodes(policy, kept.get(), env_id, seed, sampled)
        except BaseException:
            kept.close()
            raise
        return _eval_metrics(returns, lengths, final)
    frames = on_frame or {}
    env_list: list[Any] = []
    try:  # the envs made so far are closed however the evaluation ends (a ManiSkill env holds ~30 MB)
        for i in range(episodes):
            env_list.append(flowrl_envs.make_env(env_id, horizon, env_kwargs, frames.get(i)))
        returns, lengths, final = _run_episodes(policy, env_list, env_id, seed, sampled)
    finally:
        for env in env_list:
            env.close()
    return _eval_metrics(returns, lengths, final)


def _eval_metrics(returns: np.ndarray, lengths: np.ndarray, final: list[dict[str, Any]]) -> dict[str, float]:
    """The ``eval/*`` metrics of episodes with ``returns`` and ``lengths`` ``[E]`` whose last step's
    info is ``final[i]``: ``eval/success_once`` only where an env reports it (ManiSkill)."""
    episodes = len(returns)
    middle = np.sort(returns)[episodes // 4 : episodes - episodes // 4]  # the interquartile mean's half
    success = np.array([bool(info.get("success", False)) for info in final], dtype=bool)
    once = {}
    if any("success_once" in info for info in final):
        success_once = np.array([bool(info.get("success_once", False)) for info in final], dtype=bool)
        once = {"eval/success_once": float(success_once.mean())}
    return {
        **once,
        "eval/return": float(returns.mean()),
        "eval/return_std": float(returns.std()),
        "eval/return_iqm": float(middle.mean()),
        "eval/success_rate": float(success.mean()),
        "eval/episode_length": float(lengths.mean()),
    }


def _run_episodes(
    policy: Policy, env_list: list[Any], env_id: str, seed: int, sampled: bool = False
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One episode in each env, all side by side: returns and lengths (primitive steps) ``[E]``,
    and each episode's last info (its success at the end, and ManiSkill's ``success_once``)."""
    episodes = len(env_list)
    base = derive_seed(seed, 10**6)
    obs = np.stack([_call(env_id, "reset", i, env.reset, seed=base + i)[0] for i, env in enumerate(env_list)])
    obs = obs.astype(np.float32)
    generator = torch.Generator().manual_seed(derive_seed(seed, 10**6, 1))
    returns, lengths = np.zeros(episodes), np.zeros(episodes)
    final: list[dict[str, Any]] = [{} for _ in range(episodes)]
    active = np.ones(episodes, dtype=bool)
    while active.any():
        with torch.no_grad():
            cond = torch.as_tensor(obs)
            actions = (policy.sample(cond, 0, generator).final if sampled else policy.act(cond, generator)).numpy()
        for i in np.flatnonzero(active):
            obs[i], reward, ended, info = _step(env_id, i, env_list[i], actions[i])
            returns[i] += reward
            lengths[i] += info["chunk_steps"]
            if ended:
                active[i] = False
                final[i] = info
    return returns, lengths, final


def _step(env_id: str, episode: int, env: Any, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict[str, Any]]:
    """One step of an evaluation env: its observation, reward, whether the episode ended, its
    info. A non-finite reward or observation is a FlowRLError (flowrl does not replace bad values)."""
    o, r, term, trunc, info = _call(env_id, "step", episode, env.step, action)
    if not (np.isfinite(r) and np.isfinite(o).all()):
        what = f"reward {r}" if not np.isfinite(r) else "a non-finite observation"
        raise FlowRLError(
            f"evaluation: {env_id} returned {what} in episode {episode}; fix the env (flowrl does not replace "
            "bad values)"
        )
    return o, r, term or trunc, info


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


__all__ = ["EvalEnvs", "evaluate_policy", "headline_success"]
