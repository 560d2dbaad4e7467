"""``flowrl bench maniskill``: Flow-Noise and Flow-SDE, each under PPO and GRPO, fine-tuned side
by side on the ManiSkill3 tasks (PickCube, PushCube) from one pretrained policy per task.

The tasks are the files: ``experiments/maniskill/TASK_METHOD.yaml`` (``paper/`` for
``--size paper``), one per method of ``METHODS``; a task whose files are added there (StackCube)
is run by ``--tasks`` with no code change. One command runs, per task, each step cached:
  1. demonstrations: the file the experiments' ``pretrain.demos.path`` names
     (``cache/datasets/pickcube-100.npz``), recorded when missing by ManiSkill's motion planner
     (envs.maniskill_demos; the number of episodes is the one the file name ends with),
  2. pretraining once per task (the method files of a task must agree on their policy, pretrain,
     env.id and env.kwargs), cached in ``cache/maniskill/TASK/pretrain`` (``paper-pretrain``); a
     stopped pretraining there resumes, one made with other such sections is refused,
  3. raw stepping: one env of the task in this process, random actions, no policy (the speed the
     collection is compared with, per worker),
  4. per seed, every chosen method fine-tunes that policy (``policy.pretrained``) with the same
     overrides, one run after the other in this process, so the times compare.

Per task and method it reports the held-out evaluation (deterministic ODE policy;
``eval/success_once``: the episode succeeded at some step, and ``eval/success_rate``: at its
end) before and after, mean ± std over seeds; env steps; fine-tuning wall time; the training
step (``time/update_s``, mean over iterations) and its ratio to Flow-Noise PPO's; the
throughput (``time/env_steps_per_s``: env steps per collection + update) and the collection's
own env steps/s, per env worker as a ratio of the raw stepping; and the issue's targets, hit or
missed. Held out: the demonstrations use reset seeds 0, 1, ... (``meta_seeds``), evaluation the
31-bit seeds ``derive_seed(seed, 10**6) + i`` (flowrl.rollout.evaluation.evaluate_policy); the
JSON records both and the bench refuses seeds whose evaluation would meet a demonstration.

Results: ``maniskill.json`` (table, learning curves, commands), ``maniskill.png`` (eval
success_once against env steps, one panel per task) and TensorBoard scalars in
``tensorboard/TASK/METHOD_seedS``.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowrl import experiment as ex
from flowrl.bench.common import (
    ROOT,
    bench_overrides,
    check_bench_args,
    prepare_pretrained,
    results_header,
    seed_curves_chart,
    select_methods,
    shown,
    tensorboard_curves,
    write_json,
)
from flowrl.bench.rollout import raw_env_rate
from flowrl.config import ExperimentConfig, load_config
from flowrl.core.demos_file import read_metadata
from flowrl.errors import FlowRLError
from flowrl.runlog import read_metrics
from flowrl.runtime import derive_seed

MANISKILL_DIR = ROOT / "experiments" / "maniskill"
SIZES = {"cpu": MANISKILL_DIR, "paper": MANISKILL_DIR / "paper"}
REPORTED = ("eval/success_once", "eval/success_rate", "eval/return")
RAW_STEPS, RAW_REPEATS = 50, 3  # raw stepping: 50 action chunks per timed run, the best of 3
# The targets: PickCube's success_once from <= 60 % pretrained to >= 90 % fine-tuned in
# <= 45 min on 2 CPU cores; Flow-SDE's training step <= 0.5x Flow-Noise's at equal final success;
# collection through Ray workers >= 0.8x the raw single-env stepping per worker.
BEFORE_AT_MOST, AFTER_AT_LEAST, FINETUNE_MINUTES = 0.6, 0.9, 45
STEP_COST_AT_MOST, ROLLOUT_VS_RAW_AT_LEAST = 0.5, 0.8
# Whose training step the step-cost target judges: Flow-SDE PPO, like for like with Flow-Noise PPO
# (the same PPO update on the same batch; only the denoising steps it trains differ). GRPO's
# batch and update differ, so its ratio is reported but not judged.
STEP_COST_METHOD = "flow_sde_ppo"


@dataclass(frozen=True)
class Method:
    label: str
    key: str  # --methods accepts it or the label; the experiment file is TASK_KEY.yaml


METHODS = (
    Method("Flow-Noise PPO", "flow_noise_ppo"),
    Method("Flow-SDE PPO", "flow_sde_ppo"),
    Method("Flow-Noise GRPO", "flow_noise_grpo"),
    Method("Flow-SDE GRPO", "flow_sde_grpo"),
)
BASELINE = "flow_noise_ppo"  # the training-step times are reported as ratios to it


@dataclass(frozen=True)
class TaskPlan:
    """A task's checked experiment files, loaded with the bench's overrides."""

    name: str
    files: dict[str, Path]  # method key -> experiment file
    configs: dict[str, ExperimentConfig]

    @property
    def first(self) -> ExperimentConfig:  # the shared sections are equal in every config
        return next(iter(self.configs.values()))


def task_names(folder: Path) -> list[str]:
    """The tasks with at least one method file (TASK_METHOD.yaml) in ``folder``."""
    suffixes = [f"_{m.key}.yaml" for m in METHODS]
    return sorted({p.name.removesuffix(s) for p in folder.glob("*.yaml") for s in suffixes if p.name.endswith(s)})


def _plan(task: str, folder: Path, methods: list[Method], overrides: list[str]) -> TaskPlan:
    """The task's files of ``methods``, loaded with ``overrides``; an error when one is missing
    or when they disagree on what the shared pretraining fixes."""
    files = {m.key: folder / f"{task}_{m.key}.yaml" for m in methods}
    missing = [shown(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FlowRLError(f"flowrl bench maniskill: no {', '.join(missing)} (task {task})")
    configs = {key: load_config(path, overrides) for key, path in files.items()}
    (key0, cfg0), *others = configs.items()
    for key, cfg in others:
        differs = _first_difference(_shared(cfg0), _shared(cfg))
        if differs:
            raise FlowRLError(
                f"flowrl bench maniskill: {files[key0].name} and {files[key].name} differ in {differs}; the methods "
                "of a task fine-tune one pretrained policy, so their policy, pretrain, env.id and env.kwargs must agree"
            )
    if cfg0.pretrain is None or cfg0.pretrain.demos.path is None:
        raise FlowRLError(
            f"flowrl bench maniskill: {shown(files[key0])} has no pretrain.demos.path; the bench pretrains on "
            "motion-planner demonstrations, a file such as cache/datasets/pickcube-100.npz"
        )
    return TaskPlan(task, files, configs)


def _shared(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the pretrained policy depends on: one pretraining serves every method of a task."""
    data = cfg.model_dump(mode="json")
    return {"policy": data["policy"], "pretrain": data["pretrain"], "env.id": cfg.env.id, "env.kwargs": cfg.env.kwargs}


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    """The first dotted key whose values differ, as 'key: A vs B' ('' when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
            if found:
                return found
        return ""
    return "" if a == b else f"{where}: {a} vs {b}"


def run_maniskill_bench(
    out_dir: str | Path,
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | tuple[int, ...] = (0,),
    iterations: int | None = None,
    overrides: list[str] | None = None,
    size: str = "cpu",
    cache: str | Path = "cache",
    progress: bool = True,
    folder: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune every chosen method of every chosen task once per seed from the task's
    pretrained policy; ``overrides`` (``key.sub=value``) go to every run and to the
    pretraining, ``iterations`` replaces ``algo.iterations``. ``folder``: the experiment files
    (default: the size's). Writes the results to ``out_dir`` after every run (a stopped bench
    keeps what it measured) and returns them."""
    chosen = select_methods(methods, METHODS, "maniskill")
    check_bench_args("maniskill", seeds, size, SIZES)
    folder = Path(folder) if folder is not None else SIZES[size]
    known = task_names(folder)
    unknown = [t for t in tasks or [] if t not in known]
    if unknown or tasks == []:
        raise FlowRLError(
            f"flowrl bench maniskill: unknown task(s) {unknown or tasks}; choose from {', '.join(known) or 'none'} "
            f"(TASK_METHOD.yaml files in {shown(folder)})"
        )
    overrides, extra = bench_overrides(overrides, iterations)
    plans = [_plan(t, folder, chosen, extra) for t in (tasks or known)]  # every file checked before any work
    out, cache = Path(out_dir), Path(cache)
    results: dict[str, Any] = {
        **results_header(size, seeds, iterations, overrides),
        "commands": {"bench": _bench_command(out, plans, chosen, iterations, seeds, overrides, size)},
        "tasks": {},
    }
    pretrain_folder = "pretrain" if size == "cpu" else f"{size}-pretrain"
    for plan in plans:
        _run_task(plan, results, out, cache / "maniskill" / plan.name / pretrain_folder, extra, progress)
    return results


