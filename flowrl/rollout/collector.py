"""Collectors: run vector envs with a policy (any family) and return a typed Rollout.

The Collector interface is what the trainer sees; ``InProcessCollector`` implements it in
this process and ``RayCollector`` (ray_collector.py) over Ray actors. An ``EnvShard`` (a
vector env plus the random generator that drives the policy's noise, both seeded from
(seed, shard index)) is the unit an env worker owns; worker i and shard i are seeded alike.

Two ways to collect:
- ``collect``: T policy steps in every env, episodes running on across iterations (PPO);
- ``collect_episodes``: every env resets (groups of ``group_size`` envs from one seed) and
  runs one episode, up to a step budget (GRPO); ``valid`` marks the steps of that episode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from flowrl.core.batch import TensorBatch
from flowrl.errors import FlowRLError
from flowrl.models.policy import Policy
from flowrl.rollout.vector_env import EnvStep, GymVectorEnv, VectorEnv
from flowrl.runtime import derive_seed

if TYPE_CHECKING:
    from envs.wrappers import FrameSink
    from flowrl.config import ExperimentConfig


@dataclass
class Rollout:
    """Time-major batch of policy (action-chunk) steps from N envs.

    obs, next_obs: ``[T, N, O]``; next_obs is the state reached (the episode's final
        observation when it ended at that step, before any reset).
    samples: the policy's samples stacked ``[T, N, ...]`` (Transitions for flow and
        diffusion policies, a GaussianSample for Gaussian ones).
    rewards: ``[T, N]`` (summed over the chunk); terminated, truncated: ``[T, N]`` bool.
    valid: ``[T, N]`` bool, False for steps that belong to no training episode (after an
        env's episode ended in ``collect_episodes``, or padding).
    group: ``[N]`` int64, the reset group of each env (env index // group_size, over all shards).
    episode_return, episode_success, episode_done: ``[N]`` per env's episode, from
        ``collect_episodes`` only (None otherwise); an episode that ran out of step budget
        has episode_done False and its return so far.
    env_steps: primitive env steps of the valid steps. episode_returns / episode_successes:
    one entry per episode that ended during the collection.
    metrics: what the collector measured besides (the prompt collector's accuracy per
        category, JPEG size, diversity, reward timing), logged as they are; not joined by
        ``concat_envs``.
    reward_components, reward_weights: per-reward advantages (a multi reward with
        ``advantages: per_reward``): each component's scores ``[N]`` and its weight, by name;
        GRPO then normalises each within its group instead of the summed return. Not joined
        by ``concat_envs``.
    """

    obs: Tensor
    next_obs: Tensor
    samples: TensorBatch
    rewards: Tensor
    terminated: Tensor
    truncated: Tensor
    valid: Tensor
    group: Tensor
    env_steps: int
    episode_returns: list[float] = field(default_factory=list)
    episode_successes: list[float] = field(default_factory=list)
    episode_return: Tensor | None = None
    episode_success: Tensor | None = None
    episode_done: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    reward_components: dict[str, Tensor] | None = None
    reward_weights: dict[str, float] | None = None

    @staticmethod
    def concat_envs(parts: list[Rollout]) -> Rollout:
        """Join rollouts of different env shards along the env axis; shorter ones (episodes
        that all ended early) are padded in time with invalid steps."""
        horizon = max(p.obs.shape[0] for p in parts)
        parts = [p.padded(horizon) for p in parts]
        tensors = {k: torch.cat([getattr(p, k) for p in parts], dim=1) for k in _TIME_MAJOR}
        per_env = {
            k: None if getattr(parts[0], k) is None else torch.cat([getattr(p, k) for p in parts])
            for k in ("episode_return", "episode_success", "episode_done")
        }
        return Rollout(
            **tensors,
            **per_env,
            samples=type(parts[0].samples).cat([p.samples for p in parts], dim=1),
            group=torch.cat([p.group for p in parts]),
            env_steps=sum(p.env_steps for p in parts),
            episode_returns=[r for p in parts for r in p.episode_returns],
            episode_successes=[s for p in parts for s in p.episode_successes],
        )

    def padded(self, horizon: int) -> Rollout:
        """This rollout with ``horizon`` time steps, the added ones zero and invalid."""
        missing = horizon - self.obs.shape[0]
        if missing <= 0:
            return self

        def pad(t: Tensor) -> Tensor:
            return torch.cat([t, t.new_zeros((missing, *t.shape[1:]))])

        fields_ = {k: pad(getattr(self, k)) for k in _TIME_MAJOR}
        return Rollout(
            **fields_,
            samples=self.samples.map(pad),
            group=self.group,
            env_steps=self.env_steps,
            episode_returns=self.episode_returns,
            episode_successes=self.episode_successes,
            episode_return=self.episode_return,
            episode_success=self.episode_success,
            episode_done=self.episode_done,
        )


_TIME_MAJOR = ("obs", "next_obs", "rewards", "terminated", "truncated", "valid")


def _record(rows: dict[str, list[Tensor]], obs: Tensor, step: EnvStep, valid: Tensor) -> None:
    """Append one policy step of every env to the time-major lists of a Rollout."""
    for key, value in (
        ("obs", obs),
        ("next_obs", step.reached),
        ("rewards", step.reward.to(torch.float32)),
        ("terminated", step.terminated),
        ("truncated", step.truncated),
        ("valid", valid),
    ):
        rows[key].append(value)


class Collector(Protocol):
    def reset(self, epoch: int) -> None:
        """(Re)start every env from seeds derived from (seed, shard, epoch)."""

    def collect(self, policy: Policy, num_steps: int, iteration: int) -> Rollout:
        """``num_steps`` policy steps in every env with the window of ``iteration``."""

    def collect_episodes(self, policy: Policy, max_steps: int, iteration: int) -> Rollout:
        """One episode per env from group-shared reset states, at most ``max_steps`` policy steps."""

    def close(self) -> None: ...


class EnvShard:
    """A vector of ``num_envs`` envs and the noise generator of the policy sampling for it.

    ``group_size``: every group_size consecutive envs reset from the same seed, so a group
    starts from the same state (GRPO); 1 = every env its own seed.
    """

    def __init__(
        self,
        env_id: str,
        horizon: int,
        num_envs: int,
        seed: int,
        index: int,
        env_kwargs: dict | None = None,
        group_size: int = 1,
        batched_device: torch.device | None = None,
    ) -> None:
        if num_envs % group_size:
            raise ValueError(f"an env shard of {num_envs} envs cannot hold whole groups of {group_size}")
        self.num_envs, self.seed, self.index, self.group_size = num_envs, seed, index, group_size
        self.envs: VectorEnv
        if batched_device is not None:  # env.batched: one ManiSkill batch on that device
            from envs.maniskill_batch import ManiSkillBatchEnv

            self.envs = ManiSkillBatchEnv(env_id, horizon, num_envs, env_kwargs, batched_device)
        else:
            self.envs = GymVectorEnv(env_id, horizon, num_envs, env_kwargs)
        self.generator = torch.Generator(device=self.envs.device)  # the policy samples where the envs are
        self.group = (index * num_envs + torch.arange(num_envs)) // group_size
        self._obs: Tensor | None = None
        self._returns = np.zeros(num_envs)

    def reset(self, epoch: int) -> None:
        base = derive_seed(self.seed, self.index, epoch)
        self._obs = self.envs.reset([base + i // self.group_size for i in range(self.num_envs)])
        self.generator.manual_seed(derive_seed(self.seed, self.index, epoch, 1))
        self._returns[:] = 0.0

    def _step(self, policy: Policy, iteration: int):
        assert self._obs is not None
        obs = self._obs
        sample = policy.sample(obs, iteration, self.generator)
        step = self.envs.step(sample.final)
        self._obs = step.obs
        return obs, sample, step

    def collect(self, policy: Policy, num_steps: int, iteration: int) -> Rollout:
        if self._obs is None:
            self.reset(0)
        rows: dict[str, list[Tensor]] = {k: [] for k in _TIME_MAJOR}
        samples = []
        # all steps count (stacking copies it)
        every = torch.ones(self.num_envs, dtype=torch.bool, device=self.envs.device)
        env_steps = 0
        ep_returns: list[float] = []
        ep_successes: list[float] = []
        for _ in range(num_steps):
            obs, sample, step = self._step(policy, iteration)
            done = (step.terminated | step.truncated).cpu().numpy()
            self._returns += step.reward.cpu().numpy()
            for i in np.flatnonzero(done):
                ep_returns.append(float(self._returns[i]))
                ep_successes.append(float(bool(step.success[i])))
                self._returns[i] = 0.0
            env_steps += int(step.env_steps.sum())
            _record(rows, obs, step, every)
            samples.append(sample)
        return Rollout(
            **{k: torch.stack(v) for k, v in rows.items()},
            samples=type(samples[0]).stack(samples),
            group=self.group.clone(),
            env_steps=env_steps,
            episode_returns=ep_returns,
            episode_successes=ep_successes,
        )

    def collect_episodes(self, policy: Policy, max_steps: int, iteration: int) -> Rollout:
        self.reset(iteration)
        rows: dict[str, list[Tensor]] = {k: [] for k in _TIME_MAJOR}
        samples = []
        device = self.envs.device
        active = torch.ones(self.num_envs, dtype=torch.bool, device=device)
        returns = torch.zeros(self.num_envs, dtype=torch.float64, device=device)
        success = torch.zeros(self.num_envs, dtype=torch.bool, device=device)
        env_steps = 0
        for _ in range(max_steps):
            if not bool(active.any()):
                break
            obs, sample, step = self._step(policy, iteration)
            valid = active.clone()
            returns += torch.where(valid, step.reward.double(), torch.zeros_like(returns))
            ended = valid & (step.terminated | step.truncated)
            success |= ended & step.success
            active &= ~ended
            env_steps += int(step.env_steps[valid].sum())
            _record(rows, obs, step, valid)
            samples.append(sample)
        done = ~active
        self._obs = None  # the next collection resets
        return Rollout(
            **{k: torch.stack(v) for k, v in rows.items()},
            samples=type(samples[0]).stack(samples),
            group=self.group.clone(),
            env_steps=env_steps,
            episode_returns=returns[done].tolist(),
            episode_successes=success[done].float().tolist(),
            episode_return=returns.float(),
            episode_success=success,
            episode_done=done,
        )

    def close(self) -> None:
        self.envs.close()


class InProcessCollector:
    """Collector running its env shards one after the other in this process."""

    def __init__(
        self,
        env_id: str,
        horizon: int,
        num_envs: int,
        seed: int,
        num_workers: int = 1,
        env_kwargs: dict | None = None,
        group_size: int = 1,
        batched_device: torch.device | None = None,
    ) -> None:
        if num_envs % num_workers:
            raise ValueError(f"num_envs={num_envs} must be divisible by the number of env workers ({num_workers})")
        per_shard = num_envs // num_workers
        self.shards = [
            EnvShard(env_id, horizon, per_shard, seed, i, env_kwargs, group_size, batched_device)
            for i in range(num_workers)
        ]

    def reset(self, epoch: int) -> None:
        for shard in self.shards:
            shard.reset(epoch)

    def collect(self, policy: Policy, num_steps: int, iteration: int) -> Rollout:
        return Rollout.concat_envs([s.collect(policy, num_steps, iteration) for s in self.shards])

    def collect_episodes(self, policy: Policy, max_steps: int, iteration: int) -> Rollout:
        return Rollout.concat_envs([s.collect_episodes(policy, max_steps, iteration) for s in self.shards])

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


def make_collector(cfg: ExperimentConfig) -> Collector:
    """The experiment's env workers: Ray actors (ray.enabled, inside a Ray session) or the
    same shards in this process; the worker count is env.num_workers either way."""
    if cfg.env.type == "shapes":  # prompts, not envs: reward workers instead of env workers
        from flowrl.rollout.prompts import make_prompt_collector

        return make_prompt_collector(cfg)
    env, horizon = cfg.env, cfg.policy.horizon
    if env.batched:  # one batch in this process, on the learner's device (no env workers)
        from flowrl.runtime import resolve_device

        device = resolve_device(cfg.device)
        return InProcessCollector(env.id, horizon, env.num_envs, cfg.seed, 1, env.kwargs, env.group_size, device)
    if cfg.ray.enabled:
        from flowrl.rollout.ray_collector import RayCollector  # Ray is imported only when used

        return RayCollector(
            env.id,
            horizon,
            env.num_envs,
            cfg.seed,
            env.num_workers,
            cfg.ray.cpus_per_worker,
            cfg.ray.max_restarts,
            env.kwargs,
            env.group_size,
        )
    return InProcessCollector(env.id, horizon, env.num_envs, cfg.seed, env.num_workers, env.kwargs, env.group_size)


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
        base = derive_seed(seed, 10**6)
        obs = np.stack([env.reset(seed=base + i)[0] for i, env in enumerate(env_list)]).astype(np.float32)
        generator = torch.Generator().manual_seed(derive_seed(seed, 10**6, 1))
        returns, lengths = np.zeros(episodes), np.zeros(episodes)
        success = np.zeros(episodes, dtype=bool)
        success_once: np.ndarray | None = None  # envs whose info says whether any step succeeded (ManiSkill)
        active = np.ones(episodes, dtype=bool)
        while active.any():
            actions = policy.act(torch.as_tensor(obs), generator).numpy()
            for i in np.flatnonzero(active):
                o, r, term, trunc, info = env_list[i].step(actions[i])
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


__all__ = [
    "Collector",
    "EnvShard",
    "InProcessCollector",
    "Rollout",
    "evaluate_policy",
    "headline_success",
    "make_collector",
]
