"""Strict experiment configs: unknown keys, wrong types and dead keys are errors naming the key."""

from pathlib import Path

import pytest
import yaml

from flowrl.config import (
    ConfigError,
    ExperimentConfig,
    NoiseNetConverter,
    SlidingWindowConfig,
    build_config,
    load_config,
    parse_override,
    save_config,
)

EXPERIMENTS = sorted(Path(__file__).resolve().parents[1].joinpath("experiments").glob("*.yaml"))


def test_experiments_exist_and_load():
    assert EXPERIMENTS, "no experiment files found"
    for path in EXPERIMENTS:
        cfg = load_config(path)
        assert isinstance(cfg, ExperimentConfig)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ppo.clip=0.1", ("ppo.clip", 0.1)),
        ("policy.hidden_dims=[8, 8]", ("policy.hidden_dims", [8, 8])),
        ("policy.pretrained=null", ("policy.pretrained", None)),
        ("name=abc", ("name", "abc")),
        ("ppo.iterations=3", ("ppo.iterations", 3)),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", ".a=1"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override(bad)


def test_overrides_apply_nested():
    cfg = build_config(
        {"name": "x", "mdp": {"converter": {"type": "reinflow"}}},
        overrides=["ppo.clip=0.05", "mdp.converter.std_max=0.3", "env.num_envs=6"],
    )
    assert cfg.ppo.clip == 0.05 and cfg.env.num_envs == 6
    assert isinstance(cfg.mdp.converter, NoiseNetConverter) and cfg.mdp.converter.std_max == 0.3


def test_unknown_key_names_it_and_file():
    with pytest.raises(ConfigError) as info:
        build_config({"name": "x"}, "exp.yaml", ["no.such.key=1"])
    msg = str(info.value)
    assert msg.startswith("exp.yaml: unknown key 'no'") and "\n" not in msg
    with pytest.raises(ConfigError, match=r"unknown key 'ppo.clipp'.*valid keys in ppo: .*clip"):
        build_config({"name": "x", "ppo": {"clipp": 0.1}}, "exp.yaml")


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"exp.yaml: ppo.clip: .*valid number.*'abc'"):
        build_config({"name": "x"}, "exp.yaml", ["ppo.clip=abc"])
    with pytest.raises(ConfigError, match=r"ppo.iterations: .*integer"):
        build_config({"name": "x", "ppo": {"iterations": 1.5}}, "exp.yaml")


def test_inverted_noise_range_is_an_error():
    with pytest.raises(ConfigError, match=r"mdp.converter: noise range is inverted.*std_min=0.3 >= std_max=0.1"):
        build_config({"name": "x", "mdp": {"converter": {"type": "reinflow", "std_min": 0.3, "std_max": 0.1}}})


def test_converter_and_window_types():
    with pytest.raises(ConfigError, match=r"mdp.converter.type: 'nope' is not one of"):
        build_config({"name": "x", "mdp": {"converter": {"type": "nope"}}})
    with pytest.raises(ConfigError, match=r"unknown key 'mdp.converter.std_min'"):
        build_config({"name": "x", "mdp": {"converter": {"type": "flow_sde", "std_min": 0.1}}})
    with pytest.raises(ConfigError, match=r"missing required key 'mdp.window.size'"):
        build_config({"name": "x", "mdp": {"window": {"type": "sliding"}}})
    cfg = build_config(
        {"name": "x", "mdp": {"window": {"type": "sliding", "size": 2, "mode": "decay", "decay_rate": 0.5}}}
    )
    assert isinstance(cfg.mdp.window, SlidingWindowConfig) and cfg.mdp.window.decay_rate == 0.5


