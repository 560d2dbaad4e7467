"""Tests of the ManiSkill3 envs (envs/maniskill.py) through flowrl's interfaces.

Oracles: gymnasium's env checker; ManiSkill's own guarantee that the same seed and actions
give bit-identical CPU rollouts (so two env instances must agree exactly); the episode limit
set through env kwargs. Each env takes ~1-2 s to build. The tests skip, saying why, only when
ManiSkill cannot make an env on this machine (not installed, or no Vulkan driver: the README's
set-up command installs both); set FLOWRL_REQUIRE_MANISKILL=1 to make that a failure instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs
from envs.maniskill import FIX, ManiSkillUnavailable
from envs.wrappers import ActionChunk
from flowrl.errors import FlowRLError
from flowrl.rollout.vector_env import GymVectorEnv

# ManiSkill 3.0.1 calls np.isnan on a torch tensor every step (agents/base_agent.py), which numpy 2 deprecates.
ARRAY_WRAP = "__array_wrap__ must accept context and return_scalar arguments"
pytestmark = pytest.mark.filterwarnings(f"ignore:{ARRAY_WRAP}:DeprecationWarning")


def _make(env_id: str, horizon: int | None = None, **kwargs) -> gym.Env:
    """The env (chunked when ``horizon`` is given), or a skip when ManiSkill cannot run here."""
    try:
        if horizon is None:
            return gym.make(env_id, **kwargs)
        return envs.make_env(env_id, horizon, kwargs)
    except ManiSkillUnavailable as exc:
        if os.environ.get("FLOWRL_REQUIRE_MANISKILL"):
            raise
        pytest.skip(f"ManiSkill cannot make an env on this machine: {exc}")


def _check_env_without_warnings(env: gym.Env) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    # expected: checking a wrapped env; state observations are unbounded (as MuJoCo's); ManiSkill's own
    expected = (
        "different from the unwrapped version",
        "observation space minimum value is -infinity",
        "observation space maximum value is infinity",
        ARRAY_WRAP,
    )
    others = [str(w.message) for w in caught if not any(e in str(w.message) for e in expected)]
    assert others == []


def _rollout(env: gym.Env, seed: int, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Observations ``[T + 1, O]`` and rewards ``[T]`` of ``actions`` from ``reset(seed)``."""
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            break
    return np.stack(observations), np.array(rewards)


def test_import_envs_does_not_import_maniskill() -> None:
    code = "import sys, envs; sys.exit(int(any(m in sys.modules for m in ('mani_skill', 'sapien'))))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_registered_and_report_success() -> None:
    for env_id in envs.MANISKILL:
        assert env_id in gym.registry and env_id in envs.REPORTS_SUCCESS
        assert gym.registry[env_id].entry_point == "envs.maniskill:ManiSkillEnv"


def test_missing_maniskill_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mani_skill", None)  # import mani_skill now raises ImportError
    monkeypatch.setitem(sys.modules, "mani_skill.envs", None)
    with pytest.raises(ManiSkillUnavailable, match="ManiSkill is not installed") as info:
        gym.make("flowrl/PickCube-v1")
    assert FIX in str(info.value) and "\n" not in str(info.value)


def test_missing_vulkan_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import envs.maniskill as maniskill

    class NoVulkan:
        def make(self, **kwargs):
            raise RuntimeError("vk::PhysicalDevice::createDeviceUnique: ErrorIncompatibleDriver\nmore")

    monkeypatch.setattr(maniskill, "_import_maniskill", lambda: {"PickCube-v1": NoVulkan()})
    with pytest.raises(ManiSkillUnavailable, match="cannot open a Vulkan device for PickCube-v1") as info:
        gym.make("flowrl/PickCube-v1")
    assert "ErrorIncompatibleDriver" in str(info.value) and FIX in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"control_mode": "pd_joint_pos"}, "not in \\[-1, 1\\]; use a normalised controller"),
        ({"control_mode": "nope"}, "ManiSkill refused the env's kwargs .*nope not in supported modes"),
    ],
)
def test_bad_kwargs_are_one_clear_error(kwargs: dict, message: str) -> None:
    _make("flowrl/PushCube-v1").close()  # skips where ManiSkill cannot run
    with pytest.raises(FlowRLError, match=message):
        gym.make("flowrl/PushCube-v1", **kwargs)


@pytest.mark.parametrize("env_id", envs.MANISKILL)
def test_check_env(env_id: str) -> None:
    env = _make(env_id)
    try:
        assert env.observation_space.dtype == np.float32 and len(env.observation_space.shape) == 1
        assert env.action_space.dtype == np.float32
        np.testing.assert_array_equal(env.action_space.low, -1.0)
        np.testing.assert_array_equal(env.action_space.high, 1.0)
        _check_env_without_warnings(env.unwrapped)
    finally:
        env.close()


