"""Wrappers shared by every env family."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


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