def test_dead_keys_are_errors():
    with pytest.raises(ConfigError, match="decay_rate only applies to mode: decay"):
        build_config({"name": "x", "mdp": {"window": {"type": "sliding", "size": 2, "decay_rate": 0.5}}})
    with pytest.raises(ConfigError, match="episodes only applies to scripted demos"):
        build_config({"name": "x", "pretrain": {"demos": {"path": "d.npz", "episodes": 3}}})
    # an override that leaves a dead sibling in the file's section says how to replace the section
    scripted = {"name": "x", "pretrain": {"demos": {"episodes": 3}}}
    with pytest.raises(ConfigError, match=r"give pretrain.demos=\{\.\.\.\}"):
        build_config(scripted, overrides=["pretrain.demos.path=d.npz"])
    cfg = build_config(scripted, overrides=["pretrain.demos={path: d.npz}"])
    assert cfg.pretrain.demos.path == "d.npz"
    with pytest.raises(ConfigError, match="noise_lr only applies to a learned noise"):
        build_config({"name": "x", "mdp": {"converter": {"type": "cps"}}, "ppo": {"noise_lr": 0.1}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_save_roundtrip(tmp_path):
    cfg = build_config(
        {
            "name": "x",
            "mdp": {
                "converter": {"type": "cps", "noise_level": 0.5},
                "window": {"type": "sliding", "size": 2, "mode": "random"},
            },
        }
    )
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["mdp"]["converter"]["type"] == "cps"


def test_ray_section():
    cfg = build_config({"name": "x"})
    assert cfg.ray.enabled and cfg.ray.address is None and cfg.env.num_envs % cfg.ray.num_workers == 0
    with pytest.raises(ConfigError, match="env.num_envs=5 must be a multiple of ray.num_workers=2"):
        build_config({"name": "x", "env": {"num_envs": 5}})
    with pytest.raises(ConfigError, match="address only applies with ray.enabled: true"):
        build_config({"name": "x", "ray": {"enabled": False, "address": "auto"}})
    with pytest.raises(ConfigError, match="num_cpus only applies to a local Ray"):
        build_config({"name": "x", "ray": {"address": "auto", "num_cpus": 4}})
    assert build_config({"name": "x", "ray": {"address": "10.0.0.1:6379"}}).ray.address == "10.0.0.1:6379"


def test_policy_family_keys():
    assert build_config({"name": "x", "policy": {"type": "shortcut"}}).policy.type == "shortcut"
    with pytest.raises(ConfigError, match="consistency_fraction only applies to policy.type shortcut or meanflow"):
        build_config({"name": "x", "pretrain": {"consistency_fraction": 0.5}})
    with pytest.raises(ConfigError, match="policy.type"):
        build_config({"name": "x", "policy": {"type": "consistency"}})
    with pytest.raises(ConfigError, match="mdp only applies to flow policies"):
        build_config({"name": "x", "policy": {"type": "gaussian"}, "mdp": {"log_prob_reduce": "sum"}})
    with pytest.raises(ConfigError, match="noise_lr only applies to a learned noise"):
        build_config({"name": "x", "policy": {"type": "diffusion"}, "ppo": {"noise_lr": 0.1}})
    with pytest.raises(ConfigError, match="min_std only applies to policy.type: diffusion"):
        build_config({"name": "x", "policy": {"min_std": 0.2}})
    with pytest.raises(ConfigError, match="denoising_steps only applies to flow and diffusion"):
        build_config({"name": "x", "policy": {"type": "gaussian", "denoising_steps": 2}})
    with pytest.raises(ConfigError, match="denoising_steps=30 > train_steps=20"):
        build_config({"name": "x", "policy": {"type": "diffusion", "denoising_steps": 30}})
    with pytest.raises(ConfigError, match="obs_norm: dataset needs demonstrations"):
        build_config({"name": "x", "pretrain": None})
    scratch = build_config({"name": "x", "policy": {"type": "gaussian", "obs_norm": "running"}, "pretrain": None})
    assert scratch.pretrain is None
    # dead keys are dropped when the resolved config is written
    dumped = scratch.model_dump(mode="json")
    assert "mdp" not in dumped and "noise_lr" not in dumped["ppo"] and "min_std" not in dumped["policy"]
    assert build_config(dumped) == scratch
