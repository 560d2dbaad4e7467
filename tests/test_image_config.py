"""The image track's config: env.type shapes and policy.type text_image, one-line errors."""

from __future__ import annotations

import pytest

from flowrl.config import ConfigError, ShapesEnvConfig, TextImagePolicyConfig
from flowrl.rewards.registry import reward_types
from tests.image_setup import tiny_config


def test_the_tiny_experiment_loads_and_round_trips():
    cfg = tiny_config()
    assert isinstance(cfg.env, ShapesEnvConfig) and isinstance(cfg.policy, TextImagePolicyConfig)
    assert cfg.env.id == "shapes" and cfg.pretrain is not None
    assert "demos" not in cfg.model_dump()["pretrain"] and "max_steps" not in cfg.model_dump()["algo"]


@pytest.mark.parametrize(
    ("overrides", "data", "message"),
    [
        ((), {"policy": {"type": "rectified_flow"}}, "env.type: shapes needs policy.type: text_image"),
        ((), {"env": {"type": "gym"}}, "policy.type: text_image needs env.type: shapes"),
        (("env.type=desert",), None, "env.type: 'desert' is not one of gym, shapes"),
        (("algo={type: ppo}",), None, "env.type: shapes needs algo.type: grpo"),
        (("mdp.converter={type: reinflow}",), None, "text_image policies use flow_sde or cps"),
        (("mdp.window={type: sliding, size: 5}",), None, "mdp.window.size=5 is larger than policy.denoising_steps=4"),
        (("env.image_size=20",), None, "env.image_size=20 must be a multiple of 4 * policy.patch = 8"),
        (("env.reward={type: jpeg, qualty: 3}",), None, "env.reward: unknown key 'qualty' for type 'jpeg'"),
        (
            ("env.reward={type: clip}",),
            None,
            f"env.reward: type: 'clip' is not one of {', '.join(reward_types())} (or MODULE:NAME",
        ),
        (("env.num_envs=4",), None, "unknown key 'env.num_envs'"),
        (("algo.max_steps=3",), None, "algo.max_steps only applies to gym envs"),
        (("pretrain.demos.episodes=3",), None, "pretrain.demos only applies to gym envs"),
        (("eval.keep_envs=false",), None, "eval.keep_envs only applies to gym envs"),
        (("env.group_size=1",), None, "algo.type: grpo needs env.group_size >= 2"),
        (("policy.channels=[8,12,8]",), None, "positive multiple of 8"),
        (("mdp.steps_after_window=2",), None, "steps_after_window needs window.type: sliding"),
        (
            ("env.reward={type: multi, components: [{type: jpeg}], advantages: per_reward}", "algo.outcome=success"),
            None,
            "env.reward.advantages: per_reward normalises each reward's scores within a group; it needs algo.outcome",
        ),
    ],
)
def test_bad_image_experiments_fail_with_one_line_naming_the_key(overrides, data, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(*overrides, data=data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_flash_needs_the_dpm_solver_name_the_sampler_uses():
    cfg = tiny_config("mdp.window={type: sliding, size: 2}", "mdp.solver=dpm_solver_2m", "mdp.steps_after_window=1")
    assert cfg.mdp.solver == "dpm_solver_2m" and cfg.mdp.steps_after_window == 1
