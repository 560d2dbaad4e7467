"""The typed Rollout that every collector returns, and the Collector interface the trainer sees.

Implementations: ``InProcessCollector`` (collector.py, env shards in this process), ``RayCollector``
(ray_collector.py, env shards in Ray actors), ``PromptCollector`` (prompts.py, text-to-image);
``make_collector`` (build.py) picks one from the experiment's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from flowrl.core.batch import TensorBatch
from flowrl.models.policy import Policy


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
    episode_success_once: ``[N]`` bool from ``collect_episodes``, whether the env's episode
        succeeded at any of its steps, where the env reports it (ManiSkill's ``success_once``),
        else None.
    env_steps: primitive env steps of the valid steps. episode_returns / episode_successes:
    one entry per episode that ended during the collection; episode_successes_once likewise,
    empty where the env does not report ``success_once``.
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
    episode_successes_once: list[float] = field(default_factory=list)
    episode_success_once: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    reward_components: dict[str, Tensor] | None = None
    reward_weights: dict[str, float] | None = None

    @staticmethod
    def concat_envs(parts: list[Rollout]) -> Rollout:
        """Join rollouts of different env shards along the env axis; shorter ones (episodes
        that all ended early) are padded in time with invalid steps."""
        horizon = max(p.obs.shape[0] for p in parts)
        parts = [p.padded(horizon) for p in parts]
        tensors = {k: torch.cat([getattr(p, k) for p in parts], dim=1) for k in TIME_MAJOR}
        per_env = {
            k: None if getattr(parts[0], k) is None else torch.cat([getattr(p, k) for p in parts]) for k in PER_ENV
        }
        return Rollout(
            **tensors,
            **per_env,
            samples=type(parts[0].samples).cat([p.samples for p in parts], dim=1),
            group=torch.cat([p.group for p in parts]),
            env_steps=sum(p.env_steps for p in parts),
            episode_returns=[r for p in parts for r in p.episode_returns],
            episode_successes=[s for p in parts for s in p.episode_successes],
            episode_successes_once=[s for p in parts for s in p.episode_successes_once],
        )

    def padded(self, horizon: int) -> Rollout:
        """This rollout with ``horizon`` time steps, the added ones zero and invalid."""
        missing = horizon - self.obs.shape[0]
        if missing <= 0:
            return self

        def pad(t: Tensor) -> Tensor:
            return torch.cat([t, t.new_zeros((missing, *t.shape[1:]))])

        fields_ = {k: pad(getattr(self, k)) for k in TIME_MAJOR}
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
            episode_successes_once=self.episode_successes_once,
            episode_success_once=self.episode_success_once,
        )


# The Rollout fields of shape [T, N]: joined along N, padded along T.
TIME_MAJOR = ("obs", "next_obs", "rewards", "terminated", "truncated", "valid")
# The per-env episode fields of collect_episodes ([N] or None): joined along N.
PER_ENV = ("episode_return", "episode_success", "episode_done", "episode_success_once")


class Collector(Protocol):
    def reset(self, epoch: int) -> None:
        """(Re)start every env from seeds derived from (seed, shard, epoch)."""

    def collect(self, policy: Policy, num_steps: int, iteration: int) -> Rollout:
        """``num_steps`` policy steps in every env with the window of ``iteration``."""

    def collect_episodes(self, policy: Policy, max_steps: int, iteration: int) -> Rollout:
        """One episode per env from group-shared reset states, at most ``max_steps`` policy steps."""

    def close(self) -> None: ...


__all__ = ["TIME_MAJOR", "Collector", "Rollout"]
