"""Command line: ``flowrl pretrain|train|eval EXPERIMENT.yaml [key.sub=value ...]``, ``flowrl collect RUN``,
``flowrl demos ENV``, ``flowrl bench NAME``.

The CLI is a table, ``COMMANDS``: each command declares its arguments and names its handler as
``"module:function"``, a short function in the module that owns the work (flowrl.commands for
the experiment commands, ``flowrl/bench/NAME.py`` for ``flowrl bench NAME``: ``BENCHES``). A
handler takes the parsed arguments and returns the exit code. It is imported only when its
command runs, so that ``flowrl --help`` stays instant (no torch). Adding a command is one
``Command`` entry and its handler. This module keeps the rest: the parser built from the table,
overrides after options, console logging and the exit codes (bad input 2, interrupted 130).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowrl.errors import FlowRLError, Interrupted

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call: its flags and keywords. A callable ``help`` is called when the
    parser is built (help that lists what is on disk now)."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def arg(*flags: str, **options: Any) -> Arg:
    """``arg("--seed", type=int, help=...)``: an ``Arg``, written like the ``add_argument`` call it stands for."""
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    """A subcommand: ``flowrl NAME``, its one-line help, its arguments (in help order) and its
    handler, ``"module:function"`` (imported when the command runs) or a function of this module."""

    name: str
    help: str
    handler: str | Handler
    args: tuple[Arg, ...]


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _comma_list(text: str) -> list[str] | None:
    """A comma list option; an empty one counts as not given (None)."""
    return _split(text) if text else None


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are a comma list of integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed, e.g. 0,1,2")
    return seeds


def _tasks_help() -> str:
    from flowrl.bench.tasks import task_names, tasks_dir

    names = ", ".join(task_names()) or "none found"
    return (
        "comma list; rollout: toy, mujoco (HalfCheetah-v5) or env ids (default toy,mujoco); "
        f"locomotion (required): task names or all; tasks in {tasks_dir()}: {names}; maniskill: pickcube, pushcube "
        "(default: every task with files in experiments/maniskill); learner: shapes, hopper (default both)"
    )


def _tasks_dir_help() -> str:
    from flowrl.bench.tasks import TASKS_DIR_VAR

    return f"locomotion: folder of task files (default: ${TASKS_DIR_VAR}, else experiments/locomotion/tasks)"


_NO_PROGRESS = arg("--no-progress", action="store_true", help="no progress bars")
_RUN_DIR = arg("--run-dir", help="run folder (default: runs_dir/NAME-TIMESTAMP)")
# pretrain and train: the experiment file is optional, --resume RUN_DIR names the run's config instead
_EXPERIMENT_RUN = (
    arg("experiment", nargs="?", help="experiment YAML file (experiments/*.yaml)"),
    arg("overrides", nargs="*", help="config overrides: key.sub=value (algo.iterations=10), ~key.sub (removes it)"),
    _NO_PROGRESS,
    _RUN_DIR,
)

# flowrl bench NAME: the handler of each benchmark, beside its work (choices in this order)
BENCHES: dict[str, str] = {
    "rollout": "flowrl.bench.rollout:cli_handler",
    "locomotion": "flowrl.bench.locomotion:cli_handler",
    "images": "flowrl.bench.images:cli_handler",
    "maniskill": "flowrl.bench.maniskill:cli_handler",
    "learner": "flowrl.bench.learner:cli_handler",
}


def _bench(args: argparse.Namespace) -> int:
    """``flowrl bench NAME``: the benchmark's own handler (``BENCHES``)."""
    if args.bench != "locomotion" and (args.set_expert or args.set_data):
        raise FlowRLError(f"flowrl bench {args.bench}: --set-expert and --set-data are for bench locomotion; use --set")
    return _handler(BENCHES[args.bench])(args)


