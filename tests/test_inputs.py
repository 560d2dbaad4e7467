"""Every input is checked before work starts: bad demonstrations, bad checkpoints and bad config
give one DatasetError / CheckpointError / ConfigError line that names the problem, never a
traceback from inside numpy, torch or pydantic, and no run folder.

Oracles: the corruption each case makes (its message must name it); the CLI's contract (exit
code 2, one "flowrl: error:" line on stderr, no run folder); for the property tests, equality
after a round trip (override text, saved config, saved dataset) and the exception type.
"""

from __future__ import annotations

import argparse
import string
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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
from flowrl.experiment import preflight
from flowrl.models.build import CheckpointError, actor_record, build_actor, check_checkpoint, load_actor
from flowrl.rollout.demos import DatasetError, check_demos, load_demos

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
ENV_ID = "flowrl/TwoGoal-v0"  # the quickstart's env: observations and actions of 2 dims
O, A = 2, 2


# --------------------------------------------------------------------------------------------
# demonstration files
# --------------------------------------------------------------------------------------------


def _demos(n_eps: int = 3, length: int = 4, o: int = O, a: int = A) -> dict[str, np.ndarray]:
    n = n_eps * length
    rng = np.random.default_rng(0)
    return {
        "observations": rng.normal(size=(n, o)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, a)).astype(np.float32),
        "episode_ends": np.arange(1, n_eps + 1) * length,
    }


def _with(**change: Any) -> dict[str, np.ndarray]:
    return {**_demos(), **change}


def _save(path: Path, arrays: dict[str, Any]) -> None:
    np.savez(path, **arrays)  # object arrays are pickled into the file: the reader must refuse them


def _nan_at(key: str, step: int, dim: int, value: float = np.nan) -> dict[str, np.ndarray]:
    d = _demos()
    d[key] = d[key].copy()
    d[key][step, dim] = value
    return d


def _bytes_of(arrays: dict[str, np.ndarray], path: Path) -> bytes:
    _save(path, arrays)
    return path.read_bytes()


def _write_bad_npz(name: str, path: Path) -> None:
    """Make the bad demonstration file ``name`` at ``path``."""
    d = _demos()
    n = len(d["observations"])
    arrays: dict[str, Any] | None = {
        "missing_key": {"observations": d["observations"], "actions": d["actions"]},
        "obs_1d": _with(observations=d["observations"][:, 0]),
        "actions_3d": _with(actions=d["actions"][:, :, None]),
        "ends_2d": _with(episode_ends=d["episode_ends"][:, None]),
        "obs_object": _with(observations=np.array([list(r) for r in d["observations"]], dtype=object)),
        "actions_strings": _with(actions=d["actions"].astype(str)),
        "obs_complex": _with(observations=d["observations"].astype(np.complex64)),
        "ends_float": _with(episode_ends=d["episode_ends"].astype(np.float64)),
        "fewer_actions": _with(actions=d["actions"][:-1]),
        "no_steps": {"observations": np.zeros((0, O)), "actions": np.zeros((0, A)), "episode_ends": np.zeros(0, int)},
        "obs_nan": _nan_at("observations", 5, 1),
        "actions_inf": _nan_at("actions", 7, 0, np.inf),
        "ends_empty": _with(episode_ends=np.zeros(0, np.int64)),
        "ends_zero": _with(episode_ends=np.array([0, 4, n])),
        "ends_negative": _with(episode_ends=np.array([-3, 4, n])),
        "ends_not_increasing": _with(episode_ends=np.array([4, 4, n])),
        "ends_short": _with(episode_ends=np.array([4, n - 1])),
        "ends_past": _with(episode_ends=np.array([4, n + 3])),
        "ends_uint_past": _with(episode_ends=np.array([4, 2**64 - 1], dtype=np.uint64)),
        "obs_dim": _with(observations=np.zeros((n, O + 1), np.float32)),
        "action_dim": _with(actions=np.zeros((n, A + 3), np.float32)),
        "no_obs_entries": _with(observations=np.zeros((n, 0), np.float32)),
    }.get(name)
    if arrays is not None:
        _save(path, arrays)
        return
    good = _bytes_of(d, path)
    if name == "not_npz":
        path.write_text("observations,actions\n0.1,0.2\n")
    elif name == "empty_file":
        path.write_bytes(b"")
    elif name == "single_npy":
        with path.open("wb") as f:
            np.save(f, d["observations"])
    elif name == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif name == "bad_crc":  # one flipped byte in the (stored) observation data
        data = bytearray(good)
        data[good.index(d["observations"].tobytes()) + 5] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        raise KeyError(name)


