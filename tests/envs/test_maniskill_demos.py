"""Tests of the ManiSkill demonstrations (envs/maniskill_demos.py, `flowrl demos`).

Oracles: a fresh flowrl env stepped with the stored actions from the stored seeds must give
exactly the stored observations and succeed at each stored episode end (CPU PhysX is
deterministic); flowrl's own dataset reader (the file must pass every check pretraining
applies, for the right env only). Generating two PickCube demos takes ~15-25 s.
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pytest

from envs.maniskill import ManiSkillUnavailable
from envs.maniskill_demos import motion_planning_demos, replay
from flowrl.core.demos_file import read_demos, read_metadata
from flowrl.errors import DatasetError, FlowRLError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def pick_demos(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demos") / "pick.npz"
    try:
        summary = motion_planning_demos("flowrl/PickCube-v1", 2, out, seed=3, progress=False)
    except ManiSkillUnavailable as exc:
        if os.environ.get("FLOWRL_REQUIRE_MANISKILL"):
            raise
        pytest.skip(f"ManiSkill cannot make an env on this machine: {exc}")
    return out, summary


def test_demos_replay_exactly_and_succeed_in_a_fresh_env(pick_demos) -> None:
    out, summary = pick_demos
    demos = read_demos(out, "flowrl/PickCube-v1", (42, 4))
    meta = read_metadata(out)
    seeds = [int(s) for s in meta["seeds"].split(",")]
    assert len(seeds) == summary["episodes"] == len(demos["episode_ends"]) == 2
    assert seeds[0] >= 3 and seeds == sorted(set(seeds))  # from --seed on, each seed once
    assert meta["control_mode"] == "pd_ee_delta_pos"
    assert np.abs(demos["actions"]).max() <= 1.0
    env = gym.make("flowrl/PickCube-v1")
    try:
        start = 0
        for seed, end in zip(seeds, demos["episode_ends"], strict=True):
            obs, _ = env.reset(seed=seed)
            for t in range(start, end):
                np.testing.assert_array_equal(obs, demos["observations"][t])
                obs, _, terminated, truncated, info = env.step(demos["actions"][t])
                assert (terminated or truncated) == (t == end - 1), f"seed {seed}: episode ends at the stored end"
            assert info["success"], f"seed {seed}: the stored episode ends in success"
            start = end
    finally:
        env.close()


def test_demos_are_refused_for_another_env(pick_demos) -> None:
    out, _ = pick_demos
    with pytest.raises(DatasetError, match="PickCube"):
        read_demos(out, "flowrl/PushCube-v1")


def test_held_demos_stay_put_at_the_goal_and_still_succeed(pick_demos) -> None:
    """--hold-steps: the planned episode up to its success, then zero position deltas with the
    gripper as it was; a fresh env that does not end on success, stepped with the recorded
    actions, still succeeds at the last one (the cube is held at the goal)."""
    out, _ = pick_demos
    demos = read_demos(out, "flowrl/PickCube-v1", (42, 4))
    seed = int(read_metadata(out)["seeds"].split(",")[0])
    planned = demos["actions"][: demos["episode_ends"][0]]
    held, kept = replay("flowrl/PickCube-v1", [(seed, planned)], "pd_ee_delta_pos", hold_steps=6)
    assert kept == [seed] and len(held["actions"]) == len(planned) + 6
    np.testing.assert_array_equal(held["actions"][: len(planned)], planned)
    hold = held["actions"][len(planned) :]
    assert np.all(hold[:, :3] == 0) and np.all(hold[:, 3] == planned[-1, 3])
    env = gym.make("flowrl/PickCube-v1", terminate_on_success=False)
    try:
        obs, _ = env.reset(seed=seed)
        for t, action in enumerate(held["actions"]):
            np.testing.assert_array_equal(obs, held["observations"][t])
            obs, _, terminated, truncated, info = env.step(action)
        assert info["success"] and not truncated
    finally:
        env.close()


@pytest.mark.parametrize(
    ("env_id", "episodes", "message", "extra"),
    [
        ("Hopper-v5", 2, "not a ManiSkill task", {}),
        ("flowrl/PickCube-v1", 0, "--episodes must be >= 1", {}),
        ("flowrl/PickCube-v1", 2, "--hold-steps must be >= 0", {"hold_steps": -1}),
        (
            "flowrl/PickCube-v1",
            2,
            "--hold-steps needs a delta controller",
            {"hold_steps": 4, "control_mode": "pd_joint_pos"},
        ),
    ],
)
def test_bad_arguments_are_one_clear_line(tmp_path, env_id: str, episodes: int, message: str, extra: dict) -> None:
    with pytest.raises(FlowRLError, match=message) as info:
        motion_planning_demos(env_id, episodes, tmp_path / "x.npz", progress=False, **extra)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x.npz").exists()
