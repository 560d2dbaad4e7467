"""Property-based tests (hypothesis) of the override parser and the config loader over the
real schema: valid inputs round-trip, invalid ones raise a ConfigError naming the key, never
another exception."""

from __future__ import annotations

import string
import tempfile
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrl.config import (
    FLOW_TYPES,
    POLICY_TYPES,
    AllStepsWindow,
    ConfigError,
    CPSConverterConfig,
    DemosConfig,
    DiffusionPolicyConfig,
    EvalConfig,
    ExperimentConfig,
    FlowPolicyConfig,
    FlowSDEConverterConfig,
    GaussianPolicyConfig,
    GRPOConfig,
    GymEnvConfig,
    MDPConfig,
    NoiseNetConverter,
    OneRandomStepWindow,
    PPOConfig,
    PretrainConfig,
    RayConfig,
    SlidingWindowConfig,
    build_config,
    load_config,
    parse_override,
    save_config,
)
from flowrl.config.loading import DELETE

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
ENV_ID = "flowrl/TwoGoal-v0"  # the quickstart's env: observations and actions of 2 dims
O, A = 2, 2


# --------------------------------------------------------------------------------------------
# property: the override parser
# --------------------------------------------------------------------------------------------

# Text PyYAML reads (it refuses control characters: see test_override_with_a_control_character...)
_TEXT = st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co"))
_KEY_PART = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="=."), min_size=1, max_size=6)
# a leading "~" makes the word a removal (~key), so a key=value key never starts with one
_KEYS = st.lists(_KEY_PART, min_size=1, max_size=4).map(".".join).filter(lambda k: not k.startswith("~"))
_YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(key=_KEYS, value=_YAML_VALUES, flow=st.booleans())
def test_parse_override_round_trips_key_and_value(key, value, flow):
    text = f"{key}={yaml.safe_dump(value, default_flow_style=flow)}"
    assert parse_override(text) == (key, value)


@settings(max_examples=100, deadline=None)
@given(key=_KEYS)
def test_parse_override_of_a_tilde_key_removes_that_key(key):
    parsed_key, value = parse_override(f"~{key}")
    assert parsed_key == key and value is DELETE


_MALFORMED = st.one_of(
    st.text(_TEXT).filter(lambda t: "=" not in t and not t.startswith("~")),  # no '=', not ~key
    st.just("~"),  # ~ with no key
    st.tuples(_KEYS, st.text(_TEXT)).map(lambda kv: f"~{kv[0]}={kv[1]}"),  # ~key with a value
    _KEYS.map(lambda k: f"~{k}."),  # ~key with an empty last part
    st.text(_TEXT).map(lambda v: "=" + v),  # no key
    st.tuples(_KEYS, st.text(_TEXT)).map(lambda kv: f"{kv[0]}.={kv[1]}"),  # empty last part
    st.tuples(_KEYS, st.text(_TEXT)).map(lambda kv: f".{kv[0]}={kv[1]}"),  # empty first part
    st.tuples(_KEYS, _KEYS, st.text(_TEXT)).map(lambda kv: f"{kv[0]}..{kv[1]}={kv[2]}"),  # empty inner part
)


@settings(max_examples=150, deadline=None)
@given(text=_MALFORMED)
def test_parse_override_rejects_malformed_text(text):
    with pytest.raises(ConfigError, match="bad override"):
        parse_override(text)


@settings(max_examples=150, deadline=None)
@given(key=_KEYS, raw=st.text(_TEXT | st.sampled_from("[]{}:,&*!|>'\"%@`#-?\n\t "), max_size=12))
def test_parse_override_of_any_value_text_parses_or_is_a_config_error(key, raw):
    try:
        parsed_key, _ = parse_override(f"{key}={raw}")
    except ConfigError as exc:
        assert key in str(exc) or "bad override" in str(exc)
    else:
        assert parsed_key == key


def test_override_with_a_control_character_is_a_config_error():
    with pytest.raises(ConfigError, match="seed"):
        parse_override("seed=\x01")  # yaml's ReaderError has no .problem
    with pytest.raises(ConfigError, match="seed"):
        parse_override("seed=" + "[" * 5000)  # nesting deep enough to exhaust the recursion