# (name, what the message must say) for every kind of bad demonstration file
BAD_DEMOS = [
    ("not_npz", "is not an .npz archive"),
    ("empty_file", "is empty"),
    ("single_npy", "single .npy array"),
    ("truncated", "truncated or corrupt"),
    ("bad_crc", r"array observations cannot be read .*corrupt"),
    ("missing_key", "missing arrays episode_ends"),
    ("obs_1d", r"observations has shape \(12,\), expected \[N, O\]"),
    ("actions_3d", r"actions has shape \(12, 2, 1\), expected \[N, A\]"),
    ("ends_2d", r"episode_ends has shape \(3, 1\), expected \[E\]"),
    ("obs_object", "observations holds Python objects"),
    ("actions_strings", "actions must hold real numbers"),
    ("obs_complex", "observations must hold real numbers"),
    ("ends_float", "episode_ends must hold integers"),
    ("fewer_actions", "12 observations but 11 actions"),
    ("no_steps", "observations holds no steps"),
    ("no_obs_entries", "observations has shape"),
    ("obs_nan", r"observations holds 1 non-finite values .* step 5 \(dimension 1\)"),
    ("actions_inf", r"actions holds 1 non-finite values .* step 7 \(dimension 0\)"),
    ("ends_empty", "episode_ends is empty"),
    ("ends_zero", r"episode_ends\[0\] = 0"),
    ("ends_negative", r"episode_ends\[0\] = -3"),
    ("ends_not_increasing", r"episode_ends\[1\] = 4 does not follow episode_ends\[0\] = 4"),
    ("ends_short", "episode_ends ends at 11, but there are 12 steps"),
    ("ends_past", r"episode_ends\[1\] = 15 is past the last step N = 12"),
    ("ends_uint_past", r"episode_ends\[1\] = 18446744073709551615 is past"),
    ("obs_dim", f"observations has observation dim 3, env {ENV_ID} has 2"),
    ("action_dim", f"actions has action dim 5, env {ENV_ID} has 2"),
]


@pytest.mark.parametrize(("name", "needle"), BAD_DEMOS, ids=[b[0] for b in BAD_DEMOS])
def test_bad_demonstrations_are_one_line_errors(tmp_path, name, needle):
    path = tmp_path / f"{name}.npz"
    _write_bad_npz(name, path)
    cfg = DemosConfig(path=str(path))
    for check in (lambda: check_demos(cfg, ENV_ID, (O, A)), lambda: load_demos(cfg, ENV_ID, 0, (O, A))):
        with pytest.raises(DatasetError, match=needle) as err:
            check()
        message = str(err.value)
        assert "\n" not in message and str(path) in message
        assert "allow_pickle" not in message, "no hint the user cannot follow"
    if name not in ("obs_dim", "action_dim"):
        with pytest.raises(DatasetError, match=needle):
            load_demos(cfg, ENV_ID, 0)  # without dims: only the file's own consistency


def test_good_demonstrations_load_with_any_integer_episode_ends(tmp_path):
    for dtype in (np.uint8, np.int16, np.uint32, np.int64, np.uint64):
        path = tmp_path / f"{np.dtype(dtype).name}.npz"
        d = _with(episode_ends=_demos()["episode_ends"].astype(dtype))
        np.savez(path, **d, episode_returns=np.ones(3), meta_env_id=np.array(ENV_ID))  # extra arrays are fine
        check_demos(DemosConfig(path=str(path)), ENV_ID, (O, A))
        loaded = load_demos(DemosConfig(path=str(path)), ENV_ID, 0, (O, A))
        assert loaded.keys() == {"observations", "actions", "episode_ends"}
        np.testing.assert_array_equal(loaded["episode_ends"], d["episode_ends"])
        assert loaded["episode_ends"].dtype == np.int64
        assert loaded["observations"].dtype == np.float32


