"""``flowrl bench learner``: the time of one update with 1 learner and with N data-parallel
ranks (flowrl.algos.distributed), and FSDP's per-rank parameter memory.

Per task (``shapes``: the image policy of ``experiments/images/shapes_flow_grpo.yaml``, GRPO;
``hopper``: the ReinFlow policy of ``experiments/locomotion/hopper_reinflow.yaml``, PPO with a
critic), with the file's sizes and ``--set`` overrides:

  1. fresh networks (an update costs the same whatever the weights) and one real rollout,
     collected in this process; GRPO's outcomes are replaced by random ones, so that no group
     ties and the whole batch is trained on (a fresh image model scores 0 everywhere);
  2. ``Algorithm.prepare`` once, then, ``--repeats`` times, the update from the same starting
     state with 1 learner (this process) and with N ranks (Ray actors, gloo on the CPU, nccl
     with ``learner.resources_per_worker.GPU=1``), alternately, so that a machine busy with
     something else slows both alike; one warm-up update each first (the ranks start then);
  3. the ratio of the medians, 1 learner / N ranks (> 1: the ranks are faster). The ranks'
     time includes what they cost beyond the arithmetic: the batch through Ray's object store
     and rank 0's updated state back to the driver. The one learner runs twice per round: with
     torch's default threads (what ``learner.num_workers: 1`` does) and with a rank's threads
     (Ray gives an actor OMP_NUM_THREADS = its CPUs), since on a busy machine torch's default
     threads can cost more than they give.

FSDP: the networks a rank trains (the policy, and PPO's critic) sharded as ``learner.strategy:
fsdp`` shards them (``flowrl.algos.distributed.shard_networks``: torch's FSDP2 ``fully_shard``)
over N gloo ranks, each rank's parameter bytes against the whole networks' (one learner's;
``fsdp_param_bytes``); where this torch cannot shard on the CPU, the results say so ("needs the
GPU machine").

Results: ``learner.json`` in ``--out`` (default benchmarks/results), and a table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from flowrl import experiment as ex
from flowrl.bench.common import ROOT, shown, write_json
from flowrl.config import ExperimentConfig, load_config
from flowrl.errors import FlowRLError
from flowrl.models.build import build_actor, build_image_network, build_policy

TASKS = {
    "shapes": ROOT / "experiments" / "images" / "shapes_flow_grpo.yaml",
    "hopper": ROOT / "experiments" / "locomotion" / "hopper_reinflow.yaml",
}


def task_config(task: str, overrides: list[str], ranks: int) -> ExperimentConfig:
    """The task's experiment: no pretraining, on the CPU, ``ranks`` learner ranks."""
    fixed = ["pretrain=null", "device=cpu", "policy.pretrained=null"]
    if task == "hopper":
        fixed.append("policy.obs_norm=none")  # no demonstrations to take statistics from
    return load_config(TASKS[task], [*fixed, *overrides, f"learner.num_workers={ranks}"])


def fresh_actor(cfg: ExperimentConfig) -> Any:
    torch.manual_seed(cfg.seed)
    if cfg.env.type == "shapes":
        return build_image_network(cfg)
    return build_actor(cfg.policy, *ex.env_dims(cfg.env.id, cfg.env.kwargs))


def one_batch(cfg: ExperimentConfig, algo: Any) -> Any:
    """One rollout of the task (collected in this process), prepared by ``algo``."""
    from flowrl.rollout.build import make_collector

    collector = make_collector(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"enabled": False})}))
    try:
        collector.reset(epoch=0)
        rollout = algo.collect(collector, algo.policy, 0)
    finally:
        collector.close()
    if rollout.episode_return is not None:  # GRPO: outcomes with spread in every group
        n = rollout.episode_return.shape[0]
        g = torch.Generator().manual_seed(0)
        rollout = dataclasses.replace(
            rollout, episode_return=torch.randn(n, generator=g), reward_components=None, reward_weights=None
        )
    algo.set_progress(0.0)
    return algo.prepare(rollout)


def _timed(algo: Any, start: dict[str, Any], batch: Any, iteration: int) -> float:
    algo.load_state_dict(copy.deepcopy(start))
    if hasattr(algo, "sync"):  # the ranks get the state now, not inside the timed update
        algo.sync()
    t0 = time.perf_counter()
    algo.update(batch, iteration)
    return time.perf_counter() - t0


def time_updates(cfg: ExperimentConfig, repeats: int) -> dict[str, Any]:
    """Seconds per update with 1 learner and with ``cfg.learner.num_workers`` ranks, interleaved."""
    from flowrl.algos.distributed import DataParallelLearner

    device = torch.device("cpu")
    actor = fresh_actor(cfg)
    single = ex.build_algorithm(cfg, build_policy(cfg, actor).to(device), actor, device)
    batch = one_batch(cfg, single)
    start = copy.deepcopy(single.state_dict())
    copy_actor = copy.deepcopy(actor)
    driver = ex.build_algorithm(cfg, build_policy(cfg, copy_actor), copy_actor, device)
    ranks = DataParallelLearner(
        driver, cfg.learner, functools.partial(ex.rank_algorithm, cfg, copy.deepcopy(actor).cpu())
    )
    times: dict[str, list[float]] = {"one": [], "one_rank_threads": [], "ranks": []}
    default_threads = torch.get_num_threads()
    rank_threads = max(1, int(cfg.learner.resources_per_worker.get("CPU", 1)))
    it = getattr(cfg.algo, "critic_warmup_iterations", 0)  # an iteration that trains the actor too
    try:
        _timed(single, start, batch, it), _timed(ranks, start, batch, it)  # warm-up; the ranks start here
        for _ in range(repeats):
            times["one"].append(_timed(single, start, batch, it))
            torch.set_num_threads(rank_threads)  # a rank's threads (Ray: OMP_NUM_THREADS = its CPUs)
            try:
                times["one_rank_threads"].append(_timed(single, start, batch, it))
            finally:
                torch.set_num_threads(default_threads)
            times["ranks"].append(_timed(ranks, start, batch, it))
    finally:
        ranks.close()
    one, many = statistics.median(times["one"]), statistics.median(times["ranks"])
    one_thin = statistics.median(times["one_rank_threads"])
    size = int(batch.advantages.shape[0])
    params = sum(p.numel() for p in single.policy.parameters())
    return {
        "batch": size,
        "policy_parameters": params,
        "ranks": cfg.learner.num_workers,
        "backend": cfg.learner.resolved_backend,
        "threads_one": default_threads,
        "threads_per_rank": rank_threads,
        "update_s_one": times["one"],
        "update_s_one_rank_threads": times["one_rank_threads"],
        "update_s_ranks": times["ranks"],
        "median_s_one": one,
        "median_s_one_rank_threads": one_thin,
        "median_s_ranks": many,
        "speedup": one / many,
        "speedup_same_threads": one_thin / many,
    }


