"""``flowrl bench locomotion``: ReinFlow (rectified flow, shortcut, MeanFlow; K = 4 and
K = 1), GRPO with ReinFlow's sampler, DPPO, Gaussian PPO and the methods without log-prob
ratios (DiffusionNFT, AWM, AC-Flow) fine-tuned side by side on the locomotion tasks.

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
  4. per variant: fine-tuning from that network (PPO, GRPO, NFT, AWM or AC-Flow), timed.
``--data-only`` stops after steps 1-2, making every dataset the task lists (expert and medium).
Overrides reach every step: ``--set-expert`` the expert's experiment (steps 1-2), ``--set-data
DATASET.KEY=VALUE`` the task's recipes (step 2), ``--set`` the method files (steps 3-4), so a
tiny end-to-end run of a new task edits no file (README, "Adding a task"); what steps 1-2 make
with overrides is cached under names tagged with a hash of them.
Every variant is evaluated with its deterministic policy (ODE, DDIM eta = 0, or the mean)
before and after. Results: ``locomotion.json`` (table and curves), ``locomotion.png``
(eval return against env steps) and TensorBoard scalars in ``tensorboard/``.
"""

from __future__ import annotations

import argparse
import hashlib
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
from flowrl.config import ExperimentConfig, load_config
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
    # without log-prob ratios: the deterministic ODE with GRPO's groups, and a critic on the chain
    Variant("DiffusionNFT rectified flow K=4", "nft"),
    Variant("AWM rectified flow K=4", "awm"),
    Variant("AC-Flow rectified flow K=4", "ac_flow"),
)


@dataclass(frozen=True)
class DataSteps:
    """How the expert and dataset steps run: the ``cache`` folder, overrides of the expert's
    experiment (``--set-expert``: the expert and the partly trained acting policies) and of the
    dataset recipes (``--set-data``, already applied to the tasks; here for the cache names).

    With overrides, the cached runs and datasets get a tag (a hash of the overrides) in their
    names, so a tiny run never stands in for the task's real expert or data, nor replaces them.
    """

    cache: Path
    expert_overrides: tuple[str, ...] = ()
    data_overrides: tuple[str, ...] = ()

    @property
    def expert_tag(self) -> str:
        return _tag(self.expert_overrides)

    @property
    def data_tag(self) -> str:
        return _tag((*self.expert_overrides, *("data:" + o for o in self.data_overrides)))

    def expert_config(self, task: Task, iterations: int | None = None) -> ExperimentConfig:
        """The expert's experiment with ``--set-expert`` (and stopped after ``iterations``)."""
        stopped = [] if iterations is None else [f"algo.iterations={iterations}"]
        return load_config(task.expert_file, [*self.expert_overrides, *stopped])


def _tag(overrides: tuple[str, ...]) -> str:
    return "-" + hashlib.sha1("\0".join(overrides).encode()).hexdigest()[:8] if overrides else ""


