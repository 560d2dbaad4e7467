"""What the CLI commands do: run folders, pretraining, fine-tuning, evaluation."""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import functools
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from flowrl.algos.bc import action_chunks, bc_loss, check_demos, dataset_obs_stats, demo_batches, fit, load_demos
from flowrl.algos.trainer import Algorithm, Trainer
from flowrl.config import (
    LIKELIHOOD_FREE_ALGOS,
    ACFlowConfig,
    AWMConfig,
    ExperimentConfig,
    GRPOConfig,
    NFTConfig,
    load_config,
    save_config,
)
from flowrl.errors import CheckpointError, FlowRLError
from flowrl.models.build import (
    Actor,
    actor_record,
    build_actor,
    build_critic,
    build_image_network,
    build_policy,
    check_checkpoint,
    load_actor,
    load_image_network,
)
from flowrl.models.policy import Policy
from flowrl.rollout.build import make_collector
from flowrl.rollout.demos import Actions
from flowrl.rollout.evaluation import evaluate_policy, headline_success
from flowrl.rollout.video import Recording, record_episodes
from flowrl.runlog import atomic_save, atomic_write_text, check_disk_error, holds_run_folder, remove_temporary_files
from flowrl.runtime import graceful_stop, resolve_device, seed_everything

log = logging.getLogger("flowrl")


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


def reports_success(env_id: str) -> bool:
    """Whether the env's step info carries "success" (``envs.REPORTS_SUCCESS``): the success
    rate is printed only then (MuJoCo locomotion has none: it would always read 0.00)."""
    import envs

    return env_id == "shapes" or env_id in envs.REPORTS_SUCCESS  # shapes: the verifier's accuracy


def preflight(cfg: ExperimentConfig) -> None:
    """Checks that need no run folder (device, env, given checkpoint, demonstrations: readable,
    recorded in env.id when the file says where, of the env's dims; env workers that fit a local
    Ray's CPUs), so that bad input fails before one is created."""
    resolve_device(cfg.device)
    if cfg.learner.num_workers > 1:
        from flowrl.algos.distributed import check_learner_resources

        check_learner_resources(cfg)
    if cfg.env.type == "shapes":  # reward: keys checked by the config, the rest by its preflight
        from flowrl.rewards.registry import check_reward

        check_reward(cfg.env.reward)
        if cfg.policy.type == "sd3":  # cheap checks: loading SD3 here would load it twice
            from flowrl.models.sd3_policy import check_sd3_folder

            check_sd3_folder(cfg.policy.path)
            if cfg.policy.pretrained is not None and not Path(cfg.policy.pretrained).expanduser().is_file():
                raise CheckpointError(f"checkpoint not found: {cfg.policy.pretrained} (policy.pretrained)")
        elif cfg.policy.pretrained is not None:
            load_image_network(cfg.policy.pretrained, cfg)
        return
    if cfg.ray.enabled and cfg.ray.address is None and not cfg.env.batched:  # a joined cluster: checked on joining
        from flowrl.rollout.ray_runtime import check_local_cpus

        check_local_cpus(cfg.env.num_workers, cfg.ray.cpus_per_worker, cfg.ray.num_cpus)
    if cfg.env.batched:
        from envs.maniskill_batch import check_batched

        check_batched(cfg.env.id, cfg.env.num_envs, cfg.env.kwargs, resolve_device(cfg.device))
    dims = env_dims(cfg.env.id, cfg.env.kwargs)
    if cfg.policy.pretrained is not None:  # readable, a flowrl checkpoint, fits the experiment, finite weights
        check_checkpoint(cfg.policy.pretrained, cfg.policy, *dims)
    if cfg.policy.pretrained is None and cfg.pretrain is not None:
        check_demos(cfg.pretrain.demos, cfg.env.id, dims)


def new_run_dir(cfg: ExperimentConfig, run_dir: str | None = None) -> Path:
    """Create the run folder: ``run_dir`` (--run-dir), else ``runs_dir/NAME-TIMESTAMP``. A path
    that is a file, or a folder that cannot be made (read-only disk, no permission), is one line."""
    if run_dir is not None:
        path = Path(run_dir)
        if path.exists() and not path.is_dir():
            raise FlowRLError(f"--run-dir {path} is a file, not a folder: give a new (or empty) folder's path")
        if (path / "checkpoints").exists():
            raise FlowRLError(f"run folder {path} already holds a run; continue it with --resume {path}")
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.runs_dir) / f"{cfg.name}-{stamp}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path(cfg.runs_dir) / f"{cfg.name}-{stamp}-{suffix}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        check_disk_error(exc, exc.filename or path, "creating")  # the folder that failed: maybe a parent
        what = "--run-dir" if run_dir is not None else "runs_dir"
        raise FlowRLError(f"cannot create the run folder {path} ({exc.strerror}): check {what}") from None
    return path