def test_preflight_checks_the_demonstrations_against_the_env(tmp_path):
    path = tmp_path / "wide.npz"
    _write_bad_npz("obs_dim", path)
    with pytest.raises(DatasetError, match=f"observation dim 3, env {ENV_ID} has 2"):
        preflight(load_config(QUICKSTART, [f"pretrain.demos={{path: {path}}}"]))
    _save(path, _demos())
    preflight(load_config(QUICKSTART, [f"pretrain.demos={{path: {path}}}"]))


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def _policy_cfg():
    return load_config(QUICKSTART).policy


def _record() -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = _policy_cfg()
    return actor_record(build_actor(cfg, O, A), cfg)


def _write_bad_checkpoint(name: str, path: Path) -> str:
    """Make the bad checkpoint ``name`` at ``path``; returns the name of the tensor it damages, if any."""
    record = _record()
    state = record["actor"]
    first = next(iter(state))
    weight = next(k for k, v in state.items() if k.endswith("weight"))
    if name in ("truncated", "garbage", "empty_file"):
        torch.save(record, path)
        good = path.read_bytes()
        path.write_bytes(
            {"truncated": good[: len(good) // 2], "garbage": bytes(range(256)) * 4, "empty_file": b""}[name]
        )
        return ""
    tensor = ""
    if name == "python_object":  # weights_only refuses to unpickle it
        record = {**record, "extra": argparse.Namespace(a=1)}
    elif name == "not_a_dict":
        record = [state]
    elif name == "no_arch":
        record = {"actor": state}
    elif name == "bc_state":  # a pretraining checkpoint (checkpoints/pretrain.pt), not a policy
        record = {"step": 10, "actor": state, "ema": state, "opt": {}}
    elif name == "arch_mismatch":
        record["arch"]["hidden_dims"] = [64]
    elif name == "obs_dim_mismatch":
        record["arch"]["obs_dim"] = O + 1
    elif name == "missing_tensor":
        del state[first]
        tensor = first
    elif name == "unexpected_tensor":
        state["head.extra"] = torch.zeros(3)
        tensor = "head.extra"
    elif name == "wrong_shape":
        state[weight] = torch.zeros(3, 3)
        tensor = weight
    elif name == "not_a_tensor":
        state[weight] = [1.0, 2.0]
        tensor = weight
    elif name == "complex_weights":
        state[weight] = state[weight].to(torch.complex64)
        tensor = weight
    elif name == "nan_weights":
        state[weight] = state[weight].clone()
        state[weight][0, 0] = float("nan")
        state[weight][1, 0] = float("inf")
        tensor = weight
    else:
        raise KeyError(name)
    torch.save(record, path)
    return tensor


BAD_CHECKPOINTS = [
    ("truncated", r"cannot be read by torch.load \(\w+\): the file is truncated"),
    ("garbage", "cannot be read by torch.load"),
    ("empty_file", "cannot be read by torch.load"),
    ("python_object", r"cannot be read by torch.load \(UnpicklingError\)"),
    ("not_a_dict", "is not a flowrl policy checkpoint"),
    ("no_arch", "is not a flowrl policy checkpoint"),
    ("bc_state", r"is not a flowrl policy checkpoint \(it holds entries 'step', 'actor', 'ema', 'opt'"),
    ("arch_mismatch", r"hidden_dims: checkpoint \[64\] vs experiment \[128, 128\]\); set policy.hidden_dims=\[64\]"),
    ("obs_dim_mismatch", r"obs_dim: checkpoint 3 vs experiment 2\); use a checkpoint trained on this env"),
    ("missing_tensor", "missing tensor '{tensor}'"),
    ("unexpected_tensor", "unexpected tensor '{tensor}'"),
    ("wrong_shape", r"tensor '{tensor}' has shape \[3, 3\]"),
    ("not_a_tensor", "weight '{tensor}' is a list, not a tensor"),
    ("nan_weights", "tensor '{tensor}' holds 2 non-finite values"),
    ("complex_weights", "tensor '{tensor}' has dtype complex64, the network needs real numbers"),
]


@pytest.mark.parametrize(("name", "needle"), BAD_CHECKPOINTS, ids=[b[0] for b in BAD_CHECKPOINTS])
def test_bad_checkpoints_are_one_line_errors(tmp_path, name, needle):
    path = tmp_path / f"{name}.pt"
    tensor = _write_bad_checkpoint(name, path)
    needle = needle.replace("{tensor}", tensor.replace(".", r"\."))
    for load in (check_checkpoint, load_actor):
        with pytest.raises(CheckpointError, match=needle) as err:
            load(path, _policy_cfg(), O, A)
        message = str(err.value)
        assert "\n" not in message and str(path) in message
        assert "weights_only" not in message, "no hint that would unpickle an untrusted file"


def test_good_checkpoint_passes_the_check_and_loads(tmp_path):
    path = tmp_path / "good.pt"
    record = _record()
    torch.save(record, path)
    check_checkpoint(path, _policy_cfg(), O, A)
    actor = load_actor(path, _policy_cfg(), O, A)
    for key, value in actor.state_dict().items():
        assert torch.equal(value, record["actor"][key])


def test_preflight_checks_the_pretrained_checkpoint(tmp_path):
    path = tmp_path / "p.pt"
    _write_bad_checkpoint("nan_weights", path)
    with pytest.raises(CheckpointError, match="non-finite"):
        preflight(load_config(QUICKSTART, [f"policy.pretrained={path}"]))
    torch.save(_record(), path)
    preflight(load_config(QUICKSTART, [f"policy.pretrained={path}"]))


# --------------------------------------------------------------------------------------------
# through the CLI: exit code 2, one line, no traceback, no run folder (a few representative cases)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "name", "needle"),
    [
        ("pretrain", "obs_nan", "observations holds 1 non-finite values"),
        ("pretrain", "obs_dim", "observation dim 3"),
        ("train", "truncated", "cannot be read by torch.load"),
        ("train", "nan_weights", "non-finite values"),
    ],
)
def test_cli_refuses_bad_inputs_before_the_run_folder(tmp_path, command, name, needle):
    runs = tmp_path / "runs"
    if command == "pretrain":
        bad = tmp_path / f"{name}.npz"
        _write_bad_npz(name, bad)
        override = f"pretrain.demos={{path: {bad}}}"  # (pretrain.demos.path=... clashes with the file's episodes)
    else:
        bad = tmp_path / f"{name}.pt"
        _write_bad_checkpoint(name, bad)
        override = f"policy.pretrained={bad}"
    proc = subprocess.run(
        [sys.executable, "-m", "flowrl.cli", command, QUICKSTART, override, f"runs_dir={runs}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowrl: error:"), proc.stderr
    assert needle in lines[0] and str(bad) in lines[0]
    assert "Traceback" not in proc.stderr and "run folder" not in proc.stdout
    assert not runs.exists() or not any(runs.iterdir()), "no run folder for bad input"


# --------------------------------------------------------------------------------------------
# property: the override parser
# --------------------------------------------------------------------------------------------

# Text PyYAML reads (it refuses control characters: see test_override_with_a_control_character...)
_TEXT = st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co"))
_KEY_PART = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="=."), min_size=1, max_size=6)
_KEYS = st.lists(_KEY_PART, min_size=1, max_size=4).map(".".join)
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


