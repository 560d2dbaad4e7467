"""Reflow (Liu et al.'s rectified flow, InstaFlow, Rectified Diffusion): straighten a pretrained
flow policy so that 1-2 integration steps do what its K did.

1. Pairs: noise z ``[Ta, Da]`` and the teacher's deterministic K-step ODE action a = ODE_K(obs, z)
   on the dataset's observations. The teacher's coupling (z -> a) is deterministic.
2. Student (initialised from the teacher) trained by flow matching on the straight paths between
   each pair: x_t = (1 - t) z + t a, target a - z. Its paths are straight where the coupling is
   learnt, so one Euler step lands near a. One round is enough (Lee et al. 2024), whose two
   improvements are here: a U-shaped timestep density p(t) ∝ cosh(a (2t - 1)) (a = 4, more
   weight near both ends, where one step's error starts and ends) and the pseudo-Huber loss
   sqrt(||e||^2 + c^2) - c, c = 0.00054 sqrt(d), instead of the squared error.
3. Straightness: the mean squared error per action dimension of a model's 1- and 2-step ODE
   against the teacher's K-step ODE from the same noise, on held-out observations; before (the
   teacher itself at 1 / 2 steps) and after (the student).

``flowrl reflow RUN_OR_CHECKPOINT`` (``cli_handler``) does all three: the pairs file in
``RUN/reflow`` (reused by a later call with the same teacher, K, N, split and seed, whatever its
``--out``), and in ``--out`` (default ``RUN/reflow``) ``student.pt`` (the format of
``pretrained.pt``: ``policy.pretrained`` loads it), ``finetune.yaml`` (the run's config with
``policy.pretrained`` and ``policy.denoising_steps: 1``) and ``reflow.json`` (the report).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

import envs as flowrl_envs
from flowrl.algos.bc import action_chunks, demo_batches, fit
from flowrl.config import ExperimentConfig, FlowPolicyConfig, PretrainConfig, load_config, save_config
from flowrl.config.schema import FLOW_TYPES
from flowrl.core.demos_file import read_demos
from flowrl.errors import ConfigError, FlowRLError
from flowrl.models.build import actor_record, load_actor, read_record
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.networks import VelocityMLP
from flowrl.models.sampler import ChainSampler, VelocityFn
from flowrl.rollout.demos import check_demos, load_demos
from flowrl.rollout.evaluation import evaluate_policy, headline_success
from flowrl.runlog import atomic_save, atomic_write_text
from flowrl.runtime import progress as progress_bar
from flowrl.runtime import resolve_device

Timesteps = Literal["uniform", "u_shaped"]
PairLoss = Literal["l2", "huber"]
U_SHAPE = 4.0  # a of the U-shaped density cosh(a (2t - 1)): its ends are cosh(4) ~ 27x its middle


# ------------------------------------------------------------------------------ the algorithm
@dataclass(frozen=True)
class Pairs:
    """Teacher pairs: obs ``[N, O]``, noise ``[N, Ta, Da]``, actions ``[N, Ta, Da]`` = ODE_K(obs, noise)."""

    obs: Tensor
    noise: Tensor
    actions: Tensor


@torch.no_grad()
def ode_actions(
    velocity: VelocityFn, obs: Tensor, noise: Tensor, steps: int, solver: str = "euler", shift: float = 1.0
) -> Tensor:
    """The deterministic ``steps``-step ODE from ``noise`` ``[B, *E]`` given obs ``[B, O]`` (the
    policy's grid: SD3 shift ``shift``; solver as mdp.solver) -> actions ``[B, *E]``."""
    sampler = ChainSampler(steps, solver=solver, grid_kind="shifted", grid_shift=shift).to(noise.device)
    return sampler.ode(velocity, obs, noise)[0]


def teacher_pairs(
    teacher: VelocityFn,
    obs: Tensor,
    n: int,
    steps: int,
    event_shape: tuple[int, ...],
    generator: torch.Generator,
    solver: str = "euler",
    shift: float = 1.0,
    progress: bool = True,
    chunk: int = 4096,
) -> Pairs:
    """``n`` pairs on observations drawn uniformly (with replacement) from obs ``[M, O]``, each
    with fresh noise; the teacher integrates them in chunks of ``chunk`` (a progress bar)."""
    device = obs.device
    idx = torch.randint(len(obs), (n,), generator=generator, device=device)
    noise = torch.randn((n, *event_shape), generator=generator, device=device)
    actions = torch.empty_like(noise)
    for start in progress_bar(range(0, n, chunk), "reflow pairs", progress, unit="chunk"):
        end = min(start + chunk, n)
        actions[start:end] = ode_actions(teacher, obs[idx[start:end]], noise[start:end], steps, solver, shift)
    return Pairs(obs[idx], noise, actions)


def sample_timesteps(n: int, kind: Timesteps, generator: torch.Generator, device: torch.device) -> Tensor:
    """t ``[n]`` in [0, 1]: uniform, or U-shaped (density ∝ cosh(a (2t - 1)), by inverting its CDF)."""
    u = torch.rand(n, generator=generator, device=device)
    if kind == "uniform":
        return u
    if kind == "u_shaped":
        return (torch.asinh((2.0 * u - 1.0) * math.sinh(U_SHAPE)) / U_SHAPE + 1.0) / 2.0
    raise ValueError(f"unknown timestep distribution {kind!r}; valid: uniform, u_shaped")


def pseudo_huber(err: Tensor) -> Tensor:
    """``sqrt(||e||^2 + c^2) - c`` per sample, c = 0.00054 sqrt(d): err ``[B, *E]`` -> ``[B]``."""
    flat = err.flatten(1)
    c = 0.00054 * math.sqrt(flat.shape[1])
    return torch.sqrt(flat.pow(2).sum(1) + c * c) - c


def reflow_loss(
    student: nn.Module,
    obs: Tensor,
    noise: Tensor,
    actions: Tensor,
    timesteps: Timesteps,
    loss: PairLoss,
    generator: torch.Generator,
) -> Tensor:
    """Flow matching on the straight path between each pair: obs ``[B, O]``, noise and actions
    ``[B, *E]``. A step-conditioned student (shortcut, MeanFlow) learns the same velocity a - z
    as its average over [t, r], r ~ U(t, 1): on a straight path every interval has it."""
    b = noise.shape[0]
    t = sample_timesteps(b, timesteps, generator, noise.device)
    tb = t.view(-1, *([1] * (noise.ndim - 1)))
    x_t = (1.0 - tb) * noise + tb * actions
    r = t
    if getattr(student, "step_conditioned", False):
        r = t + (1.0 - t) * torch.rand(b, generator=generator, device=noise.device)
    err = student(obs, x_t, t, r) - (actions - noise)
    if loss == "huber":
        return pseudo_huber(err).mean()
    return err.pow(2).flatten(1).mean(1).mean()


def train_student(
    student: nn.Module,
    pairs: Pairs,
    cfg: PretrainConfig,
    timesteps: Timesteps,
    loss: PairLoss,
    seed: int,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, float]]:
    """``cfg.steps`` AdamW steps of ``reflow_loss`` on batches of ``pairs`` (``flowrl.algos.bc.fit``:
    its EMA, learning rate, batch size); returns the EMA student and the final loss."""
    device = next(student.parameters()).device
    both = torch.stack([pairs.noise, pairs.actions], dim=1)  # [N, 2, *E]: one target tensor for fit's batches
    draw = demo_batches(pairs.obs, both, cfg.batch_size, device)

    def loss_fn(actor: nn.Module, o: Tensor, pair: Tensor, g: torch.Generator) -> Tensor:
        return reflow_loss(actor, o, pair[:, 0], pair[:, 1], timesteps, loss, g)

    return fit(student, draw, loss_fn, cfg, seed, progress, desc="reflow student")


