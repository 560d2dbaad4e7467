"""Strict experiment configs: unknown keys, wrong types and dead keys are errors naming the key."""

from pathlib import Path

import pytest
import yaml

from flowrl.config import (
    ConfigError,
    DiffusionPolicyConfig,
    ExperimentConfig,
    FlowPolicyConfig,
    GaussianPolicyConfig,
    GRPOConfig,
    NoiseNetConverter,
    PPOConfig,
    SlidingWindowConfig,
    build_config,
    load_config,
    parse_override,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(ROOT.joinpath("experiments").glob("*.yaml"))
# The keys only one algorithm has (written out, not read from the models).
GRPO_ONLY_KEYS = {"max_steps", "outcome", "beta", "adv_eps"}
PPO_ONLY_KEYS = {
    "steps_per_iteration",
    "gamma",
    "gae_lambda",
    "value_clip",
    "critic_lr",
    "critic_warmup_iterations",
    "normalize_advantages",
    "normalize_rewards",
    "w2_coef",
}


def _valid_keys(message: str) -> set[str]:
    """The comma-separated list after 'valid keys in SECTION: ' of a one-line error."""
    (line,) = message.splitlines()
    return {k.strip() for k in line.split(": ")[-1].split(",")}


def test_experiments_exist_and_load():
    assert EXPERIMENTS, "no experiment files found"
    names = {p.name for p in EXPERIMENTS}
    assert {"quickstart.yaml", "quickstart_grpo.yaml"} <= names
    for path in EXPERIMENTS:
        cfg = load_config(path)
        assert isinstance(cfg, ExperimentConfig)
    assert isinstance(load_config(ROOT / "experiments" / "quickstart.yaml").algo, PPOConfig)
    grpo = load_config(ROOT / "experiments" / "quickstart_grpo.yaml")
    assert isinstance(grpo.algo, GRPOConfig) and grpo.env.group_size >= 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("algo.clip=0.1", ("algo.clip", 0.1)),
        ("policy.hidden_dims=[8, 8]", ("policy.hidden_dims", [8, 8])),
        ("policy.pretrained=null", ("policy.pretrained", None)),
        ("name=abc", ("name", "abc")),
        ("algo.iterations=3", ("algo.iterations", 3)),
        ("algo={type: grpo}", ("algo", {"type": "grpo"})),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", ".a=1"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override(bad)


def test_tilde_override_removes_a_key_of_the_file():
    """`~key` removes a key: a ReinFlow file switched to a fixed-noise converter on the command
    line drops its learned-noise keys, which would otherwise be dead-key errors (whose message
    names this way out)."""
    data = {"name": "x", "mdp": {"converter": {"type": "reinflow"}}, "algo": {"type": "ppo", "noise_lr": 1e-4}}
    switch = "mdp.converter={type: flow_sde, noise_level: 0.3}"
    with pytest.raises(ConfigError, match=r"algo.noise_lr only applies .*on the command line: ~algo.noise_lr"):
        build_config(data, overrides=[switch])
    cfg = build_config(data, overrides=[switch, "~algo.noise_lr"])
    assert cfg.mdp.converter.type == "flow_sde" and "noise_lr" not in cfg.algo.model_fields_set
    assert data["algo"]["noise_lr"] == 1e-4  # the caller's dict is untouched
    # a key the file lacks is an error, not a silent no-op (a typo would otherwise go unnoticed)
    with pytest.raises(ConfigError, match="has no key 'algo.noise_lrr' to remove"):
        build_config(data, overrides=["~algo.noise_lrr"])
    with pytest.raises(ConfigError, match="has no key 'env.id' to remove"):
        build_config(data, overrides=["~env.id"])
    assert parse_override("~algo.noise_lr")[0] == "algo.noise_lr"


@pytest.mark.parametrize("bad", ["~", "~a..b", "~algo.clip=0.1", "~.a"])
def test_bad_tilde_override_syntax(bad):
    with pytest.raises(ConfigError, match="expected ~key.sub"):
        parse_override(bad)


def test_overrides_apply_nested():
    cfg = build_config(
        {"name": "x", "algo": {"type": "ppo"}, "mdp": {"converter": {"type": "reinflow"}}},
        overrides=[
            "algo.clip=0.05",
            "algo.minibatch_size=96",
            "mdp.converter.std_max=0.3",
            "env.num_envs=6",
            "env.num_workers=3",
        ],
    )
    assert isinstance(cfg.algo, PPOConfig) and cfg.algo.clip == 0.05 and cfg.algo.minibatch_size == 96
    assert cfg.env.num_envs == 6 and cfg.env.num_workers == 3
    assert isinstance(cfg.mdp.converter, NoiseNetConverter) and cfg.mdp.converter.std_max == 0.3
    # an override may also choose the algorithm (and its section) outright
    grpo = build_config({"name": "x"}, overrides=["algo={type: grpo, max_steps: 5}", "env.group_size=2"])
    assert isinstance(grpo.algo, GRPOConfig) and grpo.algo.max_steps == 5


def test_unknown_key_names_it_and_file():
    with pytest.raises(ConfigError) as info:
        build_config({"name": "x"}, "exp.yaml", ["no.such.key=1"])
    msg = str(info.value)
    assert msg.startswith("exp.yaml: unknown key 'no'") and "\n" not in msg
    with pytest.raises(ConfigError, match=r"unknown key 'algo.clipp'.*valid keys in algo: .*clip"):
        build_config({"name": "x", "algo": {"type": "ppo", "clipp": 0.1}}, "exp.yaml")


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"exp.yaml: algo.clip: .*valid number.*'abc'"):
        build_config({"name": "x", "algo": {"type": "ppo"}}, "exp.yaml", ["algo.clip=abc"])
    with pytest.raises(ConfigError, match=r"algo.iterations: .*integer"):
        build_config({"name": "x", "algo": {"type": "ppo", "iterations": 1.5}}, "exp.yaml")


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
    with pytest.raises(ConfigError, match="algo.noise_lr only applies to a learned noise"):
        build_config({"name": "x", "mdp": {"converter": {"type": "cps"}}, "algo": {"type": "ppo", "noise_lr": 0.1}})
    with pytest.raises(ConfigError, match="algo.noise_lr only applies to a learned noise"):
        build_config(
            {"name": "x", "mdp": {"converter": {"type": "cps"}}, "env": {"group_size": 2}},
            overrides=["algo={type: grpo, noise_lr: 0.1}"],
        )


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
                "solver": "heun",
                "steps_after_window": 1,
                "sample_unit": "step",
            },
        }
    )
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert saved["mdp"]["converter"]["type"] == "cps" and saved["mdp"]["solver"] == "heun"
    assert saved["algo"]["type"] == "ppo" and "ppo" not in saved and "num_workers" not in saved["ray"]