def prepare_dataset(
    task: Task, cache: Path | DataSteps, progress: bool, dataset: str = BENCH_DATASET
) -> tuple[Path, dict[str, float]]:
    """The task's dataset ``dataset`` (cache/datasets/TASK-DATASET.npz), made by its recipe:
    training the acting policy when missing (resuming a stopped training), then collecting."""
    steps = cache if isinstance(cache, DataSteps) else DataSteps(Path(cache))
    recipe = task.spec.datasets[dataset]
    path = task.dataset_path(steps.cache, dataset, steps.data_tag)
    full = steps.expert_config(task).algo.iterations
    iterations = recipe.policy_iterations or full
    timings: dict[str, float] = {}
    if path.exists():
        stale = _recorded_otherwise(path, task, recipe, iterations)
        if not stale:
            return path, timings
        print(f"{path} was recorded with {stale}: re-recording it with the task's recipe ({task.file})", flush=True)
    partial = iterations != full
    run = steps.cache / "experts" / (f"{task.name}-it{iterations}" if partial else task.name)
    run = run.with_name(run.name + steps.expert_tag)
    t0 = time.perf_counter()
    if _train_acting_policy(task, steps, run, iterations, progress):
        timings["policy_s" if partial else "expert_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex.collect(run, path, recipe.episodes, recipe.action_noise, seed=0, progress=progress, actions=recipe.actions)
    timings["collect_s"] = time.perf_counter() - t0
    return path, timings


def _train_acting_policy(task: Task, steps: DataSteps, run: Path, iterations: int, progress: bool) -> bool:
    """Train the expert's experiment for ``iterations`` into ``run`` unless it holds that policy
    (resuming a stopped training); whether it trained."""
    if (run / "policy.pt").exists():
        trained = ex.load_run_config(run, []).algo.iterations
        if trained != iterations:  # e.g. the expert file's budget changed since
            raise FlowRLError(
                f"{run} holds a policy trained for {trained} iterations, the recipe of {task.file} wants {iterations}: "
                "move the folder away to train it again"
            )
        return False
    resume = (run / "checkpoints" / "last.pt").exists()
    cfg = ex.load_run_config(run, []) if resume else steps.expert_config(task, iterations)
    ex.preflight(cfg)
    run.mkdir(parents=True, exist_ok=True)
    ex.train(cfg, run, resume=resume, progress=progress)
    return True


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


@dataclass(frozen=True)
class BenchSettings:
    """What every fine-tuning run of one bench command shares."""

    out: Path
    size: str
    seeds: tuple[int, ...]
    eval_episodes: int
    overrides: tuple[str, ...]  # --set: the method files' pretraining and fine-tuning runs
    progress: bool

    def overrides_for(self, variant: Variant, dataset: Path, seed: int) -> list[str]:
        return [
            f"pretrain.demos.path={dataset}",
            f"eval.episodes={self.eval_episodes}",
            *self.overrides,
            *variant.overrides,
            f"seed={seed}",
        ]


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
    expert_overrides: list[str] | tuple[str, ...] = (),
    data_overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run the benchmark on ``tasks`` (names of task files in ``tasks_dir``, or ``["all"]``);
    ``variants``: labels or method names (default: all), each run once per seed (pretraining
    included) and evaluated over ``eval_episodes`` episodes. ``data_only``: make the experts
    and every dataset of the tasks, and stop.

    Overrides reach every step: ``overrides`` (``--set``) the method files' pretraining and
    fine-tuning, ``expert_overrides`` (``--set-expert``) the expert's experiment (the expert and
    the partly trained acting policies), ``data_overrides`` (``--set-data``, ``DATASET.KEY=VALUE``)
    the task files' dataset recipes. Every file is loaded with its overrides before any work."""
    steps = DataSteps(Path(cache), tuple(expert_overrides), tuple(data_overrides))
    chosen_tasks = [t.with_data_overrides(list(data_overrides)) for t in select_tasks(tasks, tasks_dir)]
    for task in chosen_tasks:
        steps.expert_config(task)  # --set-expert fits the expert's experiment
    if data_only:
        return {"datasets": {task.name: _make_datasets(task, steps, progress) for task in chosen_tasks}}
    chosen = _choose_variants(variants, chosen_tasks, size, seeds)
    settings = BenchSettings(Path(out_dir), size, tuple(seeds), eval_episodes, tuple(overrides or []), progress)
    for task in chosen_tasks:  # every method file loads with its overrides, before any work
        for variant in (v for v in chosen if v.method in task.spec.methods):
            load_config(task.method_file(variant.method, size), settings.overrides_for(variant, Path("dataset.npz"), 0))
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "machine": {"cpus": os.cpu_count()},
        "size": size,
        "seeds": list(seeds),
        "eval_episodes": eval_episodes,
        "overrides": list(overrides or []),
        "tasks": {},
    }
    if expert_overrides or data_overrides:  # only then: files written before these keys still merge
        results.update(expert_overrides=list(expert_overrides), data_overrides=list(data_overrides))
    for task in chosen_tasks:
        _run_task(task, [v for v in chosen if v.method in task.spec.methods], chosen, steps, settings, results)
    return results


def _make_datasets(task: Task, steps: DataSteps, progress: bool) -> dict[str, Any]:
    made = {}
    for name in task.spec.datasets:
        path, timings = prepare_dataset(task, steps, progress, name)
        made[name] = {"path": str(path), "data_prep_s": timings}
    return made


def _choose_variants(names: list[str] | None, tasks: list[Task], size: str, seeds: Any) -> list[Variant]:
    chosen = [v for v in VARIANTS if names is None or v.label in names or v.method in names]
    if not chosen:
        raise FlowRLError(f"no variant matches {names}; labels: {[v.label for v in VARIANTS]}")
    if not seeds:
        raise FlowRLError("flowrl bench locomotion: give at least one seed (--seeds 0,1,2)")
    for task in tasks:
        if size not in task.spec.sizes:
            raise TaskError(f"task {task.name} has no {size}-sized experiments (sizes: {task.spec.sizes}; {task.file})")
    if not any(v.method in t.spec.methods for t in tasks for v in chosen):
        raise FlowRLError(f"none of the tasks {[t.name for t in tasks]} has a method of the chosen variants")
    return chosen