def pretrain(cfg: ExperimentConfig, run_dir: Path, device: torch.device, progress: bool = True) -> Actor:
    """Behaviour cloning of ``policy.type`` from the experiment's demos; writes
    ``pretrained.pt`` in the run folder."""
    assert cfg.pretrain is not None
    if cfg.env.type == "shapes":
        return pretrain_text_image(cfg, run_dir, device, progress)
    obs_dim, action_dim = env_dims(cfg.env.id, cfg.env.kwargs)
    # a file: recorded in this env (when it says), with its observation and action dims
    demos = load_demos(cfg.pretrain.demos, cfg.env.id, cfg.seed, (obs_dim, action_dim))
    if cfg.pretrain.demos.path is None:  # keep the generated demonstrations with the run
        tmp = run_dir / ".demos.npz.tmp"
        with tmp.open("wb") as f:
            np.savez(f, **demos)
        tmp.replace(run_dir / "demos.npz")
    if demos["observations"].shape[1] != obs_dim or demos["actions"].shape[1] != action_dim:
        raise FlowRLError(  # scripted demonstrators are code: a mismatch is theirs
            f"the scripted demonstrations of {cfg.env.id} have obs dim {demos['observations'].shape[1]} / action dim "
            f"{demos['actions'].shape[1]}, the env has {obs_dim} / {action_dim}"
        )
    obs, chunks = action_chunks(demos, cfg.policy.horizon)
    actor = build_actor(cfg.policy, obs_dim, action_dim)
    if cfg.policy.obs_norm == "dataset":
        actor.obs_norm.set_stats(*dataset_obs_stats(obs), count=len(obs))
    tqdm.write(
        f"pretraining ({cfg.policy.type}) on {len(demos['episode_ends'])} demonstration episodes ({len(obs)} chunks)"
    )
    loss = bc_loss(cfg.policy, cfg.pretrain)
    batches = demo_batches(obs, chunks, cfg.pretrain.batch_size, device)
    ema, metrics = fit(actor.to(device), batches, loss, cfg.pretrain, cfg.seed, progress, run_dir)
    ema = ema.cpu()
    atomic_save(actor_record(ema, cfg.policy), run_dir / "pretrained.pt")
    atomic_write_text(json.dumps(metrics), run_dir / "pretrain_metrics.json")
    (run_dir / "checkpoints" / "pretrain.pt").unlink(missing_ok=True)  # pretrained.pt supersedes it
    return ema


def pretrain_text_image(cfg: ExperimentConfig, run_dir: Path, device: torch.device, progress: bool = True) -> Actor:
    """Flow matching of the text-conditioned image flow on the shapes world; writes
    ``pretrained.pt`` (the EMA network and its constructor arguments)."""
    from flowrl.algos.image_bc import pretrain_images

    network = build_image_network(cfg)
    size = sum(p.numel() for p in network.parameters())
    tqdm.write(
        f"pretraining (text_image, {size / 1e6:.2f}M parameters) on fresh {cfg.env.image_size}px shapes-world pairs, "
        f"{cfg.pretrain.steps} steps of {cfg.pretrain.batch_size}"
    )
    ema, metrics = pretrain_images(network, cfg, device, progress, run_dir)
    ema = ema.cpu()
    atomic_save(actor_record(ema, cfg.policy), run_dir / "pretrained.pt")
    atomic_write_text(json.dumps(metrics), run_dir / "pretrain_metrics.json")
    (run_dir / "checkpoints" / "pretrain.pt").unlink(missing_ok=True)
    return ema


