"""RayCollector: env workers as Ray actors, same Rollout as the in-process collector.

Each EnvWorker actor owns one EnvShard (a vector of envs + the seeded noise generator) and
runs the policy itself: per iteration the learner puts the weights in the object store once
and each worker collects all its steps locally, so there is no Ray round trip per env step.
Worker i of a RayCollector and shard i of an InProcessCollector are seeded alike, so with
the same seed both return identical rollouts.

A worker that dies (process killed) or whose env raises is replaced by a fresh actor that
redoes its share of the iteration; the event is logged with the worker's index and cause.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from flowrl.errors import FlowRLError
from flowrl.models.policy import Policy, worker_state
from flowrl.rollout.ray_runtime import describe_failure
from flowrl.rollout.rollout import Rollout
from flowrl.rollout.shard import EnvShard, EnvSpec

log = logging.getLogger("flowrl")

# What an EnvWorker measured of one collection (seconds): loading the weights, collecting.
WORKER_TIMES = ("ray/worker_load_s", "ray/worker_collect_s")


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, a dict or list of them, a TensorBatch or
    Rollout dataclass): what a transfer of it carries, give or take the pickling's framing."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if dataclasses.is_dataclass(value):
        return sum(tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


class WorkerError(FlowRLError):
    """A worker failed more often than ray.max_restarts allows."""


class EnvWorker:
    """Body of the env-worker actor (``ray.remote(EnvWorker)``): the env shard of ``spec``."""

    def __init__(self, spec: EnvSpec) -> None:
        torch.set_num_threads(1)  # small policies; more threads would fight the other workers
        self.shard = EnvShard(spec)
        self.policy: Policy | None = None

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy.cpu()

    def reset(self, epoch: int) -> None:
        self.shard.reset(epoch)

    def collect(self, weights: dict[str, torch.Tensor], num_steps: int, iteration: int) -> Rollout:
        return self._timed(weights, "collect", num_steps, iteration)

    def collect_episodes(self, weights: dict[str, torch.Tensor], max_steps: int, iteration: int) -> Rollout:
        return self._timed(weights, "collect_episodes", max_steps, iteration)

    def _timed(self, weights: dict[str, torch.Tensor], call: str, steps: int, iteration: int) -> Rollout:
        """The shard's ``call`` with the policy sent once (``set_policy``) and this iteration's
        ``weights``; the seconds spent loading the weights and collecting ride along in the
        rollout's metrics (WORKER_TIMES), which the RayCollector takes out before joining."""
        if self.policy is None:
            raise RuntimeError(f"EnvWorker.{call} before set_policy")
        start = time.perf_counter()
        self.policy.load_state_dict(weights)
        loaded = time.perf_counter()
        rollout = getattr(self.shard, call)(self.policy, steps, iteration)
        rollout.metrics.update({WORKER_TIMES[0]: loaded - start, WORKER_TIMES[1]: time.perf_counter() - loaded})
        return rollout

    def where(self) -> dict[str, Any]:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