def _run_task(
    plan: TaskPlan, results: dict[str, Any], out: Path, pretrain_dir: Path, extra: list[str], progress: bool
) -> None:
    """Steps 1-4 for one task, its rows and results written after every run."""
    cfg, seeds, overrides = plan.first, results["seeds"], results["overrides"]
    demos, demos_s, demos_command = _prepare_demos(cfg, progress)
    held_out = _held_out(demos, seeds, max(c.eval.episodes for c in plan.configs.values()))
    pretrain_file = next(iter(plan.files.values()))
    _check_cached_pretraining(pretrain_dir, load_config(pretrain_file, overrides))
    checkpoint, pretrain_s = prepare_pretrained(pretrain_dir / "pretrained.pt", pretrain_file, overrides, progress)
    raw = raw_env_rate(cfg.env.id, cfg.policy.horizon, 1, RAW_STEPS, RAW_REPEATS, cfg.env.kwargs)
    print(f"{plan.name}: raw single-env stepping {raw:.0f} env steps/s (random actions, one process)", flush=True)
    pretrain_command = ["flowrl", "pretrain", shown(pretrain_file), *overrides, "--run-dir", str(pretrain_dir)]
    task = results["tasks"][plan.name] = {
        "env_id": cfg.env.id,
        "denoising_steps": cfg.policy.denoising_steps,
        "demos": {"path": str(demos), "made_s": demos_s},
        "held_out": held_out,
        "pretrained": {"path": str(checkpoint), "pretrain_s": pretrain_s},
        "raw_env_steps_per_s": raw,
        "commands": {"demos": demos_command, "pretrain": shlex.join(pretrain_command)},
        "rows": [],
        "targets": [],
    }
    run_overrides = [*extra, f"policy.pretrained={checkpoint}", f"runs_dir={out / 'runs' / plan.name}"]
    for path in plan.files.values():
        ex.preflight(load_config(path, run_overrides))  # the checkpoint fits every method's network
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:  # every method once per seed, so a stopped bench has whole seeds
        for method in (m for m in METHODS if m.key in plan.files):
            path = plan.files[method.key]
            print(f"{plan.name}: {method.label}, seed {seed}", flush=True)
            command = ["flowrl", "train", shown(path), *extra, f"seed={seed}", f"policy.pretrained={checkpoint}"]
            run_cfg = load_config(path, [*run_overrides, f"seed={seed}"])
            runs.setdefault(method.key, []).append(_fine_tune(run_cfg, seed, shlex.join(command), progress))
            task["rows"] = [summarise(m, runs[m.key], raw) for m in METHODS if m.key in runs]
            _ratios(task["rows"])
            task["targets"] = targets(task["rows"])
            _write(results, out, plan.name)


