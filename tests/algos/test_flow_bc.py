"""Tests of flowrl.algos.flow_bc: demonstration loading, action chunking, flow-matching BC.

Oracles: chunks written out by hand; a synthetic task whose conditional target is known
(action chunk = obs * C), checked through the ODE policy of flowrl.models.flow_policy.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from flowrl.algos.bc import DatasetError, action_chunks, demo_batches, fit, load_demos
from flowrl.algos.flow_bc import flow_matching_loss
from flowrl.config import DemosConfig, PretrainConfig
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.networks import VelocityMLP
from flowrl.models.sampler import ChainSampler

# --------------------------------------------------------------------------------------------
# action_chunks
# --------------------------------------------------------------------------------------------


def _two_episodes() -> dict[str, np.ndarray]:
    # episode A: steps 0, 1, 2; episode B: steps 3, 4. Action i is (i, -i) + 0.5, observation i is (10 i,).
    actions = np.array([[i + 0.5, -i - 0.5] for i in range(5)], dtype=np.float32)
    observations = np.array([[10.0 * i] for i in range(5)], dtype=np.float32)
    return {"observations": observations, "actions": actions, "episode_ends": np.array([3, 5])}


def test_action_chunks_by_hand() -> None:
    obs, chunks = action_chunks(_two_episodes(), horizon=3)
    a = [[i + 0.5, -i - 0.5] for i in range(5)]
    expected = [
        [a[0], a[1], a[2]],
        [a[1], a[2], a[2]],  # padded with the episode's last action
        [a[2], a[2], a[2]],
        [a[3], a[4], a[4]],  # episode B never borrows from episode A
        [a[4], a[4], a[4]],
    ]
    assert obs.dtype == torch.float32 and chunks.dtype == torch.float32
    assert obs.shape == (5, 1) and chunks.shape == (5, 3, 2)
    assert obs[:, 0].tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert chunks.tolist() == expected


def test_action_chunks_horizon_one_is_the_actions() -> None:
    d = _two_episodes()
    obs, chunks = action_chunks(d, horizon=1)
    assert torch.equal(chunks[:, 0], torch.as_tensor(d["actions"]))
    assert torch.equal(obs, torch.as_tensor(d["observations"]))


# --------------------------------------------------------------------------------------------
# load_demos
# --------------------------------------------------------------------------------------------


def test_load_demos_missing_path_names_the_key(tmp_path) -> None:
    missing = tmp_path / "no_such_demos.npz"
    with pytest.raises(DatasetError) as err:
        load_demos(DemosConfig(path=str(missing)), "flowrl/TwoGoal-v0", 0)
    assert str(missing) in str(err.value)
    assert "pretrain.demos.path" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_load_demos_roundtrip(tmp_path) -> None:
    d = _two_episodes()
    path = tmp_path / "demos.npz"
    np.savez(path, **d)
    loaded = load_demos(DemosConfig(path=str(path)), "anything", 0)
    for key, value in d.items():
        np.testing.assert_array_equal(loaded[key], value)


def test_load_demos_missing_episode_ends(tmp_path) -> None:
    d = _two_episodes()
    path = tmp_path / "no_ends.npz"
    np.savez(path, observations=d["observations"], actions=d["actions"])
    with pytest.raises(DatasetError, match="episode_ends"):
        load_demos(DemosConfig(path=str(path)), "flowrl/TwoGoal-v0", 0)


@pytest.mark.parametrize(
    "change",
    [
        {"actions": np.zeros((4, 2), np.float32)},  # 5 observations, 4 actions
        {"episode_ends": np.array([3, 4])},  # does not end at 5
        {"episode_ends": np.array([3, 6])},  # past the end
        {"episode_ends": np.array([3, 3, 5])},  # not strictly increasing
        {"episode_ends": np.array([], dtype=np.int64)},  # no episode
    ],
)
def test_load_demos_inconsistent_arrays(tmp_path, change) -> None:
    d = {**_two_episodes(), **change}
    path = tmp_path / "bad.npz"
    np.savez(path, **d)
    with pytest.raises(DatasetError, match="inconsistent"):
        load_demos(DemosConfig(path=str(path)), "flowrl/TwoGoal-v0", 0)


def test_load_demos_scripted_and_unknown_env() -> None:
    d = load_demos(DemosConfig(episodes=4), "flowrl/TwoGoal-v0", 3)
    assert len(d["episode_ends"]) == 4 and d["episode_ends"][-1] == len(d["actions"]) == len(d["observations"])
    with pytest.raises(DatasetError, match="pretrain.demos.path"):
        load_demos(DemosConfig(), "CartPole-v1", 0)


# --------------------------------------------------------------------------------------------
# flow-matching loss and pretraining
# --------------------------------------------------------------------------------------------


def test_flow_matching_loss_is_the_rectified_flow_objective() -> None:
    torch.manual_seed(0)
    vel = VelocityMLP(1, 2, 2, hidden_dims=(8,), time_dim=4)
    obs, chunks = torch.randn(16, 1), torch.randn(16, 2, 2)
    loss = flow_matching_loss(vel, obs, chunks, torch.Generator().manual_seed(3))
    # same draws, by hand: t ~ U(0, 1) then eps ~ N(0, I); x_t = (1 - t) eps + t a; target a - eps
    g = torch.Generator().manual_seed(3)
    t = torch.rand(16, generator=g)
    eps = torch.randn(16, 2, 2, generator=g)
    x_t = (1 - t.view(-1, 1, 1)) * eps + t.view(-1, 1, 1) * chunks
    expected = ((vel(obs, x_t, t) - (chunks - eps)) ** 2).mean()
    torch.testing.assert_close(loss, expected)


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from intra-op threads, and on a loaded 2-core machine the
    thread hand-off makes them ~100x slower; run this training loop single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_behaviour_cloning_learns_a_conditional_target(one_thread) -> None:
    torch.manual_seed(0)
    ta, da = 2, 2
    c = torch.tensor([[0.6, -0.4], [0.2, 0.8]])
    n = 512
    obs = torch.where(torch.rand(n, 1) < 0.5, -1.0, 1.0)
    chunks = obs.view(-1, 1, 1) * c + 0.01 * torch.randn(n, ta, da)
    velocity = VelocityMLP(1, ta, da, hidden_dims=(64, 64), time_dim=8)
    initial = copy.deepcopy(velocity)
    cfg = PretrainConfig(steps=600, batch_size=128, lr=3e-3, ema_decay=0.9)
    batches = demo_batches(obs, chunks, cfg.batch_size, torch.device("cpu"))
    ema, metrics = fit(velocity, batches, flow_matching_loss, cfg, seed=0, progress=False)
    assert ema is not velocity

    # the loss decreased: held-out evaluation on common random numbers, and the logged loss
    with torch.no_grad():
        before = flow_matching_loss(initial, obs, chunks, torch.Generator().manual_seed(1)).item()
        after = flow_matching_loss(ema, obs, chunks, torch.Generator().manual_seed(1)).item()
    assert after < 0.2 * before
    assert metrics["pretrain/loss"] < 0.2 * before

    # the ODE policy maps noise onto the conditional target obs * C
    policy = FlowPolicy(ema, ChainSampler(10))
    test_obs = torch.tensor([[-1.0]] * 64 + [[1.0]] * 64)
    actions = policy.act(test_obs, torch.Generator().manual_seed(2))
    target = test_obs.view(-1, 1, 1) * c
    err = (actions - target).abs()
    assert float(err.mean()) < 0.05, float(err.mean())
    assert float(err.max()) < 0.25, float(err.max())
    # the untrained field does not (the check has teeth)
    untrained = FlowPolicy(initial, ChainSampler(10)).act(test_obs, torch.Generator().manual_seed(2))
    assert float((untrained - target).abs().mean()) > 0.3
