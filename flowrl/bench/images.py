"""``flowrl bench images``: Flow-GRPO, MixGRPO, MixGRPO-Flash and the log-prob-free methods
(DiffusionNFT, AWM, AC-Flow) fine-tuned side by side from one pretrained shapes-world model.

One command runs the whole comparison:
  1. the pretrained model: ``--pretrained`` (default ``cache/shapes/pretrain/pretrained.pt``);
     when missing, ``experiments/images/shapes_pretrain.yaml`` pretrains it into that folder
     (a stopped pretraining there resumes), so later benches reuse it,
  2. per seed, every method's experiment file (``experiments/images/shapes_*.yaml``) fine-tunes
     that model, with the same overrides for all, one after the other in this process, so the
     times compare.
``--size paper`` takes the files of ``experiments/images/paper/`` instead (64 px, a bigger
network, more prompts and iterations: a GPU machine's) and keeps their pretrained model in
``cache/shapes/paper-pretrain/``.

The split is the experiment files' ``env.benchmark`` (override it for all with
``env.benchmark=zero_shot``): geneval, the GenEval-fair split, or zero_shot, the earlier one;
each keeps its own pretrained model (``default_pretrained``), and a model pretrained on the
other split is refused. Per method it reports the held-out accuracy and the training-prompt
accuracy (the ODE at ``policy.eval_denoising_steps``, the same sampler and noise for both, the
same prompts for every method of a seed) before and after, per caption category; the JPEG size
and the diversity within a prompt before and after (a reward-hacked model draws blank or
identical images); the time per iteration (sampling, scoring, update; evaluation excluded) and
its ratio to Flow-GRPO's; the NFE per training image; the peak memory of the learner process
during the run (Linux's peak RSS, reset at the run's start, and its growth over the RSS then:
what the run itself added to a process that already holds the earlier runs' imports; on CUDA
also ``torch.cuda.max_memory_allocated``); and the share of the reward scoring hidden behind
sampling (``time/reward_hidden_fraction``; 0 with in-process scoring, ``ray.enabled: false``).

Results: ``images.json`` (table, learning curves, the commands), ``images_grid.png`` (the
first evaluation prompts, one row each: the pretrained model's images, then each method's
after fine-tuning, from the same noise), ``images.png`` (held-out accuracy against iteration,
and that grid).
"""

from __future__ import annotations

import argparse
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowrl import experiment as ex
from flowrl.bench import common
from flowrl.bench.common import ROOT, plot_seeds, prepare_pretrained, save_figure, shown, write_json
from flowrl.config import ExperimentConfig, load_config
from flowrl.errors import FlowRLError
from flowrl.runlog import read_metrics
from flowrl.runtime import resolve_device

IMAGES_DIR = ROOT / "experiments" / "images"
# experiment files of each size (each folder has shapes_pretrain.yaml and the methods' files),
# and where the bench keeps the pretrained model of that size by default
SIZES = {"cpu": IMAGES_DIR, "paper": IMAGES_DIR / "paper"}
DEFAULT_PRETRAINED = {
    "cpu": Path("cache") / "shapes" / "pretrain" / "pretrained.pt",
    "paper": Path("cache") / "shapes" / "paper-pretrain" / "pretrained.pt",
}
# plus eval/accuracy_<category> and eval/train_accuracy_<category>
REPORTED = ("eval/accuracy", "eval/train_accuracy", "eval/return", "eval/jpeg_kb", "eval/diversity")
SPLIT_LABELS = {
    "geneval": "GenEval-fair split: held-out prompt strings RL never trains on, every combination seen in pretraining",
    "zero_shot": "zero-shot split: held-out colour-shape pairs, counts and arrangements never seen in pretraining",
}


def default_pretrained(size: str, benchmark: str) -> Path:
    """Where the bench keeps the pretrained model of ``size`` and ``benchmark`` split (the
    two splits pretrain on different captions, so each has its own)."""
    path = DEFAULT_PRETRAINED[size]
    return path if benchmark == "geneval" else path.parent.with_name(f"{path.parent.name}-{benchmark}") / path.name


