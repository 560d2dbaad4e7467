"""Tests of the batched ManiSkill simulator (envs/maniskill_batch.py, ``env.batched: true``).

Oracle: the CPU path (``GymVectorEnv`` over flowrl's per-instance ManiSkill env, itself checked
by gymnasium's env checker in test_maniskill.py). On the CPU ManiSkill's batch holds one env
(physx_cpu), and the same seed and actions must give the same chunk rewards, observations, ends
and step counts as the CPU path, through a time limit that falls inside a chunk. With a GPU
(``@pytest.mark.gpu``): reset groups share their state, and a training iteration runs with the
simulator and the learner on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from envs.maniskill import ManiSkillUnavailable
from flowrl.errors import FlowRLError
from flowrl.rollout.vector_env import GymVectorEnv

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ENV = "flowrl/PickCube-v1"


def _batch(num_envs: int = 1, device: str = "cpu", **kwargs):
    from envs.maniskill_batch import ManiSkillBatchEnv

    try:
        return ManiSkillBatchEnv(ENV, 4, num_envs, kwargs, device)
    except ManiSkillUnavailable as exc:
        if os.environ.get("FLOWRL_REQUIRE_MANISKILL"):
            raise
        pytest.skip(f"ManiSkill cannot make an env on this machine: {exc}")


def test_one_env_batch_steps_like_the_cpu_path() -> None:
    kwargs = {"max_episode_steps": 10, "reward_mode": "normalized_dense"}
    batch = _batch(**kwargs)
    cpu = GymVectorEnv(ENV, 4, 1, kwargs)
    try:
        torch.testing.assert_close(batch.reset([7]), cpu.reset([7]), rtol=0, atol=1e-6)
        gen = torch.Generator().manual_seed(0)
        for chunk in range(3):  # 4 + 4 + 2 steps: the limit falls inside the third chunk
            actions = torch.rand((1, 4, 4), generator=gen) * 2 - 1
            a, b = batch.step(actions), cpu.step(actions)
            assert a.env_steps.tolist() == b.env_steps.tolist() == ([4] if chunk < 2 else [2])
            assert a.truncated.tolist() == b.truncated.tolist() == [chunk == 2]
            assert a.terminated.tolist() == b.terminated.tolist() == [False]
            torch.testing.assert_close(a.reward.double(), b.reward.double(), rtol=0, atol=1e-5)
            torch.testing.assert_close(a.reached, b.reached, rtol=0, atol=1e-5)
            assert a.success.tolist() == b.success.tolist()
        # the ended episode was reset: a new start (not the reached state), counted from 0 again
        assert not torch.allclose(a.obs, a.reached)
        lengths = [batch.step(torch.zeros((1, 4, 4))).env_steps.item() for _ in range(3)]
        assert lengths == [4, 4, 2]
    finally:
        batch.close()
        cpu.close()


@pytest.mark.parametrize(
    ("env_id", "num_envs", "kwargs", "message"),
    [
        ("flowrl/TwoGoal-v0", 1, {}, "not a ManiSkill task"),
        (ENV, 2, {}, "one env per process on the CPU"),
        (ENV, 1, {"render_mode": "rgb_array"}, "not supported by the batched simulator"),
    ],
)
def test_what_cannot_run_batched_is_one_clear_line(env_id, num_envs, kwargs, message) -> None:
    from envs.maniskill_batch import check_batched

    with pytest.raises(FlowRLError, match=message) as info:
        check_batched(env_id, num_envs, kwargs, "cpu")
    assert "\n" not in str(info.value)


def test_batched_config_needs_one_worker() -> None:
    from flowrl.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="env.num_workers: 1"):
        build_config({"name": "b", "env": {"id": ENV, "num_envs": 4, "num_workers": 2, "batched": True}}, "test")


def test_in_process_collector_runs_on_a_batch() -> None:
    """The collector's plumbing (generator and tensors on the batch's device, episode
    collection) with a one-env batch on the CPU."""
    from flowrl.config import build_config
    from flowrl.models.build import build_actor, build_policy
    from flowrl.rollout.collector import InProcessCollector
    from flowrl.rollout.shard import EnvSpec

    cfg = build_config(
        {
            "name": "batched",
            "env": {"id": ENV, "num_envs": 1, "num_workers": 1, "batched": True, "kwargs": {"max_episode_steps": 8}},
            "policy": {"horizon": 4, "denoising_steps": 2, "hidden_dims": [16]},
            "algo": {"type": "ppo", "minibatch_size": 4},
        },
        "test",
    )
    policy = build_policy(cfg, build_actor(cfg.policy, 42, 4))
    try:
        collector = InProcessCollector(EnvSpec(ENV, 4, 1, 0, env_kwargs=cfg.env.kwargs), 1, torch.device("cpu"))
    except ManiSkillUnavailable as exc:
        pytest.skip(f"ManiSkill cannot make an env on this machine: {exc}")
    try:
        rollout = collector.collect(policy, 3, 0)
        assert rollout.obs.shape == (3, 1, 42) and rollout.env_steps == 12
        assert rollout.truncated[:, 0].tolist() == [False, True, False]  # 4 + 4 steps, then a new episode
        episodes = collector.collect_episodes(policy, 5, 0)
        assert episodes.episode_done.tolist() == [True] and episodes.env_steps == 8
    finally:
        collector.close()


@pytest.mark.gpu
def test_gpu_batch_groups_share_their_start_and_step_alike() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    batch = _batch(8, "cuda", max_episode_steps=20)
    try:
        obs = batch.reset([11] * 4 + [12] * 4)
        assert obs.device.type == "cuda" and obs.shape == (8, 42)
        torch.testing.assert_close(obs[:4], obs[0].expand(4, -1))
        torch.testing.assert_close(obs[4:], obs[4].expand(4, -1))
        assert not torch.allclose(obs[0], obs[4])
        actions = torch.rand((2, 4, 4), device="cuda").repeat_interleave(4, dim=0) * 2 - 1
        step = batch.step(actions)
        torch.testing.assert_close(step.reached[:4], step.reached[0].expand(4, -1), rtol=0, atol=1e-4)
        assert step.env_steps.tolist() == [4] * 8
    finally:
        batch.close()


@pytest.mark.gpu
def test_gpu_training_iteration_with_a_batched_simulator(tmp_path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import numpy as np

    from flowrl import experiment as ex
    from flowrl.config import load_config

    rng = np.random.default_rng(0)  # a few random "demonstrations": only the plumbing is tested
    np.savez(
        tmp_path / "demos.npz",
        observations=rng.normal(size=(64, 42)).astype(np.float32),
        actions=rng.uniform(-1, 1, (64, 4)).astype(np.float32),
        episode_ends=np.array([32, 64]),
        meta_env_id=np.array(ENV),
    )
    for name in ("pickcube_flow_noise_ppo", "pickcube_flow_sde_grpo"):
        cfg = load_config(
            f"experiments/maniskill/{name}.yaml",
            [
                "device=cuda",
                "env.batched=true",
                "env.num_envs=16",
                "env.num_workers=1",
                f"pretrain.demos.path={tmp_path / 'demos.npz'}",
                "pretrain.steps=20",
                "algo.iterations=1",
                "eval.episodes=2",
            ],
        )
        run = tmp_path / name
        run.mkdir()
        ex.train(cfg, run, progress=False)
        assert (run / "policy.pt").is_file()