class RayCollector:
    """Collector running the envs of ``spec`` in ``num_workers`` EnvWorker actors, spread over
    the cluster's nodes; worker i owns shard i of ``spec.shards(num_workers)``."""

    def __init__(self, spec: EnvSpec, num_workers: int, cpus_per_worker: float = 1.0, max_restarts: int = 3) -> None:
        self._specs = spec.shards(num_workers)
        if not ray.is_initialized():
            raise RuntimeError("RayCollector needs a running Ray (flowrl.rollout.ray_runtime.ray_session)")
        need, have = num_workers * cpus_per_worker, ray.cluster_resources().get("CPU", 0.0)
        if need > have:
            raise FlowRLError(
                f"{num_workers} env workers x {cpus_per_worker:g} CPUs need {need:g} CPUs, the Ray cluster has "
                f"{have:g}: lower env.num_workers or ray.cpus_per_worker, or add nodes"
            )
        self._actor = ray.remote(EnvWorker).options(num_cpus=cpus_per_worker, scheduling_strategy="SPREAD")
        self.max_restarts = max_restarts
        self.restarts = 0
        self._policy_ref: ray.ObjectRef | None = None
        self._epoch = 0
        # The last collection's transfers (bytes, ms): see _collect; logged by nobody, read by the bench.
        self.transfer: dict[str, float] = {}
        self.workers = [self._start(i) for i in range(num_workers)]
        try:
            self._run("where", ())  # surfaces a worker that cannot even start (bad env id or kwargs)
        except WorkerError:
            self.close()
            raise

    def _start(self, index: int):
        return self._actor.remote(self._specs[index])

    def _run(self, method: str, args: tuple, iteration: int | None = None) -> list[Any]:
        """Call ``method`` on every worker in parallel; results in worker order."""
        futures = [getattr(w, method).remote(*args) for w in self.workers]
        results = []
        for index, future in enumerate(futures):
            try:
                results.append(ray.get(future))
            except (RayActorError, RayTaskError) as exc:
                results.append(self._recover(index, method, args, iteration, exc))
        return results

    def _recover(self, index: int, method: str, args: tuple, iteration: int | None, exc: Exception) -> Any:
        """Replace failed worker ``index`` by a fresh actor (new env seeds, policy re-sent) and
        redo its call, up to ``max_restarts`` times."""
        when = f"iteration {iteration}" if iteration is not None else "set-up"
        for attempt in range(1, self.max_restarts + 1):
            self.restarts += 1
            log.warning(
                "env worker %d failed in %s (%s): %s; restarting it (attempt %d of %d) and redoing its share",
                index,
                method,
                when,
                describe_failure(exc),
                attempt,
                self.max_restarts,
            )
            ray.kill(self.workers[index], no_restart=True)
            worker = self.workers[index] = self._start(index)
            calls = []
            if self._policy_ref is not None and method != "set_policy":
                calls.append(worker.set_policy.remote(self._policy_ref))
            if method != "reset":
                calls.append(worker.reset.remote(self._epoch * 1000 + self.restarts))
            calls.append(getattr(worker, method).remote(*args))
            try:
                return ray.get(calls)[-1]
            except (RayActorError, RayTaskError) as again:
                exc = again
        raise WorkerError(
            f"env worker {index} failed {self.max_restarts + 1} times in a row ({method}, {when}); last cause: "
            f"{describe_failure(exc)}. Fix the env, or raise ray.max_restarts if it is only flaky"
        )

    def reset(self, epoch: int) -> None:
        self._epoch = epoch
        self._run("reset", (epoch,))

    def collect(self, policy: Policy, num_steps: int, iteration: int) -> Rollout:
        return self._collect("collect", policy, num_steps, iteration)

    def collect_episodes(self, policy: Policy, max_steps: int, iteration: int) -> Rollout:
        return self._collect("collect_episodes", policy, max_steps, iteration)

    def _collect(self, method: str, policy: Policy, num_steps: int, iteration: int) -> Rollout:
        if self._policy_ref is None:
            # The module (architecture, sampler) travels once; the compact state every iteration.
            self._policy_ref = ray.put(copy.deepcopy(policy).cpu())
            self._run("set_policy", (self._policy_ref,))
        start = time.perf_counter()
        state = worker_state(policy)
        weights = ray.put(state)
        put = time.perf_counter()
        parts = self._run(method, (weights, num_steps, iteration), iteration)
        done = time.perf_counter()
        times = [[p.metrics.pop(key, 0.0) for p in parts] for key in WORKER_TIMES]
        self.transfer = {
            "weights_bytes": float(tensor_bytes(state)),
            "weights_put_ms": 1e3 * (put - start),
            "worker_load_ms": 1e3 * max(times[0]),
            "rollout_bytes": float(sum(tensor_bytes(p) for p in parts)),
            # The iteration's wall time beyond the slowest worker's loading and collecting: sending
            # the call, fetching the weights, and the rollouts' way back (pickling, the object store).
            "overhead_ms": 1e3 * (done - put - max(a + b for a, b in zip(*times, strict=True))),
        }
        return Rollout.concat_envs(parts)

    def where(self) -> list[dict[str, Any]]:
        """Node id and pid of every worker."""
        return ray.get([w.where.remote() for w in self.workers])

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
