"""Tests of evaluation videos (flowrl.rollout.video, ``flowrl eval --video``).

Oracles: the episode limit (PickCube limited to 6 primitive steps, chunks of 2: every episode of
a random policy runs to it, so a video has 6 + 1 frames, the reset's first); ``evaluate_policy``
without rendering (a recording's metrics are the same numbers: rendering changes no episode);
the MP4 read back with imageio; TensorBoard's event reader. The ManiSkill tests share one
recording (a process's first rendered frame compiles the shaders, ~10 s on the CPU) and skip, as
tests/envs/test_maniskill.py does, when ManiSkill cannot make an env on this machine
(FLOWRL_REQUIRE_MANISKILL=1 makes that a failure).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from PIL import Image

import envs  # noqa: F401 - registers flowrl's envs
from envs.maniskill import ManiSkillUnavailable
from flowrl.cli import main
from flowrl.config import build_config, save_config
from flowrl.errors import FlowRLError
from flowrl.models.build import actor_record, build_actor, build_policy
from flowrl.rollout.evaluation import evaluate_policy
from flowrl.rollout.video import STRIP_GAP, Recording, chosen_episodes, parse_episodes, record_episodes
from flowrl.runlog import atomic_save

ENV_ID = "flowrl/PickCube-v1"
LIMIT, HORIZON, SIZE, EVAL_EPISODES = 6, 2, 64, 3
KWARGS = {"max_episode_steps": LIMIT, "render_size": SIZE}
CONFIG = {
    "name": "video",
    "env": {"id": ENV_ID, "kwargs": KWARGS},
    "policy": {"horizon": HORIZON, "hidden_dims": [16], "time_embed_dim": 8},
    "eval": {"episodes": 2},
    "ray": {"enabled": False},
}


def _policy(cfg_data: dict, obs_dim: int, action_dim: int, seed: int = 0):
    cfg = build_config(cfg_data)
    torch.manual_seed(seed)
    actor = build_actor(cfg.policy, obs_dim, action_dim)
    return cfg, actor, build_policy(cfg, actor)


def _maniskill_dims() -> tuple[int, int]:
    try:
        env = gym.make(ENV_ID)
    except ManiSkillUnavailable as exc:
        if os.environ.get("FLOWRL_REQUIRE_MANISKILL"):
            raise
        pytest.skip(f"ManiSkill cannot make an env on this machine: {exc}")
    dims = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    return dims


def _frames(path: Path) -> tuple[list[np.ndarray], float]:
    import imageio.v2 as imageio

    reader = imageio.get_reader(path)
    frames = [frame for frame in reader]  # list(reader) asks len(), infinite for a stream
    fps = reader.get_meta_data()["fps"]
    reader.close()
    return frames, fps


def _board_images(folder: Path) -> dict[str, tuple[int, int]]:
    """TensorBoard image tags in ``folder`` -> (height, width)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: (acc.Images(tag)[0].height, acc.Images(tag)[0].width) for tag in acc.Tags()["images"]}


@pytest.fixture(scope="module")
def renderer():
    """A rendering ManiSkill env kept open: SAPIEN drops its renderer, compiled shaders and all
    (~10 s), when the last env that renders closes, and each recording closes its envs."""
    _maniskill_dims()  # skips where ManiSkill cannot run
    env = gym.make(ENV_ID, render_mode="rgb_array", render_size=SIZE)
    env.reset(seed=0)
    env.render()
    yield
    env.close()


@pytest.fixture(scope="module")
def recorded(renderer, tmp_path_factory) -> tuple[Recording, Path, dict[str, float]]:
    """Episodes 0 and 2 of a 3-episode evaluation filmed, and the same evaluation unfilmed."""
    obs_dim, action_dim = _maniskill_dims()
    _, _, policy = _policy({"name": "v", "policy": CONFIG["policy"]}, obs_dim, action_dim)
    out = tmp_path_factory.mktemp("videos")
    recording = record_episodes(
        policy, ENV_ID, HORIZON, [2, 0], 5, KWARGS, out, eval_episodes=EVAL_EPISODES, tensorboard_dir=out / "tb"
    )
    plain = evaluate_policy(policy, ENV_ID, HORIZON, EVAL_EPISODES, 5, KWARGS)
    return recording, out, plain


def test_videos_have_a_frame_per_env_step_and_the_evaluations_metrics(recorded) -> None:
    recording, out, plain = recorded
    assert recording.videos == [out / "episode_0.mp4", out / "episode_2.mp4"]
    assert recording.metrics == plain  # the filmed episodes are the evaluation's, unchanged
    assert plain["eval/episode_length"] == LIMIT  # every episode ran to the limit: 6 primitive steps
    for video in recording.videos:
        frames, fps = _frames(video)
        assert len(frames) == LIMIT + 1 and fps == 20.0  # the reset frame, then one per step; ManiSkill's 20 Hz
        assert all(f.shape == (SIZE, SIZE, 3) and f.dtype == np.uint8 for f in frames)
        assert np.abs(frames[-1].astype(int) - frames[0]).mean() > 1.0  # the arm moved
        last = np.asarray(Image.open(video.with_name(f"{video.stem}_last.png")))
        off = [np.abs(last.astype(int) - frame).mean() for frame in frames]  # H.264 (yuv420p) is lossy
        assert last.shape == (SIZE, SIZE, 3) and off[-1] < 8 and off[-1] < off[0]
        strip = np.asarray(Image.open(video.with_name(f"{video.stem}_strip.png")))
        assert strip.shape == (SIZE, 2 * SIZE + STRIP_GAP, 3)
        np.testing.assert_array_equal(strip[:, SIZE + STRIP_GAP :], last)
    names = {p.name for p in out.iterdir()}
    assert names == {"tb"} | {f"episode_{i}{end}" for i in (0, 2) for end in (".mp4", "_last.png", "_strip.png")}
    strip_shape = (SIZE, 2 * SIZE + STRIP_GAP)
    assert _board_images(out / "tb") == {"eval/video/episode_0": strip_shape, "eval/video/episode_2": strip_shape}