@holds_run_folder
def pretrain_only(
    cfg: ExperimentConfig, run_dir: Path, progress: bool = True, resume: bool = False
) -> dict[str, float]:
    """``flowrl pretrain``: behaviour cloning, then one evaluation of the pretrained policy.
    ``resume``: continue a stopped pretraining in ``run_dir`` from its checkpoint."""
    if cfg.pretrain is None:
        raise FlowRLError("flowrl pretrain: this experiment has pretrain: null (nothing to pretrain)")
    if resume:
        remove_temporary_files(run_dir)
        if (run_dir / "pretrained.pt").exists():
            raise FlowRLError(f"{run_dir} has finished pretraining (pretrained.pt); fine-tune it with flowrl train")
    save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.seed)
    with graceful_stop():
        pretrain(cfg, run_dir, resolve_device(cfg.device), progress)
    metrics = evaluate_checkpoint(cfg, run_dir / "pretrained.pt", run_dir)
    success = f"success {headline_success(metrics):.2f}, " if reports_success(cfg.env.id) else ""
    print(f"pretrained policy: {run_dir / 'pretrained.pt'} ({success}return {metrics['eval/return']:.3f})")
    return metrics


def initial_actor(cfg: ExperimentConfig, run_dir: Path, device: torch.device, progress: bool) -> Actor:
    """The network to train: policy.pretrained, else this run's pretrained.pt, else pretrain
    now, or fresh weights when the experiment has pretrain: null."""
    if cfg.env.type == "shapes":
        if cfg.policy.pretrained is not None:
            return load_image_network(cfg.policy.pretrained, cfg)
        if (run_dir / "pretrained.pt").exists():
            return load_image_network(run_dir / "pretrained.pt", cfg)
        return build_image_network(cfg) if cfg.pretrain is None else pretrain(cfg, run_dir, device, progress)
    obs_dim, action_dim = env_dims(cfg.env.id, cfg.env.kwargs)
    if cfg.policy.pretrained is not None:
        return load_actor(cfg.policy.pretrained, cfg.policy, obs_dim, action_dim)
    if (run_dir / "pretrained.pt").exists():
        return load_actor(run_dir / "pretrained.pt", cfg.policy, obs_dim, action_dim)
    if cfg.pretrain is None:
        return build_actor(cfg.policy, obs_dim, action_dim)
    return pretrain(cfg, run_dir, device, progress)


@holds_run_folder
def train(cfg: ExperimentConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Pretrain if needed, then fine-tune (PPO or GRPO); prints the evaluation return and
    success before and after.

    ``resume``: continue the run in ``run_dir`` from its last checkpoint (fine-tuning's, or
    pretraining's); without one the fine-tuning starts over and the killed process's logs are
    dropped. The run's config.yaml is rewritten only once the resume has checked out (the
    checkpoints fit the possibly overridden config). SIGINT/SIGTERM stop at the next safe
    point with a checkpoint (``Interrupted``). Holds the run folder's lock (one writer:
    ``flowrl.runlog.run_folder_lock``).
    """
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    checkpoint = _resume_checkpoint(cfg, run_dir) if resume else None
    if not resume:
        save_config(cfg, run_dir / "config.yaml")
    with contextlib.ExitStack() as closing, _events_log(run_dir), graceful_stop():
        trainer = _build_trainer(cfg, run_dir, device, progress, closing)
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint, run_dir / "checkpoints" / "last.pt")
        if resume:  # the resume has checked out: its overrides become the run's config
            save_config(cfg, run_dir / "config.yaml")
        tqdm.write(_banner(cfg, device))
        with _ray_session(cfg):
            result = trainer.run(make_collector(cfg), resumed=resume)
    _print_summary(cfg, run_dir, result)
    return result


def _resume_checkpoint(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any] | None:
    """Resume bookkeeping: the stopped process's temporary files removed, its last fine-tuning
    checkpoint read (None: none yet), and a line saying where the run goes on from."""
    for leftover in remove_temporary_files(run_dir):
        log.info("removed %s, a temporary file left by the stopped process", leftover)
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    if checkpoint is not None:
        tqdm.write(
            f"resuming from {run_dir / 'checkpoints' / 'last.pt'} (iteration {checkpoint['iteration']}, "
            f"env steps {checkpoint['env_steps']})"
        )
        if checkpoint["iteration"] >= cfg.algo.iterations:
            tqdm.write(
                f"this run has done all {cfg.algo.iterations} iterations; to go on, resume with "
                f"algo.iterations=N (N > {cfg.algo.iterations})"
            )
    elif (run_dir / "pretrained.pt").exists():
        tqdm.write(f"no checkpoint in {run_dir / 'checkpoints'} yet: starting the fine-tuning from the beginning")
    return checkpoint


@contextlib.contextmanager
def _events_log(run_dir: Path) -> Iterator[None]:
    """While inside, the flowrl logger's records also go to RUN_DIR/events.log, with their times."""
    events = logging.FileHandler(run_dir / "events.log")
    events.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("flowrl").addHandler(events)
    try:
        yield
    finally:
        logging.getLogger("flowrl").removeHandler(events)
        events.close()