@pytest.mark.parametrize(
    "content, words",
    [(b"\xff\xfe\x00", "UTF-8"), (b"name: [\n", "line"), (b"- a\n- b\n", "mapping")],
)
def test_unreadable_experiment_files_are_one_line_errors(tmp_path, content, words):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert words in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# property: the config loader, over the real schema
# --------------------------------------------------------------------------------------------


def _bounds(info) -> tuple[Any, bool, Any, bool]:
    lo = hi = None
    lo_open = hi_open = False
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge):
            lo = m.ge
        elif isinstance(m, annotated_types.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, annotated_types.Le):
            hi = m.le
        elif isinstance(m, annotated_types.Lt):
            hi, hi_open = m.lt, True
    return lo, lo_open, hi, hi_open


def _kind(info) -> tuple[Any, bool]:
    """(int | float | bool | a Literal's values | None, optional) of a field."""
    ann, optional = info.annotation, False
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        optional = len(args) < len(get_args(ann))
        ann = args[0] if len(args) == 1 else None
    if get_origin(ann) is Literal:
        return get_args(ann), optional
    return (ann if ann in (int, float, bool) else None), optional


def _valid_value(info) -> st.SearchStrategy:
    kind, optional = _kind(info)
    lo, lo_open, hi, hi_open = _bounds(info)
    if isinstance(kind, tuple):
        strategy = st.sampled_from(kind)
    elif kind is bool:
        strategy = st.booleans()
    elif kind is int:
        low = -(2**40) if lo is None else lo + lo_open
        high = (2**40 if lo is None else low + 1000) if hi is None else hi - hi_open
        strategy = st.integers(low, high)
    else:
        low = 0.0 if lo is None else lo
        high = low + 1000.0 if hi is None else hi
        strategy = st.floats(low, high, exclude_min=lo_open, exclude_max=hi_open)
    return st.none() | strategy if optional else strategy


def _scalars(model, exclude=()) -> st.SearchStrategy[dict[str, Any]]:
    """Any subset of the section's scalar keys (numbers, flags, choices) with valid values."""
    fields = {
        name: _valid_value(info)
        for name, info in model.model_fields.items()
        if name not in exclude and _kind(info)[0] is not None
    }
    return st.fixed_dictionaries({}, optional=fields)


_NAMES = st.text(_TEXT, min_size=1, max_size=10)
_WIDTHS = st.lists(st.integers(1, 64), min_size=1, max_size=3)


