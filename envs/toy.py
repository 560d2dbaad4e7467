"""TwoGoal: a 2-D point mass with two goals, only one of which pays.

The scripted demonstrator drives to either goal with equal probability, so behaviour
cloning yields a bimodal policy that succeeds about half the time; RL fine-tuning has to
move the policy's mass onto the rewarded goal. Runs thousands of steps per second.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

GOALS = np.array([[0.7, 0.7], [-0.7, 0.7]], dtype=np.float32)  # index 0 pays, index 1 does not
REWARDED_GOAL = 0


class TwoGoalEnv(gym.Env):
    """Point mass in [-1.5, 1.5]^2 starting near the origin.

    observation: position ``[2]``. action: velocity command in [-1, 1]^2, moving the point
    by ``max_speed * action``. Reaching a goal (within ``goal_radius``) ends the episode;
    the rewarded goal gives reward 1 and ``info["success"] = True``, the other gives 0.
    """

    metadata = {"render_modes": []}

    def __init__(self, max_speed: float = 0.1, goal_radius: float = 0.12, start_noise: float = 0.03) -> None:
        self.max_speed, self.goal_radius, self.start_noise = max_speed, goal_radius, start_noise
        self.observation_space = gym.spaces.Box(-1.5, 1.5, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self._pos = np.zeros(2, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._pos = self.np_random.normal(0.0, self.start_noise, size=2).astype(np.float32)
        return self._pos.copy(), {}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        self._pos = np.clip(self._pos + self.max_speed * action, -1.5, 1.5).astype(np.float32)
        dists = np.linalg.norm(GOALS - self._pos, axis=1)
        reached = int(np.argmin(dists)) if dists.min() < self.goal_radius else -1
        success = reached == REWARDED_GOAL
        reward = 1.0 if success else 0.0
        return self._pos.copy(), reward, reached >= 0, False, {"success": success}


def scripted_demos(num_episodes: int, seed: int, max_steps: int = 30) -> dict[str, np.ndarray]:
    """Demonstrations: each episode drives to a goal drawn 50/50, with action noise.

    Returns ``observations [N, 2]``, ``actions [N, 2]`` and ``episode_ends [E]`` (exclusive
    end index of each episode in the flat arrays).
    """
    rng = np.random.default_rng(seed)
    env = TwoGoalEnv()
    observations, actions, ends = [], [], []
    for episode in range(num_episodes):
        obs, _ = env.reset(seed=int(rng.integers(2**31)))
        goal = GOALS[episode % 2]
        for _ in range(max_steps):
            direction = goal - obs
            dist = float(np.linalg.norm(direction))
            action = direction / max(dist, 1e-6) * min(1.0, dist / env.max_speed)
            action = np.clip(action + rng.normal(0.0, 0.1, size=2), -1.0, 1.0).astype(np.float32)
            observations.append(obs)
            actions.append(action)
            obs, _, terminated, _, _ = env.step(action)
            if terminated:
                break
        ends.append(len(actions))
    return {
        "observations": np.asarray(observations, dtype=np.float32),
        "actions": np.asarray(actions, dtype=np.float32),
        "episode_ends": np.asarray(ends, dtype=np.int64),
    }