def test_ray_section():
    cfg = build_config({"name": "x"})
    assert cfg.ray.enabled and cfg.ray.address is None and cfg.env.num_envs % cfg.env.num_workers == 0
    with pytest.raises(ConfigError, match="env: num_envs=5 must be a multiple of num_workers=2"):
        build_config({"name": "x", "env": {"num_envs": 5}})
    with pytest.raises(ConfigError, match="address only applies with ray.enabled: true"):
        build_config({"name": "x", "ray": {"enabled": False, "address": "auto"}})
    with pytest.raises(ConfigError, match="num_cpus only applies to a local Ray"):
        build_config({"name": "x", "ray": {"address": "auto", "num_cpus": 4}})
    assert build_config({"name": "x", "ray": {"address": "10.0.0.1:6379"}}).ray.address == "10.0.0.1:6379"
    # env.num_workers splits the envs with or without Ray
    local = build_config({"name": "x", "env": {"num_envs": 18, "num_workers": 3}, "ray": {"enabled": False}})
    assert local.env.num_workers == 3 and not local.ray.enabled


def test_policy_family_keys():
    assert build_config({"name": "x", "policy": {"type": "shortcut"}}).policy.type == "shortcut"
    assert isinstance(build_config({"name": "x"}).policy, FlowPolicyConfig)
    assert isinstance(build_config({"name": "x", "policy": {"type": "diffusion"}}).policy, DiffusionPolicyConfig)
    with pytest.raises(ConfigError, match="consistency_fraction only applies to policy.type shortcut or meanflow"):
        build_config({"name": "x", "pretrain": {"consistency_fraction": 0.5}})
    with pytest.raises(ConfigError, match="policy.type"):
        build_config({"name": "x", "policy": {"type": "consistency"}})
    with pytest.raises(ConfigError, match="mdp only applies to flow policies"):
        build_config({"name": "x", "policy": {"type": "gaussian"}, "mdp": {"log_prob_reduce": "sum"}})
    with pytest.raises(ConfigError, match="noise_lr only applies to a learned noise"):
        build_config({"name": "x", "policy": {"type": "diffusion"}, "algo": {"type": "ppo", "noise_lr": 0.1}})
    # a key of another policy family is unknown to this one; the error lists this family's keys
    with pytest.raises(ConfigError, match=r"unknown key 'policy.min_std'; valid keys in policy: ") as info:
        build_config({"name": "x", "policy": {"min_std": 0.2}})
    flow_keys = _valid_keys(str(info.value))
    assert {"denoising_steps", "time_shift"} <= flow_keys and not {"min_std", "init_std"} & flow_keys
    with pytest.raises(ConfigError, match=r"unknown key 'policy.denoising_steps'; valid keys in policy: ") as info:
        build_config({"name": "x", "policy": {"type": "gaussian", "denoising_steps": 2}})
    gaussian_keys = _valid_keys(str(info.value))
    assert "init_std" in gaussian_keys and not {"denoising_steps", "min_std", "time_shift"} & gaussian_keys
    with pytest.raises(ConfigError, match="denoising_steps=30 > train_steps=20"):
        build_config({"name": "x", "policy": {"type": "diffusion", "denoising_steps": 30}})
    # one DDIM step with no minimum std has no stochastic step at all
    with pytest.raises(ConfigError, match=r"policy: denoising_steps: 1 with min_std: 0 has no stochastic step"):
        build_config({"name": "x", "policy": {"type": "diffusion", "denoising_steps": 1, "min_std": 0}})
    assert build_config({"name": "x", "policy": {"type": "diffusion", "denoising_steps": 1}}).policy.min_std > 0
    with pytest.raises(ConfigError, match="obs_norm: dataset needs demonstrations"):
        build_config({"name": "x", "pretrain": None})
    scratch = build_config({"name": "x", "policy": {"type": "gaussian", "obs_norm": "running"}, "pretrain": None})
    assert scratch.pretrain is None and isinstance(scratch.policy, GaussianPolicyConfig)
    # dead keys are dropped when the resolved config is written
    dumped = scratch.model_dump(mode="json")
    assert "mdp" not in dumped and "noise_lr" not in dumped["algo"] and "min_std" not in dumped["policy"]
    assert "entropy_coef" in dumped["algo"]  # a Gaussian's learned std takes the entropy bonus
    assert build_config(dumped) == scratch