def fsdp_rank_bytes(rank: int, world: int, address: str, cfg: ExperimentConfig, actor: Any) -> dict[str, Any]:
    """On one of ``world`` processes: join a gloo group, build a rank's algorithm around ``actor``,
    shard its trained networks as ``learner.strategy: fsdp`` does, count this rank's bytes."""
    import torch.distributed as dist

    from flowrl.algos.distributed import shard_networks

    dist.init_process_group(
        "gloo", init_method=f"tcp://{address}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    try:
        device = torch.device("cpu")
        algo = ex.rank_algorithm(cfg, actor, device)
        networks = {"policy": algo.policy}
        if getattr(algo, "critic", None) is not None:
            networks["value"] = algo.critic

        def held() -> int:
            local = [getattr(p, "to_local", lambda p=p: p)() for net in networks.values() for p in net.parameters()]
            return sum(t.numel() * t.element_size() for t in local)

        whole = held()
        shard_networks(algo, networks, device, world)
        return {"whole_bytes": whole, "rank_bytes": held()}
    finally:
        dist.destroy_process_group()


def fsdp_param_bytes(cfg: ExperimentConfig, world: int) -> dict[str, Any]:
    """Per-rank parameter bytes of the task's trained networks under FSDP over ``world`` gloo ranks."""
    import socket

    import ray

    actor = fresh_actor(cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    task = ray.remote(num_cpus=0)(fsdp_rank_bytes)
    try:
        ranks = ray.get([task.remote(r, world, address, cfg, actor) for r in range(world)], timeout=600)
    except Exception as exc:  # noqa: BLE001 - FSDP on the CPU is this torch's to support or not
        first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
        return {"supported": False, "why": f"needs the GPU machine ({first})"}
    whole = ranks[0]["whole_bytes"]
    return {
        "supported": True,
        "ranks": world,
        "whole_mb": whole / 2**20,
        "rank_mb": [r["rank_bytes"] / 2**20 for r in ranks],
        "fraction": max(r["rank_bytes"] for r in ranks) / whole,
    }


def run_learner_bench(
    configs: dict[str, ExperimentConfig], overrides: list[str], repeats: int, ranks: int, out: Path
) -> dict[str, Any]:
    from flowrl.rollout.ray_runtime import ray_session

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "overrides": overrides,
        "repeats": repeats,
        "tasks": {},
    }
    with ray_session(None, num_cpus=max(ranks, os.cpu_count() or 1)):
        for task, cfg in configs.items():
            results["tasks"][task] = {
                "file": shown(TASKS[task]),
                **time_updates(cfg, repeats),
                "fsdp": fsdp_param_bytes(cfg, ranks),
            }
            write_json(results, out / "learner.json")  # what is done so far, should a later task fail
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"{'task':8} {'batch':>6} {'params':>9} {'1 learner s':>12} {'(threads)':>9} {'same thr. s':>11} "
        f"{'N ranks s':>10} {'speedup':>8} {'same thr.':>9}  fsdp"
    ]
    for task, r in results["tasks"].items():
        fsdp = r["fsdp"]
        shard = (
            f"{max(fsdp['rank_mb']):.2f} of {fsdp['whole_mb']:.2f} MB per rank ({fsdp['fraction']:.2f})"
            if fsdp["supported"]
            else fsdp["why"]
        )
        lines.append(
            f"{task:8} {r['batch']:>6} {r['policy_parameters']:>9} {r['median_s_one']:>12.3f} {r['threads_one']:>9} "
            f"{r['median_s_one_rank_threads']:>11.3f} {r['median_s_ranks']:>10.3f} {r['speedup']:>8.2f} "
            f"{r['speedup_same_threads']:>9.2f}  {shard}"
        )
    return "\n".join(lines)


def cli_handler(args: argparse.Namespace) -> int:
    """``flowrl bench learner`` (its arguments: flowrl.cli): runs the bench, prints the table."""
    tasks = args.tasks or list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise FlowRLError(f"flowrl bench learner: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if args.repeats < 1 or args.ranks < 2:
        raise FlowRLError("flowrl bench learner: --repeats must be >= 1 and --ranks >= 2")
    overrides = [*args.overrides, *args.set]
    configs = {task: task_config(task, overrides, args.ranks) for task in tasks}  # bad input: before any work
    out = Path(args.out or "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    results = run_learner_bench(configs, overrides, args.repeats, args.ranks, out)
    print(format_table(results))
    print(f"written: {out / 'learner.json'}")
    return 0
