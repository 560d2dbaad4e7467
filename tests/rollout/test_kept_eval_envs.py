"""``eval.keep_envs``: a run's evaluation envs are made once and reset from the same seeds at
every evaluation. The oracle is the evaluation with envs made anew (``kept=None``): the same
metrics, bit for bit, at every call, whatever the kept envs ran before (other policies' episodes,
other lengths), on MuJoCo and ManiSkill; an evaluation that raises drops them; the trainer makes
them once per run (and at every evaluation with ``keep_envs: false``)."""

from __future__ import annotations

import copy

import gymnasium as gym
import pytest
import torch

from flowrl.config import build_config
from flowrl.experiment import env_dims
from flowrl.models.build import build_actor, build_policy
from flowrl.rollout.evaluation import EvalEnvs, evaluate_policy


def _policies(env_id: str, horizon: int):
    obs_dim, act_dim = env_dims(env_id)
    cfg = build_config({"name": "t", "policy": {"horizon": horizon, "hidden_dims": [16], "time_embed_dim": 8}})
    torch.manual_seed(0)
    first = build_policy(cfg, build_actor(cfg.policy, obs_dim, act_dim))
    second = copy.deepcopy(first)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.5 * torch.randn_like(p))  # another policy: other actions, other episode lengths
    return first, second


def _maniskill_or_skip(env_id: str) -> None:
    from envs.maniskill import ManiSkillUnavailable

    try:
        gym.make(env_id).close()
    except ManiSkillUnavailable as exc:
        pytest.skip(f"ManiSkill cannot make an env on this machine: {exc}")


@pytest.mark.parametrize(
    ("env_id", "horizon", "episodes", "kwargs"),
    [
        ("Hopper-v5", 4, 3, {"max_episode_steps": 40}),
        ("flowrl/PickCube-v1", 8, 2, {"control_mode": "pd_ee_delta_pos", "max_episode_steps": 24}),
    ],
)
def test_kept_envs_evaluate_as_fresh_ones_every_time(env_id, horizon, episodes, kwargs) -> None:
    if "PickCube" in env_id:
        _maniskill_or_skip(env_id)
    first, second = _policies(env_id, horizon)
    kept = EvalEnvs(env_id, horizon, episodes, kwargs)
    try:
        runs = []
        for policy, sampled in ((first, False), (second, False), (first, True), (first, False)):
            ours = evaluate_policy(policy, env_id, horizon, episodes, 7, kwargs, sampled=sampled, kept=kept)
            fresh = evaluate_policy(policy, env_id, horizon, episodes, 7, kwargs, sampled=sampled)
            assert ours == fresh, (policy is first, sampled)
            runs.append(ours)
        assert kept.made == episodes  # made once, reused three times
    finally:
        kept.close()
    assert runs[0] == runs[3] and runs[0] != runs[1]  # the same policy again; another policy differs


def test_an_evaluation_that_raises_closes_the_kept_envs(monkeypatch) -> None:
    first, _ = _policies("flowrl/TwoGoal-v0", 4)
    kept = EvalEnvs("flowrl/TwoGoal-v0", 4, 2)
    evaluate_policy(first, "flowrl/TwoGoal-v0", 4, 2, 0, kept=kept)
    closed = []
    for env in kept.envs:
        monkeypatch.setattr(env, "close", lambda env=env: closed.append(env))
    monkeypatch.setattr(kept.envs[1], "step", lambda action: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(Exception, match="boom"):
        evaluate_policy(first, "flowrl/TwoGoal-v0", 4, 2, 0, kept=kept)
    assert len(closed) == 2 and kept.envs == []  # the next evaluation makes new ones
    evaluate_policy(first, "flowrl/TwoGoal-v0", 4, 2, 0, kept=kept)
    assert kept.made == 4
    kept.close()


@pytest.mark.parametrize("keep", [True, False])
def test_the_trainer_makes_the_evaluation_envs_once_per_run_with_keep_envs(tmp_path, monkeypatch, keep) -> None:
    import envs as flowrl_envs
    from flowrl.experiment import train

    made = []
    make = flowrl_envs.make_env

    def counting(env_id, *args, **kwargs):
        made.append(env_id)
        return make(env_id, *args, **kwargs)

    monkeypatch.setattr(flowrl_envs, "make_env", counting)
    cfg = build_config(
        {
            "name": "t",
            "env": {"num_envs": 2, "num_workers": 1},
            "policy": {"hidden_dims": [16], "time_embed_dim": 8, "obs_norm": "none"},
            "pretrain": None,
            "algo": {"type": "ppo", "iterations": 4, "steps_per_iteration": 4, "minibatch_size": 8},
            "eval": {"episodes": 3, "every": 1, "keep_envs": keep},
            "ray": {"enabled": False},
        }
    )
    train(cfg, tmp_path, progress=False)
    evaluations = 5  # before, then after each of the 4 iterations
    training_envs = 2
    assert len(made) == training_envs + 3 * (1 if keep else evaluations)