@st.composite
def valid_configs(draw) -> tuple[dict[str, Any], dict[str, Any]]:
    """A valid experiment as raw data, and {dotted key: pydantic field} of the numbers it sets."""
    family = draw(st.sampled_from(POLICY_TYPES))
    grpo = draw(st.booleans())
    flow = family in FLOW_TYPES
    data: dict[str, Any] = {"name": draw(_NAMES)}
    sections: dict[str, Any] = {"": ExperimentConfig}
    data |= draw(_scalars(ExperimentConfig, exclude={"name"}))
    if draw(st.booleans()):
        data["runs_dir"] = draw(_NAMES)

    workers, group, per = draw(st.integers(1, 4)), draw(st.integers(2, 4)) if grpo else 1, draw(st.integers(1, 4))
    data["env"] = {"num_workers": workers, "num_envs": workers * group * per}
    if grpo:
        data["env"]["group_size"] = group
    sections["env"] = GymEnvConfig

    model = {"diffusion": DiffusionPolicyConfig, "gaussian": GaussianPolicyConfig}.get(family, FlowPolicyConfig)
    policy = {"type": family} if family != "rectified_flow" or draw(st.booleans()) else {}
    policy |= draw(_scalars(model, exclude={"type", "denoising_steps", "train_steps", "min_std", "obs_norm"}))
    if draw(st.booleans()):
        policy["hidden_dims"] = draw(_WIDTHS)
    k = draw(st.integers(1, 8))
    if family != "gaussian":
        policy["denoising_steps"] = k
    if family == "diffusion":
        policy["train_steps"] = draw(st.integers(k, k + 30))
        policy["min_std"] = draw(st.floats(0.0 if k > 1 else 0.01, 1.0))
    pretrain = draw(st.booleans())
    if draw(st.booleans()):
        policy["pretrained"] = draw(_NAMES)
    dataset_ok = pretrain or "pretrained" in policy
    if not dataset_ok or draw(st.booleans()):
        policy["obs_norm"] = draw(
            st.sampled_from(["dataset", "running", "none"] if dataset_ok else ["running", "none"])
        )
    data["policy"], sections["policy"] = policy, model

    converter = "reinflow"
    if flow and draw(st.booleans()):
        mdp: dict[str, Any] = draw(_scalars(MDPConfig, exclude={"solver", "steps_after_window"}))
        sections["mdp"] = MDPConfig
        converter = draw(st.sampled_from(["reinflow", "flow_noise", "flow_sde", "cps"]))
        if converter in ("reinflow", "flow_noise"):
            c: dict[str, Any] = {"type": converter}
            if draw(st.booleans()):
                c["std_min"] = draw(st.floats(1e-3, 1.0))
                c["std_max"] = c["std_min"] + draw(st.floats(1e-3, 1.0))
            if draw(st.booleans()):
                c["hidden_dims"] = draw(_WIDTHS)
        else:
            c_model = FlowSDEConverterConfig if converter == "flow_sde" else CPSConverterConfig
            c = {"type": converter} | draw(_scalars(c_model, exclude={"type"}))
        if converter != "reinflow" or draw(st.booleans()):
            mdp["converter"] = c
            sections["mdp.converter"] = {"flow_sde": FlowSDEConverterConfig, "cps": CPSConverterConfig}.get(
                converter, NoiseNetConverter
            )
        window = draw(st.sampled_from(["all", "one_random", "sliding"]))
        w: dict[str, Any] = {"type": window}
        if window == "sliding":
            mode = draw(st.sampled_from(["progressive", "random", "decay"]))
            inactive = set(SlidingWindowConfig(type="sliding", size=1, mode=mode)._inactive())
            w |= {"size": draw(st.integers(1, k)), "mode": mode}
            w |= draw(_scalars(SlidingWindowConfig, exclude={"type", "size", "mode", *inactive}))
            if draw(st.booleans()):
                mdp["steps_after_window"] = draw(st.integers(1, 10))
        if window != "all" or draw(st.booleans()):
            mdp["window"] = w
            sections["mdp.window"] = {"all": AllStepsWindow, "one_random": OneRandomStepWindow}.get(
                window, SlidingWindowConfig
            )
        if family == "rectified_flow" or draw(st.booleans()):
            mdp["solver"] = (
                draw(st.sampled_from(["euler", "heun", "dpm_solver_2m"])) if family == "rectified_flow" else "euler"
            )
        data["mdp"] = mdp

    if pretrain:
        exclude = {"consistency_fraction"} if family not in ("shortcut", "meanflow") else set()
        p = draw(_scalars(PretrainConfig, exclude=exclude))
        if draw(st.booleans()):
            p["demos"] = draw(_scalars(DemosConfig))
            sections["pretrain.demos"] = DemosConfig
        if p or draw(st.booleans()):
            data["pretrain"], sections["pretrain"] = p, PretrainConfig
    else:
        data["pretrain"] = None

    learned_noise = flow and converter in ("reinflow", "flow_noise")
    model = GRPOConfig if grpo else PPOConfig
    exclude = {"type", "minibatch_size", "steps_per_iteration"}
    exclude |= set() if learned_noise else {"noise_lr"}
    exclude |= set() if learned_noise or family == "gaussian" else {"entropy_coef"}
    exclude |= {"ratio_norm"} if learned_noise or not flow else set()  # fixed-std converters only
    algo = {"type": "grpo" if grpo else "ppo"} | draw(_scalars(model, exclude=exclude))
    if grpo:
        algo["minibatch_size"] = draw(st.integers(1, 1024))
    else:
        steps = draw(st.integers(1, 16))
        algo["steps_per_iteration"] = steps
        algo["minibatch_size"] = draw(st.integers(1, data["env"]["num_envs"] * steps))  # fits the rollout
    data["algo"], sections["algo"] = algo, model

    if draw(st.booleans()):
        data["eval"], sections["eval"] = draw(_scalars(EvalConfig)), EvalConfig
    if draw(st.booleans()):
        ray: dict[str, Any] = {"enabled": draw(st.booleans())}
        if ray["enabled"] and draw(st.booleans()):
            ray["address"] = draw(st.sampled_from([None, "auto", "10.0.0.1:6379"]))
        inactive = set(RayConfig(**ray)._inactive())
        ray |= draw(_scalars(RayConfig, exclude={"enabled", "address", *inactive}))
        data["ray"], sections["ray"] = ray, RayConfig

    numbers = {}
    for section, model in sections.items():
        node = data
        for part in [p for p in section.split(".") if p]:
            node = node[part]
        for key, value in node.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key in model.model_fields:
                numbers[f"{section}.{key}".lstrip(".")] = (model.model_fields[key], section)
    return data, {"sections": sections, "numbers": numbers}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_configs())