@pytest.mark.parametrize("env_id", ["flowrl/PickCube-v1", "flowrl/PushCube-v1"])
def test_check_env_action_chunk(env_id: str) -> None:
    env = _make(env_id, horizon=4)
    try:
        assert isinstance(env, ActionChunk) and env.action_space.shape == (4, 4)  # dx, dy, dz, gripper
        _check_env_without_warnings(env)
    finally:
        env.close()


@pytest.mark.parametrize("env_id", ["flowrl/PickCube-v1", "flowrl/PushCube-v1"])
def test_same_seed_same_actions_same_rollout(env_id: str) -> None:
    actions = np.random.default_rng(0).uniform(-1, 1, (6, 4, 4)).astype(np.float32)
    first = _make(env_id, horizon=4)
    obs_a, rew_a = _rollout(first, 7, actions)
    obs_a2, rew_a2 = _rollout(first, 7, actions)  # the same env again, after an episode
    other_start = first.reset(seed=8)[0]
    first.close()
    second = _make(env_id, horizon=4)  # another instance, reset with other seeds first
    second.reset(seed=123)
    obs_b, rew_b = _rollout(second, 7, actions)
    second.close()
    assert len(obs_a) == 7 and np.isfinite(obs_a).all()
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rew_a, rew_b)
    np.testing.assert_array_equal(obs_a, obs_a2)
    np.testing.assert_array_equal(rew_a, rew_a2)
    assert not np.array_equal(obs_a[0], other_start)  # the seed matters


def test_episode_limit_from_kwargs_and_success_when_it_ends() -> None:
    env = _make("flowrl/PickCube-v1", horizon=3, max_episode_steps=7)
    try:
        env.reset(seed=0)
        lengths, info, truncated = [], {}, False
        while not truncated:
            _, _, terminated, truncated, info = env.step(np.zeros((3, 4), np.float32))
            assert not terminated  # standing still never picks the cube
            lengths.append(info["chunk_steps"])
        assert lengths == [3, 3, 1]
        assert info["success"] is False and info["success_once"] is False
    finally:
        env.close()


def _scripted_push(env: gym.Env) -> tuple[int, bool, bool, dict, int | None]:
    """A scripted PushCube push (behind the cube, then towards the goal) until the episode ends:
    (steps, terminated, truncated, last info, the first step that succeeded)."""
    env.reset(seed=0)
    task = env.unwrapped._env
    info, terminated, truncated = {}, False, False
    steps, first = 0, None
    while not (terminated or truncated):
        tcp = task.agent.tcp.pose.p[0].numpy()
        cube = task.obj.pose.p[0].numpy()
        goal = task.goal_region.pose.p[0].numpy()
        behind = cube - np.array([0.05, 0.0, 0.0])  # PushCube pushes along +x
        behind[2] = 0.02
        if np.linalg.norm((tcp - behind)[[1, 2]]) > 0.01 and tcp[0] > behind[0] - 0.01 and steps < 60:
            target = behind.copy()
            if tcp[0] > cube[0] - 0.04:  # go back first, above the cube
                target = np.array([behind[0], tcp[1], 0.08])
        else:
            target = np.array([goal[0] + 0.03, cube[1], 0.02])
        action = np.zeros(4, np.float32)
        action[:3] = np.clip((target - tcp) / 0.1, -1, 1)
        action[3] = -1.0  # gripper closed
        _, _, terminated, truncated, info = env.step(action)
        steps += 1
        if first is None and info["success"]:
            first = steps
    return steps, terminated, truncated, info, first


def test_success_ends_the_episode_with_success_flags() -> None:
    env = _make("flowrl/PushCube-v1")
    try:
        steps, terminated, truncated, info, first = _scripted_push(env)
        assert terminated and not truncated and first == steps, steps
        assert info["success"] is True and info["success_once"] is True
    finally:
        env.close()


def test_without_terminate_on_success_the_episode_runs_to_its_limit() -> None:
    env = _make("flowrl/PushCube-v1", terminate_on_success=False)
    try:
        steps, terminated, truncated, info, first = _scripted_push(env)
        assert truncated and not terminated and steps == 100  # PushCube's limit
        assert first is not None and first < steps and info["success_once"] is True
    finally:
        env.close()


def test_gym_vector_env_keeps_final_observation_and_success() -> None:
    try:
        vec = GymVectorEnv("flowrl/PickCube-v1", horizon=4, num_envs=1, env_kwargs={"max_episode_steps": 6})
    except ManiSkillUnavailable as exc:
        if os.environ.get("FLOWRL_REQUIRE_MANISKILL"):
            raise
        pytest.skip(f"ManiSkill cannot make an env on this machine: {exc}")
    try:
        first = vec.reset([3])
        assert first.dtype == torch.float32 and first.shape[0] == 1
        step = vec.step(torch.full((1, 4, 4), 0.5))
        assert not step.truncated.any() and step.env_steps.tolist() == [4]
        step = vec.step(torch.full((1, 4, 4), 0.5))
        assert step.truncated.tolist() == [True] and step.env_steps.tolist() == [2]
        assert step.success.tolist() == [False]
        assert not torch.equal(step.reached, step.obs)  # final observation kept; obs is the new episode's
    finally:
        vec.close()


