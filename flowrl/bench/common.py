"""What the fine-tuning benches (``locomotion``, ``images``, ``maniskill``) share: a cached
pretrained model, results written atomically (a bench of another task or size may read them
meanwhile, and a stopped bench must not leave half a file), learning curves over seeds as a
chart band and as TensorBoard scalars."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowrl import experiment as ex
from flowrl.config import load_config
from flowrl.errors import FlowRLError

ROOT = Path(__file__).resolve().parents[2]


def shown(path: Path) -> str:
    """A path as the commands give it: relative to the checkout when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def select_methods(names: list[str] | None, methods: Sequence[Any], bench: str) -> list[Any]:
    """The ``methods`` (each with a ``key`` and a ``label``) named by key or label, all for
    None, in the table's order; an unknown name is an error naming the choices."""
    if names is None:
        return list(methods)
    known = {m.key for m in methods} | {m.label for m in methods}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        keys = ", ".join(m.key for m in methods)
        raise FlowRLError(f"flowrl bench {bench}: unknown method(s) {unknown or names}; choose from {keys}")
    return [m for m in methods if m.key in names or m.label in names]


def check_bench_args(bench: str, seeds: Sequence[int], size: str, sizes: Collection[str]) -> None:
    """A fine-tuning bench's seeds (at least one) and ``--size`` (one of ``sizes``), checked first."""
    if not seeds:
        raise FlowRLError(f"flowrl bench {bench}: give at least one seed (--seeds 0)")
    if size not in sizes:
        raise FlowRLError(f"flowrl bench {bench}: --size is one of {', '.join(sizes)}, got {size!r}")


def bench_overrides(overrides: list[str] | None, iterations: int | None) -> tuple[list[str], list[str]]:
    """The bench's ``overrides`` (``--set``: the pretraining and every run get them) and those of
    its fine-tuning runs: the same plus ``algo.iterations`` when ``--iterations`` is given."""
    overrides = list(overrides or [])
    return overrides, [*overrides, *([f"algo.iterations={iterations}"] if iterations is not None else [])]


def results_header(size: str, seeds: Sequence[int], iterations: int | None, overrides: list[str]) -> dict[str, Any]:
    """What a fine-tuning bench's results start with: the machine and the bench's settings."""
    return {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "size": size,
        "seeds": list(seeds),
        "iterations": iterations,
        "overrides": overrides,
    }


def prepare_pretrained(
    path: str | Path, pretrain_file: Path, overrides: list[str], progress: bool
) -> tuple[Path, float | None]:
    """The pretrained checkpoint at ``path``; when missing, pretrained now with
    ``pretrain_file`` (and ``overrides``) into its folder, resuming a stopped pretraining
    there. Returns the path and the pretraining seconds (None when it existed)."""
    path = Path(path)
    if path.is_file():
        return path, None
    if path.name != "pretrained.pt":
        raise FlowRLError(
            f"{path} does not exist: give an existing checkpoint, or a FOLDER/pretrained.pt to pretrain into FOLDER"
        )
    run_dir = path.parent
    resume = (run_dir / "checkpoints" / "pretrain.pt").exists()
    cfg = ex.load_run_config(run_dir, overrides) if resume else load_config(pretrain_file, overrides)
    ex.preflight(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"no {path}: pretraining it with {shown(pretrain_file)}{' (resuming)' if resume else ''}", flush=True)
    t0 = time.perf_counter()
    ex.pretrain_only(cfg, run_dir, progress, resume=resume)
    return path, time.perf_counter() - t0


def write_json(results: dict[str, Any], path: Path) -> None:
    """``results`` to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure to ``path`` (PNG) through a temporary file; closes the figure."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f"{path.stem}.{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    plt.close(fig)


def plot_seeds(ax: Any, curves: list[list[tuple[float, float]]], label: str) -> None:
    """One method's learning curve: the mean over seeds of ``curves`` (per seed, (x, value)
    pairs, x env steps or iterations) against the mean x, and the seeds' min-max band when
    there are several. A run still going contributes its evaluations so far."""
    n = min(len(c) for c in curves)
    steps = np.mean([[s for s, _ in c[:n]] for c in curves], axis=0)
    values = np.array([[v for _, v in c[:n]] for c in curves])
    (line,) = ax.plot(steps, values.mean(0), marker=".", label=f"{label} ({len(curves)} seeds)")
    if len(curves) > 1:
        ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)


def seed_curves_chart(path: Path, title: str, panels: list[dict[str, Any]]) -> None:
    """One row of panels, one per task, each with every method's curve over seeds
    (``plot_seeds``). A panel: ``title``, ``ylabel``, optional ``ylim`` and ``lines``, a list of
    (label, per-seed curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, curves in panel["lines"]:
            plot_seeds(ax, curves, label)
        ax.set_title(panel["title"])
        ax.set_xlabel("env steps")
        ax.set_ylabel(panel["ylabel"])
        if "ylim" in panel:
            ax.set_ylim(*panel["ylim"])
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def tensorboard_curves(folder: Path, curves: dict[str, list[tuple[float, float]]]) -> None:
    """One run's curves (tag -> (env steps, value) pairs) as TensorBoard scalars in ``folder``,
    rewritten whole (a bench rewrites them after every run: one event file each)."""
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)
    writer = SummaryWriter(str(folder))
    for tag, curve in curves.items():
        for step, value in curve:
            writer.add_scalar(tag, value, step)
    writer.close()


__all__ = [
    "ROOT",
    "bench_overrides",
    "check_bench_args",
    "plot_seeds",
    "prepare_pretrained",
    "results_header",
    "save_figure",
    "seed_curves_chart",
    "select_methods",
    "shown",
    "tensorboard_curves",
    "write_json",
]
