"""The non-finite guard: skipped updates are counted per network and stop the run after
``limit`` in a row, whichever of the loss and the gradient is non-finite. The checkpoint of
PPO and GRPO: the keys checkpoints have always had, and a round trip that restores everything."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowrl.algos.grpo import GRPO
from flowrl.algos.policy_gradient import NonFiniteGuard, NumericalError, check_ratio, guarded_step
from flowrl.algos.ppo import PPO
from flowrl.config import build_config
from flowrl.models.build import build_actor, build_policy
from flowrl.models.networks import ValueMLP
from flowrl.rollout.collector import InProcessCollector
from flowrl.rollout.shard import EnvSpec


def _net_and_opt():
    net = nn.Linear(3, 1)
    return net, torch.optim.SGD(net.parameters(), lr=0.1)


def _loss(net, scale: float = 1.0):
    return net(torch.ones(2, 3)).sum() * scale


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_finite_losses_with_non_finite_gradients_still_stop_the_run():
    net, opt = _net_and_opt()
    guard = NonFiniteGuard(3, "lower the learning rate")
    before = [p.detach().clone() for p in net.parameters()]
    for it in range(2):
        loss = _NanGradient.apply(_loss(net))
        assert math.isfinite(float(loss.detach()))
        assert math.isnan(guarded_step(opt, net.parameters(), loss, 1.0, guard, it))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))  # no step taken
    # a finite update of another network does not end the policy's run of skips
    other, other_opt = _net_and_opt()
    assert math.isfinite(guarded_step(other_opt, other.parameters(), _loss(other), 1.0, guard, 2, "value"))
    with pytest.raises(NumericalError, match="in 3 updates in a row at iteration 3; lower the learning rate"):
        guarded_step(opt, net.parameters(), _NanGradient.apply(_loss(net)), 1.0, guard, 3)
    assert guard.pop_skipped() == 3 and guard.pop_skipped() == 0


def test_a_successful_step_ends_the_run_of_skips():
    net, opt = _net_and_opt()
    guard = NonFiniteGuard(2, "hint")
    nan = torch.tensor(float("nan"))
    assert math.isnan(guarded_step(opt, net.parameters(), _loss(net) * nan, 1.0, guard, 0))
    assert math.isfinite(guarded_step(opt, net.parameters(), _loss(net), 1.0, guard, 1))
    assert math.isnan(guarded_step(opt, net.parameters(), _loss(net) * nan, 1.0, guard, 2))  # 1 in a row again
    with pytest.raises(NumericalError, match="the policy loss was non-finite"):
        guarded_step(opt, net.parameters(), _loss(net) * nan, 1.0, guard, 3)


def _algorithm(algo: dict, seed: int = 0):
    """PPO or GRPO (groups of 2) on 4 envs of the default task, tiny networks."""
    env = {"num_envs": 4, **({"group_size": 2} if algo["type"] == "grpo" else {})}
    cfg = build_config(
        {
            "name": "t",
            "env": env,
            "policy": {"hidden_dims": [8], "time_embed_dim": 4},
            "algo": {"minibatch_size": 8, "epochs": 1, **algo},
        }
    )
    torch.manual_seed(seed)
    policy = build_policy(cfg, build_actor(cfg.policy, 2, 2))
    cpu = torch.device("cpu")
    if algo["type"] == "ppo":
        return PPO(policy, ValueMLP(2, (8,)), cfg.algo, cpu, seed=seed)
    return GRPO(policy, cfg.algo, cpu, seed, group_size=2)


def _one_iteration(algo) -> None:
    """Fills the optimisers' moments, the reward scaler and the generator's position."""
    env_id = build_config({"name": "t"}).env.id  # the default task, as _algorithm's config
    if isinstance(algo, PPO):
        collector = InProcessCollector(EnvSpec(env_id, algo.policy.event_shape[0], 4, seed=0))
        rollout = collector.collect(algo.policy, 4, 0)
    else:
        collector = InProcessCollector(EnvSpec(env_id, algo.policy.event_shape[0], 4, seed=0, group_size=2))
        rollout = collector.collect_episodes(algo.policy, 4, 0)
        rollout.episode_return = torch.arange(4.0)  # a fresh policy ties at 0: give each group signal
    collector.close()
    batch = algo.prepare(rollout)
    check_ratio(algo.policy, batch.cond, batch.samples, 1e-4, algo.name)
    assert batch.advantages.numel(), "the rollout has a group with signal: the update steps"
    algo.update(batch, 0)


# The keys of every checkpoint written so far (trainer.py stores this dict under "algo"):
# changing them would make old runs impossible to resume.
CHECKPOINT_KEYS = [
    ({"type": "ppo"}, ["policy", "critic", "actor_opt", "critic_opt", "generator"]),
    (
        {"type": "ppo", "normalize_rewards": True, "w2_coef": 0.1},
        ["policy", "critic", "actor_opt", "critic_opt", "generator", "reward_scaler", "reference"],
    ),
    ({"type": "grpo", "beta": 0.0, "max_steps": 4}, ["policy", "actor_opt", "generator"]),
    ({"type": "grpo", "beta": 0.01, "max_steps": 4}, ["policy", "actor_opt", "generator", "reference"]),
]


@pytest.mark.parametrize(("algo", "keys"), CHECKPOINT_KEYS, ids=["ppo", "ppo-scaler-w2", "grpo", "grpo-reference"])
def test_checkpoints_keep_their_keys_and_a_round_trip_restores_every_tensor(algo, keys, tmp_path):
    saved = _algorithm(algo, seed=0)
    _one_iteration(saved)
    state = saved.state_dict()
    assert list(state) == keys
    torch.save(state, tmp_path / "algo.pt")
    fresh = _algorithm(algo, seed=1)  # other weights and generator position
    assert not torch.equal(fresh.generator.get_state(), saved.generator.get_state())
    fresh.load_state_dict(torch.load(tmp_path / "algo.pt", weights_only=True))
    assert fresh.optimizer.opt.state_dict()["state"], "the optimiser's moments were restored"
    _assert_same(fresh.state_dict(), saved.state_dict())


def _assert_same(a, b, where: str = "state") -> None:
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_a_checkpoint_without_a_configured_member_names_it():
    algo = _algorithm({"type": "ppo", "normalize_rewards": True})
    state = algo.state_dict()
    del state["reward_scaler"]
    with pytest.raises(KeyError, match="reward_scaler"):
        algo.load_state_dict(state)


@pytest.mark.parametrize("algo", [{"type": "grpo", "beta": 0.01, "max_steps": 4}, {"type": "ppo"}], ids=["grpo", "ppo"])
def test_frozen_parameters_stay_fixed_and_the_others_train(algo, tmp_path):
    """A policy with some parameters frozen (a frozen text encoder, base weights under an
    adapter): the optimiser holds only the trainable ones, an update moves every one of them
    and none of the frozen, and the checkpoint round trip still restores everything."""
    first = _algorithm(algo, seed=0)
    frozen = next(m for m in first.policy.velocity.modules() if isinstance(m, nn.Linear))
    frozen.requires_grad_(False)
    if isinstance(first, PPO):
        trained = PPO(first.policy, first.critic, first.cfg, first.device, seed=0)
    else:
        trained = GRPO(first.policy, first.cfg, first.device, 0, group_size=2)
    in_opt = {id(p) for g in trained.optimizer.opt.param_groups for p in g["params"]}
    assert id(frozen.weight) not in in_opt and id(frozen.bias) not in in_opt
    trainable = [p for p in trained.policy.parameters() if p.requires_grad]
    assert in_opt == {id(p) for p in trainable}
    before = {n: p.detach().clone() for n, p in trained.policy.named_parameters()}
    _one_iteration(trained)
    for name, p in trained.policy.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        assert moved == p.requires_grad, f"{name}: moved={moved}, trainable={p.requires_grad}"
    torch.save(trained.state_dict(), tmp_path / "algo.pt")
    trained.load_state_dict(torch.load(tmp_path / "algo.pt", weights_only=True))


def test_a_policy_with_every_parameter_frozen_is_refused():
    algo = _algorithm({"type": "grpo", "beta": 0.0, "max_steps": 4})
    algo.policy.requires_grad_(False)
    with pytest.raises(ValueError, match="every policy parameter is frozen"):
        GRPO(algo.policy, algo.cfg, algo.device, 0, group_size=2)
