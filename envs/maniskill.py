"""ManiSkill3 manipulation tasks (PickCube, PushCube, StackCube, PegInsertionSide) as plain
gymnasium envs, one CPU-simulated env per instance.

``ManiSkillEnv`` owns one ManiSkill env (``num_envs=1``, ``sim_backend="physx_cpu"``, state
observations) and speaks the ordinary gymnasium API with numpy: observations are the flat
float32 state vector ``[O]``, actions float32 in [-1, 1] (``pd_ee_delta_pos`` by default: the
end effector's position delta and the gripper), ``info["success"]`` is the task's success at
that step and ``info["success_once"]`` whether the episode has succeeded at any step so far.
ManiSkill ends an episode (``terminated``) on success; ``terminate_on_success=False`` runs it on
to the time limit instead (ManiSkill's ``ignore_terminations``: with a dense reward, staying at
the goal then earns the most, where ending there forfeits the reward of the remaining steps);
``info["success_once"]`` says whether it succeeded. The time limit is gymnasium's, set per
task at registration (``envs/__init__.py``) and changed with ``env.kwargs: {max_episode_steps: N}``.
So flowrl's ``ActionChunk``, ``GymVectorEnv`` and Ray env workers take these envs unchanged.
``render_mode="rgb_array"``: ``render()`` is a frame ``[H, W, 3]`` uint8 of ManiSkill's human render
camera (512 x 512, or ``render_size``), for evaluation videos (flowrl.rollout.video). On the CPU
(lavapipe) a process's first frame compiles the shaders (~10 s), later ones take ~0.06-0.13 s.

Why not ManiSkill's own ``gym.make(..., num_envs=N)``: its CPU backend simulates one env per
ManiSkill env (``num_envs=2`` raises). Several instances can share a process (a vector of them,
cheap after the first: the ~590 MB are mostly SAPIEN, torch and the Vulkan driver); parallelism
comes from worker processes. Never fork a process holding one (the child inherits its Vulkan
context and hangs); Ray workers and ``spawn`` are fine.
Why a Vulkan driver: SAPIEN opens a Vulkan device even for state observations; on a machine
without a GPU, Mesa's lavapipe (Mesa >= 25) provides one (``scripts/install_system.sh``).
``reset(seed=s)`` gives the same initial state and observation in any instance, whatever it ran
before, and the same seed and actions give bit-identical rollouts (CPU PhysX). Two things make
the observation so: an unseeded reset draws its seed from this env's generator (ManiSkill's
would use torch's global one), and the first observation is taken without the contacts PhysX
keeps from the previous episode's last step (``_NoContacts``).

This module imports ManiSkill (and SAPIEN) only when an env is made: ``import envs`` stays fast.
"""

from __future__ import annotations

import re
from typing import Any

import gymnasium as gym
import numpy as np

from flowrl.errors import FlowRLError

# flowrl's defaults (ManiSkillEnv's and the batch's): the end effector's position delta and the
# gripper, and the dense reward scaled to [0, 1] per step.
CONTROL_MODE, REWARD_MODE = "pd_ee_delta_pos", "normalized_dense"

FIX = "install ManiSkill and a Vulkan driver with the README's set-up command (bash scripts/install_system.sh)"

# What SAPIEN raises when it finds no usable Vulkan device: no driver at all
# ("ErrorIncompatibleDriver"), or one too old (Debian 12's Mesa 22 lavapipe: "Failed to find a
# supported physical device").
_NO_VULKAN = re.compile(r"vulkan|driver|physical device|ErrorInitializationFailed", re.IGNORECASE)


class ManiSkillUnavailable(FlowRLError):
    """ManiSkill (mani-skill, SAPIEN) or a Vulkan driver is missing on this machine."""


def _import_maniskill() -> Any:
    try:
        import mani_skill.envs  # noqa: F401 - registers the tasks with ManiSkill
        from mani_skill.utils.registration import REGISTERED_ENVS
    except ImportError as exc:
        raise ManiSkillUnavailable(f"ManiSkill is not installed ({exc}); {FIX}") from None
    return REGISTERED_ENVS


