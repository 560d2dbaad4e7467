"""Soak: the Ray collector (2 env workers) collecting for many iterations, new weights every
iteration as in training, keeps the memory of the driver, of each worker and of Ray's object
store flat.

The default run does 1200 iterations (~1.5 min on the 2-core CI machine, Ray's start included);
``-m slow`` runs 6000 (4-8 min). FLOWRL_SOAK_ITERATIONS=N overrides both.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import ray
import torch

from flowrl.config import build_config
from flowrl.models.build import build_actor, build_policy
from flowrl.rollout.ray_collector import RayCollector
from flowrl.rollout.ray_runtime import ray_session
from flowrl.rollout.shard import EnvSpec

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")

WARM_UP = 200  # iterations: allocator arenas, torch's caches, Ray's buffers fill up first
EVERY = 25  # iterations between samples
# Bounds, from measurements on the 2-core CI machine (256x256 policy, 8 envs x 8 steps, Ray 2.60):
# after the warm-up each process creeps a little and takes ~2-3 MB steps (the allocator taking a new
# arena), then levels off. Over iterations 200-1200: trends of +0.18 (driver), +0.35 and +0.48 MB per
# 100 iterations (workers), last samples 1.5-5.2 MB above the warm-up level; over 200-3000: the driver
# +2 MB, each worker +3.5 MB, nearly all of it before iteration 1000; over 200-6000 (-m slow): trends of
# +0.07 MB per 100 iterations, last samples 3.7-4.6 MB above the warm-up level. A leak of one weights copy
# (320 kB) per iteration grows 32 MB per 100 iterations; the trend bound, 3x the largest measured
# trend, catches any leak of 15 kB or more per iteration.
MAX_TREND_MB_PER_100 = 1.5
MAX_DRIFT_MB = 16.0  # last samples vs the warm-up level: 3x the largest measured drift (5.2 MB)
# The object store held 0-10 MiB in 1-32 objects at any sample (the weights of the iterations in flight
# and rollouts not yet freed; freeing is asynchronous); one kept weights copy per iteration would
# pass 32 MiB within 100 iterations.
MAX_STORE_MIB, MAX_STORE_OBJECTS = 32, 100


def _iterations(default: int) -> int:
    return int(os.environ.get("FLOWRL_SOAK_ITERATIONS", default))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _object_store() -> tuple[int, int]:
    """(MiB used, objects) of Ray's object store, as `ray memory --stats-only` prints them."""
    from ray._private.internal_api import memory_summary

    # This session's GCS: without an address Ray would look for the last cluster that `ray start` started.
    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    found = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", summary)
    assert found, f"unexpected `ray memory` summary (Ray changed its format?):\n{summary}"
    return int(found[1]), int(found[2])


def _trend_per_100(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of ys over xs, per 100 iterations."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def _soak(iterations: int) -> None:
    cfg = build_config({"name": "soak", "policy": {"hidden_dims": [256, 256], "time_embed_dim": 16}})
    torch.manual_seed(0)
    policy = build_policy(cfg, build_actor(cfg.policy, 2, 2))  # ~80k parameters: 320 kB of weights
    ray.shutdown()
    with ray_session(None, num_cpus=2):
        collector = RayCollector(EnvSpec("flowrl/TwoGoal-v0", 4, 8, seed=0), num_workers=2)
        samples: dict[str, list[float]] = {}
        at: list[int] = []
        store: list[tuple[int, int, int]] = []
        try:
            processes = {"driver": os.getpid()} | {f"worker {i}": w["pid"] for i, w in enumerate(collector.where())}
            collector.reset(0)
            for iteration in range(iterations):
                with torch.no_grad():  # new weights every iteration, as after an update
                    for p in policy.parameters():
                        p.add_(1e-4)
                collector.collect(policy, 8, iteration)
                if iteration % EVERY == 0 or iteration == iterations - 1:
                    at.append(iteration)
                    for name, pid in processes.items():
                        samples.setdefault(name, []).append(_rss_mb(pid))
                    store.append((iteration, *_object_store()))
            assert collector.restarts == 0
        finally:
            collector.close()
    print(f"RSS (MB) every {EVERY} iterations:")
    for name, values in samples.items():
        print(f"  {name:<9} " + " ".join(f"{v:.1f}" for v in values))
    print("object store (iteration, MiB, objects): " + " ".join(map(str, store)))
    kept = [i for i, x in enumerate(at) if x >= WARM_UP]
    assert len(kept) >= 8, f"{iterations} iterations leave too few samples after the warm-up of {WARM_UP}"
    xs = [at[i] for i in kept]
    for name, values in samples.items():
        ys = [values[i] for i in kept]
        trend = _trend_per_100(xs, ys)
        level, last = sum(ys[:3]) / 3, max(ys[-3:])
        print(f"  {name}: trend {trend:+.3f} MB / 100 iterations, warm-up level {level:.1f}, last {last:.1f} MB")
        assert trend < MAX_TREND_MB_PER_100, f"{name}: RSS grows {trend:.2f} MB per 100 iterations: {ys}"
        assert last - level < MAX_DRIFT_MB, f"{name}: RSS went from {level:.1f} to {last:.1f} MB: {ys}"
    late = [s for s in store if s[0] >= WARM_UP]
    assert max(s[1] for s in late) <= MAX_STORE_MIB, f"object store grows (iteration, MiB, objects): {late}"
    assert max(s[2] for s in late) <= MAX_STORE_OBJECTS, f"object store grows (iteration, MiB, objects): {late}"


def test_ray_collector_memory_stays_flat():
    _soak(_iterations(1200))


@pytest.mark.slow
def test_ray_collector_memory_stays_flat_long():
    _soak(_iterations(6000))