_BENCH_ARGS = (
    arg(
        "bench",
        choices=list(BENCHES),
        help="rollout: env steps/s of raw envs vs collectors; locomotion: ReinFlow / GRPO / DPPO / Gaussian PPO / "
        "DiffusionNFT / AWM / AC-Flow fine-tuning side by side on the locomotion tasks (one file each in the tasks "
        "folder); images: Flow-GRPO, MixGRPO, MixGRPO-Flash, DiffusionNFT, AWM and AC-Flow fine-tuning one "
        "pretrained shapes-world model side by side (held-out accuracy "
        "before / after per category, JPEG size, diversity, time per iteration, NFE, memory); maniskill: Flow-Noise "
        "and Flow-SDE, each under PPO and GRPO, fine-tuning one pretrained policy per ManiSkill task side by side "
        "(held-out success before / after, env steps, wall time, training-step time, collection vs raw stepping); "
        "learner: the update of the shapes image policy and the Hopper policy with 1 learner and with N data-parallel "
        "ranks, interleaved, and FSDP's per-rank parameter memory",
    ),
    arg(
        "overrides",
        nargs="*",
        help="locomotion, images, maniskill, learner: config overrides key.sub=value for every run (like --set), e.g. "
        "algo.actor_lr=3e-4",
    ),
    arg("--tasks", type=_comma_list, help=_tasks_help),
    arg("--tasks-dir", metavar="DIR", help=_tasks_dir_help),
    arg(
        "--data-only",
        action="store_true",
        help="locomotion: train the experts and record every dataset of the tasks (cache/), then stop",
    ),
    arg("--variants", type=_comma_list, help="locomotion: comma list of variant labels or method names (default all)"),
    arg(
        "--seeds",
        type=_seed_list,
        help="locomotion, images, maniskill: comma list of seeds, each variant or method run once per seed "
        "(default: locomotion 0,1,2; images, maniskill 0)",
    ),
    arg("--eval-episodes", type=int, default=20, help="locomotion: evaluation episodes per evaluation"),
    arg(
        "--size",
        choices=["cpu", "paper"],
        default="cpu",
        help="locomotion, images, maniskill: experiment files (paper: the paper/ folders, sized for a GPU machine)",
    ),
    arg(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="locomotion: override of the method files' runs (pretraining, fine-tuning); images, maniskill: override "
        "for every run",
    ),
    arg(
        "--set-expert",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="locomotion: override of the expert's experiment (the expert and the partly trained policies that record "
        "the datasets), e.g. algo.iterations=2; cached apart from the task's own",
    ),
    arg(
        "--set-data",
        action="append",
        default=[],
        metavar="DATASET.KEY=VALUE",
        help="locomotion: override of a dataset recipe of the task files, e.g. medium.episodes=2 or "
        "medium.policy_iterations=1; cached apart from the task's own",
    ),
    arg(
        "--methods",
        type=_comma_list,
        help="images: comma list of flow_grpo, mixgrpo, flash, nft, awm, ac_flow (default flow_grpo, mixgrpo, flash; "
        "times relative to "
        "flow_grpo); maniskill: "
        "flow_noise_ppo, flow_sde_ppo, flow_noise_grpo, flow_sde_grpo (default all; training-step times relative to "
        "flow_noise_ppo)",
    ),
    arg("--iterations", type=int, help="images, maniskill: iterations of every run (default: each file's)"),
    arg(
        "--pretrained",
        metavar="PATH",
        help="images: the pretrained model to fine-tune (default: cache/shapes/pretrain/pretrained.pt, paper size "
        "cache/shapes/paper-pretrain/pretrained.pt); when missing, shapes_pretrain.yaml pretrains it into its folder",
    ),
    _NO_PROGRESS,
    arg("--num-envs", type=int, default=16, help="rollout: envs in total (equal for every variant)"),
    arg("--steps", type=int, default=50, help="rollout: policy steps per timed collection"),
    arg("--max-workers", type=int, help="rollout: largest Ray worker count (default: the CPU count)"),
    arg("--repeats", type=int, default=3, help="learner: timed updates per learner count (after one warm-up each)"),
    arg("--ranks", type=int, default=2, help="learner: data-parallel ranks compared with one learner"),
    arg(
        "--out",
        help="folder for the results (JSON, PNG; default benchmarks/results, images: benchmarks/results/images, "
        "maniskill: benchmarks/results/maniskill)",
    ),
)