def test_valid_configs_build_and_round_trip_through_the_saved_file(generated):
    data, _ = generated
    cfg = build_config(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        save_config(cfg, path)
        loaded = load_config(path)
    assert loaded == cfg
    assert loaded.model_dump() == cfg.model_dump()


def _set(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    import copy

    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[last] = value
    return data


_NOT_A_NUMBER = (
    st.text(string.ascii_letters, min_size=1, max_size=6).filter(lambda t: t.lower() not in ("inf", "infinity", "nan"))
    | st.lists(st.integers(0, 3), min_size=1, max_size=2)
    | st.dictionaries(st.sampled_from("abc"), st.integers(), min_size=1, max_size=2)
)


def _out_of_range(info) -> st.SearchStrategy:
    kind, _ = _kind(info)
    lo, lo_open, hi, hi_open = _bounds(info)
    options = []
    if lo is not None:
        edge = st.just(lo) if lo_open else st.nothing()
        below = st.integers(lo - 1000, lo - 1) if kind is int else st.floats(lo - 1000.0, lo, exclude_max=True)
        options += [edge, below]
    if hi is not None:
        edge = st.just(hi) if hi_open else st.nothing()
        above = st.integers(hi + 1, hi + 1000) if kind is int else st.floats(hi, hi + 1000.0, exclude_min=True)
        options += [edge, above]
    return st.one_of(options)


@st.composite
def invalid_configs(draw) -> tuple[dict[str, Any], list[str], str]:
    """(data, overrides, dotted key that is wrong) with one mistake: an unknown key, a number of the
    wrong type, or a number out of its range; given in the data or as a command-line override."""
    data, info = draw(valid_configs())
    numbers = info["numbers"]
    mistake = draw(st.sampled_from(["unknown", "type", "range"]))
    if mistake == "unknown":
        section = draw(st.sampled_from(sorted(info["sections"])))
        fields = info["sections"][section].model_fields
        name = draw(st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True).filter(lambda n: n not in fields))
        key, value = f"{section}.{name}".lstrip("."), draw(st.integers() | st.text(string.ascii_letters))
    elif mistake == "type":
        key = draw(st.sampled_from(sorted(numbers)))
        value = draw(_NOT_A_NUMBER)
    else:
        bounded = sorted(k for k, (field, _) in numbers.items() if _bounds(field) != (None, False, None, False))
        key = draw(st.sampled_from(bounded))  # env.num_envs is always there
        value = draw(_out_of_range(numbers[key][0]))
    if draw(st.booleans()):
        return data, [f"{key}={yaml.safe_dump(value, default_flow_style=True)}"], key
    return _set(data, key, value), [], key


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(invalid_configs())
def test_invalid_configs_are_config_errors_naming_the_key(generated):
    data, overrides, key = generated
    with pytest.raises(ConfigError) as err:
        build_config(data, "exp.yaml", overrides)
    message = str(err.value)
    assert key in message, (key, message)
    assert message.startswith("exp.yaml: ")