def _prepare_demos(cfg: ExperimentConfig, progress: bool) -> tuple[Path, float | None, str]:
    """The demonstrations file of the experiments; recorded now with ManiSkill's motion planner
    when missing (as many successful episodes as the file name's number says, holding the goal
    for N steps after each success where it says ``-holdN-``, e.g. pickcube-hold16-400.npz).
    Returns the path, the seconds it took (None when it existed) and the command that records it."""
    from envs.maniskill_demos import motion_planning_demos

    path = Path(cfg.pretrain.demos.path).expanduser()
    counted = re.search(r"-(\d+)\.npz$", path.name)
    held = re.search(r"-hold(\d+)-", path.name)
    hold_steps = int(held.group(1)) if held else 0
    control = cfg.env.kwargs.get("control_mode")
    command = ["flowrl", "demos", cfg.env.id, "--episodes", counted.group(1) if counted else "N", "--out", str(path)]
    command += ["--control-mode", control] if control else []
    command += ["--hold-steps", str(hold_steps)] if hold_steps else []
    if path.exists():
        return path, None, shlex.join(command)
    if counted is None:
        raise FlowRLError(
            f"flowrl bench maniskill: {path} (pretrain.demos.path) does not exist, and its name does not say how many "
            "episodes to record: name it NAME-EPISODES.npz (e.g. pickcube-100.npz), or record it with flowrl demos"
        )
    t0 = time.perf_counter()
    controller = {"control_mode": control} if control else {}  # none set: the env's default, the runs' too
    motion_planning_demos(
        cfg.env.id, int(counted.group(1)), path, progress=progress, hold_steps=hold_steps, **controller
    )
    return path, time.perf_counter() - t0, shlex.join(command)