@pytest.mark.slow
def test_ray_env_workers_match_in_process_collection() -> None:
    """Two Ray env workers (one ManiSkill env each, in their own processes) collect exactly what
    two in-process shards (two envs in this process) collect."""
    import ray

    from flowrl.config import build_config
    from flowrl.models.build import build_actor, build_policy
    from flowrl.rollout.collector import InProcessCollector
    from flowrl.rollout.ray_collector import RayCollector
    from flowrl.rollout.ray_runtime import ray_session
    from flowrl.rollout.shard import EnvSpec

    env_id, kwargs = "flowrl/PickCube-v1", {"max_episode_steps": 12}
    obs_dim = _make(env_id).observation_space.shape[0]
    cfg = build_config({"name": "t", "policy": {"hidden_dims": [16], "time_embed_dim": 8}})
    torch.manual_seed(0)
    policy = build_policy(cfg, build_actor(cfg.policy, obs_dim, 4))
    ray.shutdown()
    with ray_session(None, num_cpus=2):
        remote = RayCollector(EnvSpec(env_id, 4, 2, seed=5, env_kwargs=kwargs), num_workers=2)
        local = InProcessCollector(EnvSpec(env_id, 4, 2, seed=5, env_kwargs=kwargs), num_workers=2)
        try:
            for collector in (remote, local):
                collector.reset(0)
            a, b = remote.collect(policy, 5, 0), local.collect(policy, 5, 0)
        finally:
            remote.close()
            local.close()
    for name in ("obs", "next_obs", "rewards", "terminated", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.truncated.any() and a.env_steps == b.env_steps == 2 * 5 * 4


def test_reset_after_a_grasp_observes_no_grasp() -> None:
    """PhysX keeps the last step's contacts over a reset: without envs.maniskill's fix, PickCube's
    first observation after an episode that ended grasping says is_grasped = 1, and
    reset(seed) would depend on the previous episode."""
    env = _make("flowrl/PickCube-v1")
    try:
        env.reset(seed=3)
        task = env.unwrapped._env
        info: dict = {}
        for step in range(60):  # over the cube with the gripper open, down, then close it
            tcp, cube = task.agent.tcp.pose.p[0].numpy(), task.cube.pose.p[0].numpy()
            above = np.linalg.norm((tcp - cube)[:2]) > 0.01
            target = cube + np.array([0.0, 0.0, 0.05 if above else 0.0]) if step < 40 else tcp
            action = np.append(np.clip((target - tcp) / 0.1, -1, 1), 1.0 if step < 40 else -1.0)
            _, _, _, _, info = env.step(action.astype(np.float32))
        assert info["is_grasped"] is True
        after, after_info = env.reset(seed=3)
        assert after_info["is_grasped"] is False
    finally:
        env.close()
    fresh = _make("flowrl/PickCube-v1")
    try:
        np.testing.assert_array_equal(after, fresh.reset(seed=3)[0])
    finally:
        fresh.close()


def test_render_rgb_array_frames_follow_the_robot() -> None:
    """render_mode="rgb_array": gymnasium's render checks pass, a frame is [H, W, 3] uint8 of
    render_size, at the task's control frequency; it changes when the arm moves and not when
    nothing renders anew. Without a render mode, render() is a one-line error."""
    env = _make("flowrl/PickCube-v1", render_mode="rgb_array", render_size=64)
    try:
        assert env.metadata["render_fps"] == env.unwrapped._env.control_freq == 20
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the checker's unbounded-space and ManiSkill warnings (see above)
            check_env(env.unwrapped)
        env.reset(seed=0)
        before = env.render()
        assert before.shape == (64, 64, 3) and before.dtype == np.uint8
        np.testing.assert_array_equal(env.render(), before)
        for _ in range(5):
            env.step(np.array([0.0, 0.0, 1.0, 1.0], np.float32))  # the gripper up
        after = env.render()
        assert after.shape == (64, 64, 3) and np.abs(after.astype(int) - before).mean() > 1.0
    finally:
        env.close()
    plain = _make("flowrl/PickCube-v1")
    try:
        plain.reset(seed=0)
        with pytest.raises(FlowRLError, match="render_mode='rgb_array'"):
            plain.unwrapped.render()
    finally:
        plain.close()
    with warnings.catch_warnings(), pytest.raises(FlowRLError, match="render_mode 'depth_array' is not supported"):
        warnings.simplefilter("ignore")  # gymnasium's: not among the env's render modes
        gym.make("flowrl/PickCube-v1", render_mode="depth_array")