_MALFORMED = st.one_of(
    st.text(_TEXT).filter(lambda t: "=" not in t),  # no '='
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


# --------------------------------------------------------------------------------------------
# property: the demonstration reader
# --------------------------------------------------------------------------------------------

_FLOATS = {"allow_nan": False, "allow_infinity": False}


@st.composite
def datasets(draw) -> dict[str, np.ndarray]:
    lengths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=5))
    n, o, a = sum(lengths), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    obs_dtype = draw(st.sampled_from([np.float32, np.float64, np.float16, np.int32]))
    width = min(32, np.dtype(obs_dtype).itemsize * 8)
    elements = st.integers(-100, 100) if obs_dtype is np.int32 else st.floats(-1e3, 1e3, **_FLOATS, width=width)
    ends_dtype = draw(
        st.sampled_from([np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64])
    )
    return {
        "observations": draw(hnp.arrays(obs_dtype, (n, o), elements=elements)),
        "actions": draw(hnp.arrays(np.float32, (n, a), elements=st.floats(-1, 1, **_FLOATS, width=32))),
        "episode_ends": np.cumsum(lengths).astype(ends_dtype),
    }


@settings(max_examples=80, deadline=None)
@given(datasets(), st.booleans())
def test_valid_datasets_load_back_equal(demos, compressed):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        (np.savez_compressed if compressed else np.savez)(path, **demos)
        dims = (demos["observations"].shape[1], demos["actions"].shape[1])
        loaded = load_demos(DemosConfig(path=str(path)), ENV_ID, 0, dims)
    for key, value in demos.items():
        np.testing.assert_array_equal(loaded[key], value)
    assert loaded["observations"].dtype == demos["observations"].dtype
    assert loaded["actions"].dtype == demos["actions"].dtype