def evaluation_seeds(seed: int, episodes: int) -> range:
    """The reset seeds of a run's evaluations: ``episodes`` consecutive seeds from a 31-bit
    seed derived from the run's seed (flowrl.rollout.evaluation.evaluate_policy draws them so)."""
    base = derive_seed(seed, 10**6)
    return range(base, base + episodes)


def _held_out(demos: Path, seeds: list[int], episodes: int) -> dict[str, Any]:
    """The demonstrations' reset seeds (the file's ``meta_seeds``) against the evaluation's;
    an error when any seed would evaluate on a demonstration's start."""
    evaluation = {str(s): [evaluation_seeds(s, episodes)[0], evaluation_seeds(s, episodes)[-1]] for s in seeds}
    recorded = read_metadata(demos).get("seeds")
    if not recorded:
        return {"demo_seeds": None, "eval_seeds": evaluation, "disjoint": None, "note": f"{demos} records no seeds"}
    demo_seeds = sorted(int(s) for s in recorded.split(","))
    met = [s for s in seeds if set(evaluation_seeds(s, episodes)) & set(demo_seeds)]
    if met:
        raise FlowRLError(
            f"flowrl bench maniskill: the evaluation of seed(s) {met} would reset from seeds of the demonstrations in "
            f"{demos}: choose other --seeds"
        )
    return {
        "demo_seeds": [demo_seeds[0], demo_seeds[-1]],
        "demo_episodes": len(demo_seeds),
        "eval_seeds": evaluation,
        "disjoint": True,
    }


def _check_cached_pretraining(run_dir: Path, cfg: ExperimentConfig) -> None:
    """A pretraining cached (or stopped) in ``run_dir`` must be the one this bench would run."""
    if not (run_dir / "config.yaml").is_file():
        return
    cached = ex.load_run_config(run_dir, [])
    differs = _first_difference({**_shared(cached), "seed": cached.seed}, {**_shared(cfg), "seed": cfg.seed})
    if differs:
        raise FlowRLError(
            f"flowrl bench maniskill: {run_dir} holds a pretraining with other settings ({differs}, cached vs "
            "this bench's): move the folder away to pretrain again"
        )


def _fine_tune(cfg: ExperimentConfig, seed: int, command: str, progress: bool) -> dict[str, Any]:
    """One timed fine-tuning run and what its metrics.jsonl says (``command``: the same run
    as a ``flowrl train`` command, for the record)."""
    run_dir = ex.new_run_dir(cfg.model_copy(update={"name": f"{cfg.name}-s{seed}"}))
    t0 = time.perf_counter()
    result = ex.train(cfg, run_dir, progress=progress)
    wall = time.perf_counter() - t0
    records = read_metrics(run_dir)
    trained = [r for r in records if "time/update_s" in r]
    steps = np.diff([0, *(r["env_steps"] for r in trained)])
    return {
        "seed": seed,
        "run": str(run_dir),
        "command": command,
        "eval_episodes": cfg.eval.episodes,
        "before": {k: result["before"][k] for k in REPORTED},
        "after": {k: result["after"][k] for k in REPORTED},
        "curves": {k: [(r["env_steps"], r[k]) for r in records if k in r] for k in REPORTED},
        "env_steps": records[-1]["env_steps"],
        "finetune_s": wall,
        "update_s": float(np.mean([r["time/update_s"] for r in trained])),
        "env_steps_per_s": float(np.mean([r["time/env_steps_per_s"] for r in trained])),
        "collect_env_steps_per_s": float(steps.sum() / sum(r["time/collect_s"] for r in trained)),
        "collector": "ray" if cfg.ray.enabled else "in_process",
        "workers": cfg.env.num_workers,
    }


