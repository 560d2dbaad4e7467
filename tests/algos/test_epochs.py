"""The update's batching: near-equal minibatches (no small remainder), the target-KL stop and
its flag, PPO's advantages normalised over the whole batch, and GRPO's success_once outcome."""

from __future__ import annotations

import pytest
import torch

from flowrl.algos.grpo import GRPO
from flowrl.algos.policy_gradient import minibatches, run_epochs
from flowrl.config import GRPOConfig, PPOConfig, build_config
from flowrl.core.advantages import gae
from flowrl.errors import FlowRLError
from flowrl.rollout.rollout import Rollout


@pytest.mark.parametrize(
    ("size", "minibatch", "expected"),
    [
        (208, 100, [104, 104]),  # PickCube PPO: 16 envs x 13 chunks (was 100, 100, 8)
        (416, 100, [104] * 4),  # PickCube GRPO's 32 envs x 13 (was 4 x 100 + 16)
        (300, 100, [100] * 3),  # a multiple: unchanged
        (40, 100, [40]),  # smaller than one minibatch: the whole batch
        (149, 100, [149]),  # round(1.49) = 1
        (151, 100, [76, 75]),
    ],
)
def test_minibatches_are_near_equal_and_cover_the_batch_once(size, minibatch, expected) -> None:
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(0))
    parts = minibatches(perm, minibatch)
    assert [len(p) for p in parts] == expected
    assert sorted(torch.cat(parts).tolist()) == list(range(size))


def _cfg(**kw) -> PPOConfig:
    return PPOConfig(type="ppo", **kw)


def test_target_kl_ends_the_epochs_at_the_first_minibatch_past_it_and_says_so() -> None:
    seen: list[int] = []

    def step(mb: torch.Tensor) -> dict[str, float]:
        seen.append(len(mb))
        return {"approx_kl": 0.01 * len(seen)}  # 0.01, 0.02, ... per minibatch

    cfg = _cfg(epochs=5, minibatch_size=10, target_kl=0.035)
    run = run_epochs(40, cfg, torch.Generator().manual_seed(0), torch.device("cpu"), step)
    assert len(seen) == 4  # the fourth minibatch's 0.04 > 0.035 stops it, in the first epoch
    assert run.epochs == 1 and run.kl_stop
    assert run.metrics() == {"train/epochs": 1.0, "train/kl_stop": 1.0}
    seen.clear()
    run = run_epochs(40, _cfg(epochs=2, minibatch_size=10), torch.Generator(), torch.device("cpu"), step)
    assert len(seen) == 8 and run.metrics() == {"train/epochs": 2.0, "train/kl_stop": 0.0}


@pytest.mark.parametrize(("given", "meant"), [(True, "minibatch"), (False, "none"), ("batch", "batch")])
def test_normalize_advantages_scopes_and_older_booleans(given, meant) -> None:
    assert _cfg(normalize_advantages=given).normalize_advantages == meant
    with pytest.raises(ValueError, match="normalize_advantages"):
        _cfg(normalize_advantages="episode")


def test_ppo_batch_normalisation_z_scores_the_gae_of_the_whole_batch() -> None:
    from flowrl.algos.ppo import PPO
    from flowrl.models.build import build_actor, build_policy
    from flowrl.models.networks import ValueMLP

    cfg = build_config(
        {
            "name": "t",
            "policy": {"hidden_dims": [8], "time_embed_dim": 4},
            "algo": {"type": "ppo", "normalize_advantages": "batch", "gamma": 0.9, "gae_lambda": 0.8},
        }
    )
    torch.manual_seed(0)
    critic = ValueMLP(2, (8,))
    ppo = PPO(build_policy(cfg, build_actor(cfg.policy, 2, 2)), critic, cfg.algo, torch.device("cpu"), seed=0)
    t, n = 5, 3
    g = torch.Generator().manual_seed(1)
    done = torch.rand(t, n, generator=g) < 0.2
    rollout = Rollout(
        obs=torch.randn(t, n, 2, generator=g),
        next_obs=torch.randn(t, n, 2, generator=g),
        samples=_Samples(torch.zeros(t, n, 1)),
        rewards=torch.randn(t, n, generator=g),
        terminated=done,
        truncated=torch.zeros(t, n, dtype=torch.bool),
        valid=torch.ones(t, n, dtype=torch.bool),
        group=torch.arange(n),
        env_steps=t * n,
    )
    with torch.no_grad():
        values = critic(rollout.obs.flatten(0, 1)).view(t, n)
        next_values = critic(rollout.next_obs.flatten(0, 1)).view(t, n)
    adv, _ = gae(rollout.rewards, values, next_values, done, done, 0.9, 0.8)
    adv = adv.flatten()
    batch = ppo.prepare(rollout)
    torch.testing.assert_close(batch.advantages, (adv - adv.mean()) / adv.std())


class _Samples:
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __getitem__(self, index):
        return _Samples(self.x[index])

    def flatten(self, *dims):
        return _Samples(self.x.flatten(*dims))

    def to(self, _device):
        return self


def _episodes(success_once: torch.Tensor | None) -> Rollout:
    n = 4
    rollout = Rollout(
        obs=torch.arange(n, dtype=torch.float32).view(1, n, 1),
        next_obs=torch.zeros(1, n, 1),
        samples=_Samples(torch.zeros(1, n, 1)),
        rewards=torch.zeros(1, n),
        terminated=torch.zeros(1, n, dtype=torch.bool),
        truncated=torch.ones(1, n, dtype=torch.bool),
        valid=torch.ones(1, n, dtype=torch.bool),
        group=torch.arange(n) // 2,
        env_steps=n,
        episode_return=torch.tensor([3.0, 1.0, 2.0, 2.5]),
        episode_success=torch.zeros(n, dtype=torch.bool),  # nobody holds the goal at the end
        episode_done=torch.ones(n, dtype=torch.bool),
    )
    if success_once is not None:
        rollout.episode_success_once = success_once
    return rollout


def _grpo(outcome: str) -> GRPO:
    algo = GRPO.__new__(GRPO)
    algo.cfg = GRPOConfig(type="grpo", outcome=outcome)
    algo.group_size, algo.device = 2, torch.device("cpu")
    return algo


def test_grpo_success_once_outcome_scores_whether_any_step_succeeded() -> None:
    algo = _grpo("success_once")
    batch = algo.prepare(_episodes(torch.tensor([False, True, True, True])))
    # group 0 (0 vs 1): +-1 up to eps; group 1 ties (both succeeded): dropped. By success at
    # the end every group would tie; by return group 1 would not.
    a = 0.5 / (0.5 + 1e-4)
    torch.testing.assert_close(batch.advantages, torch.tensor([-a, a]))
    assert algo._stats["grpo/groups_dropped"] == 1.0 and algo._stats["grpo/outcome_mean"] == 0.75


def test_grpo_success_once_without_it_in_the_rollout_is_one_line() -> None:
    with pytest.raises(FlowRLError, match="success_once needs an env that reports success_once"):
        _grpo("success_once").prepare(_episodes(None))
