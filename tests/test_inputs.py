"""Every input is checked before work starts: bad demonstrations, bad checkpoints and bad config
give one DatasetError / CheckpointError / ConfigError line that names the problem, never a
traceback from inside numpy, torch or pydantic, and no run folder.

Oracles: the corruption each case makes (its message must name it); the CLI's contract (exit
code 2, one "flowrl: error:" line on stderr, no run folder); for the property tests, equality
after a round trip (override text, saved config, saved dataset) and the exception type.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flowrl.config import (
    DemosConfig,
    load_config,
)
from flowrl.errors import DatasetError
from flowrl.experiment import preflight
from flowrl.models.build import CheckpointError, actor_record, build_actor, check_checkpoint, load_actor
from flowrl.rollout.demos import check_demos, load_demos

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
