"""A data-parallel learner: N ranks as Ray actors, joined by one torch.distributed process
group, gradients averaged by DistributedDataParallel (``learner.num_workers > 1``,
``learner.strategy: ddp``) or by FSDP2's reduce-scatter over sharded parameters (``fsdp``).

The driver (the Trainer's process) keeps the whole loop: it collects, computes the advantages
over the whole batch (``Algorithm.prepare``: GAE, GRPO's group statistics), checks the ratio,
logs, evaluates, checkpoints and publishes the weights to the env / reward workers as with one
learner. Only ``update`` moves: ``DataParallelLearner.update`` puts the batch into Ray's object
store once, and every rank runs the algorithm's own ``update`` on it with a ``RankDataParallel``
attached (``PolicyGradientAlgorithm.data_parallel``):

- all ranks draw the same shuffle (their generators are equal) and each steps on an equal share
  of every minibatch (``local``);
- each share's loss is scaled by N * m_r / m and passed through the network's DDP module, so
  DDP's mean over the ranks' gradients is the whole minibatch's gradient: N ranks make the same
  update as one learner, to float round-off (tests/algos/test_distributed.py);
- PPO's per-minibatch advantage normalisation and the early stop on approx KL use the whole
  minibatch's statistics (all-reduced), and the non-finite guard checks the whole minibatch's
  loss, so every rank takes and skips the same steps.

With ``strategy: fsdp`` each rank's trained networks (policy, critic) are ``fully_shard``-ed
(``shard_networks``): a rank keeps 1/N of their parameters and of Adam's moments, FSDP gathers
the whole parameters for each ``evaluate`` / forward and its backward and reduce-scatters the
gradients (their mean over the ranks, as DDP's), so the same loss scaling gives the same update.
After the update every rank joins in gathering the full state (``full_state``) and rank 0
returns it: the checkpoint holds whole tensors either way.

Rank 0 then returns what the update changed (networks, optimisers, generator); the driver loads
it into its own algorithm, so checkpoints are those of one learner (rank-independent: a run
resumes with any ``learner.num_workers`` and either strategy).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import inspect
import logging
import os
import socket
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flowrl.config import LearnerConfig
from flowrl.errors import FlowRLError

log = logging.getLogger("flowrl")

# Algorithm state that the update does not change: the driver's copy stays (the reward scaler
# moves in ``prepare``, on the driver; the reference policy is frozen).
DRIVER_STATE = ("reward_scaler", "reference")

AlgorithmBuilder = Callable[[torch.device], Any]  # device -> a PolicyGradientAlgorithm

# The policy methods the update computes its losses through (not ``forward``): FSDP gathers the
# parameters around each call (``register_fsdp_forward_method``).
FSDP_FORWARD_METHODS = ("evaluate", "coupled_actions")


class LearnerError(FlowRLError, RuntimeError):
    """A learner rank died or failed: the run stops, the last good checkpoint is kept."""


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``obj`` (tensors in dataclasses, dicts, lists, tuples) with ``fn`` applied to every tensor."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **fields)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


class _PassLoss(nn.Module):
    """Holds a network for DDP; its forward hands the already computed loss back.

    Why: the algorithms compute their losses through the policy's own methods (evaluate,
    coupled_actions), not through one ``forward``. DDP's gradient hooks sit on the parameters
    themselves; its forward only tells the reducer a backward is coming (and, with
    find_unused_parameters, which parameters that loss's graph reaches). Passing the loss
    through it just before ``backward`` does exactly that."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, loss: Tensor) -> Tensor:
        return loss


class RankDataParallel:
    """A rank's part in a data-parallel update (``flowrl.algos.policy_gradient.DataParallel``).

    ``networks``: the trained networks by the names ``guarded_step`` gives them (``policy``,
    ``value``), each wrapped in DDP here (``strategy`` ddp), or already sharded by
    ``shard_networks`` (fsdp: FSDP's own hooks average the gradients)."""

    def __init__(
        self, rank: int, world: int, device: torch.device, networks: dict[str, nn.Module], strategy: str = "ddp"
    ) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.networks = set(networks)
        ids = [device.index or 0] if device.type == "cuda" else None
        # broadcast_buffers off: buffers (observation statistics) change only in the update, the
        # same way on every rank; find_unused_parameters: a loss may not reach every parameter.
        self.ddp = (
            {
                name: DistributedDataParallel(
                    _PassLoss(net), device_ids=ids, broadcast_buffers=False, find_unused_parameters=True
                )
                for name, net in networks.items()
            }
            if strategy == "ddp"
            else {}
        )
        self.weight = 1.0 / world  # this rank's share of the current minibatch, m_r / m
        self.whole = False  # a minibatch smaller than the ranks: every rank takes it whole

    def local(self, mb: Tensor) -> Tensor:
        m = len(mb)
        if m < self.world:  # too small to split: identical gradients on every rank, DDP's mean keeps them
            self.whole, self.weight = True, 1.0 / self.world
            return mb
        part = mb.tensor_split(self.world)[self.rank]
        self.whole, self.weight = False, len(part) / m
        return part

    def _sum(self, values: Tensor) -> Tensor:
        values = values.to(self.device, torch.float64)
        dist.all_reduce(values)
        return values.cpu()

    def global_mean(self, value: float) -> float:
        return float(self._sum(torch.tensor([value * self.weight])))

    def normalise(self, adv: Tensor) -> Tensor:
        if self.whole:
            return adv if len(adv) <= 1 else (adv - adv.mean()) / (adv.std() + 1e-8)
        x = adv.detach().double()
        total, count = self._sum(torch.stack([x.sum().cpu(), torch.tensor(float(len(x)), dtype=torch.float64)]))
        if count <= 1:
            return adv
        mean = total / count
        squares = self._sum((x - mean.to(x.device)).pow(2).sum().cpu().reshape(1))
        std = (squares / (count - 1)).sqrt()  # unbiased, like Tensor.std of the whole minibatch
        return (adv - mean.to(adv)) / (std.to(adv) + 1e-8)

    def before_backward(self, loss: Tensor, network: str) -> Tensor:
        if network not in self.networks:
            raise RuntimeError(f"data-parallel learner: the {network!r} network is not data-parallel")
        scaled = loss * (self.weight * self.world)
        return self.ddp[network](scaled) if self.ddp else scaled


def shard_networks(algo: Any, networks: dict[str, nn.Module], device: torch.device, world: int) -> None:
    """``fully_shard`` (FSDP2) each of ``networks`` over the process group, in place, and point the
    algorithm's optimisers (``algo.optimizer.schedule``, ``algo.optimizer.params``) at the sharded
    parameters, their Adam moments cut into the same shards. Call after loading the full state."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world,))
    swap: dict[nn.Parameter, nn.Parameter] = {}
    for net in networks.values():
        before = dict(net.named_parameters())
        fully_shard(net, mesh=mesh)  # replaces each parameter by a DTensor shard of it
        for name in FSDP_FORWARD_METHODS:
            if inspect.ismethod(getattr(net, name, None)):
                register_fsdp_forward_method(net, name)
        after = dict(net.named_parameters())
        swap.update({before[k]: after[k] for k in before})
    for opt in algo.optimizer.schedule:
        _repoint(opt, swap)
    algo.optimizer.params[:] = [swap.get(p, p) for p in algo.optimizer.params]


def _repoint(opt: torch.optim.Optimizer, swap: dict[nn.Parameter, nn.Parameter]) -> None:
    """``opt`` over the sharded parameters of ``swap`` (old -> new), its per-parameter state
    (Adam's moments; not its ``step`` count) sharded like the new parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def shard(key: str, value: Any, new: nn.Parameter) -> Any:
        if key == "step" or not isinstance(value, Tensor) or not isinstance(new, DTensor):
            return value
        # every rank holds the same full moments: each keeps its own shard, no communication
        return distribute_tensor(value.to(new.device), new.device_mesh, new.placements, src_data_rank=None)

    for group in opt.param_groups:
        group["params"] = [swap.get(p, p) for p in group["params"]]
    state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
    for p, st in opt.state.items():
        new = swap.get(p, p)
        state[new] = {k: shard(k, v, new) for k, v in st.items()}
    opt.state = state


def full_state(state: Any) -> Any:
    """``state`` with every DTensor (FSDP's shards) gathered whole. A collective: every rank calls
    it on the same structure, in the same order."""
    from torch.distributed.tensor import DTensor

    return map_tensors(state, lambda t: t.full_tensor() if isinstance(t, DTensor) else t)


def rank_device(backend: str) -> torch.device:
    """nccl: the GPU Ray gave this rank (the first visible one); gloo: the CPU."""
    if backend == "nccl":
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


class LearnerRank:
    """One rank (a Ray actor): builds the algorithm, joins the process group, runs updates."""

    def __init__(
        self, rank: int, world: int, backend: str, timeout_s: float, build: AlgorithmBuilder, strategy: str = "ddp"
    ) -> None:
        self.rank, self.world, self.backend, self.timeout_s, self.build = rank, world, backend, timeout_s, build
        self.strategy = strategy
        self.algo: Any = None
        self.networks: dict[str, nn.Module] = {}
        self.device = torch.device("cpu")

    def where(self) -> tuple[str, str, int]:
        """(node IP, host name, pid) of this rank, for messages."""
        import ray

        return ray.util.get_node_ip_address(), socket.gethostname(), os.getpid()

    def node_id(self) -> str:
        """The Ray node this rank runs on (nodes of one machine share an IP)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def rendezvous(self) -> str:
        """HOST:PORT of a free port on this node (rank 0's: the process group's store)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def setup(self, address: str, state: dict[str, Any]) -> None:
        """Join the process group at ``address``, then build the algorithm from ``state``."""
        dist.init_process_group(
            self.backend,
            init_method=f"tcp://{address}",
            rank=self.rank,
            world_size=self.world,
            timeout=datetime.timedelta(seconds=self.timeout_s),
        )
        self.device = rank_device(self.backend)
        self._build(state)

    def _build(self, state: dict[str, Any]) -> None:
        """A fresh algorithm with ``state`` loaded, its networks wrapped in DDP or sharded (FSDP).
        The builder is copied each time: FSDP shards the modules it holds in place."""
        self.algo = copy.deepcopy(self.build)(self.device)
        self.algo.load_state_dict(state)
        networks = {"policy": self.algo.policy}
        if getattr(self.algo, "critic", None) is not None:
            networks["value"] = self.algo.critic
        self.networks = networks
        if self.strategy == "fsdp":
            shard_networks(self.algo, networks, self.device, self.world)
        self.algo.data_parallel = RankDataParallel(self.rank, self.world, self.device, networks, self.strategy)

    def load(self, state: dict[str, Any]) -> None:
        """The driver's state (after it loaded a checkpoint). FSDP: sharded networks take no whole
        tensors, so the algorithm is built again from ``state`` (every rank at once)."""
        if self.strategy == "fsdp":
            self._build(state)
        else:
            self.algo.load_state_dict(state)

    def update(self, batch: Any, iteration: int, fraction_done: float) -> tuple[dict[str, float], dict | None]:
        """The algorithm's update on this rank; rank 0 also returns what the update changed."""
        self.algo.set_progress(fraction_done)
        metrics = self.algo.update(map_tensors(batch, lambda t: t.to(self.device)), iteration)
        if self.strategy == "fsdp":
            for net in self.networks.values():
                net.reshard()  # a last no-grad forward may have left whole parameters in place of the shards
        state = {k: v for k, v in self.algo.state_dict().items() if k not in DRIVER_STATE}
        if self.strategy == "fsdp":
            state = full_state(state)  # every rank takes part in gathering the shards
        if self.rank != 0:
            return metrics, None
        return metrics, map_tensors(state, lambda t: t.detach().cpu())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def ray_options(cfg: LearnerConfig) -> dict[str, Any]:
    """Ray actor options of a rank: its resources, spread over the cluster's nodes."""
    res = dict(cfg.resources_per_worker)
    options: dict[str, Any] = {
        "num_cpus": res.pop("CPU", 0.0),
        "num_gpus": res.pop("GPU", 0.0),
        "scheduling_strategy": "SPREAD",
        "max_restarts": 0,
    }
    if res:
        options["resources"] = res
    return options


class DataParallelLearner:
    """The ``Algorithm`` the Trainer sees with ``learner.num_workers > 1``: ``algo`` (the driver's
    copy) for everything but ``update``, which runs on the ranks. Close it (``close``)."""

    def __init__(self, algo: Any, cfg: LearnerConfig, build: AlgorithmBuilder, run_dir: Path | None = None) -> None:
        self.algo, self.cfg, self.build, self.run_dir = algo, cfg, build, run_dir
        self.ranks: list[Any] = []
        self.where: list[tuple[str, str, int]] = []
        self.fraction_done = 0.0
        self.stale = False  # the driver's state changed outside an update (a checkpoint was loaded)

    @property
    def name(self) -> str:
        return self.algo.name

    def __getattr__(self, attr: str) -> Any:
        if attr == "algo":  # not set yet (unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self.algo, attr)

    def collect(self, collector, policy, iteration: int):
        return self.algo.collect(collector, policy, iteration)

    def prepare(self, rollout):
        return self.algo.prepare(rollout)

    def set_progress(self, fraction_done: float) -> None:
        self.fraction_done = fraction_done
        self.algo.set_progress(fraction_done)

    def state_dict(self) -> dict[str, Any]:
        return self.algo.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.algo.load_state_dict(state)
        self.stale = True

    def start(self) -> None:
        """Start the ranks (inside a Ray session), join them into one process group."""
        import ray

        remote = ray.remote(LearnerRank).options(**ray_options(self.cfg))
        n, backend = self.cfg.num_workers, self.cfg.resolved_backend
        self.ranks = [remote.remote(r, n, backend, self.cfg.timeout_s, self.build, self.cfg.strategy) for r in range(n)]
        self.where = self._wait([rank.where.remote() for rank in self.ranks], "starting")
        for r, (ip, host, pid) in enumerate(self.where):
            log.info("learner rank %d: pid %d on node %s (%s)", r, pid, ip, host)
        address = self._wait([self.ranks[0].rendezvous.remote()], "starting")[0]
        state = ray.put(self._cpu_state())
        self._wait([rank.setup.remote(address, state) for rank in self.ranks], "joining the process group")
        self.stale = False

    def nodes(self) -> list[str]:
        """The Ray node of each rank, in rank order (after ``start``)."""
        return self._wait([rank.node_id.remote() for rank in self.ranks], "asking the ranks' nodes")

    def sync(self) -> None:
        """Start the ranks, or give them the driver's state where it changed (a loaded checkpoint)."""
        import ray

        if not self.ranks:
            self.start()
        elif self.stale:
            state = ray.put(self._cpu_state())
            self._wait([rank.load.remote(state) for rank in self.ranks], "loading the checkpoint")
            self.stale = False

    def _cpu_state(self) -> dict[str, Any]:
        return map_tensors(self.algo.state_dict(), lambda t: t.detach().cpu())

    def update(self, batch: Any, iteration: int) -> dict[str, float]:
        """Every rank's update on ``batch`` (in the object store once); rank 0's result loaded here."""
        import ray

        self.sync()
        ref = ray.put(map_tensors(batch, lambda t: t.detach().cpu()))
        calls = [rank.update.remote(ref, iteration, self.fraction_done) for rank in self.ranks]
        results = self._wait(calls, f"the update of iteration {iteration}")
        metrics, changed = results[0]
        state = self.algo.state_dict()
        state.update(changed)
        self.algo.load_state_dict(state)
        # statistics ``prepare`` computed here, on the driver (GRPO's group counts), join the update's
        return {**getattr(self.algo, "_stats", {}), **metrics}

    def _wait(self, calls: list[Any], what: str) -> list[Any]:
        """Results of ``calls`` (one per rank, in order); a failed or dead rank stops everything
        with one line naming it and its node."""
        import ray
        from ray.exceptions import RayActorError, RayError, RayTaskError

        pending = list(calls)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except RayError:
                # the rank whose peer died fails too (a collective broke): prefer naming the dead one
                ray.wait(pending, num_returns=len(pending), timeout=10.0)
                failures = []
                for r, call in enumerate(calls):
                    try:
                        ray.get(call, timeout=0)
                    except RayError as exc:
                        failures.append((not isinstance(exc, RayActorError), r, exc))
                    except Exception:  # noqa: BLE001 - still running: not the cause
                        pass
                _, r, exc = min(failures, key=lambda f: (f[0], f[1]))
                self.close()
                cause = getattr(exc, "cause", None)
                if isinstance(exc, RayTaskError) and isinstance(cause, FlowRLError):
                    raise cause from None  # the algorithm's own one-line error (a numerical stop)
                raise LearnerError(self._failure_line(r, exc, what)) from None
        return ray.get(calls)

    def _failure_line(self, r: int, exc: BaseException, what: str) -> str:
        from flowrl.rollout.ray_runtime import describe_failure

        ip, host, pid = self.where[r] if r < len(self.where) else ("?", "?", 0)
        how = "died" if "died" in describe_failure(exc) else "failed"
        resume = f"flowrl train --resume {self.run_dir}" if self.run_dir is not None else "flowrl train --resume RUN"
        return (
            f"learner rank {r} of {self.cfg.num_workers} (node {ip}, host {host}, pid {pid}) {how} during {what} "
            f"({describe_failure(exc)}); the run stops and its last good checkpoint is kept: resume with {resume}"
        )

    def close(self) -> None:
        """End the ranks (nothing to do once Ray has shut down: they ended with it)."""
        ranks, self.ranks = self.ranks, []
        if not ranks:
            return
        import ray

        if not ray.is_initialized():
            return
        for rank in ranks:
            try:
                ray.kill(rank)
            except Exception:  # noqa: BLE001 - already gone
                pass


def check_learner_resources(cfg: Any) -> None:
    """Refuse learner ranks a local Ray cannot place next to the env workers, before any run
    folder (a Ray that cannot place an actor waits for ever). A joined cluster is not checked
    here: its nodes may come and go."""
    n = cfg.learner.num_workers
    if n == 1 or cfg.ray.address is not None:
        return
    from flowrl.rollout.ray_runtime import local_cpus

    per_rank = cfg.learner.resources_per_worker
    env_cpus = 0.0 if cfg.env.type == "shapes" or cfg.env.batched else cfg.env.num_workers * cfg.ray.cpus_per_worker
    need, have = env_cpus + n * per_rank.get("CPU", 0.0), local_cpus(cfg.ray.num_cpus)
    if need > have:
        raise FlowRLError(
            f"{n} learner ranks x {per_rank.get('CPU', 0.0):g} CPUs and {env_cpus:g} CPUs of env workers need "
            f"{need:g} CPUs, the local Ray has {have:g}: lower learner.num_workers or "
            "learner.resources_per_worker.CPU, or raise ray.num_cpus"
        )
    gpus, have_gpus = n * per_rank.get("GPU", 0.0), torch.cuda.device_count()
    if gpus > have_gpus:
        raise FlowRLError(
            f"{n} learner ranks x {per_rank.get('GPU', 0.0):g} GPUs need {gpus:g} GPUs, this machine has "
            f"{have_gpus}: lower learner.num_workers, or join a cluster with ray.address"
        )