@torch.no_grad()
def straightness(
    model: VelocityFn,
    target: Tensor,
    obs: Tensor,
    noise: Tensor,
    steps: tuple[int, ...] = (1, 2),
    solver: str = "euler",
    shift: float = 1.0,
) -> dict[int, float]:
    """Mean squared error per action dimension of the model's n-step ODE (n in ``steps``) against
    ``target`` ``[B, *E]`` (the teacher's K-step ODE from the same noise ``[B, *E]``, obs ``[B, O]``)."""
    return {n: float((ode_actions(model, obs, noise, n, solver, shift) - target).pow(2).mean()) for n in steps}


# ------------------------------------------------------------------------------ the command
@dataclass(frozen=True)
class _Source:
    run_dir: Path
    checkpoint: Path
    cfg: ExperimentConfig


def _source(target: str) -> _Source:
    """RUN_OR_CHECKPOINT: a run folder (its pretrained.pt, else policy.pt) or a checkpoint file in
    one (its config.yaml says what the network is)."""
    path = Path(target).expanduser()
    if not path.exists():
        raise FlowRLError(
            f"flowrl reflow: {path} does not exist; give a run folder of `flowrl pretrain` or its pretrained.pt"
        )
    run_dir = path if path.is_dir() else path.parent
    if not (run_dir / "config.yaml").is_file():
        raise FlowRLError(
            f"flowrl reflow: {run_dir} has no config.yaml; give a flowrl run folder or a checkpoint in one"
        )
    if path.is_dir():
        found = [p for p in (path / "pretrained.pt", path / "policy.pt") if p.is_file()]
        if not found:
            raise FlowRLError(f"flowrl reflow: {path} holds no pretrained.pt or policy.pt; pretrain it first")
        path = found[0]
    cfg = load_config(run_dir / "config.yaml", [])
    if cfg.policy.type not in FLOW_TYPES:
        raise FlowRLError(
            f"flowrl reflow: {run_dir} trains a {cfg.policy.type} policy; reflow straightens flow policies "
            f"(policy.type {', '.join(FLOW_TYPES)})"
        )
    return _Source(run_dir, path, cfg)