def _run_task(
    task: Task,
    runnable: list[Variant],
    chosen: list[Variant],
    steps: DataSteps,
    settings: BenchSettings,
    results: dict[str, Any],
) -> None:
    """Every runnable variant of ``task`` once per seed (so a stopped bench has whole seeds),
    each method file's pretraining once per seed; the results written after every run."""
    skipped = sorted({v.method for v in chosen} - set(task.spec.methods))
    if skipped:
        print(f"{task.name}: no experiment file for {', '.join(skipped)} (methods in {task.file})", flush=True)
    if not runnable:
        return
    dataset, timings = prepare_dataset(task, steps, settings.progress)
    runs: dict[str, list[dict[str, Any]]] = {}
    pretrained: dict[tuple[str, int], tuple[Path, float]] = {}
    for seed in settings.seeds:
        for variant in runnable:
            file = task.method_file(variant.method, settings.size)
            extra = [*settings.overrides_for(variant, dataset, seed), f"runs_dir={settings.out / 'runs' / task.name}"]
            if (variant.method, seed) not in pretrained:  # behaviour cloning once per method file and seed
                pretrained[variant.method, seed] = _pretrain(load_config(file, extra), seed, settings.progress)
            checkpoint, pretrain_s = pretrained[variant.method, seed]
            run = _finetune(load_config(file, [*extra, f"policy.pretrained={checkpoint}"]), seed, settings.progress)
            runs.setdefault(variant.label, []).append({**run, "pretrain_s": pretrain_s})
            rows = [summarise(label, runs[label]) for label in (v.label for v in runnable) if label in runs]
            _write(results, settings.out, task.name, rows, timings)


def _pretrain(cfg: ExperimentConfig, seed: int, progress: bool) -> tuple[Path, float]:
    ex.preflight(cfg)  # e.g. a dataset of another env: before a run folder exists
    run_dir = ex.new_run_dir(cfg.model_copy(update={"name": f"{cfg.name}-s{seed}-pretrain"}))
    t0 = time.perf_counter()
    ex.pretrain_only(cfg, run_dir, progress)
    return run_dir / "pretrained.pt", time.perf_counter() - t0


def _finetune(cfg: ExperimentConfig, seed: int, progress: bool) -> dict[str, Any]:
    """One fine-tuning run from its pretrained checkpoint: its row entry (no pretrain_s)."""
    run_dir = ex.new_run_dir(cfg.model_copy(update={"name": f"{cfg.name}-s{seed}"}))
    t0 = time.perf_counter()
    result = ex.train(cfg, run_dir, progress=progress)
    wall = time.perf_counter() - t0
    records = read_metrics(run_dir)
    curve = [(r["env_steps"], r["eval/return"]) for r in records if "eval/return" in r]
    return {
        "seed": seed,
        "run": str(run_dir),
        "return_before": result["before"]["eval/return"],
        "return_after": result["after"]["eval/return"],
        "iqm_after": result["after"].get("eval/return_iqm", result["after"]["eval/return"]),
        "return_best": max(r for _, r in curve),
        "return_worst": min(r for _, r in curve),
        "env_steps": records[-1]["env_steps"],
        "finetune_s": wall,
        "curve": curve,
    }


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
    same = ("format", "size", "overrides", "seeds", "eval_episodes", "expert_overrides", "data_overrides")
    if all(previous.get(k) == results.get(k) for k in same):
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


def cli_handler(args: argparse.Namespace) -> int:
    """``flowrl bench locomotion`` (its arguments: flowrl.cli): runs the bench and prints its
    table, or with --data-only the datasets it made."""
    if args.tasks is None:
        raise FlowRLError("flowrl bench locomotion: give --tasks, a comma list of task names or all (see --help)")
    out = args.out or "benchmarks/results"
    results = run_locomotion_bench(
        out,
        args.tasks,
        args.variants,
        args.size,
        [*args.set, *args.overrides],
        progress=not args.no_progress,
        tasks_dir=args.tasks_dir,
        data_only=args.data_only,
        seeds=args.seeds or [0, 1, 2],
        eval_episodes=args.eval_episodes,
        expert_overrides=args.set_expert,
        data_overrides=args.set_data,
    )
    if args.data_only:
        for task, datasets in results["datasets"].items():
            print(f"{task}: " + ", ".join(f"{name} {d['path']}" for name, d in datasets.items()))
        return 0
    print(format_table(results))
    print(f"written: {Path(out) / 'locomotion.json'}, {Path(out) / 'locomotion.png'}")
    return 0
