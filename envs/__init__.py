"""Environments shipped with flowrl, registered with gymnasium on import.

| id | file | what |
|---|---|---|
| flowrl/TwoGoal-v0 | envs/toy.py | 2-D point mass, two goals, one pays (quickstart) |
| flowrl/FaultInjection-v0 | envs/faults.py | TwoGoal that fails at a chosen step (worker-recovery tests) |
| any MuJoCo id (Hopper-v5, ...) | gymnasium | locomotion; flowrl's tasks are files, experiments/locomotion/tasks/ |
| flowrl/{PickCube,PushCube,StackCube,PegInsertionSide}-v1 | envs/maniskill.py | ManiSkill3, CPU (MANISKILL) |

The ManiSkill tasks are registered here by name only: ManiSkill and SAPIEN are imported when
one of them is made (``envs/maniskill.py``), so ``import envs`` stays fast.

The locomotion tasks (one file each in experiments/locomotion/tasks/, flowrl.bench.tasks) get
their demonstrations from `flowrl collect` of a policy trained by flowrl.

``make_env`` wraps any of them in action chunking; observation normalisation lives in the
policy's networks (their ObsNormalizer buffers travel with every checkpoint). With ``on_frame``
it also renders every primitive step (evaluation videos, flowrl.rollout.video): ManiSkill's envs
and gymnasium's MuJoCo envs render; MuJoCo draws through OpenGL, and on a machine without a
display flowrl sets ``MUJOCO_GL=egl`` when it is unset (MuJoCo's default, glfw, needs a window).

``REPORTS_SUCCESS``: the envs whose step info carries ``"success"`` (flowrl prints a success
rate only for those; add the id of your own env when it reports one).

MuJoCo's warnings: importing ``envs`` routes MuJoCo's C-level warnings (printed to stderr and
appended to ``MUJOCO_LOG.TXT`` otherwise) into Python's ``warnings`` as ``MujocoWarning``, and
drops exactly one of them: MuJoCo 4.0 deprecates the ``settotalmass`` compiler attribute that
gymnasium's HalfCheetah model uses, and said so once per env created (~150 lines per log).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from envs import toy
from envs.wrappers import ActionChunk, FrameSink, RenderFrames
from flowrl.errors import FlowRLError

if "flowrl/TwoGoal-v0" not in gym.registry:
    gym.register("flowrl/TwoGoal-v0", entry_point="envs.toy:TwoGoalEnv", max_episode_steps=30)
if "flowrl/FaultInjection-v0" not in gym.registry:
    gym.register("flowrl/FaultInjection-v0", entry_point="envs.faults:FaultInjectionEnv", max_episode_steps=30)

# ManiSkill3 tasks (envs/maniskill.py, imported only when one is made): flowrl id -> (ManiSkill id,
# episode limit). The limits fit the motion-planning demonstrations (PickCube 49-88 steps,
# PushCube 62-78, StackCube 94-121), longer than ManiSkill's default of 50.
_MANISKILL_TASKS = {
    "flowrl/PickCube-v1": ("PickCube-v1", 100),
    "flowrl/PushCube-v1": ("PushCube-v1", 100),
    "flowrl/StackCube-v1": ("StackCube-v1", 150),
    "flowrl/PegInsertionSide-v1": ("PegInsertionSide-v1", 200),
}
for _id, (_task, _limit) in _MANISKILL_TASKS.items():
    if _id not in gym.registry:
        gym.register(_id, entry_point="envs.maniskill:ManiSkillEnv", kwargs={"task": _task}, max_episode_steps=_limit)
MANISKILL = tuple(_MANISKILL_TASKS)

# Scripted demonstrators by env id: (num_episodes, seed) -> dataset dict.
DEMONSTRATORS: dict[str, Callable[[int, int], dict[str, np.ndarray]]] = {
    "flowrl/TwoGoal-v0": toy.scripted_demos,
    "flowrl/FaultInjection-v0": toy.scripted_demos,  # the same task, until its fault fires
}


# Envs whose step info carries "success" (bool): the console prints their success rate.
REPORTS_SUCCESS: set[str] = {"flowrl/TwoGoal-v0", "flowrl/FaultInjection-v0", *MANISKILL}


class MujocoWarning(UserWarning):
    """A warning of the MuJoCo library, routed from its C callback into Python's ``warnings``."""


# Third-party messages dropped, each matched exactly (nothing else is filtered): gymnasium's
# half_cheetah.xml sets `settotalmass`, which MuJoCo 4.0 deprecates; the model it compiles is
# unchanged, and the warning came once per HalfCheetah env created.
MUJOCO_MESSAGES_DROPPED = (re.compile(r"^compiler attribute 'settotalmass' is deprecated and will be removed"),)