def summarise(method: Method, runs: list[dict[str, Any]], raw: float) -> dict[str, Any]:
    """A method's row: each evaluation metric before and after, mean and std over seeds; the
    times and rates averaged over seeds; the collection per worker process (the Ray workers,
    or this one process for in-process workers) over the raw single-env stepping ``raw``."""

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in runs]))

    def over_seeds(when: str, statistic) -> dict[str, float]:
        return {k: float(statistic([r[when][k] for r in runs])) for k in REPORTED}

    processes = runs[0]["workers"] if runs[0]["collector"] == "ray" else 1
    return {
        "method": method.label,
        "key": method.key,
        "seeds": [r["seed"] for r in runs],
        "before": over_seeds("before", np.mean),
        "before_std": over_seeds("before", np.std),
        "after": over_seeds("after", np.mean),
        "after_std": over_seeds("after", np.std),
        "env_steps": mean("env_steps"),
        "finetune_s": mean("finetune_s"),
        "update_s": mean("update_s"),
        "env_steps_per_s": mean("env_steps_per_s"),
        "collect_env_steps_per_s": mean("collect_env_steps_per_s"),
        "collector": runs[0]["collector"],
        "worker_processes": processes,
        "collect_per_worker_vs_raw": mean("collect_env_steps_per_s") / processes / raw,
        "runs": runs,
    }


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's training step over Flow-Noise PPO's (None when Flow-Noise PPO did not run)."""
    base = next((r["update_s"] for r in rows if r["key"] == BASELINE), None)
    for row in rows:
        row["update_vs_flow_noise"] = row["update_s"] / base if base else None


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for a task's rows, each with its measured value and hit (None where
    it does not apply: collection not through Ray)."""
    found = []
    for r in rows:
        before, after, minutes = r["before"]["eval/success_once"], r["after"]["eval/success_once"], r["finetune_s"] / 60
        found.append(
            {
                "method": r["method"],
                "target": f"success_once <= {BEFORE_AT_MOST:.2f} pretrained, >= {AFTER_AT_LEAST:.2f} after, "
                f"fine-tuning <= {FINETUNE_MINUTES} min",
                "value": f"{before:.2f} -> {after:.2f} in {minutes:.1f} min",
                "hit": before <= BEFORE_AT_MOST and after >= AFTER_AT_LEAST and minutes <= FINETUNE_MINUTES,
            }
        )
    base = next((r for r in rows if r["key"] == BASELINE), None)
    for r in rows:
        if base is None or r["key"] != STEP_COST_METHOD:
            continue
        ratio, (equal, noise) = r["update_vs_flow_noise"], _equal_success(r, base)
        found.append(
            {
                "method": r["method"],
                "target": f"training step <= {STEP_COST_AT_MOST}x Flow-Noise PPO's at equal final success_once",
                "value": f"{ratio:.2f}x; success_once {r['after']['eval/success_once']:.2f} vs "
                f"{base['after']['eval/success_once']:.2f} (2 standard errors {noise:.2f})",
                "hit": ratio <= STEP_COST_AT_MOST and equal,
            }
        )
    for r in rows:
        ray = r["collector"] == "ray"
        found.append(
            {
                "method": r["method"],
                "target": f"collection per Ray worker >= {ROLLOUT_VS_RAW_AT_LEAST}x raw single-env stepping",
                "value": f"{r['collect_per_worker_vs_raw']:.2f}x" + ("" if ray else " (in-process workers, not Ray)"),
                "hit": r["collect_per_worker_vs_raw"] >= ROLLOUT_VS_RAW_AT_LEAST if ray else None,
            }
        )
    return found


def _equal_success(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, float]:
    """Whether two rows' final success_once agree within noise: within two binomial standard
    errors of the difference, each over all its evaluation episodes (every seed's)."""

    def variance(row: dict[str, Any]) -> float:
        p, n = row["after"]["eval/success_once"], sum(r["eval_episodes"] for r in row["runs"])
        return p * (1 - p) / n

    noise = 2 * math.sqrt(variance(a) + variance(b))
    return abs(a["after"]["eval/success_once"] - b["after"]["eval/success_once"]) <= noise, noise


def _write(results: dict[str, Any], out: Path, task: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "maniskill.json")
    _chart(results, out / "maniskill.png")
    for row in results["tasks"][task]["rows"]:
        for run in row["runs"]:
            tensorboard_curves(out / "tensorboard" / task / f"{row['key']}_seed{run['seed']}", run["curves"])