# --------------------------------------------------------------------------- keys that moved
def test_every_moved_key_gives_one_line_naming_its_new_place(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("name: x\nppo:\n  clip: 0.1\n  iterations: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(old)
    (line,) = str(info.value).splitlines()
    assert line.startswith(f"{old}: ") and "'ppo' has moved to algo" in line and "algo.type: ppo" in line

    old.write_text("name: x\nray:\n  num_workers: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(old)
    (line,) = str(info.value).splitlines()
    assert line.startswith(f"{old}: ") and "'ray.num_workers' has moved to env.num_workers" in line

    # both in one file: one line per key
    old.write_text("name: x\nppo: {clip: 0.1}\nray: {enabled: false, num_workers: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_config(old)
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{old}: ") for line in lines)
    assert "'ppo' has moved to algo" in lines[0] and "'ray.num_workers' has moved to env.num_workers" in lines[1]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("ray.num_workers=1", "'ray.num_workers' has moved to env.num_workers"),
        ("ppo.clip=0.1", "'ppo' has moved to algo"),
        ("ppo.iterations=3", "'ppo' has moved to algo"),
    ],
)
def test_moved_key_as_a_command_line_override(override, needle):
    quickstart = ROOT / "experiments" / "quickstart.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(quickstart, [override])
    (line,) = str(info.value).splitlines()
    assert line.startswith(f"{quickstart}: ") and needle in line


# --------------------------------------------------------------------------- the algo union
def test_algo_union_lists_the_chosen_algorithms_keys():
    with pytest.raises(ConfigError, match=r"exp.yaml: unknown key 'algo.gamma'; valid keys in algo: ") as info:
        build_config({"name": "x", "algo": {"type": "grpo", "gamma": 0.9}, "env": {"group_size": 2}}, "exp.yaml")
    keys = _valid_keys(str(info.value))
    assert keys == set(GRPOConfig.model_fields) and GRPO_ONLY_KEYS <= keys and not PPO_ONLY_KEYS & keys
    assert {"type", "iterations", "clip", "epochs", "minibatch_size", "actor_lr"} <= keys
    with pytest.raises(ConfigError, match=r"unknown key 'algo.max_steps'; valid keys in algo: ") as info:
        build_config({"name": "x", "algo": {"type": "ppo", "max_steps": 8}}, "exp.yaml")
    keys = _valid_keys(str(info.value))
    assert keys == set(PPOConfig.model_fields) and PPO_ONLY_KEYS <= keys and not GRPO_ONLY_KEYS & keys


def test_algo_without_type_or_with_an_unknown_type():
    with pytest.raises(ConfigError) as info:
        build_config({"name": "x", "algo": {"clip": 0.1}}, "exp.yaml")
    (line,) = str(info.value).splitlines()
    assert line.startswith("exp.yaml: ") and "missing 'algo.type'" in line
    with pytest.raises(ConfigError, match=r"exp.yaml: algo.type: 'nope' is not one of 'ppo', 'grpo'"):
        build_config({"name": "x", "algo": {"type": "nope"}}, "exp.yaml")


def test_grpo_needs_groups_and_ppo_has_none():
    with pytest.raises(ConfigError, match=r"algo.type: grpo needs env.group_size >= 2"):
        build_config({"name": "x", "algo": {"type": "grpo"}})
    with pytest.raises(ConfigError, match=r"algo.type: grpo needs env.group_size >= 2"):
        build_config({"name": "x", "algo": {"type": "grpo"}, "env": {"group_size": 1}})
    with pytest.raises(ConfigError, match=r"env.group_size only applies to algo.type: grpo"):
        build_config({"name": "x", "algo": {"type": "ppo"}, "env": {"group_size": 2}})
    with pytest.raises(ConfigError, match=r"env.group_size only applies to algo.type: grpo"):
        build_config({"name": "x"}, overrides=["env.group_size=4"])
    # every worker holds whole groups
    with pytest.raises(ConfigError, match=r"make num_envs / num_workers a multiple of group_size"):
        build_config({"name": "x", "algo": {"type": "grpo"}, "env": {"num_envs": 8, "num_workers": 2, "group_size": 8}})
    cfg = build_config(
        {"name": "x", "algo": {"type": "grpo"}, "env": {"num_envs": 8, "num_workers": 2, "group_size": 4}}
    )
    assert isinstance(cfg.algo, GRPOConfig) and cfg.env.group_size == 4


def test_minibatch_must_fit_the_batch():
    env = {"num_envs": 4, "num_workers": 2}
    ok = build_config(
        {"name": "x", "env": env, "algo": {"type": "ppo", "steps_per_iteration": 4, "minibatch_size": 16}}
    )
    assert ok.algo.minibatch_size == 16
    with pytest.raises(ConfigError, match=r"algo.minibatch_size=17 is larger than .* = 16"):
        build_config({"name": "x", "env": env, "algo": {"type": "ppo", "steps_per_iteration": 4, "minibatch_size": 17}})
    with pytest.raises(ConfigError, match=r"algo.minibatch_size=256 is larger than .* = 16"):
        build_config({"name": "x", "env": env}, overrides=["algo={type: ppo, steps_per_iteration: 4}"])
    # a minibatch counts env steps, whatever the sample unit (per-step samples come with their env step)
    for extra in ({"mdp": {"sample_unit": "step"}}, {"policy": {"type": "diffusion"}}):
        with pytest.raises(ConfigError, match=r"algo.minibatch_size=17 is larger than .* = 16"):
            build_config(
                {
                    "name": "x",
                    "env": env,
                    **extra,
                    "algo": {"type": "ppo", "steps_per_iteration": 4, "minibatch_size": 17},
                }
            )


# --------------------------------------------------------------------------- the MDP
def test_sliding_window_fits_the_steps():
    window = {"type": "sliding", "size": 4}
    assert build_config({"name": "x", "policy": {"denoising_steps": 4}, "mdp": {"window": window}}).mdp.window.size == 4
    with pytest.raises(ConfigError) as info:
        build_config({"name": "x", "policy": {"denoising_steps": 3}, "mdp": {"window": window}}, "exp.yaml")
    (line,) = str(info.value).splitlines()
    assert line.startswith("exp.yaml: ") and "mdp.window.size=4" in line and "policy.denoising_steps=3" in line
    with pytest.raises(ConfigError, match=r"mdp.window.size=2 is larger than policy.denoising_steps=1"):
        build_config(
            {"name": "x", "mdp": {"window": {"type": "sliding", "size": 2}}}, overrides=["policy.denoising_steps=1"]
        )


def test_steps_after_window_needs_a_sliding_window():
    with pytest.raises(ConfigError, match=r"exp.yaml: mdp: steps_after_window needs window.type: sliding"):
        build_config({"name": "x", "mdp": {"steps_after_window": 1}}, "exp.yaml")
    with pytest.raises(ConfigError, match=r"mdp: steps_after_window needs window.type: sliding"):
        build_config({"name": "x", "mdp": {"window": {"type": "one_random"}, "steps_after_window": 1}})
    cfg = build_config({"name": "x", "mdp": {"window": {"type": "sliding", "size": 1}, "steps_after_window": 2}})
    assert cfg.mdp.steps_after_window == 2


@pytest.mark.parametrize(("family", "solver"), [("shortcut", "heun"), ("meanflow", "dpm_solver_2m")])
def test_higher_order_solvers_need_a_plain_velocity_field(family, solver):
    with pytest.raises(ConfigError) as info:
        build_config({"name": "x", "policy": {"type": family}, "mdp": {"solver": solver}}, "exp.yaml")
    (line,) = str(info.value).splitlines()
    assert line.startswith("exp.yaml: ") and f"mdp.solver: {solver}" in line and "policy.type: rectified_flow" in line
    assert build_config({"name": "x", "policy": {"type": family}, "mdp": {"solver": "euler"}}).mdp.solver == "euler"
    assert build_config({"name": "x", "mdp": {"solver": solver}}).mdp.solver == solver


# --------------------------------------------------------------------------- round trip
ROUNDTRIP = [
    "quickstart.yaml",
    "quickstart_grpo.yaml",
    "locomotion/hopper_reinflow.yaml",  # rectified flow
    "locomotion/hopper_shortcut.yaml",
    "locomotion/hopper_meanflow.yaml",
    "locomotion/hopper_dppo.yaml",  # diffusion
    "locomotion/hopper_gaussian.yaml",  # gaussian
    "locomotion/hopper_expert.yaml",  # gaussian from scratch (pretrain: null)
]


@pytest.mark.parametrize("name", ROUNDTRIP)
def test_saved_config_loads_back_equal(name, tmp_path):
    cfg = load_config(ROOT / "experiments" / name)
    family = {
        "rectified_flow": FlowPolicyConfig,
        "shortcut": FlowPolicyConfig,
        "meanflow": FlowPolicyConfig,
        "diffusion": DiffusionPolicyConfig,
        "gaussian": GaussianPolicyConfig,
    }[cfg.policy.type]
    assert isinstance(cfg.policy, family)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert type(again.policy) is type(cfg.policy) and type(again.algo) is type(cfg.algo)
    # the saved file is in the current shape: it holds no key that has moved
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "ppo" not in saved and "num_workers" not in saved["ray"]
    assert saved["algo"]["type"] == cfg.algo.type and saved["env"]["num_workers"] == cfg.env.num_workers
    # and saving it again writes the same file
    save_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == (tmp_path / "config.yaml").read_text()
