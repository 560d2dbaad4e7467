"""``flowrl bench rollout``: env steps per second of raw vectorised env stepping, the
in-process collector and the Ray collector with 1, 2, ... workers, at equal env count.

Every variant runs in the same process tree, one after the other, on the same envs and
policy, so the ratios are comparable even on a noisy machine: after one warm-up each, the
variants take turns, one timed collection each per round, for ``repeats`` rounds; each figure
is the median over the rounds, with its spread (min, max) and the load average before and
after in the JSON. Ray variants also report their transfers (weights out, rollouts back:
bytes, ms). The task names and sizes are checked before Ray starts: an unknown task is one
line naming the choices.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
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
from flowrl.rollout.vector_env import per_env

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


def _timed(run: Callable[[], int]) -> float:
    """Env steps per second of one call of ``run`` (which returns the env steps it took)."""
    start = time.perf_counter()
    env_steps = run()
    return env_steps / (time.perf_counter() - start)


def _raw_stepper(
    env_id: str, horizon: int, num_envs: int, steps: int, env_kwargs: dict[str, Any] | None = None
) -> tuple[Callable[[], int], Callable[[], None]]:
    """(run, close): ``run`` steps ``num_envs`` chunked envs ``steps`` times with uniform random
    actions in this process (gymnasium's SyncVectorEnv, no policy) and returns the primitive env
    steps taken, counted exactly (a chunk that ends its episode early counts its own steps)."""
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
            total += int(per_env(info, "chunk_steps", num_envs, horizon).sum())
        return total

    return run, vec.close


def raw_env_rate(
    env_id: str, horizon: int, num_envs: int, steps: int, repeats: int, env_kwargs: dict[str, Any] | None = None
) -> float:
    """Env steps per second of ``num_envs`` chunked envs stepped with uniform random actions in
    this process (gymnasium's SyncVectorEnv, no policy): the speed the collectors are measured
    against. ``steps`` chunk steps per timed run, the best of ``repeats`` after one warm-up."""
    run, close = _raw_stepper(env_id, horizon, num_envs, steps, env_kwargs)
    try:
        run()  # warm-up
        return max(_timed(run) for _ in range(repeats))
    finally:
        close()


def _spread(rates: list[float]) -> dict[str, Any]:
    return {"median": float(np.median(rates)), "min": min(rates), "max": max(rates), "runs": rates}


def _measure_task(env_id: str, spec: EnvSpec, worker_counts: list[int], steps: int, repeats: int, policy) -> dict:
    """Every variant built, warmed up once, then timed in ``repeats`` rounds, one collection of
    each per round in a rotating order, so that a burst of load elsewhere hits every variant alike
    (the machine is rarely idle). Per variant: the median rate and its spread; per Ray variant,
    the transfers of its last collection (RayCollector.transfer)."""
    from flowrl.rollout.ray_collector import RayCollector

    runs: dict[str, Callable[[], int]] = {}
    closers: list[Callable[[], None]] = []
    ray_collectors: dict[str, RayCollector] = {}
    try:
        runs["raw_env"], close = _raw_stepper(env_id, spec.horizon, spec.num_envs, steps)
        closers.append(close)
        collectors: dict[str, Any] = {"in_process": InProcessCollector(spec)}
        closers.append(collectors["in_process"].close)
        for w in worker_counts:
            collectors[f"ray_{w}"] = ray_collectors[f"ray_{w}"] = RayCollector(spec, num_workers=w)
            closers.append(ray_collectors[f"ray_{w}"].close)
        for name, collector in collectors.items():
            collector.reset(0)
            runs[name] = lambda c=collector: c.collect(policy, steps, 0).env_steps
        rates: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for name in names:
            runs[name]()  # warm-up
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rates[name].append(_timed(runs[name]))
        transfer = {name: dict(c.transfer) for name, c in ray_collectors.items()}
    finally:
        for close in closers:
            close()
    return {"spread": {name: _spread(r) for name, r in rates.items()}, "ray_transfer": transfer}


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
        "machine": {"cpus": cpus, "torch_threads": 1, "load_average_before": list(os.getloadavg())},
        "num_envs": num_envs,
        "steps_per_collect": steps,
        "repeats": repeats,
        "horizon": horizon,
        "denoising_steps": denoising_steps,
        "tasks": {},
    }
    # Every Ray variant's actors live through the interleaved rounds, idle but for their own turn:
    # Ray's CPU count is a bookkeeping limit, so it is raised to hold them all.
    with ray_session(None, num_cpus=max(cpus, sum(worker_counts))):
        for env_id in env_ids:
            policy = _policy(env_id, horizon, denoising_steps)
            spec = EnvSpec(env_id, horizon, num_envs, seed=0)
            measured = _measure_task(env_id, spec, worker_counts, steps, repeats, policy)
            row = {name: s["median"] for name, s in measured["spread"].items()}
            ray1 = row[f"ray_{worker_counts[0]}"]
            ratios = {f"ray_{w}_vs_raw": row[f"ray_{w}"] / row["raw_env"] for w in worker_counts}
            scaling = {f"ray_{w}_efficiency": row[f"ray_{w}"] / (w * ray1) for w in worker_counts}
            results["tasks"][env_id] = {"env_steps_per_s": row, **ratios, **scaling, **measured}
    results["machine"]["load_average_after"] = list(os.getloadavg())
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


def _range(spread: dict[str, Any], key: str) -> str:
    return f"{spread[key]['min']:.0f}-{spread[key]['max']:.0f}" if key in spread else ""


def _task_table(task: str, res: dict[str, Any], results: dict[str, Any]) -> list[str]:
    row, spread = res["env_steps_per_s"], res.get("spread", {})
    lines = [
        f"**{task}**, {results['num_envs']} envs, action chunk {results['horizon']}, "
        f"K = {results['denoising_steps']}, median of {results.get('repeats', '?')} interleaved runs\n",
        "| variant | env steps/s (median) | range | vs raw env | scaling efficiency |",
        "|---|---|---|---|---|",
        f"| raw vectorised env (random actions) | {row['raw_env']:.0f} | {_range(spread, 'raw_env')} | 1.00 | |",
        f"| in-process collector | {row['in_process']:.0f} | {_range(spread, 'in_process')} | "
        f"{row['in_process'] / row['raw_env']:.2f} | |",
    ]
    for key in (k for k in row if k.startswith("ray_")):
        w = key.split("_")[1]
        lines.append(
            f"| Ray collector, {w} worker{'s' if w != '1' else ''} | {row[key]:.0f} | {_range(spread, key)} | "
            f"{res[f'{key}_vs_raw']:.2f} | {res[f'{key}_efficiency']:.2f} |"
        )
    transfer = res.get("ray_transfer", {})
    if transfer:
        lines += ["", "| Ray, one collection | weights out | put | worker load | rollouts back | overhead |"]
        lines.append("|---|---|---|---|---|---|")
        for key, t in transfer.items():
            lines.append(
                f"| {key.split('_')[1]} worker(s) | {t['weights_bytes'] / 1e3:.1f} kB | {t['weights_put_ms']:.2f} ms "
                f"| {t['worker_load_ms']:.2f} ms | {t['rollout_bytes'] / 1e3:.1f} kB | {t['overhead_ms']:.1f} ms |"
            )
    return [*lines, ""]


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the results (what the README quotes): per variant the median rate over
    the repeats and its range, the ratio to raw stepping and the Ray scaling efficiency; per Ray
    variant its transfers; the load average the machine had."""
    lines = [line for task, res in results["tasks"].items() for line in _task_table(task, res, results)]
    machine = results["machine"]
    if "load_average_before" in machine:
        before, after = machine["load_average_before"][0], machine["load_average_after"][0]
        lines.append(f"{machine['cpus']} CPUs; 1-minute load average {before:.2f} before, {after:.2f} after.")
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