CORRUPTIONS = [
    "missing",
    "rank",
    "object",
    "strings",
    "float_ends",
    "row_count",
    "no_steps",
    "non_finite",
    "ends_empty",
    "ends_first",
    "ends_order",
    "ends_last",
    "dims",
    "truncate",
]


@st.composite
def corrupted_datasets(draw) -> tuple[dict[str, Any] | bytes, str, str]:
    """(arrays or raw file bytes, corruption, what the message must name)."""
    d: dict[str, Any] = dict(draw(datasets()))
    n = len(d["observations"])
    kind = draw(st.sampled_from(CORRUPTIONS))
    key = draw(st.sampled_from(["observations", "actions", "episode_ends"]))
    data_key = draw(st.sampled_from(["observations", "actions"]))
    ends = d["episode_ends"].astype(np.int64)
    if kind == "missing":
        del d[key]
        return d, kind, key
    if kind == "rank":
        d[key] = d[key].reshape(-1) if key != "episode_ends" else d[key][:, None]
        if draw(st.booleans()):
            d[key] = d[key][..., None, None]
        return d, kind, key
    if kind == "object":
        d[key] = d[key].astype(object)
        return d, kind, key
    if kind == "strings":
        d[key] = d[key].astype(str)
        return d, kind, key
    if kind == "float_ends":
        d["episode_ends"] = ends.astype(draw(st.sampled_from([np.float32, np.float64])))
        return d, kind, "episode_ends"
    if kind == "row_count":
        d["actions"] = np.concatenate([d["actions"], d["actions"][:1]]) if draw(st.booleans()) else d["actions"][:-1]
        return d, kind, "actions"
    if kind == "no_steps":
        d = {k: v[:0] for k, v in d.items()}
        return d, kind, "observations"
    if kind == "non_finite":
        arr = d[data_key].astype(np.float32)
        flat = arr.reshape(-1)
        where = draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=4, unique=True))
        flat[where] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        d[data_key] = arr
        first = min(where)
        return (
            d,
            kind,
            f"{data_key} holds {len(where)} non-finite values (NaN or inf), the first at step {first // arr.shape[1]}",
        )
    if kind == "ends_empty":
        d["episode_ends"] = ends[:0]
        return d, kind, "episode_ends"
    if kind == "ends_first":
        ends[0] = draw(st.integers(-5, 0))
    elif kind == "ends_order":
        assume(len(ends) >= 2)
        i = draw(st.integers(0, len(ends) - 2))
        ends[i + 1] = ends[i] - draw(st.integers(0, 2))
    elif kind == "ends_last":
        ends[-1] = draw(st.sampled_from([n - 1, n + 1, n + 5]))
    if kind.startswith("ends_"):
        d["episode_ends"] = ends
        return d, kind, "episode_ends"
    if kind == "dims":
        d[data_key] = np.concatenate([d[data_key], d[data_key][:, :1]], axis=1)
        return d, kind, data_key
    # truncate: the bytes of a good file, cut short
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        np.savez(path, **d)
        raw = path.read_bytes()
    return raw[: draw(st.integers(0, len(raw) - 1))], kind, "d.npz"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(corrupted_datasets())
def test_corrupted_datasets_are_dataset_errors_naming_the_array(generated):
    content, kind, needle = generated
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            np.savez(path, **content)
        dims = None
        if kind == "dims":  # the env's dims are the widths before the corruption added a column
            assert isinstance(content, dict)
            o, a = content["observations"].shape[1], content["actions"].shape[1]
            dims = (o - 1, a) if needle == "observations" else (o, a - 1)
        with pytest.raises(DatasetError) as err:
            load_demos(DemosConfig(path=str(path)), ENV_ID, 0, dims)
    message = str(err.value)
    assert needle in message, (kind, message)
    assert "\n" not in message