COMMANDS: tuple[Command, ...] = (
    Command(
        "pretrain",
        "flow-matching behaviour cloning only",
        "flowrl.commands:pretrain",
        (
            *_EXPERIMENT_RUN,
            arg("--resume", metavar="RUN_DIR", help="continue a stopped pretraining from its checkpoint"),
        ),
    ),
    Command(
        "train",
        "pretrain (unless policy.pretrained is set), then PPO or GRPO fine-tuning (algo.type)",
        "flowrl.commands:train",
        (
            *_EXPERIMENT_RUN,
            arg("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint"),
            arg("--ray-address", metavar="HOST:PORT", help="join this Ray cluster ('auto' = the local one)"),
        ),
    ),
    Command("bench", "benchmarks; results to a JSON file and a PNG chart", _bench, _BENCH_ARGS),
    Command(
        "collect",
        "record a demonstration dataset with a trained run's policy",
        "flowrl.commands:collect",
        (
            arg("run", help="run folder of a finished `flowrl train` (its config.yaml and policy.pt)"),
            arg("--out", required=True, help="dataset file to write (.npz), e.g. cache/datasets/hopper-medium.npz"),
            arg("--episodes", type=int, default=100, help="episodes to record"),
            arg(
                "--actions",
                choices=["deterministic", "sample"],
                default="deterministic",
                help="deterministic: the policy's evaluation actions (mean, ODE, DDIM eta = 0); sample: draws from "
                "its own stochastic policy (a D4RL-like dataset: README, Locomotion)",
            ),
            arg("--action-noise", type=float, default=0.0, help="std of extra Gaussian noise on every action"),
            arg("--seed", type=int, default=0, help="seed of the env resets and the noise"),
            arg("--checkpoint", help="policy checkpoint (default: RUN/policy.pt)"),
            _NO_PROGRESS,
        ),
    ),
    Command(
        "demos",
        "record demonstrations of a ManiSkill task with ManiSkill's motion planner (no downloads)",
        "flowrl.commands:demos",
        (
            arg("env", help="flowrl's ManiSkill env id, e.g. flowrl/PickCube-v1"),
            arg("--out", required=True, help="dataset file to write (.npz), e.g. cache/datasets/pickcube-20.npz"),
            arg("--episodes", type=int, default=20, help="successful planned episodes to record"),
            arg("--control-mode", default="pd_ee_delta_pos", help="controller the actions are converted to"),
            arg("--seed", type=int, default=0, help="first reset seed (the planner goes on from there)"),
            arg(
                "--hold-steps",
                type=int,
                default=0,
                help="steps of holding still at the goal recorded after each success (delta controllers)",
            ),
            _NO_PROGRESS,
        ),
    ),
    Command(
        "reflow",
        "straighten a pretrained flow policy for 1-2 step sampling: its own ODE's (noise, action) pairs, a student "
        "retrained on them, straightness and success before / after (RUN/reflow)",
        "flowrl.algos.reflow:cli_handler",
        (
            arg(
                "source",
                metavar="RUN_OR_CHECKPOINT",
                help="run folder of `flowrl pretrain` (its pretrained.pt) or a checkpoint in one",
            ),
            arg("--pairs", type=int, default=20000, help="teacher (noise, action) pairs to train the student on"),
            arg("--teacher-steps", type=int, default=32, help="K, the teacher's ODE steps that make each pair"),
            arg("--steps", type=int, help="student gradient steps (default: the run's pretrain.steps)"),
            arg("--batch-size", type=int, help="student batch size (default: the run's pretrain.batch_size)"),
            arg("--lr", type=float, help="student learning rate (default: the run's pretrain.lr)"),
            arg("--timesteps", choices=["uniform", "u_shaped"], default="u_shaped", help="student's t distribution"),
            arg("--loss", choices=["l2", "huber"], default="huber", help="squared error or pseudo-Huber"),
            arg(
                "--held-out",
                type=int,
                default=256,
                help="observations kept out of the pairs to measure straightness (at most a fifth)",
            ),
            arg("--eval-episodes", type=int, help="episodes per success evaluation (default: eval.episodes; 0 = none)"),
            arg("--seed", type=int, help="seed of the pairs, the split and the training (default: the run's seed)"),
            arg(
                "--out",
                help="folder of student.pt, finetune.yaml and reflow.json (default: RUN/reflow); the pairs stay in "
                "RUN/reflow, reused by later calls",
            ),
            _NO_PROGRESS,
        ),
    ),
    Command(
        "eval",
        "evaluate a run (RUN_DIR: its config.yaml and policy.pt) or an experiment's checkpoint with the "
        "deterministic policy",
        "flowrl.commands:evaluate",
        (
            arg("experiment", help="a run folder, or an experiment YAML file (then give --checkpoint)"),
            arg("overrides", nargs="*", help="config overrides key.sub=value, e.g. eval.episodes=100"),
            arg(
                "--checkpoint",
                help="policy checkpoint (default: RUN_DIR/policy.pt, else RUN_DIR/pretrained.pt; for a YAML file, "
                "policy.pretrained)",
            ),
            arg(
                "--video",
                metavar="EPISODES",
                help="also film evaluation episodes: N = the first N, or indices 0,3,5 (one: 5,); per episode i an "
                "MP4 (every env step), episode_i_last.png and episode_i_strip.png (first | last frame), their paths "
                "in the output; with a run folder the strips also go to TensorBoard (RUN_DIR/tensorboard/videos)",
            ),
            arg(
                "--sampled",
                action="store_true",
                help="evaluate the stochastic policy fine-tuning samples from (its mdp.converter noise) instead of "
                "the deterministic one; e.g. mdp.converter.std_min=0.05 mdp.converter.std_max=0.05 for a fixed std",
            ),
            arg(
                "--video-dir",
                help="folder of the videos (default: RUN_DIR/videos/CHECKPOINT_NAME, e.g. RUN_DIR/videos/policy; for "
                "a YAML file, videos/CHECKPOINT_NAME next to the checkpoint)",
            ),
        ),
    ),
)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows an option's default in its help when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _parser(commands: tuple[Command, ...] = COMMANDS) -> argparse.ArgumentParser:
    """The parser of ``commands``; each subparser remembers its command's handler (``args.handler``)."""
    p = argparse.ArgumentParser(prog="flowrl", description="RL fine-tuning of flow-matching policies.")
    sub = p.add_subparsers(dest="command", required=True)
    for command in commands:
        sp = sub.add_parser(command.name, help=command.help, formatter_class=_DefaultsFormatter)
        for a in command.args:
            options = dict(a.options)
            if callable(options.get("help")):
                options["help"] = options["help"]()
            sp.add_argument(*a.flags, **options)
        sp.set_defaults(handler=command.handler)
    return p


def _handler(ref: str | Handler) -> Handler:
    """The handler a table entry names: ``"module:function"`` imported now, or the function itself."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


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
        return _handler(args.handler)(args)
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
