"""Command line: ``flowrl pretrain|train|eval EXPERIMENT.yaml [key.sub=value ...]``, ``flowrl collect RUN``,
``flowrl demos ENV``, ``flowrl bench NAME``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from flowrl.errors import FlowRLError, Interrupted


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows an option's default in its help when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowrl", description="RL fine-tuning of flow-matching policies.")
    sub = p.add_subparsers(dest="command", required=True)
    formatter = _DefaultsFormatter

    def common(sp: argparse.ArgumentParser, experiment_required: bool = True) -> None:
        sp.add_argument(
            "experiment",
            nargs="?" if not experiment_required else None,
            help="experiment YAML file (experiments/*.yaml)",
        )
        sp.add_argument(
            "overrides", nargs="*", help="config overrides: key.sub=value (algo.iterations=10), ~key.sub (removes it)"
        )
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    sp = sub.add_parser("pretrain", help="flow-matching behaviour cloning only", formatter_class=formatter)
    common(sp, experiment_required=False)
    sp.add_argument("--run-dir", help="run folder (default: runs_dir/NAME-TIMESTAMP)")
    sp.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped pretraining from its checkpoint")

    sp = sub.add_parser(
        "train",
        help="pretrain (unless policy.pretrained is set), then PPO or GRPO fine-tuning (algo.type)",
        formatter_class=formatter,
    )
    common(sp, experiment_required=False)
    sp.add_argument("--run-dir", help="run folder (default: runs_dir/NAME-TIMESTAMP)")
    sp.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    sp.add_argument("--ray-address", metavar="HOST:PORT", help="join this Ray cluster ('auto' = the local one)")

    from flowrl.bench.tasks import TASKS_DIR_VAR, task_names, tasks_dir

    sp = sub.add_parser("bench", help="benchmarks; results to a JSON file and a PNG chart", formatter_class=formatter)
    sp.add_argument(
        "bench",
        choices=["rollout", "locomotion", "images", "maniskill"],
        help="rollout: env steps/s of raw envs vs collectors; locomotion: ReinFlow / GRPO / DPPO / Gaussian PPO "
        "fine-tuning side by side on the locomotion tasks (one file each in the tasks folder); images: Flow-GRPO, "
        "MixGRPO and MixGRPO-Flash fine-tuning one pretrained shapes-world model side by side (held-out accuracy "
        "before / after per category, JPEG size, diversity, time per iteration, NFE, memory); maniskill: Flow-Noise "
        "and Flow-SDE, each under PPO and GRPO, fine-tuning one pretrained policy per ManiSkill task side by side "
        "(held-out success before / after, env steps, wall time, training-step time, collection vs raw stepping)",
    )
    sp.add_argument(
        "overrides",
        nargs="*",
        help="locomotion, images, maniskill: config overrides key.sub=value for every run (like --set), e.g. "
        "algo.actor_lr=3e-4",
    )
    names = ", ".join(task_names()) or "none found"
    sp.add_argument(
        "--tasks",
        help="comma list; rollout: toy, mujoco (HalfCheetah-v5) or env ids (default toy,mujoco); "
        f"locomotion (required): task names or all; tasks in {tasks_dir()}: {names}; maniskill: pickcube, pushcube "
        "(default: every task with files in experiments/maniskill)",
    )
    sp.add_argument(
        "--tasks-dir",
        metavar="DIR",
        help=f"locomotion: folder of task files (default: ${TASKS_DIR_VAR}, else experiments/locomotion/tasks)",
    )
    sp.add_argument(
        "--data-only",
        action="store_true",
        help="locomotion: train the experts and record every dataset of the tasks (cache/), then stop",
    )
    sp.add_argument("--variants", help="locomotion: comma list of variant labels or method names (default all)")
    sp.add_argument(
        "--seeds",
        type=_seed_list,
        help="locomotion, images, maniskill: comma list of seeds, each variant or method run once per seed "
        "(default: locomotion 0,1,2; images, maniskill 0)",
    )
    sp.add_argument("--eval-episodes", type=int, default=20, help="locomotion: evaluation episodes per evaluation")
    sp.add_argument(
        "--size",
        choices=["cpu", "paper"],
        default="cpu",
        help="locomotion, images, maniskill: experiment files (paper: the paper/ folders, sized for a GPU machine)",
    )
    sp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="locomotion: override of the method files' runs (pretraining, fine-tuning); images, maniskill: override "
        "for every run",
    )
    sp.add_argument(
        "--set-expert",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="locomotion: override of the expert's experiment (the expert and the partly trained policies that record "
        "the datasets), e.g. algo.iterations=2; cached apart from the task's own",
    )
    sp.add_argument(
        "--set-data",
        action="append",
        default=[],
        metavar="DATASET.KEY=VALUE",
        help="locomotion: override of a dataset recipe of the task files, e.g. medium.episodes=2 or "
        "medium.policy_iterations=1; cached apart from the task's own",
    )
    sp.add_argument(
        "--methods",
        help="images: comma list of flow_grpo, mixgrpo, flash (default all; times relative to flow_grpo); maniskill: "
        "flow_noise_ppo, flow_sde_ppo, flow_noise_grpo, flow_sde_grpo (default all; training-step times relative to "
        "flow_noise_ppo)",
    )
    sp.add_argument("--iterations", type=int, help="images, maniskill: iterations of every run (default: each file's)")
    sp.add_argument(
        "--pretrained",
        metavar="PATH",
        help="images: the pretrained model to fine-tune (default: cache/shapes/pretrain/pretrained.pt, paper size "
        "cache/shapes/paper-pretrain/pretrained.pt); when missing, shapes_pretrain.yaml pretrains it into its folder",
    )
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.add_argument("--num-envs", type=int, default=16, help="rollout: envs in total (equal for every variant)")
    sp.add_argument("--steps", type=int, default=50, help="rollout: policy steps per timed collection")
    sp.add_argument("--max-workers", type=int, help="rollout: largest Ray worker count (default: the CPU count)")
    sp.add_argument(
        "--out",
        help="folder for the results (JSON, PNG; default benchmarks/results, images: benchmarks/results/images, "
        "maniskill: benchmarks/results/maniskill)",
    )

    sp = sub.add_parser(
        "collect", help="record a demonstration dataset with a trained run's policy", formatter_class=formatter
    )
    sp.add_argument("run", help="run folder of a finished `flowrl train` (its config.yaml and policy.pt)")
    sp.add_argument("--out", required=True, help="dataset file to write (.npz), e.g. cache/datasets/hopper-medium.npz")
    sp.add_argument("--episodes", type=int, default=100, help="episodes to record")
    sp.add_argument(
        "--actions",
        choices=["deterministic", "sample"],
        default="deterministic",
        help="deterministic: the policy's evaluation actions (mean, ODE, DDIM eta = 0); sample: draws from its own "
        "stochastic policy (a D4RL-like dataset: README, Locomotion)",
    )
    sp.add_argument("--action-noise", type=float, default=0.0, help="std of extra Gaussian noise on every action")
    sp.add_argument("--seed", type=int, default=0, help="seed of the env resets and the noise")
    sp.add_argument("--checkpoint", help="policy checkpoint (default: RUN/policy.pt)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    sp = sub.add_parser(
        "demos",
        help="record demonstrations of a ManiSkill task with ManiSkill's motion planner (no downloads)",
        formatter_class=formatter,
    )
    sp.add_argument("env", help="flowrl's ManiSkill env id, e.g. flowrl/PickCube-v1")
    sp.add_argument("--out", required=True, help="dataset file to write (.npz), e.g. cache/datasets/pickcube-20.npz")
    sp.add_argument("--episodes", type=int, default=20, help="successful planned episodes to record")
    sp.add_argument("--control-mode", default="pd_ee_delta_pos", help="controller the actions are converted to")
    sp.add_argument("--seed", type=int, default=0, help="first reset seed (the planner goes on from there)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    sp = sub.add_parser(
        "eval",
        help="evaluate a run (RUN_DIR: its config.yaml and policy.pt) or an experiment's checkpoint with the "
        "deterministic policy",
        formatter_class=formatter,
    )
    sp.add_argument("experiment", help="a run folder, or an experiment YAML file (then give --checkpoint)")
    sp.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. eval.episodes=100")
    sp.add_argument(
        "--checkpoint",
        help="policy checkpoint (default: RUN_DIR/policy.pt, else RUN_DIR/pretrained.pt; for a YAML file, "
        "policy.pretrained)",
    )
    sp.add_argument(
        "--video",
        metavar="EPISODES",
        help="also film evaluation episodes: N = the first N, or indices 0,3,5 (one: 5,); per episode i an MP4 "
        "(every env step), episode_i_last.png and episode_i_strip.png (first | last frame), their paths in the "
        "output; with a run folder the strips also go to TensorBoard (RUN_DIR/tensorboard/videos)",
    )
    sp.add_argument(
        "--video-dir",
        help="folder of the videos (default: RUN_DIR/videos/CHECKPOINT_NAME, e.g. RUN_DIR/videos/policy; for a "
        "YAML file, videos/CHECKPOINT_NAME next to the checkpoint)",
    )
    return p


def _run(args: argparse.Namespace) -> int:
    # Heavy imports after argument parsing, so `flowrl --help` is instant.
    from flowrl import experiment as ex
    from flowrl.config import load_config
    from flowrl.config.loading import is_override
    from flowrl.runlog import run_folder_lock

    if args.command == "bench" and args.bench != "locomotion" and (args.set_expert or args.set_data):
        raise FlowRLError(f"flowrl bench {args.bench}: --set-expert and --set-data are for bench locomotion; use --set")
    if args.command == "bench" and args.bench == "locomotion":
        from flowrl.bench import locomotion

        if not args.tasks:
            raise FlowRLError("flowrl bench locomotion: give --tasks, a comma list of task names or all (see --help)")
        out = args.out or "benchmarks/results"
        results = locomotion.run_locomotion_bench(
            out,
            _split(args.tasks),
            _split(args.variants) if args.variants else None,
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
        print(locomotion.format_table(results))
        print(f"written: {Path(out) / 'locomotion.json'}, {Path(out) / 'locomotion.png'}")
        return 0
    if args.command == "bench" and args.bench == "images":
        from flowrl.bench import images

        out = Path(args.out or "benchmarks/results/images")
        results = images.run_images_bench(
            out,
            _split(args.methods) if args.methods else None,
            args.iterations,
            args.seeds or [0],
            [*args.set, *args.overrides],
            args.pretrained,
            args.size,
            progress=not args.no_progress,
        )
        print(images.format_table(results))
        print(f"written: {out / 'images.json'}, {out / 'images.png'}, {out / results['grid']['file']}")
        return 0
    if args.command == "bench" and args.bench == "maniskill":
        from flowrl.bench import maniskill

        out = Path(args.out or "benchmarks/results/maniskill")
        results = maniskill.run_maniskill_bench(
            out,
            _split(args.tasks) if args.tasks else None,
            _split(args.methods) if args.methods else None,
            args.seeds or [0],
            args.iterations,
            [*args.set, *args.overrides],
            args.size,
            progress=not args.no_progress,
        )
        print(maniskill.format_table(results))
        print(f"written: {out / 'maniskill.json'}, {out / 'maniskill.png'}, {out / 'tensorboard'}")
        return 0
    if args.command == "bench":
        from flowrl.bench.rollout import format_table, run_rollout_bench

        if args.overrides or args.set:
            raise FlowRLError("flowrl bench rollout takes no config overrides (it builds its own policy)")
        out = args.out or "benchmarks/results"
        results = run_rollout_bench(
            out,
            _split(args.tasks or "toy,mujoco"),
            num_envs=args.num_envs,
            steps=args.steps,
            max_workers=args.max_workers,
        )
        print(format_table(results))
        print(f"written: {Path(out) / 'rollout.json'}, {Path(out) / 'rollout.png'}")
        return 0
    if args.command == "collect":
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
    if args.command == "demos":
        from envs.maniskill_demos import motion_planning_demos

        done = motion_planning_demos(
            args.env, args.episodes, args.out, args.control_mode, args.seed, not args.no_progress
        )
        print(
            f"wrote {done['path']}: {done['episodes']} episodes of {args.env} ({args.control_mode}), {done['steps']} "
            f"steps, {done['length_mean']:.1f} per episode, seeds {done['seeds'][0]}-{done['seeds'][-1]}"
        )
        return 0
    overrides = list(args.overrides)
    if getattr(args, "ray_address", None):
        overrides.append(f"ray.address={args.ray_address}")
    if args.command in ("train", "pretrain") and args.resume:
        if args.experiment is not None:
            if not is_override(args.experiment):
                raise FlowRLError("with --resume RUN_DIR, give no experiment file: the run's config.yaml is used")
            overrides.insert(0, args.experiment)
        if args.run_dir:
            raise FlowRLError("--resume and --run-dir exclude each other: --resume already names the run folder")
        run_dir = Path(args.resume)
        cfg = ex.load_run_config(run_dir, overrides)
        with run_folder_lock(run_dir):  # a folder another process writes: one line, before any output
            print(f"run folder: {run_dir}", flush=True)
            if args.command == "pretrain":
                ex.pretrain_only(cfg, run_dir, progress=not args.no_progress, resume=True)
            else:
                ex.train(cfg, run_dir, resume=True, progress=not args.no_progress)
        return 0
    if args.experiment is None:
        raise FlowRLError(f"flowrl {args.command}: give an experiment file, e.g. experiments/quickstart.yaml")
    if args.command == "eval":
        from flowrl.rollout.video import parse_episodes

        episodes = None if args.video is None else parse_episodes(args.video)
        if args.video_dir and episodes is None:
            raise FlowRLError("flowrl eval: --video-dir is where --video puts its videos; give --video too")
        run = Path(args.experiment)
        if run.is_dir():
            cfg = ex.load_run_config(run, overrides)
            found = [p for p in (run / "policy.pt", run / "pretrained.pt") if p.is_file()]
            checkpoint = args.checkpoint or (str(found[0]) if found else None)
            if checkpoint is None:
                raise FlowRLError(f"flowrl eval: {run} holds no policy.pt or pretrained.pt yet; give --checkpoint PATH")
        else:
            cfg = load_config(args.experiment, overrides)
            checkpoint = args.checkpoint or cfg.policy.pretrained
            if checkpoint is None:
                raise FlowRLError("flowrl eval: give a run folder, or --checkpoint PATH (or set policy.pretrained)")
        if episodes is None:
            metrics = ex.evaluate_checkpoint(cfg, checkpoint)
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
    cfg = load_config(args.experiment, overrides)
    ex.preflight(cfg)
    run_dir = ex.new_run_dir(cfg, args.run_dir)
    with run_folder_lock(run_dir):
        print(f"run folder: {run_dir}", flush=True)
        if args.command == "pretrain":
            ex.pretrain_only(cfg, run_dir, progress=not args.no_progress)
        else:
            ex.train(cfg, run_dir, progress=not args.no_progress)
    return 0


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are a comma list of integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed, e.g. 0,1,2")
    return seeds


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _console_logging() -> None:
    logger = logging.getLogger("flowrl")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("flowrl: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after options too: `flowrl train X.yaml --ray-address A algo.clip=0.1`.
    args, extra = parser.parse_known_args(argv)
    from flowrl.config.loading import is_override  # after parsing: `flowrl --help` stays instant

    unknown = [e for e in extra if e.startswith("-") or not is_override(e)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra and not hasattr(args, "overrides"):
        parser.error(f"flowrl {args.command} takes no overrides: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _console_logging()
    try:
        return _run(args)
    except FlowRLError as exc:
        print(f"flowrl: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full or read-only disk under a write without its own message
        from flowrl.runlog import disk_error, is_disk_error

        if not is_disk_error(exc, permissions=False):  # others (a bug, a file that is not there) keep their traceback
            raise
        print(f"flowrl: error: {disk_error(exc, exc.filename or Path.cwd(), 'writing')}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"flowrl: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("flowrl: interrupted (no checkpoint written since the last one)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