def _run_folder(path: Path) -> Path:
    obs_dim, action_dim = _maniskill_dims()
    cfg, actor, _ = _policy(CONFIG, obs_dim, action_dim, seed=1)
    path.mkdir()
    save_config(cfg, path / "config.yaml")
    atomic_save(actor_record(actor, cfg.policy), path / "policy.pt")
    return path


def test_cli_eval_video_writes_to_the_run_folder_and_prints_the_paths(renderer, tmp_path, capsys) -> None:
    run = _run_folder(tmp_path / "run")
    assert main(["eval", str(run)]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--video", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    video = run / "videos" / "policy" / "episode_0.mp4"
    assert out == {**plain, "videos": [str(video)]}  # the metrics as without --video, and the path
    assert len(_frames(video)[0]) == LIMIT + 1
    assert (run / "videos" / "policy" / "episode_0_last.png").is_file()
    strip_shape = (SIZE, 2 * SIZE + STRIP_GAP)
    assert _board_images(run / "tensorboard" / "videos") == {"eval/video/policy/episode_0": strip_shape}
    # an episode the evaluation (eval.episodes=2) does not have: one line, nothing written
    assert main(["eval", str(run), "--video", "5,", "--video-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "episode 5 is not one of the evaluation's 2 episodes" in err[0]
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(("text", "expected"), [("3", 3), ("0,3,5", [0, 3, 5]), ("5,", [5]), (" 1 , 2 ", [1, 2])])
def test_parse_episodes(text: str, expected) -> None:
    assert parse_episodes(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-2", "a", "1,b", ","])
def test_parse_episodes_rejects(text: str) -> None:
    with pytest.raises(FlowRLError, match="give a count N >= 1 or episode indices"):
        parse_episodes(text)


def test_chosen_episodes() -> None:
    assert chosen_episodes(2, 5) == [0, 1] and chosen_episodes([3, 1, 3], 5) == [1, 3]
    with pytest.raises(FlowRLError, match="episode 5 is not one of the evaluation's 5 episodes \\(0-4\\)"):
        chosen_episodes(6, 5)
    with pytest.raises(FlowRLError, match="episode -1 is not one"):
        chosen_episodes([-1], 5)


def test_an_env_without_rgb_array_is_one_clear_line(tmp_path) -> None:
    _, _, policy = _policy({"name": "v", "policy": {"horizon": 1, "hidden_dims": [8]}}, 2, 2)
    with pytest.raises(FlowRLError) as info:
        record_episodes(policy, "flowrl/TwoGoal-v0", 1, 1, 0, None, tmp_path / "v", eval_episodes=2)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("flowrl/TwoGoal-v0 cannot render episodes (its render modes: [])")
    assert "render_mode='rgb_array'" in message


class BrokenRenderEnv(gym.Env):
    """Says it renders rgb_array, but its renderer is missing (as MuJoCo without OpenGL)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def __init__(self, render_mode: str | None = None) -> None:
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, False, False, {}

    def render(self):
        raise RuntimeError("no OpenGL context\nmore detail")


def test_a_renderer_that_fails_is_one_clear_line_and_leaves_no_file(tmp_path) -> None:
    if "test/BrokenRender-v0" not in gym.registry:
        gym.register("test/BrokenRender-v0", entry_point=BrokenRenderEnv, max_episode_steps=5)
    _, _, policy = _policy({"name": "v", "policy": {"horizon": 1, "hidden_dims": [8]}}, 2, 2)
    with pytest.raises(FlowRLError) as info:
        record_episodes(policy, "test/BrokenRender-v0", 1, 1, 0, None, tmp_path / "v", eval_episodes=1)
    assert str(info.value) == (
        "test/BrokenRender-v0 cannot render a frame (RuntimeError: no OpenGL context); "
        "check the env's render() with render_mode='rgb_array'"
    )
    assert list((tmp_path / "v").iterdir()) == []


def test_mujoco_renders_headless_or_says_how_to(tmp_path, monkeypatch) -> None:
    """Without a display and MUJOCO_GL, flowrl picks EGL (MuJoCo's default, glfw, needs a window):
    Hopper's episode is filmed, or (no EGL here) the error names MUJOCO_GL and its values."""
    pytest.importorskip("mujoco")
    monkeypatch.setenv("MUJOCO_GL", "")
    monkeypatch.delenv("MUJOCO_GL")  # restored (or removed again) after the test
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    _, _, policy = _policy({"name": "v", "policy": {"horizon": 2, "hidden_dims": [8]}}, 11, 3)
    kwargs = {"width": 48, "height": 48}
    try:
        recording = record_episodes(policy, "Hopper-v5", 2, 1, 0, kwargs, tmp_path, eval_episodes=1)
    except FlowRLError as exc:
        assert "Hopper-v5 cannot render a frame" in str(exc) and "MUJOCO_GL=egl" in str(exc)
        pytest.skip(f"MuJoCo cannot render here: {exc}")
    assert os.environ["MUJOCO_GL"] == "egl"
    frames, fps = _frames(recording.videos[0])
    assert len(frames) == recording.metrics["eval/episode_length"] + 1 and frames[0].shape == (48, 48, 3)
    assert fps == 125.0  # Hopper's 1 / dt: real time
