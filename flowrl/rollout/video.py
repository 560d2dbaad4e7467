"""Videos of evaluation episodes (``flowrl eval RUN --video N``).

``record_episodes`` runs the deterministic evaluation (``evaluate_policy``: its seeds, its initial
noise, all ``eval_episodes`` envs) and renders the chosen episodes, so the video of episode i is
episode i of that evaluation, as logged during training with the same config. Per episode i:

    episode_{i}.mp4         the reset frame and one frame per primitive env step (an episode of n
                            steps has n + 1 frames), H.264 at the env's render_fps (real time)
    episode_{i}_last.png    its last frame (what the README shows before and after fine-tuning)
    episode_{i}_strip.png   its first and last frames side by side

and, with ``tensorboard_dir``, the strip as a TensorBoard image (tag ``{tag}/episode_{i}``):
TensorBoard's add_video needs moviepy, which flowrl does not install.

Frames go to ffmpeg (imageio-ffmpeg's binary) as they come, not into memory: a 100-step episode
of 512 x 512 frames is ~80 MB, times the episodes recorded at once. Each MP4 is written under a
temporary name and renamed when complete, so a failed recording leaves no half video.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowrl.errors import FlowRLError
from flowrl.models.policy import Policy
from flowrl.rollout.evaluation import evaluate_policy

DEFAULT_FPS = 30.0  # for an env whose metadata gives no render_fps
STRIP_GAP = 4  # white pixels between the frames of a strip


@dataclass
class Recording:
    """What ``record_episodes`` made: the MP4s in episode order (the PNGs lie next to them) and
    the metrics of the whole evaluation (``evaluate_policy``'s, rendering changes no episode)."""

    videos: list[Path]
    metrics: dict[str, float]


class EpisodeVideo:
    """One episode's frames (a FrameSink) streamed into ``path``; keeps its first and last frame."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # ffmpeg picks the format by suffix
        self._writer: Any = None
        self.first: np.ndarray | None = None
        self.last: np.ndarray | None = None
        self.frames = 0

    def __call__(self, frame: np.ndarray, fps: float | None) -> None:
        if self._writer is None:
            import imageio.v2 as imageio

            # macro_block_size 2: H.264 (yuv420p) needs even sides; 16 would rescale most sizes
            self._writer = imageio.get_writer(
                self._tmp, fps=fps or DEFAULT_FPS, codec="libx264", macro_block_size=2, ffmpeg_log_level="error"
            )
            self.first = frame.copy()
        self._writer.append_data(frame)
        self.last = frame.copy()
        self.frames += 1

    def finish(self) -> np.ndarray:
        """Close the MP4, write the PNGs; returns the strip ``[H, 2W + gap, 3]`` uint8."""
        from PIL import Image

        assert self._writer is not None and self.first is not None and self.last is not None
        self._writer.close()
        self._tmp.replace(self.path)
        gap = np.full((self.first.shape[0], STRIP_GAP, 3), 255, np.uint8)
        strip = np.concatenate([self.first, gap, self.last], axis=1)
        Image.fromarray(self.last).save(self.path.with_name(f"{self.path.stem}_last.png"))
        Image.fromarray(strip).save(self.path.with_name(f"{self.path.stem}_strip.png"))
        return strip

    def abandon(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._tmp.unlink(missing_ok=True)


def parse_episodes(text: str) -> int | list[int]:
    """``flowrl eval --video``'s argument: ``N`` (the first N episodes) or indices ``0,3,5``
    (one index: ``5,``)."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or ("," not in text and values[0] < 1):
        raise FlowRLError(f"--video {text!r}: give a count N >= 1 or episode indices such as 0,3,5 (one: 5,)")
    return values if "," in text else values[0]


def chosen_episodes(episodes: int | Sequence[int], eval_episodes: int) -> list[int]:
    """``episodes`` (a count: the first ones; or indices) as sorted indices of the evaluation's."""
    chosen = list(range(episodes)) if isinstance(episodes, int) else sorted(set(episodes))
    if not chosen:
        raise FlowRLError("videos: choose at least one episode (a count, or indices such as 0,3)")
    outside = [i for i in chosen if not 0 <= i < eval_episodes]
    if outside:
        raise FlowRLError(
            f"videos: episode {outside[0]} is not one of the evaluation's {eval_episodes} episodes "
            f"(0-{eval_episodes - 1}); choose among them or raise eval.episodes"
        )
    return chosen


def record_episodes(
    policy: Policy,
    env_id: str,
    horizon: int,
    episodes: int | Sequence[int],
    seed: int,
    env_kwargs: dict | None,
    out_dir: str | Path,
    *,
    eval_episodes: int,
    tensorboard_dir: str | Path | None = None,
    tag: str = "eval/video",
) -> Recording:
    """Evaluate ``policy`` on ``eval_episodes`` episodes (eval.episodes) and film ``episodes`` of
    them (a count: the first ones; or indices) into ``out_dir`` (see the module doc).

    An env that cannot render is a one-line FlowRLError naming it and the fix (envs.make_env)."""
    chosen = chosen_episodes(episodes, eval_episodes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    videos = {i: EpisodeVideo(out_dir / f"episode_{i}.mp4") for i in chosen}
    try:
        metrics = evaluate_policy(policy, env_id, horizon, eval_episodes, seed, env_kwargs, on_frame=videos)
        strips = {i: video.finish() for i, video in videos.items()}
    except BaseException:
        for video in videos.values():
            video.abandon()
        raise
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter  # slow to import

        writer = SummaryWriter(str(tensorboard_dir))
        for i, strip in strips.items():
            writer.add_image(f"{tag}/episode_{i}", strip, 0, dataformats="HWC")
        writer.close()
    return Recording([video.path for video in videos.values()], metrics)


__all__ = ["DEFAULT_FPS", "EpisodeVideo", "Recording", "chosen_episodes", "parse_episodes", "record_episodes"]
