"""``flowrl bench rollout``: env steps per second of raw vectorised env stepping, the
in-process collector and the Ray collector with 1, 2, ... workers, at equal env count.

Every variant runs in the same process tree, one after the other, on the same envs and
policy, so the ratios are comparable even on a noisy machine. Each figure is the best of
``repeats`` timed collections after one warm-up. The task names and sizes are checked before
Ray starts: an unknown task is one line naming the choices.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import envs as flowrl_envs
from flowrl.config import build_config
from flowrl.errors import FlowRLError
from flowrl.models.build import build_actor, build_policy
from flowrl.rollout.collector import InProcessCollector
from flowrl.rollout.shard import EnvSpec

TASKS = {"toy": "flowrl/TwoGoal-v0", "mujoco": "HalfCheetah-v5"}


def check_tasks(tasks: list[str]) -> list[str]:
    """The env id of each name in ``tasks`` (toy, mujoco or a registered env id); FlowRLError
    naming the choices for an unknown one, or saying why an env does not fit (no flat Box
    spaces, a missing dependency). Makes each env once, in this process."""
    from flowrl.experiment import env_dims

    if not tasks:
        raise FlowRLError(f"flowrl bench rollout: --tasks names no task; give {_choices()}")
    env_ids = []
    for task in tasks:
        env_id = TASKS.get(task, task)
        if env_id not in gym.registry:
            raise FlowRLError(f"flowrl bench rollout: unknown task {task!r} (--tasks); give {_choices()}")
        try:
            env_dims(env_id)
        except (FlowRLError, gym.error.Error) as exc:
            raise FlowRLError(f"flowrl bench rollout: task {task!r} (--tasks): {exc}") from None
        env_ids.append(env_id)
    return env_ids


def _choices() -> str:
    ours = ", ".join(sorted(k for k in gym.registry if k.startswith("flowrl/")))
    named = ", ".join(f"{name} ({env_id})" for name, env_id in TASKS.items())
    return f"{named}, or a registered gymnasium env id with flat Box spaces (flowrl's: {ours})"


def _policy(env_id: str, horizon: int, denoising_steps: int):
    env = gym.make(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    cfg = build_config({"name": "bench", "policy": {"horizon": horizon, "denoising_steps": denoising_steps}})
    torch.manual_seed(0)
    return build_policy(cfg, build_actor(cfg.policy, obs_dim, act_dim))


def _best_rate(run, repeats: int) -> float:
    run()  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        env_steps = run()
        best = max(best, env_steps / (time.perf_counter() - start))
    return best


def _collector_rate(collector, policy, steps: int, repeats: int) -> float:
    collector.reset(0)
    try:
        return _best_rate(lambda: collector.collect(policy, steps, 0).env_steps, repeats)
    finally:
        collector.close()


def raw_env_rate(
    env_id: str, horizon: int, num_envs: int, steps: int, repeats: int, env_kwargs: dict[str, Any] | None = None
) -> float:
    """Env steps per second of ``num_envs`` chunked envs stepped with uniform random actions in
    this process (gymnasium's SyncVectorEnv, no policy): the speed the collectors are measured
    against. ``steps`` chunk steps per timed run, the best of ``repeats`` after one warm-up."""
    vec = SyncVectorEnv(
        [lambda: flowrl_envs.make_env(env_id, horizon, env_kwargs) for _ in range(num_envs)],
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    vec.reset(seed=0)
    rng = np.random.default_rng(0)
    low, high = vec.single_action_space.low, vec.single_action_space.high

    def run() -> int:
        total = 0
        for _ in range(steps):
            _, _, _, _, info = vec.step(rng.uniform(low, high, size=(num_envs, *low.shape)).astype(np.float32))
            total += int(np.sum(info.get("chunk_steps", horizon))) if "final_info" not in info else num_envs * horizon
        return total

    rate = _best_rate(run, repeats)
    vec.close()
    return rate


def run_rollout_bench(
    out_dir: str | Path,
    tasks: list[str],
    num_envs: int = 16,
    steps: int = 50,
    max_workers: int | None = None,
    repeats: int = 5,
    horizon: int = 4,
    denoising_steps: int = 4,
) -> dict[str, Any]:
    """Runs the comparison, writes ``rollout.json`` and ``rollout.png`` to ``out_dir``."""
    from flowrl.rollout.ray_collector import RayCollector
    from flowrl.rollout.ray_runtime import ray_session

    for flag, value in (
        ("--num-envs", num_envs),
        ("--steps", steps),
        ("--max-workers", 1 if max_workers is None else max_workers),
    ):
        if value < 1:
            raise FlowRLError(f"flowrl bench rollout: {flag} must be at least 1, got {value}")
    env_ids = check_tasks(tasks)
    cpus = os.cpu_count() or 1
    max_workers = max_workers or cpus
    worker_counts = [w for w in range(1, max_workers + 1) if num_envs % w == 0]
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "machine": {"cpus": cpus, "torch_threads": 1},
        "num_envs": num_envs,
        "steps_per_collect": steps,
        "horizon": horizon,
        "denoising_steps": denoising_steps,
        "tasks": {},
    }
    with ray_session(None, num_cpus=max(cpus, max_workers)):
        for env_id in env_ids:
            policy = _policy(env_id, horizon, denoising_steps)
            row: dict[str, float] = {"raw_env": raw_env_rate(env_id, horizon, num_envs, steps, repeats)}
            spec = EnvSpec(env_id, horizon, num_envs, seed=0)
            local = InProcessCollector(spec)
            row["in_process"] = _collector_rate(local, policy, steps, repeats)
            for w in worker_counts:
                remote = RayCollector(spec, num_workers=w)
                row[f"ray_{w}"] = _collector_rate(remote, policy, steps, repeats)
            ray1 = row[f"ray_{worker_counts[0]}"]
            ratios = {f"ray_{w}_vs_raw": row[f"ray_{w}"] / row["raw_env"] for w in worker_counts}
            scaling = {f"ray_{w}_efficiency": row[f"ray_{w}"] / (w * ray1) for w in worker_counts}
            results["tasks"][env_id] = {"env_steps_per_s": row, **ratios, **scaling}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout.json").write_text(json.dumps(results, indent=2))
    _chart(results, out / "rollout.png")
    return results


def _chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        row = results["tasks"][task]["env_steps_per_s"]
        ax.bar(list(row), list(row.values()), color=["#888"] + ["#4a7"] + ["#47a"] * (len(row) - 2))
        ax.set_title(f"{task} ({results['num_envs']} envs)")
        ax.set_ylabel("env steps / s")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"flowrl bench rollout, {results['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the results (what the README quotes)."""
    lines = []
    for task, res in results["tasks"].items():
        row = res["env_steps_per_s"]
        workers = [k for k in row if k.startswith("ray_")]
        lines.append(
            f"**{task}**, {results['num_envs']} envs, action chunk {results['horizon']}, "
            f"K = {results['denoising_steps']}\n"
        )
        lines.append("| variant | env steps/s | vs raw env | scaling efficiency |")
        lines.append("|---|---|---|---|")
        lines.append(f"| raw vectorised env (random actions) | {row['raw_env']:.0f} | 1.00 | |")
        lines.append(f"| in-process collector | {row['in_process']:.0f} | {row['in_process'] / row['raw_env']:.2f} | |")
        for key in workers:
            w = key.split("_")[1]
            lines.append(
                f"| Ray collector, {w} worker{'s' if w != '1' else ''} | {row[key]:.0f} | "
                f"{res[f'{key}_vs_raw']:.2f} | {res[f'{key}_efficiency']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def cli_handler(args: argparse.Namespace) -> int:
    """``flowrl bench rollout`` (its arguments: flowrl.cli): runs the bench, prints the table."""
    if args.overrides or args.set:
        raise FlowRLError("flowrl bench rollout takes no config overrides (it builds its own policy)")
    out = args.out or "benchmarks/results"
    results = run_rollout_bench(
        out,
        ["toy", "mujoco"] if args.tasks is None else args.tasks,
        num_envs=args.num_envs,
        steps=args.steps,
        max_workers=args.max_workers,
    )
    print(format_table(results))
    print(f"written: {Path(out) / 'rollout.json'}, {Path(out) / 'rollout.png'}")
    return 0
