"""Wrappers shared by every env family."""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np

from flowrl.errors import FlowRLError

# Receives a rendered frame [H, W, 3] uint8 and the env's frames per second of real time
# (metadata["render_fps"], None if the env does not say).
FrameSink = Callable[[np.ndarray, "float | None"], None]


class ActionChunk(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Executes an action chunk ``[Ta, Da]`` as Ta env steps; one policy step = one chunk.

    Rewards are summed; the chunk stops early when the episode terminates or truncates.
    Actions are clipped to the inner action space. ``info["chunk_steps"]`` counts the
    primitive steps taken (for env-step accounting).
    """

    def __init__(self, env: gym.Env, horizon: int) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, horizon=horizon)
        gym.Wrapper.__init__(self, env)
        if horizon < 1:
            raise ValueError(f"action chunk horizon must be >= 1, got {horizon}")
        inner = env.action_space
        if not isinstance(inner, gym.spaces.Box) or len(inner.shape) != 1:
            raise ValueError(f"ActionChunk needs a 1-D Box action space, got {inner}")
        self.horizon = horizon
        self.action_space = gym.spaces.Box(
            np.repeat(inner.low[None], horizon, axis=0),
            np.repeat(inner.high[None], horizon, axis=0),
            dtype=inner.dtype,
        )

    def step(self, action):
        action = np.asarray(action, dtype=self.env.action_space.dtype).reshape(self.action_space.shape)
        low, high = self.env.action_space.low, self.env.action_space.high
        total, info = 0.0, {}
        terminated = truncated = False
        steps = 0
        for a in action:
            obs, reward, terminated, truncated, info = self.env.step(np.clip(a, low, high))
            total += float(reward)
            steps += 1
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, {**info, "chunk_steps": steps}


class RenderFrames(gym.Wrapper):
    """Hands ``on_frame`` (a FrameSink) a rendered frame after every reset and every step.

    Placed below ``ActionChunk``, it sees every primitive step of a chunk: an episode of n steps
    gives n + 1 frames (the reset's first). The env must be made with ``render_mode="rgb_array"``.
    A first frame that fails is a one-line FlowRLError naming the env and ``fix``: OpenGL and
    Vulkan back ends fail in many ways (MuJoCo's FatalError, PyOpenGL's AttributeError, ...), and
    a traceback into them says nothing about what to install or set.
    """

    def __init__(self, env: gym.Env, on_frame: FrameSink, fix: str) -> None:
        super().__init__(env)
        self.on_frame, self.fix = on_frame, fix
        self._rendered = False

    def _frame(self) -> None:
        fps = self.env.metadata.get("render_fps")
        if self._rendered:
            self.on_frame(np.asarray(self.env.render()), fps)
            return
        name = self.env.spec.id if self.env.spec else type(self.env.unwrapped).__name__
        try:
            frame = np.asarray(self.env.render())
        except Exception as exc:  # noqa: BLE001 - see the class doc
            cause = (str(exc).strip().splitlines() or [""])[0][:200]
            raise FlowRLError(f"{name} cannot render a frame ({type(exc).__name__}: {cause}); {self.fix}") from None
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise FlowRLError(f"{name} renders {frame.dtype} frames of shape {frame.shape}, not [H, W, 3] uint8")
        self._rendered = True
        self.on_frame(frame, fps)

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self._frame()
        return out

    def step(self, action):
        out = self.env.step(action)
        self._frame()
        return out
