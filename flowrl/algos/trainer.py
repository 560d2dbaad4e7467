"""The Trainer owns the fine-tuning loop and nothing else; it imports no algorithm.

    collect -> non-finite reward check -> advantages (Algorithm.prepare) -> ratio = 1 check
    (where the samples carry log-probs) -> update epochs (Algorithm.update) -> end_iteration:
    evaluate when due, log, checkpoint

An algorithm (ppo.py, grpo.py) decides how to collect (T steps of running episodes, or one
episode per env from group-shared resets), how to turn the rollout into advantages, and how
to update; the trainer runs the same loop for all of them.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

import envs as flowrl_envs
from flowrl.algos.policy_gradient import NumericalError, check_ratio_of
from flowrl.config import ExperimentConfig
from flowrl.core.batch import TensorBatch
from flowrl.errors import CheckpointError, FlowRLError, Interrupted, RewardError
from flowrl.models.build import actor_record
from flowrl.models.policy import Policy
from flowrl.rollout.evaluation import EvalEnvs, evaluate_policy, headline_success
from flowrl.rollout.rollout import Collector, Rollout
from flowrl.runlog import RunLog, atomic_save
from flowrl.runtime import progress as progress_bar
from flowrl.runtime import stop_requested


class EnvRewardError(RewardError, RuntimeError):
    """The env returned a non-finite reward (a ``flowrl.errors.RewardError``, as a reward model's
    failure is, so one ``except RewardError`` catches both)."""


class ObservationError(FlowRLError, RuntimeError):
    """The env returned a non-finite observation."""


class Batch(Protocol):
    cond: Any
    samples: TensorBatch


class Algorithm(Protocol):
    """``stores_log_probs`` (a class attribute, True when absent): False for algorithms whose
    samples carry no log-probs (DiffusionNFT, AWM), for which the ratio = 1 check does not apply."""

    name: str

    def collect(self, collector: Collector, policy: Policy, iteration: int) -> Rollout: ...

    def prepare(self, rollout: Rollout) -> Batch:
        """Advantages (and whatever the update needs) over the rollout, flattened."""
        ...

    def update(self, batch: Batch, iteration: int) -> dict[str, float]:
        """Epochs of minibatch updates; returns metrics."""
        ...

    def set_progress(self, fraction_done: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_actions(rollout: Rollout, policy: Policy, iteration: int, lr: float) -> None:
    """Non-finite sampled actions: the policy's weights have blown up (they stay finite
    numbers but overflow in the forward pass)."""
    actions = getattr(rollout.samples, "final", None)
    if actions is None:
        return
    bad = ~torch.isfinite(actions).flatten(2).all(dim=2) & rollout.valid
    if bool(bad.any()):
        t, n = bad.nonzero()[0].tolist()
        largest = max(float(p.detach().abs().max()) for p in policy.parameters())
        raise NumericalError(
            f"the policy sampled non-finite actions in iteration {iteration} (policy step {t}, env {n}); its largest "
            f"weight is {largest:.3g}: the learning rates are likely too high (algo.actor_lr={lr:g}). The last good "
            "checkpoint is kept: resume it with lower ones (flowrl train --resume RUN algo.actor_lr=...)"
        )


def check_weights(policy: Policy, iteration: int, lr: float) -> None:
    """Weights that became non-finite in an update stop the run before anything saves them."""
    bad = nonfinite_entries(policy.state_dict())
    if bad:
        raise NumericalError(
            f"the policy's weights became non-finite in the update of iteration {iteration} ({bad[0]}, {len(bad)} "
            f"tensors): the learning rates are likely too high (algo.actor_lr={lr:g}). The last good checkpoint is "
            "kept: resume it with lower ones (flowrl train --resume RUN algo.actor_lr=...)"
        )


def check_rewards(rollout: Rollout, env_id: str = "the env") -> None:
    """A non-finite reward or observation stops the run, naming where it came from."""
    bad = ~torch.isfinite(rollout.rewards) & rollout.valid
    if bool(bad.any()):
        t, n = bad.nonzero()[0].tolist()
        raise EnvRewardError(
            f"{env_id} returned reward {rollout.rewards[t, n].item()} at policy step {t} of env {n}; "
            "fix the env's reward (flowrl does not replace bad rewards)"
        )
    for name, obs in (("observation", rollout.obs), ("next observation", rollout.next_obs)):
        bad = ~torch.isfinite(obs).flatten(2).all(dim=2) & rollout.valid
        if bool(bad.any()):
            t, n = bad.nonzero()[0].tolist()
            raise ObservationError(
                f"{env_id} returned a non-finite {name} at policy step {t} of env {n} "
                f"({obs[t, n].flatten()[:6].tolist()}...); fix the env (flowrl does not replace bad observations)"
            )


def nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) state dict that hold NaN or inf."""
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, dict):
        return [n for k, v in state.items() for n in nonfinite_entries(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(state, (list, tuple)):
        return [n for i, v in enumerate(state) for n in nonfinite_entries(v, f"{prefix}[{i}]")]
    return []


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if rollout.episode_returns:
        metrics.update(
            {
                "charts/episode_return": float(np.mean(rollout.episode_returns)),
                "charts/success_rate": float(np.mean(rollout.episode_successes)),
                "charts/episodes": float(len(rollout.episode_returns)),
            }
        )
    if rollout.episode_successes_once:  # only envs that report success_once (ManiSkill)
        metrics["charts/success_once"] = float(np.mean(rollout.episode_successes_once))
    nfe = getattr(rollout.samples, "nfe", None)
    if nfe is not None:
        metrics["sampler/nfe_per_sample"] = float(nfe[rollout.valid].mean())
    metrics.update(rollout.metrics)
    return metrics


class Evaluator(Protocol):
    def __call__(self, policy: Policy, iteration: int, env_steps: int) -> dict[str, float]:
        """Deterministic evaluation metrics (``eval/return``, ``eval/success_rate``, ...)."""
        ...


class Trainer:
    """Fine-tunes ``policy`` with ``algo`` on ``collector``'s envs; writes the run folder."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: Path,
        policy: Policy,
        algo: Algorithm,
        device: torch.device,
        progress: bool = True,
        evaluator: Evaluator | None = None,
    ) -> None:
        """``evaluator``: how to evaluate (the image track's held-out prompts); None = the gym
        env's deterministic episodes (``evaluate_policy``)."""
        self.cfg, self.run_dir, self.policy, self.algo = cfg, run_dir, policy, algo
        self.evaluator = evaluator
        self.device, self.progress = device, progress
        self.loaded = False  # a checkpoint was loaded
        # Rollouts run on the CPU (like remote workers), the learner may sit on the GPU; a batched
        # simulator (env.batched) runs on the learner's device, and so does its policy.
        on_device = device.type == "cpu" or getattr(cfg.env, "batched", False)
        self.rollout_policy = policy if on_device else copy.deepcopy(policy).cpu()
        self.iteration, self.env_steps = 0, 0
        self.before: dict[str, float] | None = None
        self.last_eval: dict[str, float] | None = None
        self.eval_envs: EvalEnvs | None = None  # eval.keep_envs: made at the first evaluation
        # Envs without a success signal (MuJoCo locomotion) would always show 0.00.
        self.reports_success = cfg.env.type == "shapes" or cfg.env.id in flowrl_envs.REPORTS_SUCCESS

    def evaluate(self) -> dict[str, float]:
        # an algorithm that keeps an EMA of the weights (GRPO's ema_decay) is evaluated with it
        policy = getattr(self.algo, "eval_policy", None) or self.rollout_policy
        if self.evaluator is not None:
            return self.evaluator(policy, self.iteration, self.env_steps)
        env, horizon, episodes = self.cfg.env, self.cfg.policy.horizon, self.cfg.eval.episodes
        if self.cfg.eval.keep_envs and self.eval_envs is None:
            self.eval_envs = EvalEnvs(env.id, horizon, episodes, env.kwargs)  # closed at the end of ``run``
        return evaluate_policy(policy, env.id, horizon, episodes, self.cfg.seed, env.kwargs, kept=self.eval_envs)

    def save_checkpoint(self) -> None:
        """Writes checkpoints/last.pt atomically; never with non-finite weights (the last good
        checkpoint stays)."""
        state = self.algo.state_dict()
        bad = nonfinite_entries(state)
        if bad:
            raise NumericalError(
                f"non-finite values in {bad[0]} (and {len(bad) - 1} more) at iteration {self.iteration}: no checkpoint "
                "written, the last good one is kept; lower the learning rates and resume from it "
                "(flowrl train --resume RUN algo.actor_lr=...)"
            )
        atomic_save(
            {
                "iteration": self.iteration,
                "env_steps": self.env_steps,
                "eval_before": self.before,
                "eval_last": self.last_eval,
                "algo": state,
                **actor_record(self.policy.network, self.cfg.policy),
            },
            self.run_dir / "checkpoints" / "last.pt",
        )

    def load_checkpoint(self, checkpoint: dict[str, Any], source: Path | str = "the checkpoint") -> None:
        """Continue from a checkpoint of this class; CheckpointError when it does not fit."""
        try:
            self.algo.load_state_dict(checkpoint["algo"])
        except (KeyError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{source} does not fit this experiment ({first}); resume without the overrides that change the "
                "policy, the algorithm or their sizes"
            ) from None
        self.iteration, self.env_steps = checkpoint["iteration"], checkpoint["env_steps"]
        self.before, self.last_eval = checkpoint["eval_before"], checkpoint["eval_last"]
        if self.rollout_policy is not self.policy:
            self.rollout_policy.load_state_dict(self.policy.state_dict())
        self.loaded = True

    def run(self, collector: Collector, resumed: bool = False) -> dict[str, Any]:
        """Train to ``algo.iterations``; returns {"before": eval metrics, "after": eval metrics}.

        Continues after the iteration of a loaded checkpoint (``load_checkpoint``); ``resumed``
        without one starts over and drops what a killed process logged.
        """
        cfg, algo, policy = self.cfg, self.algo, self.policy
        iterations = cfg.algo.iterations
        self.collector = collector
        collector.reset(epoch=self.iteration)
        log = RunLog(self.run_dir, resume_after=self.env_steps if self.loaded else (-1 if resumed else None))
        try:
            self.evaluate_before(log)
            bar = progress_bar(
                range(self.iteration, iterations),
                algo.name.lower(),
                self.progress,
                initial=self.iteration,
                total=iterations,
            )
            for it in bar:
                t0 = time.perf_counter()
                rollout = algo.collect(self.collector, self.rollout_policy, it)
                check_actions(rollout, policy, it, cfg.algo.actor_lr)
                check_rewards(rollout, cfg.env.id)
                t1 = time.perf_counter()
                algo.set_progress(it / iterations)
                batch = algo.prepare(rollout)  # advantages
                ratio_metrics = (
                    check_ratio_of(policy, batch.cond, batch.samples, cfg.algo, algo.name)
                    if getattr(algo, "stores_log_probs", True)
                    else {}
                )
                metrics = algo.update(batch, it)
                self.publish_weights(it)
                t2 = time.perf_counter()
                times = {
                    "time/collect_s": t1 - t0,
                    "time/update_s": t2 - t1,
                    "time/env_steps_per_s": rollout.env_steps / max(t2 - t0, 1e-9),
                }
                self.end_iteration(rollout, {**metrics, **ratio_metrics}, times, log, bar)
        finally:
            log.close()
            self.collector.close()
            if self.eval_envs is not None:
                self.eval_envs.close()
        self.save_policy()
        return {"before": self.before, "after": self.last_eval}

    def evaluate_before(self, log: RunLog) -> None:
        """The evaluation before training (once per run: a resumed run keeps its own)."""
        if self.before is None:
            self.before = self.evaluate()
            log.log(0, self.before, iteration=0)
            success = f", success {headline_success(self.before):.2f}" if self.reports_success else ""
            tqdm.write(f"before training: return {self.before['eval/return']:.3f}{success}")
        self.last_eval = self.last_eval or self.before

    def publish_weights(self, iteration: int) -> None:
        """After an update: stop on non-finite weights, else give them to the CPU copy that
        collects and evaluates."""
        check_weights(self.policy, iteration, self.cfg.algo.actor_lr)
        if self.rollout_policy is not self.policy:
            self.rollout_policy.load_state_dict(self.policy.state_dict())

    def end_iteration(
        self, rollout: Rollout, metrics: dict[str, float], times: dict[str, float], log: RunLog, bar: tqdm
    ) -> None:
        """Count the iteration, then log its metrics (update, rollout, evaluation when due,
        ``times``), show them, checkpoint when due, and stop here when a stop was requested."""
        cfg, iterations = self.cfg, self.cfg.algo.iterations
        self.iteration, self.env_steps = self.iteration + 1, self.env_steps + rollout.env_steps
        metrics = {**metrics, **rollout_metrics(rollout)}
        if hasattr(self.collector, "restarts"):
            metrics["ray/worker_restarts"] = float(self.collector.restarts)
        if self.iteration % cfg.eval.every == 0 or self.iteration == iterations:
            self.last_eval = self.evaluate()
            metrics.update(self.last_eval)
        log.log(self.env_steps, {**metrics, **times}, iteration=self.iteration)
        assert self.last_eval is not None
        shown = {"success": f"{headline_success(self.last_eval):.2f}"} if self.reports_success else {}
        bar.set_postfix(**shown, ret=f"{self.last_eval['eval/return']:.2f}", refresh=False)
        if self.iteration % cfg.checkpoint_every == 0 or self.iteration == iterations or stop_requested():
            self.save_checkpoint()
        if stop_requested() and self.iteration < iterations:
            raise Interrupted(
                f"stopped after iteration {self.iteration} of {iterations} (checkpoint saved); resume with: "
                f"flowrl train --resume {self.run_dir}"
            )

    def save_policy(self) -> None:
        """The evaluated policy as policy.pt (never with non-finite weights): the trained one, or
        its EMA where the algorithm evaluates an EMA (GRPO's ema_decay), so that ``flowrl eval
        RUN`` scores what the run's evaluations scored; the checkpoint keeps both."""
        network = (getattr(self.algo, "eval_policy", None) or self.policy).network
        bad = nonfinite_entries(network.state_dict())
        if bad:  # unreachable while the guards hold; never write such a policy
            raise NumericalError(f"the final policy has non-finite weights ({bad[0]}): policy.pt not written")
        atomic_save(actor_record(network, self.cfg.policy), self.run_dir / "policy.pt")
