"""RewardPool: reward models on Ray actors, scoring batch i while the caller makes batch i+1.

``submit(batch)`` returns a future at once; ``result(future)`` waits for the scores: the
model's RewardOutput (scores and details), or a float32 ``[B]`` tensor for a model that returns
plain scores. Errors name the model by its ``name`` attribute when it has one. A worker
that dies or raises is restarted and the batch re-scored, up to ``max_retries`` times; after
that the failure is raised (RewardError), never turned into a reward of 0. A non-finite score
is raised at once. With ``use_ray=False`` the same interface scores in this process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from flowrl.rewards import RewardError, RewardFactory, RewardOutput, check_scores

log = logging.getLogger("flowrl")


class RewardWorker:
    """Body of the reward actor: builds its model once from the factory, then scores batches."""

    def __init__(self, factory: RewardFactory, own_process: bool = False) -> None:
        if own_process:  # a Ray actor: one thread each; in-process, the learner's threads stay as set
            torch.set_num_threads(1)
        self.model = factory()

    def score(self, batch: Any) -> tuple[str | None, Any]:
        """(the model's name or None, its scores with tensors moved to the CPU)."""
        with torch.no_grad():
            scores = self.model(batch)
        if isinstance(scores, RewardOutput):
            scores = RewardOutput(_cpu(scores.scores), {k: _cpu(v) for k, v in scores.details.items()})
        return getattr(self.model, "name", None), _cpu(scores)


def _cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


@dataclass
class RewardFuture:
    """A batch being scored: ``RewardPool.result`` turns it into ``[B]`` scores."""

    batch: Any
    worker: int
    ref: Any = None  # a Ray ObjectRef, or (model name, scores) when scored in-process
    error: BaseException | None = None


def _batch_size(batch: Any) -> int | None:
    try:
        return len(batch)
    except TypeError:
        return None


class RewardPool:
    """``num_workers`` reward workers, used round-robin.

    gpu_fraction: GPU share per worker; None = 1 / num_workers of a GPU when the Ray
    cluster has GPUs, else 0.
    """

    def __init__(
        self,
        factory: RewardFactory,
        num_workers: int = 1,
        use_ray: bool = True,
        gpu_fraction: float | None = None,
        max_retries: int = 2,
        name: str = "reward model",
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"RewardPool needs num_workers >= 1, got {num_workers}")
        self.factory, self.use_ray, self.max_retries, self.name = factory, use_ray, max_retries, name
        self.retries = 0
        self._next = 0
        if use_ray:
            import ray

            if not ray.is_initialized():
                raise RuntimeError("RewardPool(use_ray=True) needs a running Ray (ray_session)")
            if gpu_fraction is None:
                gpu_fraction = 1.0 / num_workers if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            self._actor = ray.remote(RewardWorker).options(num_cpus=0, num_gpus=gpu_fraction)
            self.workers = [self._actor.remote(factory, own_process=True) for _ in range(num_workers)]
        else:
            self.workers = [RewardWorker(factory) for _ in range(num_workers)]

    def submit(self, batch: Any) -> RewardFuture:
        """Start scoring ``batch``; returns at once when on Ray."""
        index = self._next
        self._next = (self._next + 1) % len(self.workers)
        return self._send(batch, index)

    def _send(self, batch: Any, index: int) -> RewardFuture:
        future = RewardFuture(batch, index)
        if self.use_ray:
            future.ref = self.workers[index].score.remote(batch)
        else:
            try:
                future.ref = self.workers[index].score(batch)
            except Exception as exc:  # noqa: BLE001 - retried in result(), then raised
                future.error = exc
        return future

    def result(self, future: RewardFuture) -> RewardOutput | torch.Tensor:
        """The checked scores of a submitted batch: the model's RewardOutput, or float32 ``[B]``
        scores for a model that returns plain scores."""
        source = f"{self.name} (worker {future.worker})"
        for attempt in range(self.max_retries + 1):
            try:
                model_name, scores = self._wait(future)
                break
            except RewardError:
                raise
            except Exception as exc:  # noqa: BLE001 - the model's own failure, reported below
                cause = _describe(exc, self.use_ray)
                if attempt == self.max_retries:
                    raise RewardError(
                        f"{source} failed {attempt + 1} times on the same batch; last cause: {cause}"
                    ) from None
                self.retries += 1
                log.warning(
                    "%s failed: %s; restarting it and re-scoring the batch (retry %d of %d)",
                    source,
                    cause,
                    attempt + 1,
                    self.max_retries,
                )
                self._restart(future.worker)
                future = self._send(future.batch, future.worker)
        if model_name:
            source = f"{self.name} {model_name!r} (worker {future.worker})"
        return check_scores(scores, _batch_size(future.batch), source)

    def score(self, batch: Any) -> RewardOutput | torch.Tensor:
        return self.result(self.submit(batch))

    def _wait(self, future: RewardFuture) -> Any:
        if future.error is not None:
            raise future.error
        if self.use_ray:
            import ray

            return ray.get(future.ref)
        return future.ref

    def _restart(self, index: int) -> None:
        if self.use_ray:
            import ray

            ray.kill(self.workers[index], no_restart=True)
            self.workers[index] = self._actor.remote(self.factory, own_process=True)
        else:
            self.workers[index] = RewardWorker(self.factory)

    def close(self) -> None:
        if self.use_ray:
            import ray

            for w in self.workers:
                ray.kill(w, no_restart=True)
        self.workers = []


def _describe(exc: BaseException, on_ray: bool) -> str:
    if on_ray:
        from flowrl.rollout.ray_runtime import describe_failure

        return describe_failure(exc)
    return f"{type(exc).__name__}: {exc}"[:300]