def _build_trainer(
    cfg: ExperimentConfig, run_dir: Path, device: torch.device, progress: bool, closing: contextlib.ExitStack
) -> Trainer:
    """The actor (pretrained if needed), its policy and algorithm, and for shapes the held-out
    evaluator (closed by ``closing``), in a Trainer."""
    actor = initial_actor(cfg, run_dir, device, progress)
    policy = build_policy(cfg, actor).to(device)
    algo = build_algorithm(cfg, policy, actor, device)
    if cfg.learner.num_workers > 1:  # the update runs on Ray actors (started inside the run's Ray session)
        from flowrl.algos.distributed import DataParallelLearner

        build = functools.partial(rank_algorithm, cfg, copy.deepcopy(actor).cpu())
        algo = DataParallelLearner(algo, cfg.learner, build, run_dir)
        closing.callback(algo.close)
    evaluator = None
    if cfg.env.type == "shapes":
        from flowrl.rollout.image_eval import ImageEvaluator

        evaluator = ImageEvaluator(cfg, run_dir)
        closing.callback(evaluator.close)
    return Trainer(cfg, run_dir, policy, algo, device, progress, evaluator)


def _banner(cfg: ExperimentConfig, device: torch.device) -> str:
    """The line that says what runs where, e.g. ``fine-tuning (PPO, ...): learner on cpu, 4 in-process env workers``."""
    kind = "reward" if cfg.env.type == "shapes" else "env"
    workers = cfg.env.reward_workers if cfg.env.type == "shapes" else cfg.env.num_workers
    where = f"{workers} Ray {kind} workers" if cfg.ray.enabled else f"{workers} in-process {kind} workers"
    what = "training" if cfg.pretrain is None and cfg.policy.pretrained is None else "fine-tuning"
    n = cfg.learner.num_workers
    ranks = f"{n} learner ranks ({cfg.learner.resolved_backend}, {cfg.learner.strategy.upper()})"
    learner = f"learner on {device}" if n == 1 else ranks
    return f"{what} ({_method(cfg)}): {learner}, {where}"


def _ray_session(cfg: ExperimentConfig) -> contextlib.AbstractContextManager[Any]:
    """Ray started (or joined) for the run when ``ray.enabled``, else nothing."""
    if not cfg.ray.enabled:
        return contextlib.nullcontext()
    from flowrl.rollout.ray_runtime import ray_session  # Ray is imported only when used

    return ray_session(cfg.ray.address, cfg.ray.num_cpus)


def _print_summary(cfg: ExperimentConfig, run_dir: Path, result: dict[str, Any]) -> None:
    """The evaluation return (and success, where the env reports it) before and after, and the run folder."""
    before, after = result["before"], result["after"]
    success = (
        f" (success {headline_success(before):.2f} -> {headline_success(after):.2f})"
        if reports_success(cfg.env.id)
        else ""
    )
    print(f"return before: {before['eval/return']:.3f} -> after: {after['eval/return']:.3f}{success}")
    print(f"run folder: {run_dir}")


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """A fine-tuning checkpoint, None when there is none yet; CheckpointError when unreadable."""
    if not path.exists():
        return None
    try:
        with warnings.catch_warnings():  # torch warns at length about damaged files
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: say which and what to do
        raise CheckpointError(
            f"{path} is unreadable ({type(exc).__name__}: truncated or corrupt); move it away to restart the "
            "fine-tuning from its beginning"
        ) from None
    if not isinstance(checkpoint, dict) or not {"iteration", "env_steps", "algo"} <= set(checkpoint):
        raise CheckpointError(
            f"{path} is not a flowrl fine-tuning checkpoint of this version (no 'algo'/'iteration' entries); move it "
            "away to restart the fine-tuning, or start a new run from its policy (policy.pretrained)"
        )
    return checkpoint