def _check_args(args: argparse.Namespace) -> None:
    for name, low in (("pairs", 1), ("teacher_steps", 1), ("steps", 1), ("batch_size", 1), ("held_out", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise FlowRLError(f"flowrl reflow: --{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.lr is not None and args.lr <= 0:
        raise FlowRLError(f"flowrl reflow: --lr must be > 0, got {args.lr}")
    if args.eval_episodes is not None and args.eval_episodes < 0:
        raise FlowRLError(f"flowrl reflow: --eval-episodes must be >= 0 (0 = no evaluation), got {args.eval_episodes}")


def _observations(src: _Source, dims: tuple[int, int]) -> Tensor:
    """The observations of the run's dataset ``[M, O]``: its kept scripted demos (demos.npz), or
    the file pretrain.demos.path names."""
    cfg = src.cfg
    kept = src.run_dir / "demos.npz"
    if kept.is_file():
        demos = read_demos(kept, cfg.env.id, dims)
    elif cfg.pretrain is not None:
        check_demos(cfg.pretrain.demos, cfg.env.id, dims)
        demos = load_demos(cfg.pretrain.demos, cfg.env.id, cfg.seed, dims)
    else:
        raise FlowRLError(f"flowrl reflow: {src.run_dir} names no dataset (pretrain: null, no demos.npz)")
    return action_chunks(demos, cfg.policy.horizon)[0]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _pairs_file(src: _Source, obs: Tensor, args: argparse.Namespace, device: torch.device, teacher):
    """The pairs for these settings: read from ``RUN/reflow`` when a call made them before (with
    any --out), else made and saved there (teacher digest, K, N, split and seed in the name)."""
    p = src.cfg.policy
    held = args.held_out_used  # a split with other held-out observations makes other pairs
    folder = src.run_dir / "reflow"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"pairs-{_digest(src.checkpoint)}-K{args.teacher_steps}-N{args.pairs}-H{held}-seed{args.seed}.pt"
    if path.is_file():
        saved = torch.load(path, map_location=device, weights_only=True)
        tqdm.write(f"reusing {path} ({args.pairs} pairs)")
        return Pairs(saved["obs"], saved["noise"], saved["actions"]), path
    gen = torch.Generator(device=device).manual_seed(args.seed)
    tqdm.write(f"generating {args.pairs} pairs with the teacher's {args.teacher_steps}-step ODE")
    shape = (p.horizon, teacher.action_dim)
    pairs = teacher_pairs(
        teacher, obs, args.pairs, args.teacher_steps, shape, gen, src.cfg.mdp.solver, p.time_shift, args.progress
    )
    record = {"obs": pairs.obs.cpu(), "noise": pairs.noise.cpu(), "actions": pairs.actions.cpu()}
    atomic_save({**record, "teacher": str(src.checkpoint.resolve()), "teacher_steps": args.teacher_steps}, path)
    return pairs, path


def _evaluate(cfg: ExperimentConfig, actor: VelocityMLP, steps: int, episodes: int) -> dict[str, float]:
    """The deterministic evaluation of ``actor`` integrated in ``steps`` steps: return, its
    standard error, and success where the env reports one (MuJoCo locomotion has none)."""
    sampler = ChainSampler(steps, solver=cfg.mdp.solver, grid_kind="shifted", grid_shift=cfg.policy.time_shift)
    policy = FlowPolicy(actor.cpu(), sampler)
    metrics = evaluate_policy(policy, cfg.env.id, cfg.policy.horizon, episodes, cfg.seed, cfg.env.kwargs)
    found = {"return": metrics["eval/return"], "return_se": metrics["eval/return_std"] / math.sqrt(episodes)}
    if cfg.env.id in flowrl_envs.REPORTS_SUCCESS:
        found["success"] = headline_success(metrics)
    return found


def _finetune_yaml(src: _Source, student_path: Path, out: Path) -> Path | None:
    """The run's config with policy.pretrained = the student and K = 1, when that config is valid."""
    overrides = [f"policy.pretrained={student_path.resolve()}", "policy.denoising_steps=1"]
    try:
        cfg = load_config(src.run_dir / "config.yaml", overrides)
    except ConfigError as exc:
        tqdm.write(f"no finetune.yaml: the run's config does not take K = 1 ({exc})")
        return None
    save_config(cfg, out / "finetune.yaml")
    return out / "finetune.yaml"


def run_reflow(args: argparse.Namespace) -> dict[str, Any]:
    """The whole command (see the module doc); returns the report written to reflow.json."""
    _check_args(args)
    src = _source(args.source)
    cfg, p = src.cfg, src.cfg.policy
    assert isinstance(p, FlowPolicyConfig)
    arch = read_record(src.checkpoint)["arch"]
    dims = (int(arch.get("obs_dim", -1)), int(arch.get("action_dim", -1)))
    teacher = load_actor(src.checkpoint, p, *dims)
    args.seed = cfg.seed if args.seed is None else args.seed
    obs = _observations(src, dims)
    if len(obs) < 2:
        raise FlowRLError(f"flowrl reflow: the dataset has {len(obs)} observation; it needs at least 2")
    held = args.held_out_used = min(args.held_out, max(1, len(obs) // 5))
    out = Path(args.out) if args.out else src.run_dir / "reflow"
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    teacher = teacher.to(device).requires_grad_(False)
    perm = torch.randperm(len(obs), generator=torch.Generator().manual_seed(args.seed))
    held_obs, train_obs = obs[perm[:held]].to(device), obs[perm[held:]].to(device)
    pairs, pairs_path = _pairs_file(src, train_obs, args, device, teacher)
    report = _train_and_measure(src, args, teacher, pairs, held_obs, device, out)
    report |= {"pairs_file": str(pairs_path), "held_out_observations": held}
    atomic_write_text(json.dumps(report, indent=2), out / "reflow.json")
    return report


def _train_and_measure(src, args, teacher: VelocityMLP, pairs: Pairs, held_obs: Tensor, device, out: Path):
    cfg, p = src.cfg, src.cfg.policy
    base = cfg.pretrain or PretrainConfig()
    train_cfg = base.model_copy(
        update={
            "steps": args.steps or base.steps,
            "batch_size": args.batch_size or base.batch_size,
            "lr": args.lr or base.lr,
        }
    )
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    noise = torch.randn((len(held_obs), *pairs.noise.shape[1:]), generator=gen, device=device)
    solve = {"solver": cfg.mdp.solver, "shift": p.time_shift}
    target = ode_actions(teacher, held_obs, noise, args.teacher_steps, **solve)
    before = straightness(teacher, target, held_obs, noise, **solve)
    tqdm.write(f"training the student: {train_cfg.steps} steps, {args.timesteps} timesteps, {args.loss} loss")
    student = copy.deepcopy(teacher).requires_grad_(True)
    student, metrics = train_student(student, pairs, train_cfg, args.timesteps, args.loss, args.seed, args.progress)
    after = straightness(student, target, held_obs, noise, **solve)
    student_path = out / "student.pt"
    atomic_save(actor_record(student.cpu(), p), student_path)
    report: dict[str, Any] = {
        "teacher": str(src.checkpoint),
        "teacher_steps": args.teacher_steps,
        "pairs": args.pairs,
        "student": str(student_path),
        "timesteps": args.timesteps,
        "loss": args.loss,
        "train_steps": train_cfg.steps,
        "final_loss": metrics["pretrain/loss"],
        "straightness_before": {f"{n}_step": e for n, e in before.items()},
        "straightness_after": {f"{n}_step": e for n, e in after.items()},
        "straightness_gain_1_step": before[1] / max(after[1], 1e-12),
    }
    episodes = cfg.eval.episodes if args.eval_episodes is None else args.eval_episodes
    if episodes:
        k = p.denoising_steps
        report["success"] = {
            f"teacher_K{k}": _evaluate(cfg, teacher, k, episodes),
            "teacher_K1": _evaluate(cfg, teacher, 1, episodes),
            "student_K1": _evaluate(cfg, student, 1, episodes),
            "student_K2": _evaluate(cfg, student, 2, episodes),
            "episodes": episodes,
        }
    finetune = _finetune_yaml(src, student_path, out)
    report["finetune_yaml"] = None if finetune is None else str(finetune)
    return report


def _summary(report: dict[str, Any]) -> str:
    b, a = report["straightness_before"], report["straightness_after"]
    lines = [
        f"straightness (mean squared error per action dim vs the teacher's {report['teacher_steps']}-step ODE, "
        f"{report['held_out_observations']} held-out observations):",
        f"  teacher: 1 step {b['1_step']:.5f}, 2 steps {b['2_step']:.5f}",
        f"  student: 1 step {a['1_step']:.5f}, 2 steps {a['2_step']:.5f}  "
        f"({report['straightness_gain_1_step']:.1f}x lower at 1 step)",
    ]
    for name, m in report.get("success", {}).items():
        if isinstance(m, dict):
            success = f"success {m['success']:.2f}, " if "success" in m else ""
            lines.append(f"  {name}: {success}return {m['return']:.3f} ± {m['return_se']:.3f} (standard error)")
    lines.append(f"student: {report['student']}")
    if report["finetune_yaml"]:
        lines.append(f"fine-tune it at K = 1: python -m flowrl.cli train {report['finetune_yaml']}")
    return "\n".join(lines)


def cli_handler(args: argparse.Namespace) -> int:
    """``flowrl reflow``: pairs, student, straightness and success; prints the summary."""
    args.progress = not args.no_progress
    report = run_reflow(args)
    print(_summary(report))
    return 0


__all__ = [
    "Pairs",
    "cli_handler",
    "ode_actions",
    "pseudo_huber",
    "reflow_loss",
    "sample_timesteps",
    "straightness",
    "teacher_pairs",
    "train_student",
]
