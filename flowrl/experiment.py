"""What the CLI commands do: run folders, pretraining, fine-tuning, evaluation."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

import envs as flowrl_envs
from flowrl.algos.flow_bc import action_chunks, load_demos, pretrain_flow
from flowrl.algos.flow_ppo import train_ppo
from flowrl.config import ExperimentConfig, load_config, save_config
from flowrl.errors import FlowRLError
from flowrl.models.build import build_policy, build_velocity, load_velocity, velocity_record
from flowrl.models.networks import ValueMLP, VelocityMLP
from flowrl.rollout.collector import Collector, InProcessCollector, evaluate_policy
from flowrl.runlog import atomic_save
from flowrl.runtime import resolve_device, seed_everything


def env_dims(env_id: str, kwargs: dict[str, Any] | None = None) -> tuple[int, int]:
    """(observation dim, action dim) of a registered env with flat Box spaces."""
    if env_id not in gym.registry:
        known = ", ".join(sorted(k for k in gym.registry if k.startswith("flowrl/")))
        raise FlowRLError(f"unknown env id {env_id!r} (env.id); flowrl's envs: {known}")
    try:
        env = gym.make(env_id, **(kwargs or {}))
    except TypeError as exc:
        raise FlowRLError(f"env.kwargs do not fit {env_id}: {exc}") from None
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1):
        raise FlowRLError(f"{env_id}: flowrl's MLP policies need a flat Box observation space, got {obs_space}")
    if not (isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1):
        raise FlowRLError(f"{env_id}: flowrl's MLP policies need a flat Box action space, got {act_space}")
    return obs_space.shape[0], act_space.shape[0]


def preflight(cfg: ExperimentConfig) -> None:
    """Checks that need no run folder (device, env, given checkpoint), so that bad input
    fails before one is created."""
    resolve_device(cfg.device)
    env_dims(cfg.env.id, cfg.env.kwargs)
    if cfg.policy.pretrained is not None and not Path(cfg.policy.pretrained).expanduser().is_file():
        raise FlowRLError(f"checkpoint not found: {cfg.policy.pretrained} (policy.pretrained)")


def new_run_dir(cfg: ExperimentConfig, run_dir: str | None = None) -> Path:
    if run_dir is not None:
        path = Path(run_dir)
        if (path / "checkpoints").exists():
            raise FlowRLError(f"run folder {path} already holds a run; continue it with --resume {path}")
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.runs_dir) / f"{cfg.name}-{stamp}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path(cfg.runs_dir) / f"{cfg.name}-{stamp}-{suffix}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pretrain(cfg: ExperimentConfig, run_dir: Path, device: torch.device, progress: bool = True) -> VelocityMLP:
    """Flow-matching BC from the experiment's demos; writes ``pretrained.pt`` in the run folder."""
    env_flowrl = flowrl_envs  # noqa: F841  (import registers the envs)
    obs_dim, action_dim = env_dims(cfg.env.id, cfg.env.kwargs)
    demos = load_demos(cfg.pretrain.demos, cfg.env.id, cfg.seed)
    if cfg.pretrain.demos.path is None:  # keep the generated demonstrations with the run
        np.savez(run_dir / "demos.npz", **demos)
    if demos["observations"].shape[1] != obs_dim or demos["actions"].shape[1] != action_dim:
        raise FlowRLError(
            f"demonstrations have obs dim {demos['observations'].shape[1]} / action dim {demos['actions'].shape[1]}, "
            f"env {cfg.env.id} has {obs_dim} / {action_dim}"
        )
    obs, chunks = action_chunks(demos, cfg.policy.horizon)
    velocity = build_velocity(cfg.policy, obs_dim, action_dim, cfg.pretrain.method != "rectified_flow").to(device)
    tqdm.write(
        f"pretraining ({cfg.pretrain.method}) on {len(demos['episode_ends'])} demonstration episodes "
        f"({len(obs)} chunks)"
    )
    ema, metrics = pretrain_flow(velocity, obs, chunks, cfg.pretrain, cfg.seed, progress)
    ema = ema.cpu()
    atomic_save(velocity_record(ema, cfg.policy), run_dir / "pretrained.pt")
    (run_dir / "pretrain_metrics.json").write_text(json.dumps(metrics))
    return ema


def pretrain_only(cfg: ExperimentConfig, run_dir: Path, progress: bool = True) -> dict[str, float]:
    """``flowrl pretrain``: behaviour cloning, then one evaluation of the pretrained policy."""
    save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.seed)
    pretrain(cfg, run_dir, resolve_device(cfg.device), progress)
    metrics = evaluate_checkpoint(cfg, run_dir / "pretrained.pt")
    print(
        f"pretrained policy: {run_dir / 'pretrained.pt'} (success {metrics['eval/success_rate']:.2f}, "
        f"return {metrics['eval/return']:.3f})"
    )
    return metrics


