"""Tests of flowrl.rollout.demos (``flowrl collect``) on TwoGoal.

Oracles: a replay of every recorded episode in a fresh env reset with the documented seed
(derive_seed(seed, 7) + i): it must see the recorded observations, end exactly at the
recorded length and pay the recorded return; the action bounds; the file read back by
flowrl.algos.bc.load_demos.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401  (registers the envs)
from flowrl.algos.bc import load_demos
from flowrl.config import DemosConfig
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.gaussian_policy import GaussianPolicy
from flowrl.models.networks import GaussianActor, VelocityMLP
from flowrl.models.sampler import ChainSampler
from flowrl.rollout.demos import collect_demos, save_demos
from flowrl.runtime import derive_seed

ENV_ID = "flowrl/TwoGoal-v0"
EPISODES = 12


def gaussian_policy(horizon: int = 4) -> GaussianPolicy:
    """Mean action ~(0.8, 0.8) + a small obs-dependent part: heads for the rewarded goal."""
    torch.manual_seed(0)
    actor = GaussianActor(2, horizon, 2, hidden_dims=(8,))
    with torch.no_grad():
        actor.net[-1].weight.normal_(0.0, 0.3)
        actor.net[-1].bias.fill_(0.8)
    return GaussianPolicy(actor)


def flow_policy(horizon: int = 2) -> FlowPolicy:
    """ODE from x_0 ~ N(0, I) with a drift to the upper right: random, goal-directed actions."""
    torch.manual_seed(1)
    velocity = VelocityMLP(2, horizon, 2, hidden_dims=(8,), time_dim=4)
    with torch.no_grad():
        velocity.net[-1].weight.mul_(0.1)
        velocity.net[-1].bias.fill_(0.8)
    return FlowPolicy(velocity, ChainSampler(2))  # ODE only: no converter, it acts deterministically


POLICIES = {"gaussian": gaussian_policy, "flow": flow_policy}


def _collect(make, seed: int, noise: float = 0.0) -> dict[str, np.ndarray]:
    return collect_demos(make(), ENV_ID, EPISODES, seed, action_noise=noise, progress=False)


def _episodes(demos):
    ends = demos["episode_ends"]
    starts = np.concatenate([[0], ends[:-1]])
    return list(zip(starts, ends, strict=True))


@pytest.mark.parametrize("name", POLICIES)
def test_same_seed_same_dataset_other_seed_other_dataset(name):
    make = POLICIES[name]
    noise = 0.3 if name == "gaussian" else 0.0  # the flow policy is random through its initial noise
    first, again, other = _collect(make, 3, noise), _collect(make, 3, noise), _collect(make, 4, noise)
    assert first.keys() == {"observations", "actions", "episode_ends", "episode_returns"}
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert first["observations"].shape != other["observations"].shape or not np.array_equal(
        first["observations"], other["observations"]
    )


@pytest.mark.parametrize(("name", "noise"), [("gaussian", 0.0), ("gaussian", 0.5), ("flow", 0.0), ("flow", 0.3)])
def test_replay_reproduces_observations_lengths_and_returns(name, noise):
    seed = 11
    demos = _collect(POLICIES[name], seed, noise)
    obs, actions, ends, returns = (demos[k] for k in ("observations", "actions", "episode_ends", "episode_returns"))
    n = len(obs)
    assert obs.dtype == np.float32 and actions.dtype == np.float32
    assert obs.shape == (n, 2) and actions.shape == (n, 2)
    assert ends.shape == (EPISODES,) and returns.shape == (EPISODES,)
    assert ends[-1] == n and np.all(np.diff(ends) > 0) and ends[0] > 0
    assert np.all(np.diff(ends) <= 30) and ends[0] <= 30  # TwoGoal's time limit
    base = derive_seed(seed, 7)
    outcomes = set()
    for i, (start, end) in enumerate(_episodes(demos)):
        env = gym.make(ENV_ID)
        o, _ = env.reset(seed=base + i)
        total = 0.0
        for k in range(start, end):
            np.testing.assert_array_equal(o, obs[k])  # the recorded observation is the one acted on
            o, r, term, trunc, _ = env.step(actions[k])
            total += r
            assert (term or trunc) == (k == end - 1), "the episode ends exactly at its recorded end"
        env.close()
        assert total == returns[i]
        outcomes.add((bool(term), total))
    # the datasets hold different kinds of episodes: the replay checks rewarded ones too
    assert any(ret == 1.0 for _, ret in outcomes), outcomes


@pytest.mark.parametrize("name", POLICIES)
def test_action_noise_stays_inside_the_action_bounds(name):
    noisy = _collect(POLICIES[name], 5, noise=2.0)
    actions = noisy["actions"]
    assert actions.min() >= -1.0 and actions.max() <= 1.0
    assert np.mean(np.abs(actions) == 1.0) > 0.3  # the big noise is clipped, not dropped
    clean = _collect(POLICIES[name], 5)
    assert clean["actions"].min() >= -1.0 and clean["actions"].max() <= 1.0  # executed = clipped actions too
    assert not np.array_equal(noisy["actions"][:5], clean["actions"][:5])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="episodes"):
        collect_demos(gaussian_policy(), ENV_ID, 0, 0, progress=False)
    with pytest.raises(ValueError, match="noise"):
        collect_demos(gaussian_policy(), ENV_ID, 2, 0, action_noise=-0.1, progress=False)


def test_save_then_load_demos_round_trips(tmp_path):
    demos = _collect(flow_policy, 2, 0.1)
    path = save_demos(demos, tmp_path / "sub" / "d.npz", env_id=ENV_ID, action_noise=0.1, seed=2)
    assert path == tmp_path / "sub" / "d.npz" and path.is_file()
    assert not list(path.parent.glob("*.tmp*")), "the temporary file is renamed away"
    loaded = load_demos(DemosConfig(path=str(path)), ENV_ID, 0)
    assert loaded.keys() == {"observations", "actions", "episode_ends"}
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, demos[key])
        assert value.dtype == demos[key].dtype
    with np.load(path) as data:
        np.testing.assert_array_equal(data["episode_returns"], demos["episode_returns"])
        assert str(data["meta_env_id"]) == ENV_ID and str(data["meta_action_noise"]) == "0.1"