def _scalar(value: Any) -> Any:
    """A ManiSkill info entry (a tensor ``[1]`` on the CPU) as a Python scalar; None if not one."""
    if hasattr(value, "numel") and value.numel() == 1:
        return value.item()
    if isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)):
        return value.item() if isinstance(value, np.generic) else value
    return None


def make_maniskill(
    task: str,
    num_envs: int = 1,
    control_mode: str = CONTROL_MODE,
    reward_mode: str = REWARD_MODE,
    sim_backend: str = "physx_cpu",
    render_backend: str = "cpu",
    **kwargs: Any,
) -> Any:
    """ManiSkill's env class for ``task`` (state observations): ``num_envs`` envs in one, simulated
    by ``sim_backend``, flowrl's default controller and reward unless given, made with ``kwargs``
    (ManiSkill's other arguments), without ManiSkill's TimeLimit (flowrl's registration rules the
    limit). The one place both env families (``ManiSkillEnv``, envs/maniskill_batch.py) make
    theirs. Bad kwargs and a missing Vulkan driver are one-line errors naming the fix."""
    registered = _import_maniskill()
    if task not in registered:
        raise FlowRLError(f"ManiSkill has no task {task!r} (the task of a ManiSkillEnv, e.g. PickCube-v1)")
    try:
        return registered[task].make(
            obs_mode="state",
            num_envs=num_envs,
            control_mode=control_mode,
            reward_mode=reward_mode,
            sim_backend=sim_backend,
            render_backend=render_backend,
            **kwargs,
        )
    except AssertionError as exc:  # how ManiSkill rejects an unknown control_mode, reward_mode, ...
        raise FlowRLError(f"{task}: ManiSkill refused the env's kwargs (env.kwargs): {exc}") from None
    except RuntimeError as exc:
        if _NO_VULKAN.search(str(exc)):
            raise ManiSkillUnavailable(
                f"ManiSkill cannot open a Vulkan device for {task} ({str(exc).strip().splitlines()[0]}); {FIX}"
            ) from None
        raise


class _NoContacts:
    """The PhysX system as ManiSkill's scene sees it, with an empty contact list."""

    def __init__(self, px: Any) -> None:
        self._px = px

    def get_contacts(self) -> list:
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._px, name)


