"""Tests of flowrl.rollout.demos (``flowrl collect``) and of the file format (flowrl.core.demos_file) on TwoGoal.

Oracles: a replay of every recorded episode in a fresh env reset with the documented seed
(derive_seed(seed, 7) + i): it must see the recorded observations, end exactly at the
recorded length and pay the recorded return; the action bounds; the first sampled actions
redrawn from the policy with the documented generator seed; the file read back by
flowrl.algos.bc.load_demos, which refuses a dataset recorded in another env.
"""

from __future__ import annotations

import logging

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401  (registers the envs)
from flowrl.algos.bc import load_demos
from flowrl.config import DemosConfig
from flowrl.core.demos_file import read_demos, read_metadata, save_demos
from flowrl.errors import DatasetError
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.gaussian_policy import GaussianPolicy
from flowrl.models.networks import GaussianActor, VelocityMLP
from flowrl.models.sampler import ChainSampler
from flowrl.rollout.demos import check_demos, collect_demos
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


def _collect(make, seed: int, noise: float = 0.0, actions: str = "deterministic") -> dict[str, np.ndarray]:
    return collect_demos(make(), ENV_ID, EPISODES, seed, action_noise=noise, progress=False, actions=actions)


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


@pytest.mark.parametrize(
    ("name", "noise", "actions"),
    [
        ("gaussian", 0.0, "deterministic"),
        ("gaussian", 0.5, "deterministic"),
        ("gaussian", 0.0, "sample"),
        ("flow", 0.0, "deterministic"),
        ("flow", 0.3, "deterministic"),
    ],
)
def test_replay_reproduces_observations_lengths_and_returns(name, noise, actions):
    seed = 11
    demos = _collect(POLICIES[name], seed, noise, actions)
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


def test_sampled_actions_are_the_policys_own_draws():
    """actions="sample": the first chunk of every episode is the policy's own sample for the
    initial observations, drawn with the documented generator (derive_seed(seed, 7, 1)), then
    clipped to the bounds; a different dataset from the deterministic (mean) actions."""
    seed, policy = 4, gaussian_policy()
    with torch.no_grad():
        policy.actor.log_std.fill_(np.log(0.3))  # a std the test can see against the mean
    demos = collect_demos(policy, ENV_ID, EPISODES, seed, progress=False, actions="sample")
    base = derive_seed(seed, 7)
    obs0 = np.stack([gym.make(ENV_ID).reset(seed=base + i)[0] for i in range(EPISODES)]).astype(np.float32)
    generator = torch.Generator().manual_seed(derive_seed(seed, 7, 1))
    first = policy.sample(torch.as_tensor(obs0), generator=generator).final[:, 0].numpy()
    starts = np.concatenate([[0], demos["episode_ends"][:-1]])
    np.testing.assert_allclose(demos["actions"][starts], np.clip(first, -1.0, 1.0), rtol=1e-6)
    mean = policy.act(torch.as_tensor(obs0))[:, 0].numpy()
    assert np.abs(first - mean).mean() > 0.1  # the draws are not the mean
    deterministic = collect_demos(policy, ENV_ID, EPISODES, seed, progress=False)
    np.testing.assert_allclose(deterministic["actions"][:1], np.clip(mean[:1], -1.0, 1.0), rtol=1e-6)
    with pytest.raises(ValueError, match="actions must be"):
        collect_demos(policy, ENV_ID, 2, 0, progress=False, actions="noisy")


def _dataset(tmp_path, **metadata):
    return save_demos(_collect(gaussian_policy, 0), tmp_path / "d.npz", **metadata)


def test_a_dataset_of_another_env_is_refused_with_one_line(tmp_path):
    path = _dataset(tmp_path, env_id="HalfCheetah-v5")
    for check in (
        lambda: check_demos(DemosConfig(path=str(path)), ENV_ID, (2, 2)),
        lambda: load_demos(DemosConfig(path=str(path)), ENV_ID, 0),
        lambda: read_demos(path, ENV_ID),
    ):
        with pytest.raises(DatasetError) as err:
            check()
        message = str(err.value)
        assert len(message.splitlines()) == 1
        assert f"{path} was recorded in HalfCheetah-v5 but the experiment's env.id is {ENV_ID}" in message
    assert read_metadata(path) == {"env_id": "HalfCheetah-v5"}


def _warnings_of(load) -> list[str]:
    """flowrl's logged warnings while ``load`` runs (the CLI stops the "flowrl" logger from
    propagating, so a handler goes on it directly)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("flowrl")
    logger.addHandler(handler)
    try:
        load()
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records]


def test_a_dataset_that_does_not_name_its_env_is_used_with_a_warning(tmp_path):
    path = _dataset(tmp_path)  # hand-made files have only the three arrays
    assert read_metadata(path) == {}
    check_demos(DemosConfig(path=str(path)), ENV_ID, (2, 2))
    loaded = {}
    (warning,) = _warnings_of(lambda: loaded.update(load_demos(DemosConfig(path=str(path)), ENV_ID, 0)))
    assert len(loaded["observations"]) > 0
    assert "does not say which env" in warning and ENV_ID in warning and "meta_env_id" in warning
    named = _dataset(tmp_path / "named", env_id=ENV_ID)
    assert _warnings_of(lambda: load_demos(DemosConfig(path=str(named)), ENV_ID, 0)) == []


def test_a_provenance_entry_that_is_not_a_string_is_refused(tmp_path):
    demos = _collect(gaussian_policy, 0)
    np.savez(tmp_path / "d.npz", **demos, meta_env_id=np.arange(3))
    with pytest.raises(DatasetError, match="array meta_env_id is not a string"):
        read_demos(tmp_path / "d.npz", ENV_ID)
