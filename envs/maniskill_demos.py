"""Demonstrations for the ManiSkill tasks from ManiSkill's own motion planners, no downloads.

``motion_planning_demos`` makes a flowrl dataset (``observations [N, O]``, ``actions [N, A]``,
``episode_ends [E]``; ``flowrl demos`` on the command line) in three steps:

1. ManiSkill's panda motion planner solves ``episodes`` episodes, seeds ``seed``, ``seed + 1``, ...
   (a seed whose plan fails is skipped, so the file's ``meta_seeds`` lists the seeds kept). It
   records joint-position targets (``pd_joint_pos``) and the simulator states.
2. ManiSkill's trajectory converter turns them into the chosen normalised controller
   (``pd_ee_delta_pos`` by default, actions in [-1, 1]) by following the recorded states.
3. flowrl replays the converted actions in its own env (``envs/maniskill.py``) from
   ``reset(seed=s)``, recording the observations the policy will see during fine-tuning, and
   keeps an episode only if it succeeds there. The episode ends at its first success, as
   flowrl's env ends it, or (``hold_steps``) holds still at the goal for that many steps more.

Why replay rather than read the converter's observations: they are ManiSkill's env's, not
flowrl's, and they differ at every reset after the first (the first observation of an episode
keeps the previous episode's contacts, e.g. ``is_grasped = 1``; flowrl's env observes a fresh
start). Replaying also checks that the actions really solve the task in the env that trains.

Steps 1-2 run ManiSkill's scripts in child processes (fresh Vulkan context, their own logs).
The same arguments give the same file (the planner and CPU PhysX are deterministic).
Held-out evaluation: flowrl's training and evaluation resets draw 31-bit seeds derived from the
experiment's seed (``flowrl.runtime.derive_seed``), so they essentially never meet the small
seeds the demonstrations use (``meta_seeds``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from flowrl.core.demos_file import save_demos
from flowrl.errors import FlowRLError

log = logging.getLogger("flowrl")

# ManiSkill's motion-planning script (mani_skill.examples.motionplanning.panda.run) always starts at
# seed 0; its _main takes the first seed. The seed is argv[1]; the rest are the script's own flags.
_PLAN = (
    "import sys\n"
    "from mani_skill.examples.motionplanning.panda import run\n"
    "start = int(sys.argv.pop(1))\n"
    "run._main(run.parse_args(), 0, start)\n"
)


def _maniskill_task(env_id: str) -> str:
    import envs

    if env_id not in envs.MANISKILL:
        raise FlowRLError(
            f"flowrl demos: {env_id!r} is not a ManiSkill task of flowrl; choose one of {list(envs.MANISKILL)}"
        )
    return gym.spec(env_id).kwargs["task"]


def _run(cmd: list[str], what: str, log_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with log_path.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise FlowRLError(f"flowrl demos: ManiSkill's {what} failed (exit {done.returncode}): {' | '.join(tail)}")


def _plan_and_convert(task: str, episodes: int, seed: int, control_mode: str, work: Path) -> tuple[Path, Path]:
    """Steps 1-2: the planner's trajectories converted to ``control_mode``; (h5, json) paths."""
    _run(
        [
            sys.executable,
            "-c",
            _PLAN,
            str(seed),
            "-e",
            task,
            "-n",
            str(episodes),
            "-b",
            "cpu",
            "--only-count-success",
            "--record-dir",
            str(work),
            "--traj-name",
            "plan",
        ],  # fmt: skip
        "motion planner",
        work / "plan.log",
    )
    planned = work / task / "motionplanning" / "plan.h5"
    if not planned.exists():
        raise FlowRLError(
            f"flowrl demos: ManiSkill's motion planner wrote no trajectories for {task} (log: {work / 'plan.log'})"
        )
    _run(
        [
            sys.executable,
            "-m",
            "mani_skill.trajectory.replay_trajectory",
            "--traj-path",
            str(planned),
            "-c",
            control_mode,
            "-o",
            "none",
            "-b",
            "physx_cpu",
            "--save-traj",
        ],  # fmt: skip
        f"trajectory conversion to {control_mode}",
        work / "convert.log",
    )
    converted = sorted(planned.parent.glob(f"plan.*.{control_mode}.*.h5"))
    if not converted:
        raise FlowRLError(f"flowrl demos: ManiSkill's converter wrote no {control_mode} trajectories for {task}")
    return converted[0], converted[0].with_suffix(".json")


def _read_converted(h5_path: Path, json_path: Path) -> list[tuple[int, np.ndarray]]:
    """(reset seed, actions [T, A]) per converted episode, in the planner's order."""
    import h5py

    meta = json.loads(json_path.read_text())
    out = []
    with h5py.File(h5_path, "r") as f:
        for episode in meta["episodes"]:
            seed = episode.get("reset_kwargs", {}).get("seed", episode.get("episode_seed"))
            if isinstance(seed, list):  # ManiSkill writes [s] for batched resets
                seed = seed[0]
            out.append((int(seed), np.asarray(f[f"traj_{episode['episode_id']}"]["actions"], dtype=np.float32)))
    return out


