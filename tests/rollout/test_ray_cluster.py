"""A two-node Ray cluster on this machine: env workers spread over both nodes, and a
data-parallel learner with one rank per node that makes the one-process update."""

from __future__ import annotations

import functools

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from flowrl.config import build_config
from flowrl.models.build import build_actor, build_policy
from flowrl.rollout.collector import InProcessCollector
from flowrl.rollout.ray_collector import RayCollector
from flowrl.rollout.ray_runtime import ray_session
from flowrl.rollout.shard import EnvSpec
from tests.algos.test_distributed import _collect_steps, _one_update_both_ways, _ppo_config


@pytest.fixture(scope="module")
def two_node_cluster():
    ray.shutdown()
    # one CPU per node: each env worker (and each learner rank, one CPU each) has a node of its own
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_workers_spread_over_two_nodes(two_node_cluster):
    # What `flowrl train --ray-address HOST:PORT` does: join the running cluster.
    with ray_session(two_node_cluster.address):
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = build_config({"name": "t", "policy": {"hidden_dims": [16], "time_embed_dim": 8}})
        torch.manual_seed(0)
        policy = build_policy(cfg, build_actor(cfg.policy, 2, 2))
        collector = RayCollector(EnvSpec("flowrl/TwoGoal-v0", 4, 4, seed=3), num_workers=2)
        try:
            nodes = {w["node_id"] for w in collector.where()}
            assert len(nodes) == 2, "one worker per node"
            collector.reset(0)
            rollout = collector.collect(policy, 4, 0)
        finally:
            collector.close()
    local = InProcessCollector(EnvSpec("flowrl/TwoGoal-v0", 4, 4, seed=3), num_workers=2)
    local.reset(0)
    expected = local.collect(policy, 4, 0)
    local.close()
    assert torch.equal(rollout.samples.final, expected.samples.final)
    assert torch.equal(rollout.samples.x_out, expected.samples.x_out)  # the whole stored chain, not only its end
    assert torch.equal(rollout.rewards, expected.rewards)


def test_learner_ranks_one_per_node_make_the_one_process_update(two_node_cluster):
    """PPO with a critic (learner.num_workers = 2, gloo over TCP between the nodes): the ranks
    land on different nodes and their update equals the one-process one."""
    cfg = _ppo_config()

    def one_per_node(learner):
        nodes = learner.nodes()
        assert len(set(nodes)) == 2, nodes
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert set(nodes) == alive

    with ray_session(two_node_cluster.address):
        _one_update_both_ways(cfg, functools.partial(_collect_steps, cfg), check_ranks=one_per_node)