def build_algorithm(cfg: ExperimentConfig, policy: Policy, actor: Actor, device: torch.device) -> Algorithm:
    """PPO (with a critic on the actor's observations), GRPO, DiffusionNFT, AWM or AC-Flow (a critic
    on the chain's states), from ``cfg.algo``."""
    running = getattr(cfg.policy, "obs_norm", "none") == "running"  # image policies have no observations
    if isinstance(cfg.algo, NFTConfig | AWMConfig):
        from flowrl.algos.awm import AWM
        from flowrl.algos.nft import NFT

        kind = NFT if isinstance(cfg.algo, NFTConfig) else AWM
        return kind(policy, cfg.algo, device, cfg.seed, cfg.env.group_size, running, _sample_bounds(cfg))
    if isinstance(cfg.algo, GRPOConfig):
        from flowrl.algos.grpo import GRPO

        return GRPO(policy, cfg.algo, device, cfg.seed, cfg.env.group_size, running)
    if isinstance(cfg.algo, ACFlowConfig):
        from flowrl.algos.ac_flow import ACFlow, chain_critic

        critic = chain_critic(actor, cfg.algo.critic_hidden_dims).to(device)
        return ACFlow(policy, critic, cfg.algo, device, cfg.seed, running)
    from flowrl.algos.ppo import PPO

    return PPO(policy, build_critic(actor).to(device), cfg.algo, device, cfg.seed, running)


