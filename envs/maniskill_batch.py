"""ManiSkill tasks simulated as one batch in the learner's process (``env.batched: true``).

``ManiSkillBatchEnv`` implements flowrl's vector-env interface (flowrl.core.env_step) on
ManiSkill's batched API: ``num_envs`` envs in one ManiSkill env, torch tensors on the simulator's
device throughout (``physx_cuda`` on a GPU: hundreds of envs, no worker processes, no copies to
numpy). On the CPU, ManiSkill's ``physx_cpu`` allows one env per process, so there it serves
tests and one-env runs; the CPU workers (``envs/maniskill.py``) are the CPU path.

It keeps the semantics of the gymnasium path so that either gives the same kind of rollout:
- an action chunk ``[N, Ta, Da]`` is Ta simulator steps; rewards are summed over the steps an
  env's episode was running; an env whose episode ends inside the chunk is reset at the chunk's
  end (the batch steps together, so its remaining sub-steps are simulated and discarded);
- ``reached`` is the observation where the episode ended (for bootstrapping), ``obs`` the new
  episode's first one; the time limit is flowrl's registration's (``max_episode_steps``),
  counted here (ManiSkill's raw class does not truncate);
- ``terminate_on_success`` as in envs/maniskill.py; ``success`` is the task's success at the
  ending step.
Reset groups (GRPO): ManiSkill draws a batch's initial states from one generator seeded by the
first seed, so equal seeds do not give equal states; each env of a group therefore receives the
simulator state of the group's first env (``set_state_dict``) and observes it.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from torch import Tensor

from envs.maniskill import make_maniskill
from flowrl.core.env_step import EnvStep
from flowrl.errors import FlowRLError

# ManiSkillEnv's constructor arguments a batch understands (envs/maniskill.py documents them).
KWARGS = {"control_mode", "reward_mode", "terminate_on_success", "max_episode_steps"}


def _index_state(state: Any, index: Tensor) -> Any:
    """A ManiSkill state dict (nested dicts of ``[N, ...]`` tensors) with rows ``index``."""
    if isinstance(state, dict):
        return {k: _index_state(v, index) for k, v in state.items()}
    return state[index]


def check_batched(env_id: str, num_envs: int, env_kwargs: dict[str, Any] | None, device: torch.device | str) -> None:
    """FlowRLError (one line) unless ``env.batched`` can run this env here: a ManiSkill task, env
    kwargs the batch understands, and one env unless the simulator is on a GPU."""
    import envs

    if env_id not in envs.MANISKILL:
        raise FlowRLError(
            f"env.batched: {env_id} is not a ManiSkill task (batched simulation is ManiSkill's: "
            f"{list(envs.MANISKILL)}); set env.batched: false"
        )
    unknown = sorted(set(env_kwargs or {}) - KWARGS)
    if unknown:
        raise FlowRLError(
            f"env.batched: env.kwargs {unknown} are not supported by the batched simulator (it takes {sorted(KWARGS)})"
        )
    if torch.device(device).type != "cuda" and num_envs != 1:
        raise FlowRLError(
            f"env.batched: ManiSkill simulates one env per process on the CPU (physx_cpu), got num_envs={num_envs}; "
            "run the learner on a GPU (device: cuda) or set env.batched: false (CPU env workers)"
        )


class ManiSkillBatchEnv:
    """``num_envs`` envs of a flowrl ManiSkill task (``flowrl/PickCube-v1``, ...) in one batch."""

    def __init__(
        self,
        env_id: str,
        horizon: int,
        num_envs: int,
        env_kwargs: dict[str, Any] | None = None,
        device: torch.device | str = "cuda",
    ) -> None:
        check_batched(env_id, num_envs, env_kwargs, device)
        kwargs = dict(env_kwargs or {})
        device = torch.device(device)
        spec = gym.spec(env_id)
        self.limit = int(kwargs.pop("max_episode_steps", spec.max_episode_steps))
        self.terminate_on_success = bool(kwargs.pop("terminate_on_success", True))
        cuda = device.type == "cuda"
        self._env = make_maniskill(  # kwargs: control_mode and reward_mode, if given (KWARGS, the rest popped above)
            spec.kwargs["task"],
            num_envs,
            sim_backend="physx_cuda" if cuda else "physx_cpu",
            render_backend="gpu" if cuda else "cpu",
            **kwargs,
        )
        self.num_envs, self.horizon = num_envs, horizon
        self.device = torch.device(self._env.device)
        self._t = torch.zeros(num_envs, dtype=torch.long, device=self.device)

    def reset(self, seeds: list[int]) -> Tensor:
        seeds = [int(s) for s in seeds]
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset needs {self.num_envs} seeds, got {len(seeds)}")
        obs, _ = self._env.reset(seed=seeds)
        first = {s: seeds.index(s) for s in seeds}
        leader = torch.tensor([first[s] for s in seeds], device=self.device)
        if bool((leader != torch.arange(self.num_envs, device=self.device)).any()):
            self._env.set_state_dict(_index_state(self._env.get_state_dict(), leader))
            obs = self._env.get_obs()
        self._t.zero_()
        return obs.float()

    def step(self, actions: Tensor) -> EnvStep:
        actions = actions.to(self.device, torch.float32).clamp(-1.0, 1.0)
        n = self.num_envs
        zeros = torch.zeros(n, dtype=torch.bool, device=self.device)
        reward = torch.zeros(n, dtype=torch.float32, device=self.device)
        steps = torch.zeros(n, dtype=torch.long, device=self.device)
        done, terminated, truncated, success = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
        reached: Tensor | None = None
        for j in range(actions.shape[1]):
            obs, r, term, _, info = self._env.step(actions[:, j])
            running = ~done
            reward += torch.where(running, r.float(), torch.zeros_like(reward))
            steps += running.long()
            self._t += running.long()
            ended_by_task = term.bool() if self.terminate_on_success else info.get("fail", zeros).bool()
            term_j = running & ended_by_task
            trunc_j = running & ~term_j & (self._t >= self.limit)
            ended = term_j | trunc_j
            success = torch.where(ended, info["success"].bool(), success)
            # where the episode was running at this step (and so where it ended) the latest observation
            reached = obs.float() if reached is None else torch.where(running[:, None], obs.float(), reached)
            terminated |= term_j
            truncated |= trunc_j
            done |= ended
            if bool(done.all()):
                break
        assert reached is not None
        next_obs = reached
        if bool(done.any()):
            index = done.nonzero().flatten()
            fresh, _ = self._env.reset(options={"env_idx": index})
            next_obs = torch.where(done[:, None], fresh.float(), reached)
            self._t[index] = 0
        return EnvStep(
            obs=next_obs,
            reached=reached,
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            success=success,
            env_steps=steps,
        )

    def close(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
            self._env = None


__all__ = ["ManiSkillBatchEnv", "check_batched"]