def check_pretrained_split(checkpoint: Path, benchmark: str) -> None:
    """A pretrained model whose pretraining run folder says another split is refused: its
    pretraining captions do not fit this split's held-out set."""
    config = checkpoint.parent / "config.yaml"
    if not config.is_file():
        return  # a checkpoint without its run folder: nothing to compare
    pretrained_on = load_config(config).env
    split = getattr(pretrained_on, "benchmark", None)
    if split is not None and split != benchmark:
        raise FlowRLError(
            f"{checkpoint} was pretrained on the {split} split ({config}), this bench runs env.benchmark={benchmark}; "
            f"give --pretrained a model pretrained on {benchmark}, or leave --pretrained out"
        )


@dataclass(frozen=True)
class Method:
    label: str
    key: str  # --methods accepts it or the label
    file: str  # experiment file in the size's folder


METHODS = (
    Method("Flow-GRPO", "flow_grpo", "shapes_flow_grpo.yaml"),
    Method("MixGRPO", "mixgrpo", "shapes_mixgrpo.yaml"),
    Method("Flash", "flash", "shapes_flash.yaml"),
    Method("DiffusionNFT", "nft", "shapes_nft.yaml"),
    Method("AWM", "awm", "shapes_awm.yaml"),
    Method("AC-Flow", "ac_flow", "shapes_ac_flow.yaml"),
)
BASELINE = "Flow-GRPO"  # the times are reported as ratios to it
# what runs without --methods: the README's table (the methods without log-prob ratios run when named)
DEFAULT_METHODS = ("flow_grpo", "mixgrpo", "flash")


def select_methods(names: list[str] | None) -> list[Method]:
    """The methods named by key or label (``DEFAULT_METHODS`` for None), in the table's order."""
    return common.select_methods(list(DEFAULT_METHODS) if names is None else names, METHODS, "images")