def _sample_bounds(cfg: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What a sample can execute: the image's pixel range [-1, 1] (model space), or a gym env's
    Box action bounds per action dim (None where they are infinite)."""
    if cfg.env.type == "shapes":
        return torch.tensor(-1.0), torch.tensor(1.0)
    env = gym.make(cfg.env.id, **cfg.env.kwargs)
    low, high = (torch.as_tensor(b, dtype=torch.float32) for b in (env.action_space.low, env.action_space.high))
    env.close()
    return (low, high) if bool(torch.isfinite(low).all() and torch.isfinite(high).all()) else None


def rank_algorithm(cfg: ExperimentConfig, actor: Actor, device: torch.device) -> Algorithm:
    """A data-parallel learner rank's algorithm (flowrl.algos.distributed): ``actor`` (a copy of
    the driver's, whose state is loaded over it) in the experiment's policy and algorithm."""
    policy = build_policy(cfg, actor).to(device)
    return build_algorithm(cfg, policy, actor, device)


def _method(cfg: ExperimentConfig) -> str:
    algo = "AC-Flow" if cfg.algo.type == "ac_flow" else cfg.algo.type.upper()
    if cfg.policy.type == "gaussian":
        return f"Gaussian {algo}"
    if cfg.policy.type == "diffusion":
        return f"DPPO, {cfg.policy.denoising_steps} denoising steps" if algo == "PPO" else f"diffusion {algo}"
    m = cfg.mdp
    if cfg.algo.type in LIKELIHOOD_FREE_ALGOS:  # no converter or window: the ODE samples
        return f"{algo}, {cfg.policy.type} flow, K = {cfg.policy.denoising_steps}, {m.solver} ODE sampling"
    window = m.window.type if m.window.type != "sliding" else f"sliding({m.window.size})"
    solver = "" if m.solver == "euler" else f", {m.solver} solver"
    unit = "" if m.sample_unit == "chain" else ", per-step samples"
    return (
        f"{algo}, {cfg.policy.type} flow, K = {cfg.policy.denoising_steps}, {m.converter.type} steps, "
        f"window {window}{solver}{unit}"
    )


def evaluate_checkpoint(
    cfg: ExperimentConfig, checkpoint: str | Path, run_dir: Path | None = None, sampled: bool = False
) -> dict[str, float]:
    """Deterministic evaluation of a checkpoint; shapes: on the held-out prompts, and with
    ``run_dir`` its sample grid goes to ``run_dir/samples``. ``sampled``: with the config's
    stochastic sampler instead (robot tasks; a fresh noise network, e.g. at a fixed std with
    ``mdp.converter.std_min = std_max``), labelled ``eval/sampled``."""
    if sampled and cfg.env.type == "shapes":
        raise FlowRLError("flowrl eval --sampled: the shapes track evaluates the ODE only; drop --sampled")
    if cfg.env.type == "shapes":
        from flowrl.rollout.image_eval import ImageEvaluator

        evaluator = ImageEvaluator(cfg, run_dir)
        try:
            return evaluator(build_policy(cfg, load_image_network(checkpoint, cfg)), 0)
        finally:
            evaluator.close()
    obs_dim, action_dim = env_dims(cfg.env.id, cfg.env.kwargs)
    policy = build_policy(cfg, load_actor(checkpoint, cfg.policy, obs_dim, action_dim))
    metrics = evaluate_policy(
        policy, cfg.env.id, cfg.policy.horizon, cfg.eval.episodes, cfg.seed, cfg.env.kwargs, sampled=sampled
    )
    return {**metrics, "eval/sampled": 1.0} if sampled else metrics


def record_checkpoint(
    cfg: ExperimentConfig,
    checkpoint: str | Path,
    episodes: int | list[int],
    out_dir: Path,
    tensorboard_dir: Path | None = None,
) -> Recording:
    """``flowrl eval --video``: ``evaluate_checkpoint``'s evaluation, with ``episodes`` of it (a
    count: the first ones; or indices) filmed into ``out_dir`` (flowrl.rollout.video); in
    TensorBoard under the tag ``eval/video/CHECKPOINT_NAME``."""
    if cfg.env.type == "shapes":
        raise FlowRLError(
            "flowrl eval --video: the shapes track has no episodes to film; its evaluation writes sample grids "
            "(RUN/samples) instead"
        )
    obs_dim, action_dim = env_dims(cfg.env.id, cfg.env.kwargs)
    policy = build_policy(cfg, load_actor(checkpoint, cfg.policy, obs_dim, action_dim))
    return record_episodes(
        policy,
        cfg.env.id,
        cfg.policy.horizon,
        episodes,
        cfg.seed,
        cfg.env.kwargs,
        out_dir,
        eval_episodes=cfg.eval.episodes,
        tensorboard_dir=tensorboard_dir,
        tag=f"eval/video/{Path(checkpoint).stem}",
    )


def collect(
    run_dir: str | Path,
    out: str | Path,
    episodes: int,
    action_noise: float,
    seed: int,
    checkpoint: str | None = None,
    progress: bool = True,
    actions: Actions = "deterministic",
) -> dict[str, float]:
    """``flowrl collect``: a demonstration dataset from a trained run's policy (see
    flowrl.rollout.demos); ``actions``: the policy's deterministic actions or draws from its
    own stochastic policy. The file records its provenance (env, policy, its training
    iterations, these settings); returns the dataset's return statistics."""
    from flowrl.core.demos_file import save_demos
    from flowrl.rollout.demos import collect_demos

    cfg = load_run_config(run_dir, [])
    path = Path(checkpoint) if checkpoint else Path(run_dir) / "policy.pt"
    if not path.is_file():
        raise FlowRLError(f"{path} not found: train the run to its end first, or pass --checkpoint")
    obs_dim, action_dim = env_dims(cfg.env.id, cfg.env.kwargs)
    policy = build_policy(cfg, load_actor(path, cfg.policy, obs_dim, action_dim))
    demos = collect_demos(policy, cfg.env.id, episodes, seed, action_noise, cfg.env.kwargs, progress, actions)
    returns = demos["episode_returns"]
    provenance: dict[str, Any] = {
        "env_id": cfg.env.id,
        "env_kwargs": json.dumps(cfg.env.kwargs, sort_keys=True),
        "policy": path.resolve(),
        "actions": actions,
        "action_noise": action_noise,
        "episodes": episodes,
        "seed": seed,
    }
    if checkpoint is None:  # the run's final policy: trained for all its iterations
        provenance["policy_iterations"] = cfg.algo.iterations
    written = save_demos(demos, out, **provenance)
    stats = {
        "episodes": float(len(returns)),
        "steps": float(len(demos["observations"])),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
    }
    how = "sampled actions" if actions == "sample" else "deterministic actions"
    print(
        f"wrote {written}: {len(returns)} episodes, {len(demos['observations'])} steps, return "
        f"{stats['return_mean']:.1f} +- {stats['return_std']:.1f} ({how}"
        + (f", action noise {action_noise})" if action_noise else ")")
    )
    return stats


def load_run_config(run_dir: str | Path, overrides: list[str]) -> ExperimentConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FlowRLError(f"{run_dir}: no config.yaml there; is it a flowrl run folder?")
    return load_config(path, overrides)