def hold_action(control_mode: str, last: np.ndarray) -> np.ndarray:
    """The action that keeps the arm where it is and the gripper as it was: a zero delta with the
    last gripper command, for the delta controllers (an absolute controller has no such action)."""
    if "delta" not in control_mode:
        raise FlowRLError(
            f"flowrl demos: --hold-steps needs a delta controller (pd_ee_delta_pos, pd_joint_delta_pos), "
            f"not {control_mode}; drop --hold-steps or choose a delta --control-mode"
        )
    held = np.zeros_like(last)
    held[-1] = last[-1]
    return held


def replay(
    env_id: str,
    episodes: list[tuple[int, np.ndarray]],
    control_mode: str,
    progress: bool = False,
    hold_steps: int = 0,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Step 3: each (seed, actions) replayed in flowrl's env; the successful episodes and their seeds.

    ``hold_steps`` > 0: after its first success an episode goes on for that many steps of
    ``hold_action`` (stay put, gripper as it was), recorded as demonstrations too, so that
    behaviour cloning learns to hold the goal rather than only to reach it; an episode that
    loses its success while holding is dropped like one that never succeeds."""
    from flowrl.runtime import progress as progress_bar

    env = gym.make(env_id, control_mode=control_mode, terminate_on_success=hold_steps == 0)
    observations, actions, lengths, returns, kept = [], [], [], [], []
    try:
        for seed, planned in progress_bar(episodes, "replay in flowrl's env", progress, unit="episode"):
            obs, _ = env.reset(seed=seed)
            ep_obs, ep_act, total, success = [], [], 0.0, False
            for action in planned:
                action = np.clip(action, -1.0, 1.0)
                ep_obs.append(obs)
                ep_act.append(action)
                obs, reward, terminated, truncated, info = env.step(action)
                total += reward
                success = bool(info["success_once"])
                if terminated or truncated or (hold_steps and bool(info["success"])):
                    break
            if success and hold_steps:
                held = hold_action(control_mode, ep_act[-1])
                for _ in range(hold_steps):
                    if truncated:
                        break
                    ep_obs.append(obs)
                    ep_act.append(held)
                    obs, reward, terminated, truncated, info = env.step(held)
                    total += reward
                success = bool(info["success"])
            if not success:
                log.warning("flowrl demos: seed %d: the converted plan does not succeed in %s; dropped", seed, env_id)
                continue
            observations += ep_obs
            actions += ep_act
            lengths.append(len(ep_obs))
            returns.append(total)
            kept.append(seed)
    finally:
        env.close()
    if not kept:
        raise FlowRLError(f"flowrl demos: no converted plan succeeds in {env_id}; try another --control-mode")
    demos = {
        "observations": np.stack(observations).astype(np.float32),
        "actions": np.stack(actions).astype(np.float32),
        "episode_ends": np.cumsum(lengths),
        "episode_returns": np.asarray(returns),
    }
    return demos, kept


def motion_planning_demos(
    env_id: str,
    episodes: int,
    out: str | Path,
    control_mode: str = "pd_ee_delta_pos",
    seed: int = 0,
    progress: bool = True,
    hold_steps: int = 0,
) -> dict[str, Any]:
    """Writes ``out`` (.npz) with ``episodes`` planned demonstrations of ``env_id``; returns a summary.
    ``hold_steps``: steps of holding still at the goal recorded after each first success (``replay``)."""
    if episodes < 1:
        raise FlowRLError(f"flowrl demos: --episodes must be >= 1, got {episodes}")
    if hold_steps < 0:
        raise FlowRLError(f"flowrl demos: --hold-steps must be >= 0, got {hold_steps}")
    if hold_steps:
        hold_action(control_mode, np.zeros(1, dtype=np.float32))  # a controller without a hold action fails now
    if seed < 0:
        raise FlowRLError(f"flowrl demos: --seed must be >= 0, got {seed}")
    task = _maniskill_task(env_id)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flowrl-demos-") as tmp:
        if progress:
            print(
                f"planning {episodes} successful {task} episodes from seed {seed}, converting to {control_mode} ...",
                flush=True,
            )
        h5_path, json_path = _plan_and_convert(task, episodes, seed, control_mode, Path(tmp))
        converted = _read_converted(h5_path, json_path)
    demos, kept = replay(env_id, converted, control_mode, progress, hold_steps)
    save_demos(
        demos,
        out,
        env_id=env_id,
        source="ManiSkill motion planner (mani_skill.examples.motionplanning.panda), replayed in flowrl's env",
        control_mode=control_mode,
        seeds=",".join(map(str, kept)),
        episodes=len(kept),
        hold_steps=hold_steps,
    )
    lengths = np.diff(demos["episode_ends"], prepend=0)
    return {
        "path": str(out),
        "episodes": len(kept),
        "planned": len(converted),
        "steps": int(demos["episode_ends"][-1]),
        "length_mean": float(lengths.mean()),
        "return_mean": float(demos["episode_returns"].mean()),
        "seeds": kept,
    }


__all__ = ["motion_planning_demos", "replay"]