def run_images_bench(
    out_dir: str | Path,
    methods: list[str] | None = None,
    iterations: int | None = None,
    seeds: list[int] | tuple[int, ...] = (0,),
    overrides: list[str] | None = None,
    pretrained: str | Path | None = None,
    size: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune every chosen method once per seed from ``pretrained``; ``overrides``
    (``key.sub=value``) go to every run (and to the pretraining), ``iterations`` replaces
    ``algo.iterations``; ``pretrained`` None: the size's DEFAULT_PRETRAINED. Writes the
    results to ``out_dir`` after every run (a stopped bench keeps what it measured) and
    returns them."""
    chosen = select_methods(methods)
    common.check_bench_args("images", seeds, size, SIZES)
    folder = SIZES[size]
    pretrain_file = folder / "shapes_pretrain.yaml"
    overrides, extra = common.bench_overrides(overrides, iterations)
    benchmarks = {load_config(folder / m.file, extra).env.benchmark for m in chosen}  # every file checked first
    if len(benchmarks) != 1:
        raise FlowRLError(f"the methods' files name different splits ({sorted(benchmarks)}): set env.benchmark=...")
    benchmark = benchmarks.pop()
    pretrained = Path(pretrained or default_pretrained(size, benchmark))
    if pretrained.is_file():
        check_pretrained_split(pretrained, benchmark)
    out = Path(out_dir)
    checkpoint, pretrain_s = prepare_pretrained(pretrained, pretrain_file, overrides, progress)
    results: dict[str, Any] = {
        **common.results_header(size, seeds, iterations, overrides),
        "benchmark": benchmark,
        "pretrained": str(checkpoint),
        "pretrain_s": pretrain_s,
        "commands": {"bench": _bench_command(out, chosen, iterations, seeds, overrides, pretrained, size)},
        "rows": [],
    }
    if pretrain_s is not None:
        pretrain = ["flowrl", "pretrain", shown(pretrain_file), *overrides, "--run-dir", str(checkpoint.parent)]
        results["commands"]["pretrain"] = shlex.join(pretrain)
    _fine_tune_all(results, chosen, folder, extra, checkpoint, out, progress)
    results["grid"] = _grid(results["rows"], checkpoint, out)
    _write(results, out)
    return results


def _fine_tune_all(
    results: dict[str, Any],
    chosen: list[Method],
    folder: Path,
    extra: list[str],
    checkpoint: Path,
    out: Path,
    progress: bool,
) -> None:
    """Step 2: every chosen method fine-tunes ``checkpoint`` once per seed (``extra``: the runs'
    overrides); the rows of ``results`` are updated and written after every run."""
    run_overrides = [*extra, f"policy.pretrained={checkpoint}", f"runs_dir={out / 'runs'}"]
    for method in chosen:
        ex.preflight(load_config(folder / method.file, run_overrides))  # the checkpoint fits every method's network
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in results["seeds"]:  # every method once per seed, so a stopped bench has whole seeds
        for method in chosen:
            file = folder / method.file
            cfg = load_config(file, [*run_overrides, f"seed={seed}"])
            command = shlex.join(
                ["flowrl", "train", shown(file), *extra, f"seed={seed}", f"policy.pretrained={checkpoint}"]
            )
            runs.setdefault(method.label, []).append(_fine_tune(cfg, seed, command, progress))
            results["rows"] = [summarise(m.label, runs[m.label]) for m in chosen if m.label in runs]
            _ratios(results["rows"])
            _write(results, out)


def _fine_tune(cfg: ExperimentConfig, seed: int, command: str, progress: bool) -> dict[str, Any]:
    """One timed fine-tuning run and what its metrics.jsonl says (``command``: the same run
    as a ``flowrl train`` command, for the record)."""
    run_dir = ex.new_run_dir(cfg.model_copy(update={"name": f"{cfg.name}-s{seed}"}))
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_start = _peak_rss_mb() if _reset_peak_rss() else None  # the peak is now the current RSS
    t0 = time.perf_counter()
    result = ex.train(cfg, run_dir, progress=progress)
    wall = time.perf_counter() - t0
    peak_rss = _peak_rss_mb() if rss_start is not None else None
    records = read_metrics(run_dir)
    trained = [r for r in records if "time/update_s" in r]
    iteration_s = [r["time/collect_s"] + r["time/update_s"] for r in trained]
    return {
        "seed": seed,
        "run": str(run_dir),
        "command": command,
        "before": _reported(result["before"]),
        "after": _reported(result["after"]),
        "curve": [(r["iteration"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r],
        "iteration_s": iteration_s,
        "s_per_iteration": float(np.mean(iteration_s)),
        "nfe_per_image": float(np.mean([r["sampler/nfe_per_sample"] for r in trained])),
        "reward_hidden_fraction": float(np.mean([r["time/reward_hidden_fraction"] for r in trained])),
        "peak_rss_mb": peak_rss,
        "rss_growth_mb": peak_rss - rss_start if peak_rss is not None and rss_start is not None else None,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "finetune_s": wall,
    }


def _reported(metrics: dict[str, float]) -> dict[str, float]:
    return {
        k: v for k, v in metrics.items() if k in REPORTED or k.startswith(("eval/accuracy_", "eval/train_accuracy_"))
    }


def summarise(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A method's row: each before / after metric and time averaged over its seeds, the peak
    memory the largest of them."""

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in runs]))

    def peak(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return max(values) if values else None

    def averaged(when: str) -> dict[str, float]:
        keys = sorted({k for r in runs for k in r[when]})  # a category no seed's prompts hold is absent
        return {k: float(np.mean([r[when][k] for r in runs if k in r[when]])) for k in keys}

    return {
        "method": label,
        "seeds": [r["seed"] for r in runs],
        "before": averaged("before"),
        "after": averaged("after"),
        "s_per_iteration": mean("s_per_iteration"),
        "nfe_per_image": mean("nfe_per_image"),
        "reward_hidden_fraction": mean("reward_hidden_fraction"),
        "peak_rss_mb": peak("peak_rss_mb"),
        "rss_growth_mb": peak("rss_growth_mb"),
        "cuda_peak_mb": peak("cuda_peak_mb"),
        "finetune_s": mean("finetune_s"),
        "runs": runs,
    }


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's time per iteration over Flow-GRPO's (None when Flow-GRPO did not run)."""
    base = next((r["s_per_iteration"] for r in rows if r["method"] == BASELINE), None)
    for row in rows:
        row["time_vs_flow_grpo"] = row["s_per_iteration"] / base if base else None


def _reset_peak_rss() -> bool:
    """Resets this process's peak resident memory (Linux: VmHWM, by writing 5 to
    /proc/self/clear_refs), so that a run's peak is its own; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise FlowRLError("/proc/self/status has no VmHWM line: cannot read the peak memory")