def _chart(results: dict[str, Any], path: Path) -> None:
    panels = [
        {
            "title": f"{task} ({res['env_id']})",
            "ylabel": "held-out success_once (ODE policy)\nmean, min-max over seeds",
            "ylim": (-0.03, 1.03),
            "lines": [(row["method"], [r["curves"]["eval/success_once"] for r in row["runs"]]) for row in res["rows"]],
        }
        for task, res in results["tasks"].items()
    ]
    title = f"flowrl bench maniskill ({results['size']}-sized, {results['machine']['cpus']} CPUs)"
    seed_curves_chart(path, title, panels)


def _bench_command(out, plans, methods, iterations, seeds, overrides, size) -> str:
    args = ["flowrl", "bench", "maniskill", "--tasks", ",".join(p.name for p in plans)]
    args += ["--methods", ",".join(m.key for m in methods), "--seeds", ",".join(map(str, seeds)), "--out", str(out)]
    args += ["--iterations", str(iterations)] if iterations is not None else []
    args += ["--size", size] if size != "cpu" else []
    return shlex.join([*args, *overrides])


def format_table(results: dict[str, Any]) -> str:
    """Markdown table (what the README quotes, with the command), the held-out note and the targets."""
    lines = [f"`{results['commands']['bench']}`\n"]
    for name, task in results["tasks"].items():
        episodes = sorted({r["eval_episodes"] for row in task["rows"] for r in row["runs"]})
        lines.append(
            f"**{name}** ({task['env_id']}, {results['size']}-sized, {results['machine']['cpus']} CPUs; mean ± std "
            f"over seeds {results['seeds']}, {'/'.join(map(str, episodes))} held-out evaluation episodes, ODE policy, "
            f"K = {task['denoising_steps']})\n"
        )
        lines.append(
            "| method | success_once before | after | success_rate after | env steps | fine-tune wall | "
            "training step | vs Flow-Noise PPO | env steps/s | collection per worker vs raw |"
        )
        lines.append("|---" * 10 + "|")
        for r in task["rows"]:
            ratio = f"{r['update_vs_flow_noise']:.2f}x" if r["update_vs_flow_noise"] is not None else ""
            where = f"{r['worker_processes']} Ray workers" if r["collector"] == "ray" else "in-process"
            cells = [
                r["method"],
                f"{r['before']['eval/success_once']:.2f} ± {r['before_std']['eval/success_once']:.2f}",
                f"{r['after']['eval/success_once']:.2f} ± {r['after_std']['eval/success_once']:.2f}",
                f"{r['after']['eval/success_rate']:.2f}",
                f"{r['env_steps']:,.0f}",
                f"{r['finetune_s'] / 60:.1f} min",
                f"{r['update_s']:.3g} s",
                ratio,
                f"{r['env_steps_per_s']:.0f} ({r['collect_env_steps_per_s']:.0f} collecting)",
                f"{r['collect_per_worker_vs_raw']:.2f}x ({where})",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        held = task["held_out"]
        seeds = ", ".join(f"{lo}-{hi} (seed {s})" for s, (lo, hi) in held["eval_seeds"].items())
        demo = f"{held['demo_seeds'][0]}-{held['demo_seeds'][-1]}" if held["demo_seeds"] else "not recorded"
        lines.append(
            f"\nRaw single-env stepping (random actions, one process): {task['raw_env_steps_per_s']:.0f} env steps/s. "
            f"Reset seeds of the demonstrations: {demo}; of the evaluations: {seeds}"
            + (", disjoint from them." if held["disjoint"] else ".")
        )
        lines.append("\nTargets:")
        for t in task["targets"]:
            verdict = {True: "hit", False: "MISS", None: "n/a"}[t["hit"]]
            lines.append(f"- {t['method']}: {t['target']}: {t['value']}: {verdict}")
        lines.append("")
    return "\n".join(lines)


__all__ = ["METHODS", "evaluation_seeds", "format_table", "run_maniskill_bench", "summarise", "targets", "task_names"]


def cli_handler(args: argparse.Namespace) -> int:
    """``flowrl bench maniskill`` (its arguments: flowrl.cli): runs the bench, prints the table."""
    out = Path(args.out or "benchmarks/results/maniskill")
    results = run_maniskill_bench(
        out,
        tasks=args.tasks,
        methods=args.methods,
        seeds=args.seeds or [0],
        iterations=args.iterations,
        overrides=[*args.set, *args.overrides],
        size=args.size,
        progress=not args.no_progress,
    )
    print(format_table(results))
    print(f"written: {out / 'maniskill.json'}, {out / 'maniskill.png'}, {out / 'tensorboard'}")
    return 0
