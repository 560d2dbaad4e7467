"""``flowrl bench locomotion``: ReinFlow (rectified flow, shortcut, MeanFlow; K = 4 and
K = 1), GRPO with ReinFlow's sampler, DPPO and Gaussian PPO fine-tuned side by side on the
locomotion tasks.

The tasks are data: one file per task in ``experiments/locomotion/tasks/`` (its env, its
expert, its methods and sizes, its dataset recipes; see flowrl.bench.tasks). A task added
there is run by ``--tasks NAME`` (or ``all``) with no code change.

The whole pipeline runs in one command, each step cached under ``cache/``:
  1. expert: Gaussian PPO from scratch (the task's ``expert`` experiment, ``cache/experts/TASK``),
  2. dataset: the task's "medium" recipe, D4RL-like: a partly trained policy (the expert's
     experiment stopped after ``policy_iterations``, ``cache/experts/TASK-itN``) acting with its
     own stochasticity, recorded by ``flowrl collect --actions sample``
     (``cache/datasets/TASK-medium.npz``; re-recorded when the file's recorded recipe differs),
  3. per method file: behaviour cloning once (K = 4 and K = 1 share the pretrained network),
  4. per variant: PPO fine-tuning from that network, timed.
``--data-only`` stops after steps 1-2, making every dataset the task lists (expert and medium).
Every variant is evaluated with its deterministic policy (ODE, DDIM eta = 0, or the mean)
before and after. Results: ``locomotion.json`` (table and curves), ``locomotion.png``
(eval return against env steps) and TensorBoard scalars in ``tensorboard/``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowrl import experiment as ex
from flowrl.bench.common import seed_curves_chart, tensorboard_curves, write_json
from flowrl.bench.tasks import BENCH_DATASET, DatasetRecipe, Task, TaskError, select_tasks
from flowrl.config import load_config
from flowrl.core.demos_file import read_metadata
from flowrl.errors import FlowRLError
from flowrl.runlog import read_metrics


@dataclass(frozen=True)
class Variant:
    label: str
    method: str  # experiment file: [paper/]TASK_METHOD.yaml, when the task lists the method
    overrides: tuple[str, ...] = field(default=())


RESULTS_FORMAT = 2  # locomotion.json's layout (2: per-seed runs in every row); older files' tasks are not merged
VARIANTS = (
    Variant("ReinFlow rectified flow K=4", "reinflow"),
    Variant("ReinFlow rectified flow K=1", "reinflow", ("policy.denoising_steps=1",)),
    Variant("ReinFlow shortcut K=4", "shortcut"),
    Variant("ReinFlow shortcut K=1", "shortcut", ("policy.denoising_steps=1",)),
    Variant("ReinFlow MeanFlow K=4", "meanflow"),
    Variant("ReinFlow MeanFlow K=1", "meanflow", ("policy.denoising_steps=1",)),
    # the ReinFlow file with Flow-SDE's fixed noise in place of the learned noise net
    Variant(
        "Flow-SDE rectified flow K=4",
        "reinflow",
        ("mdp.converter={type: flow_sde, noise_level: 0.3}", "~algo.noise_lr", "~algo.entropy_coef"),
    ),
    Variant("GRPO rectified flow K=4", "grpo"),
    Variant("DPPO", "dppo"),
    Variant("Gaussian PPO", "gaussian"),
)


def prepare_dataset(
    task: Task, cache: Path, progress: bool, dataset: str = BENCH_DATASET
) -> tuple[Path, dict[str, float]]:
    """The task's dataset ``dataset`` (cache/datasets/TASK-DATASET.npz), made by its recipe:
    training the acting policy when missing (resuming a stopped training), then collecting."""
    recipe = task.spec.datasets[dataset]
    path = task.dataset_path(cache, dataset)
    expert_cfg = load_config(task.expert_file)
    iterations = recipe.policy_iterations or expert_cfg.algo.iterations
    timings: dict[str, float] = {}
    if path.exists():
        stale = _recorded_otherwise(path, task, recipe, iterations)
        if not stale:
            return path, timings
        print(f"{path} was recorded with {stale}: re-recording it with the task's recipe ({task.file})", flush=True)
    partial = iterations != expert_cfg.algo.iterations
    run = cache / "experts" / (f"{task.name}-it{iterations}" if partial else task.name)
    if (run / "policy.pt").exists():
        trained = ex.load_run_config(run, []).algo.iterations
        if trained != iterations:  # e.g. the expert file's budget changed since
            raise FlowRLError(
                f"{run} holds a policy trained for {trained} iterations, the recipe of {task.file} wants {iterations}: "
                "move the folder away to train it again"
            )
    else:
        resume = (run / "checkpoints" / "last.pt").exists()
        stopped_short = [f"algo.iterations={iterations}"]
        cfg = ex.load_run_config(run, []) if resume else load_config(task.expert_file, stopped_short)
        run.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ex.train(cfg, run, resume=resume, progress=progress)
        timings["policy_s" if partial else "expert_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex.collect(run, path, recipe.episodes, recipe.action_noise, seed=0, progress=progress, actions=recipe.actions)
    timings["collect_s"] = time.perf_counter() - t0
    return path, timings


def _recorded_otherwise(path: Path, task: Task, recipe: DatasetRecipe, iterations: int) -> str:
    """How the file's recorded recipe differs from the task's ('' when it does not; a file
    without any record, e.g. hand-made, is taken as it is)."""
    recorded = read_metadata(path)
    if not recorded:
        print(f"{path}: no recorded recipe (not from flowrl collect); using it as it is", flush=True)
        return ""
    wanted = {
        "env_id": task.spec.env_id,
        "policy_iterations": str(iterations),
        "actions": recipe.actions,
        "action_noise": str(recipe.action_noise),
        "episodes": str(recipe.episodes),
    }
    return ", ".join(
        f"{k} {recorded.get(k, '(none)')} instead of {v}" for k, v in wanted.items() if recorded.get(k) != v
    )


def run_locomotion_bench(
    out_dir: str | Path,
    tasks: list[str],
    variants: list[str] | None = None,
    size: str = "cpu",
    overrides: list[str] | None = None,
    cache: str | Path = "cache",
    progress: bool = True,
    tasks_dir: str | Path | None = None,
    data_only: bool = False,
    seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    eval_episodes: int = 20,
) -> dict[str, Any]:
    """Run the benchmark on ``tasks`` (names of task files in ``tasks_dir``, or ``["all"]``);
    ``variants``: labels or method names (default: all), each run once per seed (pretraining
    included) and evaluated over ``eval_episodes`` episodes. ``data_only``: make the experts
    and every dataset of the tasks, and stop."""
    chosen_tasks = select_tasks(tasks, tasks_dir)  # every file checked before any work
    out, cache = Path(out_dir), Path(cache)
    if data_only:
        datasets: dict[str, Any] = {}
        for task in chosen_tasks:
            for name in task.spec.datasets:
                path, timings = prepare_dataset(task, cache, progress, name)
                datasets.setdefault(task.name, {})[name] = {"path": str(path), "data_prep_s": timings}
        return {"datasets": datasets}
    chosen = [v for v in VARIANTS if variants is None or v.label in variants or v.method in variants]
    if not chosen:
        raise FlowRLError(f"no variant matches {variants}; labels: {[v.label for v in VARIANTS]}")
    if not seeds:
        raise FlowRLError("flowrl bench locomotion: give at least one seed (--seeds 0,1,2)")
    for task in chosen_tasks:
        if size not in task.spec.sizes:
            raise TaskError(f"task {task.name} has no {size}-sized experiments (sizes: {task.spec.sizes}; {task.file})")
    if not any(v.method in t.spec.methods for t in chosen_tasks for v in chosen):
        raise FlowRLError(f"none of the tasks {[t.name for t in chosen_tasks]} has a method of the chosen variants")
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "machine": {"cpus": os.cpu_count()},
        "size": size,
        "seeds": list(seeds),
        "eval_episodes": eval_episodes,
        "overrides": list(overrides or []),
        "tasks": {},
    }
    for task in chosen_tasks:
        runnable = [v for v in chosen if v.method in task.spec.methods]
        skipped = sorted({v.method for v in chosen} - set(task.spec.methods))
        if skipped:
            print(f"{task.name}: no experiment file for {', '.join(skipped)} (methods in {task.file})", flush=True)
        if not runnable:
            continue
        dataset, timings = prepare_dataset(task, cache, progress)
        runs: dict[str, list[dict[str, Any]]] = {}
        pretrained: dict[tuple[str, int], tuple[Path, float]] = {}
        for seed in seeds:  # every variant once per seed, so a stopped bench has whole seeds
            for variant in runnable:
                file = task.method_file(variant.method, size)
                extra = [
                    f"pretrain.demos.path={dataset}",
                    f"eval.episodes={eval_episodes}",
                    *(overrides or []),
                    *variant.overrides,
                    f"seed={seed}",
                ]
                run_root = out / "runs" / task.name
                if (variant.method, seed) not in pretrained:  # behaviour cloning once per method file and seed
                    cfg = load_config(file, [*extra, f"runs_dir={run_root}"])
                    ex.preflight(cfg)  # e.g. a dataset of another env: before a run folder exists
                    run_dir = ex.new_run_dir(cfg.model_copy(update={"name": f"{cfg.name}-s{seed}-pretrain"}))
                    t0 = time.perf_counter()
                    ex.pretrain_only(cfg, run_dir, progress)
                    pretrained[variant.method, seed] = (run_dir / "pretrained.pt", time.perf_counter() - t0)
                checkpoint, pretrain_s = pretrained[variant.method, seed]
                cfg = load_config(file, [*extra, f"policy.pretrained={checkpoint}", f"runs_dir={run_root}"])
                run_dir = ex.new_run_dir(cfg.model_copy(update={"name": f"{cfg.name}-s{seed}"}))
                t0 = time.perf_counter()
                result = ex.train(cfg, run_dir, progress=progress)
                wall = time.perf_counter() - t0
                records = read_metrics(run_dir)
                curve = [(r["env_steps"], r["eval/return"]) for r in records if "eval/return" in r]
                runs.setdefault(variant.label, []).append(
                    {
                        "seed": seed,
                        "run": str(run_dir),
                        "return_before": result["before"]["eval/return"],
                        "return_after": result["after"]["eval/return"],
                        "iqm_after": result["after"].get("eval/return_iqm", result["after"]["eval/return"]),
                        "return_best": max(r for _, r in curve),
                        "return_worst": min(r for _, r in curve),
                        "env_steps": records[-1]["env_steps"],
                        "finetune_s": wall,
                        "pretrain_s": pretrain_s,
                        "curve": curve,
                    }
                )
                rows = [summarise(label, runs[label]) for label in (v.label for v in runnable) if label in runs]
                _write(results, out, task.name, rows, timings)
    return results


def iqm(values: list[float] | np.ndarray) -> float:
    """Interquartile mean: the mean of the middle half, trimming int(n / 4) values from each
    end (scipy.stats.trim_mean(values, 0.25), as rliable computes it); the mean for n < 4."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    k = len(x) // 4
    return float(x[k : len(x) - k].mean())


