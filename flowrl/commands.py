"""The handlers of ``flowrl pretrain|train|eval|collect|demos``: each turns the parsed command
line into calls of flowrl.experiment (demos: envs.maniskill_demos) and prints the result. Their
arguments, and the table that names these handlers, are flowrl.cli's ``COMMANDS``; every
handler returns the exit code (errors are raised: flowrl.cli maps them to exit codes)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowrl import experiment as ex
from flowrl.config import ExperimentConfig, load_config
from flowrl.config.loading import is_override
from flowrl.errors import FlowRLError
from flowrl.rollout.video import parse_episodes
from flowrl.runlog import run_folder_lock


def pretrain(args: argparse.Namespace) -> int:
    """``flowrl pretrain``: behaviour cloning in a new run folder, or continued with --resume."""
    return _in_run_folder(args, ex.pretrain_only)


def train(args: argparse.Namespace) -> int:
    """``flowrl train``: pretraining if needed and fine-tuning in a new run folder, or continued with --resume."""
    return _in_run_folder(args, ex.train)


def _in_run_folder(args: argparse.Namespace, work: Callable[..., Any]) -> int:
    """Load and check the config, make the run folder (or take --resume's), then ``work`` in it
    while holding the folder's lock: another process writing it is one line, before any output."""
    overrides = list(args.overrides)
    if getattr(args, "ray_address", None):
        overrides.append(f"ray.address={args.ray_address}")
    if args.resume:
        run_dir, cfg = _resumed_run(args, overrides)
    else:
        if args.experiment is None:
            raise FlowRLError(f"flowrl {args.command}: give an experiment file, e.g. experiments/quickstart.yaml")
        cfg = load_config(args.experiment, overrides)
        ex.preflight(cfg)
        run_dir = ex.new_run_dir(cfg, args.run_dir)
    with run_folder_lock(run_dir):
        print(f"run folder: {run_dir}", flush=True)
        work(cfg, run_dir, progress=not args.no_progress, resume=bool(args.resume))
    return 0


def _resumed_run(args: argparse.Namespace, overrides: list[str]) -> tuple[Path, ExperimentConfig]:
    """--resume RUN_DIR: the run folder and its config.yaml with the overrides (the first one may
    sit where the experiment file goes)."""
    if args.experiment is not None:
        if not is_override(args.experiment):
            raise FlowRLError("with --resume RUN_DIR, give no experiment file: the run's config.yaml is used")
        overrides.insert(0, args.experiment)
    if args.run_dir:
        raise FlowRLError("--resume and --run-dir exclude each other: --resume already names the run folder")
    run_dir = Path(args.resume)
    return run_dir, ex.load_run_config(run_dir, overrides)


def evaluate(args: argparse.Namespace) -> int:
    """``flowrl eval``: the deterministic evaluation of a checkpoint, printed as JSON; with
    --video some of its episodes filmed too."""
    episodes = None if args.video is None else parse_episodes(args.video)
    if args.video_dir and episodes is None:
        raise FlowRLError("flowrl eval: --video-dir is where --video puts its videos; give --video too")
    if args.sampled and episodes is not None:
        raise FlowRLError("flowrl eval: --video films the deterministic evaluation; drop --sampled or --video")
    run = Path(args.experiment)
    cfg, checkpoint = _eval_target(args.experiment, args.checkpoint, list(args.overrides))
    if episodes is None:
        metrics = ex.evaluate_checkpoint(cfg, checkpoint, sampled=args.sampled)
        print(json.dumps({"checkpoint": str(checkpoint), **metrics}, indent=2))
        return 0
    if args.video_dir:
        out = Path(args.video_dir)
    else:
        out = (run if run.is_dir() else Path(checkpoint).parent) / "videos" / Path(checkpoint).stem
    board = run / "tensorboard" / "videos" if run.is_dir() else None
    recording = ex.record_checkpoint(cfg, checkpoint, episodes, out, board)
    videos = [str(path) for path in recording.videos]
    print(json.dumps({"checkpoint": str(checkpoint), **recording.metrics, "videos": videos}, indent=2))
    return 0


def _eval_target(experiment: str, checkpoint: str | None, overrides: list[str]) -> tuple[ExperimentConfig, str]:
    """The config and checkpoint ``flowrl eval`` evaluates: a run folder's (policy.pt, else
    pretrained.pt), or an experiment file's (--checkpoint, else policy.pretrained)."""
    run = Path(experiment)
    if run.is_dir():
        cfg = ex.load_run_config(run, overrides)
        found = [p for p in (run / "policy.pt", run / "pretrained.pt") if p.is_file()]
        checkpoint = checkpoint or (str(found[0]) if found else None)
        if checkpoint is None:
            raise FlowRLError(f"flowrl eval: {run} holds no policy.pt or pretrained.pt yet; give --checkpoint PATH")
        return cfg, checkpoint
    cfg = load_config(experiment, overrides)
    checkpoint = checkpoint or cfg.policy.pretrained
    if checkpoint is None:
        raise FlowRLError("flowrl eval: give a run folder, or --checkpoint PATH (or set policy.pretrained)")
    return cfg, checkpoint


def collect(args: argparse.Namespace) -> int:
    """``flowrl collect``: a demonstration dataset from a trained run's policy."""
    ex.collect(
        args.run,
        args.out,
        args.episodes,
        args.action_noise,
        args.seed,
        args.checkpoint,
        not args.no_progress,
        args.actions,
    )
    return 0


def demos(args: argparse.Namespace) -> int:
    """``flowrl demos``: ManiSkill motion-planner demonstrations of a task, and a line saying what was written."""
    from envs.maniskill_demos import motion_planning_demos  # mani_skill is imported only when used

    done = motion_planning_demos(
        args.env, args.episodes, args.out, args.control_mode, args.seed, not args.no_progress, args.hold_steps
    )
    print(
        f"wrote {done['path']}: {done['episodes']} episodes of {args.env} ({args.control_mode}), {done['steps']} "
        f"steps, {done['length_mean']:.1f} per episode, seeds {done['seeds'][0]}-{done['seeds'][-1]}"
    )
    return 0