def _mujoco_warning(message: str) -> None:
    if any(pattern.match(message) for pattern in MUJOCO_MESSAGES_DROPPED):
        return
    try:
        warnings.warn(message, MujocoWarning, stacklevel=2)
    except Exception:  # noqa: BLE001 - a filter set to "error": raising through MuJoCo's C code would abort
        print(f"WARNING: {message}", file=sys.stderr)


_MUJOCO_BROKEN = ""  # why MuJoCo could not be imported (made a one-line error when a MuJoCo env is made)


def _route_mujoco_warnings() -> None:
    """Install the hook unless someone else installed one (theirs is left alone)."""
    global _MUJOCO_BROKEN
    try:
        import mujoco
    except ImportError:  # gymnasium without its mujoco extra: nothing to route
        return
    except Exception as exc:  # noqa: BLE001 - e.g. MUJOCO_GL=osmesa without libOSMesa: PyOpenGL fails inside
        backend = os.environ.get("MUJOCO_GL")
        _MUJOCO_BROKEN = (
            f"MuJoCo cannot be imported with MUJOCO_GL={backend} ({type(exc).__name__}: {exc}): install that back "
            "end's library (osmesa: libosmesa6; egl: libegl1) or unset MUJOCO_GL"
            if backend
            else f"MuJoCo cannot be imported ({type(exc).__name__}: {exc}): reinstall it "
            "(pip install 'gymnasium[mujoco]')"
        )
        return
    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(_mujoco_warning)


_route_mujoco_warnings()


def _prepare_render(env_id: str) -> str:
    """Check, before it is made, that ``env_id`` renders rgb_array frames; returns what to do if
    its first frame fails. Sets MuJoCo's OpenGL back end to EGL on a machine without a display
    (see the module doc)."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as exc:
        raise ValueError(f"cannot make env {env_id!r} (env.id / env.kwargs): {exc}") from None
    creator = spec.entry_point
    if isinstance(creator, str):
        creator = gym.envs.registration.load_env_creator(creator)
    modes = list(getattr(creator, "metadata", {}).get("render_modes", []))
    if "rgb_array" not in modes:
        raise FlowRLError(
            f"{env_id} cannot render episodes (its render modes: {modes}); record an env that renders "
            "(flowrl's ManiSkill tasks, gymnasium's MuJoCo tasks) or give this one render_mode='rgb_array'"
        )
    if str(spec.entry_point).startswith("gymnasium.envs.mujoco"):
        if "MUJOCO_GL" not in os.environ and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            os.environ["MUJOCO_GL"] = "egl"
        backend = os.environ.get("MUJOCO_GL")
        return (
            f"MuJoCo renders through OpenGL ({f'MUJOCO_GL={backend}' if backend else 'MUJOCO_GL unset'}): set "
            "MUJOCO_GL=egl (a GPU driver or Mesa's EGL), MUJOCO_GL=osmesa (needs libOSMesa) or, with a display, "
            "MUJOCO_GL=glfw"
        )
    if spec.entry_point == "envs.maniskill:ManiSkillEnv":
        from envs.maniskill import FIX

        return FIX
    return "check the env's render() with render_mode='rgb_array'"


def _is_mujoco(env_id: str) -> bool:
    try:
        return str(gym.spec(env_id).entry_point).startswith("gymnasium.envs.mujoco")
    except gym.error.Error:
        return False


def make_env(
    env_id: str,
    horizon: int,
    kwargs: dict[str, Any] | None = None,
    on_frame: FrameSink | None = None,
) -> gym.Env:
    """An env that takes action chunks of ``horizon`` steps (``kwargs`` go to gym.make).

    ``on_frame``: made with ``render_mode="rgb_array"``, the env hands it a frame ``[H, W, 3]``
    uint8 (and its fps) after every reset and primitive step (envs.wrappers.RenderFrames); an env
    that cannot render is a one-line FlowRLError naming it and the fix."""
    kwargs = dict(kwargs or {})
    if _MUJOCO_BROKEN and _is_mujoco(env_id):
        raise FlowRLError(f"cannot make {env_id}: {_MUJOCO_BROKEN}")
    if on_frame is not None:
        fix = _prepare_render(env_id)
        kwargs["render_mode"] = "rgb_array"
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as exc:
        raise ValueError(f"cannot make env {env_id!r} (env.id / env.kwargs): {exc}") from None
    if on_frame is not None:
        env = RenderFrames(env, on_frame, fix)
    return ActionChunk(env, horizon)


__all__ = ["DEMONSTRATORS", "MANISKILL", "REPORTS_SUCCESS", "ActionChunk", "MujocoWarning", "make_env"]