def initial_velocity(cfg: ExperimentConfig, run_dir: Path, device: torch.device, progress: bool) -> VelocityMLP:
    """The policy to fine-tune: policy.pretrained, else this run's pretrained.pt, else pretrain now."""
    obs_dim, action_dim = env_dims(cfg.env.id, cfg.env.kwargs)
    if cfg.policy.pretrained is not None:
        return load_velocity(cfg.policy.pretrained, cfg.policy, obs_dim, action_dim)
    if (run_dir / "pretrained.pt").exists():
        return load_velocity(run_dir / "pretrained.pt", cfg.policy, obs_dim, action_dim)
    return pretrain(cfg, run_dir, device, progress)


def train(cfg: ExperimentConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Pretrain if needed, then PPO fine-tuning; prints success before and after."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    save_config(cfg, run_dir / "config.yaml")
    checkpoint = None
    if resume:
        path = run_dir / "checkpoints" / "last.pt"
        if path.exists():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            tqdm.write(
                f"resuming from {path} (iteration {checkpoint['iteration']}, env steps {checkpoint['env_steps']})"
            )
            if checkpoint["iteration"] >= cfg.ppo.iterations:
                tqdm.write(
                    f"this run has done all {cfg.ppo.iterations} iterations; to go on, resume with "
                    f"ppo.iterations=N (N > {cfg.ppo.iterations})"
                )
        else:
            tqdm.write(f"no checkpoint in {run_dir / 'checkpoints'} yet: starting the fine-tuning from the beginning")
    velocity = initial_velocity(cfg, run_dir, device, progress)
    obs_dim, action_dim = env_dims(cfg.env.id, cfg.env.kwargs)
    policy = build_policy(cfg, velocity, obs_dim, action_dim)
    critic = ValueMLP(obs_dim)
    where = (
        f"{cfg.ray.num_workers} Ray env workers" if cfg.ray.enabled else f"{cfg.ray.num_workers} in-process env shards"
    )
    tqdm.write(
        f"fine-tuning: learner on {device}, {where}, {cfg.mdp.converter.type} steps, window {cfg.mdp.window.type}"
    )
    events = logging.FileHandler(run_dir / "events.log")
    events.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("flowrl").addHandler(events)
    try:
        session = contextlib.nullcontext()
        if cfg.ray.enabled:
            from flowrl.rollout.ray_runtime import ray_session  # Ray is imported only when used

            session = ray_session(cfg.ray.address, cfg.ray.num_cpus)
        with session:
            collector = make_collector(cfg)
            result = train_ppo(
                cfg, run_dir, policy, critic, device, resume=checkpoint, progress=progress, collector=collector
            )
    finally:
        logging.getLogger("flowrl").removeHandler(events)
        events.close()
    before, after = result["before"], result["after"]
    print(
        f"success before fine-tuning: {before['eval/success_rate']:.2f} -> after: {after['eval/success_rate']:.2f} "
        f"(return {before['eval/return']:.3f} -> {after['eval/return']:.3f})"
    )
    print(f"run folder: {run_dir}")
    return result


def make_collector(cfg: ExperimentConfig) -> Collector:
    """Ray env workers (ray.enabled), or the same shards in this process."""
    env, horizon = cfg.env, cfg.policy.horizon
    if cfg.ray.enabled:
        from flowrl.rollout.ray_collector import RayCollector

        return RayCollector(
            env.id,
            horizon,
            env.num_envs,
            cfg.seed,
            cfg.ray.num_workers,
            cfg.ray.cpus_per_worker,
            cfg.ray.max_restarts,
            env.kwargs,
        )
    return InProcessCollector(env.id, horizon, env.num_envs, cfg.seed, cfg.ray.num_workers, env.kwargs)


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: str | Path) -> dict[str, float]:
    obs_dim, action_dim = env_dims(cfg.env.id, cfg.env.kwargs)
    velocity = load_velocity(checkpoint, cfg.policy, obs_dim, action_dim)
    policy = build_policy(cfg, velocity, obs_dim, action_dim)
    return evaluate_policy(policy, cfg.env.id, cfg.policy.horizon, cfg.eval.episodes, cfg.seed, cfg.env.kwargs)


def load_run_config(run_dir: str | Path, overrides: list[str]) -> ExperimentConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FlowRLError(f"--resume {run_dir}: no config.yaml there; is it a flowrl run folder?")
    return load_config(path, overrides)