def _grid(rows: list[dict[str, Any]], checkpoint: Path, out: Path) -> dict[str, Any]:
    """``images_grid.png``: the first evaluation prompts of the first seed, one row each: the
    pretrained model's images, a blank, then each method's after fine-tuning, all from the
    evaluation's fixed noise (ODE at policy.eval_denoising_steps)."""
    from flowrl.models.build import build_policy, load_image_network
    from flowrl.rollout.image_eval import GRID_PROMPTS, ImageEvaluator, image_grid, save_png

    seed = rows[0]["runs"][0]["seed"]
    cfg = load_config(Path(rows[0]["runs"][0]["run"]) / "config.yaml")
    evaluator = ImageEvaluator(cfg, None)
    g, prompts = evaluator.group_size, evaluator.prompts[:GRID_PROMPTS]
    checkpoints = {"pretrained": checkpoint} | {r["method"]: Path(r["runs"][0]["run"]) / "policy.pt" for r in rows}
    blocks = []
    for path in checkpoints.values():
        images = evaluator.images(build_policy(cfg, load_image_network(path, cfg)))
        blocks.append(images[: len(prompts) * g].view(len(prompts), g, *images.shape[1:]))
    blank = torch.ones_like(blocks[0][:, :1])  # a white tile between the blocks
    tiles = torch.cat([torch.cat([b, blank], dim=1) for b in blocks], dim=1)[:, :-1]  # [P, columns, 3, H, W]
    save_png(image_grid(tiles.flatten(0, 1), tiles.shape[1]), out / "images_grid.png")
    return {"file": "images_grid.png", "seed": seed, "prompts": prompts, "columns": list(checkpoints), "per_column": g}


def _write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "images.json")
    _chart(results, out / "images.png")


def _chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = results.get("grid")
    fig, axes = plt.subplots(1, 2 if grid else 1, figsize=(13 if grid else 6.5, 4.8), squeeze=False)
    ax = axes[0][0]
    for row in results["rows"]:
        plot_seeds(ax, [r["curve"] for r in row["runs"]], row["method"])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("GRPO iteration")
    ax.set_ylabel("held-out accuracy (ODE): mean, min-max over seeds")
    ax.legend(fontsize=8)
    if grid:
        from PIL import Image

        ax = axes[0][1]
        ax.imshow(np.asarray(Image.open(path.parent / grid["file"])))
        ax.set_xticks(_column_centres(grid, ax), [c.replace("pretrained", "before") for c in grid["columns"]])
        ax.set_yticks(_row_centres(grid, ax), grid["prompts"], fontsize=7)
        ax.set_title(f"before / after, held-out prompts (seed {grid['seed']})")
    fig.suptitle(f"flowrl bench images ({results['size']}-sized, {results['machine']['cpus']} CPUs)")
    fig.tight_layout()
    save_figure(fig, path)


def _column_centres(grid: dict[str, Any], ax) -> list[float]:
    width = ax.get_images()[0].get_array().shape[1]
    columns = len(grid["columns"]) * (grid["per_column"] + 1) - 1  # tiles, blanks included
    tile = width / columns
    return [(k * (grid["per_column"] + 1) + grid["per_column"] / 2) * tile for k in range(len(grid["columns"]))]


