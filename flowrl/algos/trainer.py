"""The Trainer owns the fine-tuning loop and nothing else; it imports no algorithm.

    collect -> non-finite reward check -> advantages (Algorithm.prepare) -> ratio = 1 check
    -> update epochs (Algorithm.update) -> log -> evaluate -> checkpoint

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

from flowrl.algos.policy_gradient import check_ratio
from flowrl.config import ExperimentConfig
from flowrl.core.batch import TensorBatch
from flowrl.errors import FlowRLError
from flowrl.models.build import actor_record
from flowrl.models.policy import Policy
from flowrl.rollout.collector import Collector, Rollout, evaluate_policy
from flowrl.runlog import RunLog, atomic_save
from flowrl.runtime import progress as progress_bar


class RewardError(FlowRLError, RuntimeError):
    """The env returned a non-finite reward."""


class Batch(Protocol):
    cond: Any
    samples: TensorBatch


class Algorithm(Protocol):
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


def check_rewards(rollout: Rollout) -> None:
    """A non-finite reward stops the run, naming where it came from."""
    bad = ~torch.isfinite(rollout.rewards) & rollout.valid
    if bool(bad.any()):
        t, n = bad.nonzero()[0].tolist()
        raise RewardError(
            f"the env returned reward {rollout.rewards[t, n].item()} at policy step {t} of env {n}; "
            "fix the env's reward (flowrl does not replace bad rewards)"
        )


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
    nfe = getattr(rollout.samples, "nfe", None)
    if nfe is not None:
        metrics["sampler/nfe_per_sample"] = float(nfe[rollout.valid].mean())
    return metrics


class Trainer:
    """Fine-tunes ``policy`` with ``algo`` on ``collector``'s envs; writes the run folder."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: Path,
        policy: Policy,
        algo: Algorithm,
        collector: Collector,
        device: torch.device,
        progress: bool = True,
    ) -> None:
        self.cfg, self.run_dir, self.policy, self.algo = cfg, run_dir, policy, algo
        self.collector, self.device, self.progress = collector, device, progress
        # Rollouts run on the CPU (like remote workers); the learner may sit on the GPU.
        self.rollout_policy = policy if device.type == "cpu" else copy.deepcopy(policy).cpu()
        self.iteration, self.env_steps = 0, 0
        self.before: dict[str, float] | None = None
        self.last_eval: dict[str, float] | None = None

    def evaluate(self) -> dict[str, float]:
        env = self.cfg.env
        return evaluate_policy(
            self.rollout_policy, env.id, self.cfg.policy.horizon, self.cfg.eval.episodes, self.cfg.seed, env.kwargs
        )

    def save_checkpoint(self) -> None:
        atomic_save(
            {
                "iteration": self.iteration,
                "env_steps": self.env_steps,
                "eval_before": self.before,
                "eval_last": self.last_eval,
                "algo": self.algo.state_dict(),
                **actor_record(self.policy.network, self.cfg.policy),
            },
            self.run_dir / "checkpoints" / "last.pt",
        )

    def load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "algo" not in checkpoint:
            raise FlowRLError(
                "this checkpoint was written by an older flowrl (no 'algo' entry); start a new run from its "
                "policy instead: policy.pretrained=RUN/policy.pt"
            )
        self.algo.load_state_dict(checkpoint["algo"])
        self.iteration, self.env_steps = checkpoint["iteration"], checkpoint["env_steps"]
        self.before, self.last_eval = checkpoint["eval_before"], checkpoint["eval_last"]
        if self.rollout_policy is not self.policy:
            self.rollout_policy.load_state_dict(self.policy.state_dict())

    def run(self, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train to ``algo.iterations``; returns {"before": eval metrics, "after": eval metrics}.

        ``resume``: a checkpoint written by this class; training continues after its iteration.
        """
        cfg, algo, policy = self.cfg, self.algo, self.policy
        iterations = cfg.algo.iterations
        if resume is not None:
            self.load_checkpoint(resume)
        self.collector.reset(epoch=self.iteration)
        log = RunLog(self.run_dir, resume_after=self.env_steps if resume is not None else None)
        try:
            if self.before is None:
                self.before = self.evaluate()
                log.log(0, self.before, iteration=0)
                tqdm.write(
                    f"before training: return {self.before['eval/return']:.3f}, "
                    f"success {self.before['eval/success_rate']:.2f}"
                )
            self.last_eval = self.last_eval or self.before
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
                check_rewards(rollout)
                t1 = time.perf_counter()
                algo.set_progress(it / iterations)
                batch = algo.prepare(rollout)
                ratio_dev = check_ratio(policy, batch.cond, batch.samples, cfg.algo.ratio_check_tol, algo.name)
                metrics = algo.update(batch, it)
                if self.rollout_policy is not policy:  # the CPU copy that collects and evaluates
                    self.rollout_policy.load_state_dict(policy.state_dict())
                t2 = time.perf_counter()
                self.iteration, self.env_steps = it + 1, self.env_steps + rollout.env_steps
                metrics["train/ratio_check_dev"] = ratio_dev
                metrics.update(rollout_metrics(rollout))
                if hasattr(self.collector, "restarts"):
                    metrics["ray/worker_restarts"] = float(self.collector.restarts)
                if self.iteration % cfg.eval.every == 0 or self.iteration == iterations:
                    self.last_eval = self.evaluate()
                    metrics.update(self.last_eval)
                metrics.update(
                    {
                        "time/collect_s": t1 - t0,
                        "time/update_s": t2 - t1,
                        "time/env_steps_per_s": rollout.env_steps / max(t2 - t0, 1e-9),
                    }
                )
                log.log(self.env_steps, metrics, iteration=self.iteration)
                bar.set_postfix(
                    success=f"{self.last_eval['eval/success_rate']:.2f}",
                    ret=f"{self.last_eval['eval/return']:.2f}",
                    refresh=False,
                )
                if self.iteration % cfg.checkpoint_every == 0 or self.iteration == iterations:
                    self.save_checkpoint()
        finally:
            log.close()
            self.collector.close()
        atomic_save(actor_record(policy.network, cfg.policy), self.run_dir / "policy.pt")
        return {"before": self.before, "after": self.last_eval}
