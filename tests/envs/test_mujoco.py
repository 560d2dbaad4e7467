"""gymnasium's MuJoCo v5 locomotion tasks through flowrl's action chunking."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from flowrl.bench.tasks import load_tasks

# The MuJoCo ids of the locomotion tasks (their files in experiments/locomotion/tasks, or $FLOWRL_LOCOMOTION_TASKS)
LOCOMOTION = sorted({task.spec.env_id for task in load_tasks().values()})


@pytest.mark.parametrize("env_id", LOCOMOTION)
def test_chunked_mujoco_env_passes_the_checker_and_sums_rewards(env_id):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(envs.make_env(env_id, 4), skip_render_check=True)
        chunked, plain = envs.make_env(env_id, 4), gym.make(env_id)
    chunked.reset(seed=3)
    plain.reset(seed=3)
    actions = np.random.default_rng(0).uniform(-0.3, 0.3, size=(4, plain.action_space.shape[0])).astype(np.float32)
    obs, reward, terminated, truncated, info = chunked.step(actions)
    expected, steps = 0.0, 0
    for a in actions:  # the oracle: the same actions one by one on the unwrapped task
        plain_obs, r, term, trunc, _ = plain.step(a)
        expected += r
        steps += 1
        if term or trunc:
            break
    assert info["chunk_steps"] == steps
    assert reward == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(obs, plain_obs, rtol=1e-6)
    assert chunked.action_space.shape == (4, plain.action_space.shape[0])