class ManiSkillEnv(gym.Env):
    """One ManiSkill3 task on the CPU, state observations ``[O]`` float32, actions ``[A]`` in [-1, 1].

    task: ManiSkill's env id (``PickCube-v1``). control_mode: a normalised ManiSkill controller
    (``pd_ee_delta_pos``, ``pd_ee_delta_pose``, ``pd_joint_delta_pos``, ...); controllers whose
    actions are not in [-1, 1] (``pd_joint_pos``) are refused. reward_mode: ManiSkill's
    (``normalized_dense``: dense reward scaled to [0, 1] per step; ``dense``; ``sparse``).
    reconfiguration_freq: how often reset rebuilds the scene (ManiSkill's default: None;
    0 = never, which makes PegInsertionSide's reset ~3 ms but keeps the first episode's peg
    and hole sizes, so the same seed no longer gives the same start in every instance).
    terminate_on_success: end the episode when it succeeds (ManiSkill's rule; a task's failure
    always ends it); False: only at the time limit.
    render_mode: None or ``"rgb_array"`` (``render()`` returns a frame ``[H, W, 3]`` uint8);
    render_size: the frame's side in pixels (None: ManiSkill's 512). Rendering changes nothing
    in the simulation: ManiSkill builds its render camera whatever the render mode.
    """

    # render_fps: ManiSkill's default control frequency; each instance sets its task's own.
    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        task: str,
        control_mode: str = CONTROL_MODE,
        reward_mode: str = REWARD_MODE,
        reconfiguration_freq: int | None = None,
        sim_backend: str = "physx_cpu",
        render_backend: str = "cpu",
        render_mode: str | None = None,
        render_size: int | None = None,
        terminate_on_success: bool = True,
    ) -> None:
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise FlowRLError(f"{task}: render_mode {render_mode!r} is not supported; use None or 'rgb_array'")
        camera = {} if render_size is None else {"width": render_size, "height": render_size}
        self._env = make_maniskill(
            task,
            control_mode=control_mode,
            reward_mode=reward_mode,
            sim_backend=sim_backend,
            render_backend=render_backend,
            reconfiguration_freq=reconfiguration_freq,
            render_mode=render_mode,
            human_render_camera_configs=camera,
        )
        self.task = task
        self.control_mode = control_mode
        self.render_mode = render_mode
        self.terminate_on_success = bool(terminate_on_success)
        self.metadata = {**self.metadata, "render_fps": self._env.control_freq}  # one frame per step
        obs_shape = self._env.single_observation_space.shape
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(int(np.prod(obs_shape)),), dtype=np.float32)
        inner = self._env.single_action_space
        if not (
            isinstance(inner, gym.spaces.Box)
            and len(inner.shape) == 1
            and np.all(inner.low == -1.0)
            and np.all(inner.high == 1.0)
        ):
            self._env.close()
            raise FlowRLError(
                f"{task}: control_mode {control_mode!r} has actions {inner}, not in [-1, 1]; "
                "use a normalised controller such as pd_ee_delta_pos or pd_joint_delta_pos"
            )
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=inner.shape, dtype=np.float32)
        self._success_once = False

    def _obs(self, obs: Any) -> np.ndarray:
        return obs.detach().cpu().numpy().reshape(-1).astype(np.float32, copy=False)

    def _info(self, info: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in info.items():
            scalar = _scalar(value)
            if scalar is not None:
                out[key] = scalar
        return out

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is None:
            # ManiSkill's unseeded reset draws from torch's global generator: seed every episode
            # from this env's own generator instead (reset(seed=s) then reset() is reproducible).
            seed = int(self.np_random.integers(2**31))
        obs, info = self._env.reset(seed=seed, options=options)
        scene = self._env.scene
        if scene.px.get_contacts():
            # PhysX keeps the contacts of the last simulated step until the next one, so the first
            # observation would see the previous episode's (PickCube's is_grasped = 1 after a grasp):
            # observe the new start as a fresh env does, with no contacts yet.
            px, scene.px = scene.px, _NoContacts(scene.px)
            try:
                info = self._env.get_info()
                obs = self._env.get_obs(info)
            finally:
                scene.px = px
        self._success_once = False
        info = self._info(info)
        info.pop("reconfigure", None)  # ManiSkill's flag, not a property of the state
        info["success"] = info["success_once"] = False
        return self._obs(obs), info

    def step(self, action):
        action = np.asarray(action, dtype=np.float32).reshape(1, *self.action_space.shape)
        obs, reward, terminated, truncated, info = self._env.step(action)
        info = self._info(info)
        success = bool(info.get("success", False))
        self._success_once = self._success_once or success
        info["success"], info["success_once"] = success, self._success_once
        ended = bool(terminated.reshape(-1)[0])
        if not self.terminate_on_success:
            ended = bool(info.get("fail", False))  # ManiSkill's terminated = success | fail
        return self._obs(obs), float(reward.reshape(-1)[0]), ended, False, info

    def render(self) -> np.ndarray:
        """The scene seen by ManiSkill's human render camera now: ``[H, W, 3]`` uint8."""
        if self.render_mode != "rgb_array":
            raise FlowRLError(f"{self.task}: render() needs the env made with render_mode='rgb_array'")
        return self._env.render().cpu().numpy()[0]

    def close(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
            self._env = None


__all__ = ["CONTROL_MODE", "FIX", "REWARD_MODE", "ManiSkillEnv", "ManiSkillUnavailable", "make_maniskill"]