def _row_centres(grid: dict[str, Any], ax) -> list[float]:
    height = ax.get_images()[0].get_array().shape[0]
    return [(i + 0.5) * height / len(grid["prompts"]) for i in range(len(grid["prompts"]))]


def _bench_command(out, methods, iterations, seeds, overrides, pretrained, size) -> str:
    args = ["flowrl", "bench", "images", "--methods", ",".join(m.key for m in methods), "--out", str(out)]
    args += ["--seeds", ",".join(map(str, seeds)), "--pretrained", str(pretrained)]
    args += ["--iterations", str(iterations)] if iterations is not None else []
    args += ["--size", size] if size != "cpu" else []
    return shlex.join([*args, *overrides])


def format_table(results: dict[str, Any]) -> str:
    """Markdown table (what the README quotes): before -> after per metric and category."""
    rows = results["rows"]
    from envs.shapes import CATEGORIES

    found = {k.removeprefix("eval/accuracy_") for r in rows for k in r["after"] if k.startswith("eval/accuracy_")}
    categories = [c for c in CATEGORIES if c in found]

    def change(row: dict[str, Any], key: str, fmt: str = ".2f") -> str:
        before, after = row["before"].get(key), row["after"].get(key)
        return "" if before is None or after is None else f"{before:{fmt}} → {after:{fmt}}"

    def memory(row: dict[str, Any]) -> str:
        parts = (
            [f"{row['peak_rss_mb']:.0f} MB RSS (+{row['rss_growth_mb']:.0f})"] if row["peak_rss_mb"] is not None else []
        )
        parts += [f"{row['cuda_peak_mb']:.0f} MB CUDA"] if row["cuda_peak_mb"] is not None else []
        return ", ".join(parts) or "?"

    split = results.get("benchmark", "zero_shot")
    lines = [
        f"**flowrl bench images** ({results['size']}-sized, {results['machine']['cpus']} CPUs; mean over seeds "
        f"{results['seeds']}; accuracy with the ODE; {SPLIT_LABELS[split]})\n",
        "| method | held-out accuracy | training-prompt accuracy | "
        + " | ".join(categories)
        + " | JPEG kB | diversity | s / iteration | vs Flow-GRPO | NFE / image | peak memory | reward hidden |",
        "|---" * (10 + len(categories)) + "|",
    ]
    for r in rows:
        ratio = f"{r['time_vs_flow_grpo']:.2f}x" if r["time_vs_flow_grpo"] is not None else ""
        cells = [
            r["method"],
            change(r, "eval/accuracy"),
            change(r, "eval/train_accuracy"),
            *(change(r, f"eval/accuracy_{c}") for c in categories),
            change(r, "eval/jpeg_kb"),
            change(r, "eval/diversity", ".3f"),
            f"{r['s_per_iteration']:.2f}",
            ratio,
            f"{r['nfe_per_image']:.1f}",
            memory(r),
            f"{r['reward_hidden_fraction']:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = [
    "METHODS",
    "check_pretrained_split",
    "default_pretrained",
    "format_table",
    "prepare_pretrained",
    "run_images_bench",
    "select_methods",
    "summarise",
]


def cli_handler(args: argparse.Namespace) -> int:
    """``flowrl bench images`` (its arguments: flowrl.cli): runs the bench, prints the table."""
    out = Path(args.out or "benchmarks/results/images")
    results = run_images_bench(
        out,
        methods=args.methods,
        iterations=args.iterations,
        seeds=args.seeds or [0],
        overrides=[*args.set, *args.overrides],
        pretrained=args.pretrained,
        size=args.size,
        progress=not args.no_progress,
    )
    print(format_table(results))
    print(f"written: {out / 'images.json'}, {out / 'images.png'}, {out / results['grid']['file']}")
    return 0