def summarise(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's row: mean and std over seeds of the returns before and after, the mean of
    each run's interquartile mean over its final evaluation episodes, and the wall time per
    unit of improvement of the means."""
    before = np.array([r["return_before"] for r in runs])
    after = np.array([r["return_after"] for r in runs])
    wall = float(np.mean([r["finetune_s"] for r in runs]))
    gain = float(after.mean() - before.mean())
    return {
        "variant": label,
        "seeds": [r["seed"] for r in runs],
        "return_before": float(before.mean()),
        "return_before_std": float(before.std()),
        "return_after": float(after.mean()),
        "return_after_std": float(after.std()),
        "iqm_after": float(np.mean([r["iqm_after"] for r in runs])),
        "ratio": float(np.mean(after / np.where(before > 0, before, np.nan))),
        "return_worst": float(min(r["return_worst"] for r in runs)),
        "env_steps": float(np.mean([r["env_steps"] for r in runs])),
        "finetune_s": wall,
        "s_per_100_return": wall / gain * 100 if gain > 0 else None,
        "runs": runs,
    }


def _write(results: dict[str, Any], out: Path, task: str, rows: list[dict[str, Any]], timings) -> None:
    """Results so far (written after every run, so a stopped benchmark keeps what it measured).

    A task's rows all come from one run (side by side); the other tasks already in
    ``locomotion.json`` measured alike (same results format, size, overrides, seeds and
    evaluation episodes) are kept, so the tasks can run as separate commands; the others are
    dropped, so one table never mixes statistics.
    """
    results["tasks"][task] = {"data_prep_s": timings, "rows": rows}
    previous = _previous(out / "locomotion.json")
    same = ("format", "size", "overrides", "seeds", "eval_episodes")
    if all(previous.get(k) == results[k] for k in same):
        for other, res in previous.get("tasks", {}).items():
            if other != task:
                results["tasks"][other] = res
    results["tasks"] = {t: results["tasks"][t] for t in sorted(results["tasks"])}
    ratios = _wall_ratio(rows)
    if ratios:
        results["tasks"][task]["reinflow_vs_dppo_wall_per_improvement"] = ratios
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "locomotion.json")  # atomic: a bench of another task may read it meanwhile
    _chart(results, out / "locomotion.png")
    _tensorboard(rows, out / "tensorboard" / task)  # this task only: another command owns the others


def _previous(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _wall_ratio(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each ReinFlow (and Flow-SDE) variant's wall time per unit of improvement over DPPO's
    (issue 13's target is <= 0.5); empty until DPPO has improved."""
    dppo = next((r for r in rows if r["variant"] == "DPPO"), None)
    if dppo is None or not dppo["s_per_100_return"]:
        return {}
    return {
        r["variant"]: r["s_per_100_return"] / dppo["s_per_100_return"]
        for r in rows
        if r["variant"].startswith(("ReinFlow", "Flow-SDE")) and r["s_per_100_return"]
    }


def _chart(results: dict[str, Any], path: Path) -> None:
    panels = [
        {
            "title": task,
            "ylabel": "eval return, deterministic policy\n(line: mean; band: min-max over seeds)",
            "lines": [(row["variant"], [r["curve"] for r in row["runs"]]) for row in res["rows"]],
        }
        for task, res in results["tasks"].items()
    ]
    title = f"flowrl bench locomotion ({results['size']}-sized, {results['machine']['cpus']} CPUs)"
    seed_curves_chart(path, title, panels)


def _tensorboard(rows: list[dict[str, Any]], folder: Path) -> None:
    for row in rows:
        for run in row["runs"]:
            name = f"{row['variant']}_seed{run['seed']}".replace(" ", "_").replace("=", "")
            tensorboard_curves(folder / name, {"eval/return": run["curve"]})


def format_table(results: dict[str, Any]) -> str:
    """Markdown table (what the README quotes)."""
    lines = []
    for task, res in results["tasks"].items():
        lines.append(
            f"**{task}** ({results['size']}-sized, {results['machine']['cpus']} CPUs; mean ± std over seeds "
            f"{results.get('seeds', [0])}, {results.get('eval_episodes', '?')} evaluation episodes)\n"
        )
        lines.append(
            "| variant | return before | after | after IQM | after / before | worst eval | env steps | fine-tune wall "
            "| s per +100 |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            per = f"{r['s_per_100_return']:.0f}" if r["s_per_100_return"] else "no gain"
            lines.append(
                f"| {r['variant']} | {r['return_before']:.0f} ± {r['return_before_std']:.0f} | "
                f"{r['return_after']:.0f} ± {r['return_after_std']:.0f} | {r['iqm_after']:.0f} | {r['ratio']:.2f} | "
                f"{r['return_worst']:.0f} | {r['env_steps'] / 1000:.0f}k | {r['finetune_s'] / 60:.1f} min | {per} |"
            )
        if "reinflow_vs_dppo_wall_per_improvement" in res:
            ratios = ", ".join(f"{v} {x:.2f}x" for v, x in res["reinflow_vs_dppo_wall_per_improvement"].items())
            lines.append(f"\nWall time per unit of improvement, over DPPO's: {ratios}")
        lines.append("")
    return "\n".join(lines)
