"""EnvShard: a vector of envs and the seeded noise generator of the policy that acts in them,
built from an EnvSpec (which envs, how many, how seeded).

An EnvShard is the unit an env worker owns: the in-process collector (collector.py) runs its
shards one after the other, the Ray collector (ray_collector.py) one per actor. Both split the
experiment's EnvSpec alike (``EnvSpec.shards``) and shard i is seeded from (seed, i) either way,
so both return identical rollouts.

Two ways to collect:
- ``collect``: T policy steps in every env, episodes running on across iterations (PPO);
- ``collect_episodes``: every env resets (groups of ``group_size`` envs from one seed) and
  runs one episode, up to a step budget (GRPO); ``valid`` marks the steps of that episode.

An env that raises in ``reset`` or ``step`` is an EnvError naming the env, the call and the
exception (the collector that runs the shard adds what to do).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from flowrl.core.batch import TensorBatch
from flowrl.core.env_step import EnvStep, VectorEnv
from flowrl.errors import EnvError, FlowRLError, brief
from flowrl.models.policy import Policy
from flowrl.rollout.rollout import TIME_MAJOR, Rollout
from flowrl.rollout.vector_env import GymVectorEnv
from flowrl.runtime import derive_seed

if TYPE_CHECKING:
    from flowrl.config import ExperimentConfig


@dataclass(frozen=True)
class EnvSpec:
    """Which envs a collector or an env shard runs and how it seeds them.

    env_id: a registered env id (``flowrl/TwoGoal-v0``, ``Hopper-v5``); horizon: the policy's
    action chunk Ta (one policy step = Ta env steps); num_envs: the envs of all shards (the
    experiment's spec) or of one (a shard's); seed: the experiment's seed; index: the shard's
    number (its envs and noise are seeded from (seed, index, epoch)), 0 for the experiment's
    spec; env_kwargs: the env's constructor arguments (``env.kwargs``); group_size: every
    group_size consecutive envs reset from the same seed, so a group starts from the same
    state (GRPO); 1 = every env its own seed. ``env_kwargs`` is not copied: do not change it.
    """

    env_id: str
    horizon: int
    num_envs: int
    seed: int
    index: int = 0
    env_kwargs: dict[str, Any] | None = None
    group_size: int = 1

    def __post_init__(self) -> None:
        if self.num_envs % self.group_size:
            raise ValueError(f"{self.num_envs} envs cannot hold whole groups of group_size={self.group_size}")

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> EnvSpec:
        """The experiment's envs: ``env.id``, ``policy.horizon``, ``env.num_envs``, ``seed``,
        ``env.kwargs``, ``env.group_size``."""
        env = cfg.env
        return cls(env.id, cfg.policy.horizon, env.num_envs, cfg.seed, env_kwargs=env.kwargs, group_size=env.group_size)

    def shards(self, count: int) -> list[EnvSpec]:
        """The specs of ``count`` env shards sharing these envs: shard i holds num_envs / count
        of them and has index i (the same split in this process and on Ray)."""
        if self.num_envs % count:
            raise ValueError(f"num_envs={self.num_envs} must be divisible by the number of env workers ({count})")
        return [replace(self, num_envs=self.num_envs // count, index=i) for i in range(count)]


class _Steps:
    """The policy steps of one collection (at most ``length``), kept as lists of per-step tensors
    and stacked into the Rollout's ``[T, N, ...]`` tensors once at the end. Measured against
    buffers preallocated at the first step and written in place (issue 27): a dozen ``copy_``
    calls per step cost about five times what these appends and the final stacks do, so the
    lists stay (see README, "Where a policy step goes")."""

    def __init__(self, length: int) -> None:
        if length < 1:
            raise ValueError(f"a collection needs at least one policy step, got {length}")
        self.rows: dict[str, list[Tensor]] = {k: [] for k in TIME_MAJOR}
        self.samples: list[TensorBatch] = []
        self.env_steps: list[Tensor] = []

    def write(self, obs: Tensor, step: EnvStep, valid: Tensor, sample: TensorBatch) -> None:
        """Record one policy step of every env (``valid``: ``[N]`` bool; the tensors are kept, not
        copied: nothing writes into them afterwards)."""
        for key, value in zip(
            TIME_MAJOR, (obs, step.reached, step.reward, step.terminated, step.truncated, valid), strict=True
        ):
            self.rows[key].append(value)
        self.samples.append(sample)
        self.env_steps.append(step.env_steps)

    def valid_env_steps(self) -> int:
        """Primitive env steps of the valid steps recorded."""
        return int(torch.stack(self.env_steps)[torch.stack(self.rows["valid"])].sum())

    def rollout(self, group: Tensor, env_steps: int, **episodes: Any) -> Rollout:
        rows = {k: torch.stack(v) for k, v in self.rows.items()}
        rows["rewards"] = rows["rewards"].to(torch.float32)  # the env's precision (float64 for gymnasium)
        samples = type(self.samples[0]).stack(self.samples)
        return Rollout(**rows, samples=samples, group=group, env_steps=env_steps, **episodes)


class EnvShard:
    """The ``spec.num_envs`` envs of ``spec`` (shard ``spec.index``) and the noise generator of the
    policy sampling for them. ``batched_device``: simulate them as one ManiSkill batch on that
    device (``env.batched``) instead of gymnasium envs on the CPU."""

    def __init__(self, spec: EnvSpec, batched_device: torch.device | None = None) -> None:
        self.spec = spec
        self.num_envs = spec.num_envs
        self.envs: VectorEnv
        if batched_device is not None:  # env.batched: one ManiSkill batch on that device
            from envs.maniskill_batch import ManiSkillBatchEnv

            self.envs = ManiSkillBatchEnv(spec.env_id, spec.horizon, spec.num_envs, spec.env_kwargs, batched_device)
        else:
            self.envs = GymVectorEnv(spec.env_id, spec.horizon, spec.num_envs, spec.env_kwargs)
        self.generator = torch.Generator(device=self.envs.device)  # the policy samples where the envs are
        self.group = (spec.index * spec.num_envs + torch.arange(spec.num_envs)) // spec.group_size
        self._obs: Tensor | None = None
        self._returns = np.zeros(spec.num_envs)

    def reset(self, epoch: int) -> None:
        spec = self.spec
        base = derive_seed(spec.seed, spec.index, epoch)
        seeds = [base + i // spec.group_size for i in range(spec.num_envs)]
        try:
            self._obs = self.envs.reset(seeds)
        except Exception as exc:
            raise self._failed("reset", exc) from exc
        self.generator.manual_seed(derive_seed(spec.seed, spec.index, epoch, 1))
        self._returns[:] = 0.0

    def _failed(self, call: str, exc: Exception) -> FlowRLError:
        """What an exception of the env's ``call`` becomes: a FlowRLError stays (it is one line with
        its fix already); anything else is an EnvError naming the env, the call and the exception."""
        if isinstance(exc, FlowRLError):
            return exc
        return EnvError(f"env {self.spec.env_id} raised in {call} (env shard {self.spec.index}): {brief(exc, 200)}")

    def _step(self, policy: Policy, iteration: int):
        assert self._obs is not None
        obs = self._obs
        sample = policy.sample(obs, iteration, self.generator)
        try:
            step = self.envs.step(sample.final)
        except Exception as exc:
            raise self._failed("step", exc) from exc
        self._obs = step.obs
        return obs, sample, step

    def collect(self, policy: Policy, num_steps: int, iteration: int) -> Rollout:
        if self._obs is None:
            self.reset(0)
        steps = _Steps(num_steps)
        every = torch.ones(self.num_envs, dtype=torch.bool, device=self.envs.device)  # all steps count
        ep_returns: list[float] = []
        ep_successes: list[float] = []
        ep_successes_once: list[float] = []
        for _ in range(num_steps):
            obs, sample, step = self._step(policy, iteration)
            steps.write(obs, step, every, sample)
            self._returns += step.reward.cpu().numpy()
            ended = np.flatnonzero((step.terminated | step.truncated).cpu().numpy())
            if ended.size:  # the episodes' order: by step, then by env, as they end
                ep_returns += self._returns[ended].tolist()
                ep_successes += step.success.cpu().numpy()[ended].astype(float).tolist()
                if step.success_once is not None:
                    ep_successes_once += step.success_once.cpu().numpy()[ended].astype(float).tolist()
                self._returns[ended] = 0.0
        return steps.rollout(
            self.group.clone(),
            int(torch.stack(steps.env_steps).sum()),
            episode_returns=ep_returns,
            episode_successes=ep_successes,
            episode_successes_once=ep_successes_once,
        )

    def collect_episodes(self, policy: Policy, max_steps: int, iteration: int) -> Rollout:
        self.reset(iteration)
        steps = _Steps(max_steps)
        device = self.envs.device
        active = torch.ones(self.num_envs, dtype=torch.bool, device=device)
        returns = torch.zeros(self.num_envs, dtype=torch.float64, device=device)
        success = torch.zeros(self.num_envs, dtype=torch.bool, device=device)
        once: Tensor | None = None  # stays None for envs that do not report success_once
        for _ in range(max_steps):
            if not bool(active.any()):
                break
            obs, sample, step = self._step(policy, iteration)
            steps.write(obs, step, active, sample)
            returns += torch.where(active, step.reward.double(), torch.zeros_like(returns))
            ended = active & (step.terminated | step.truncated)
            success |= ended & step.success
            if step.success_once is not None:
                once = (torch.zeros_like(success) if once is None else once) | (active & step.success_once)
            active = active & ~ended
        done = ~active
        self._obs = None  # the next collection resets
        return steps.rollout(
            self.group.clone(),
            steps.valid_env_steps(),
            episode_returns=returns[done].tolist(),
            episode_successes=success[done].float().tolist(),
            episode_return=returns.float(),
            episode_success=success,
            episode_done=done,
            episode_successes_once=[] if once is None else once[done].float().tolist(),
            episode_success_once=once,
        )

    def close(self) -> None:
        self.envs.close()


__all__ = ["EnvShard", "EnvSpec"]
