"""The demonstrations file: a NumPy ``.npz`` of observations ``[N, O]``, actions ``[N, A]`` and
episode_ends ``[E]`` (cumulative episode lengths), plus its provenance as ``meta_*`` 0-d string
arrays (``save_demos``' keyword arguments), among them ``meta_env_id``: a dataset recorded in
another env than the experiment's is refused (``read_demos``), whatever the dimensions.

Writing (``save_demos``), reading and checking (``read_demos``, ``read_metadata``): the format
in one place, in the lowest layer, because both sides write it: ``flowrl collect``
(flowrl/rollout/demos.py) and ManiSkill's motion planners (envs/maniskill_demos.py); pretraining
reads it. Any problem with a file is one DatasetError line naming the file, the array and the fix.
"""

from __future__ import annotations

import pickle
import struct
import tokenize
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from flowrl.errors import DatasetError, brief

DEMO_KEYS = ("observations", "actions", "episode_ends")
ENV_KEY = "meta_env_id"  # the env the dataset was recorded in (save_demos(..., env_id=...))
_LAYOUT = "observations [N, O], actions [N, A], episode_ends [E]"
_WRITE = "write it with np.savez(path, observations=..., actions=..., episode_ends=...) or `flowrl collect`"

# What reading a damaged .npz raises (numpy 2 and zipfile; found by fuzzing truncated, bit-flipped
# and random files): zipfile's and zlib's errors; numpy's format errors (ValueError, also
# UnicodeDecodeError); headers numpy's parser gives up on (tokenize.TokenError, SyntaxError,
# TypeError); zip features Python cannot read (NotImplementedError; RuntimeError for encrypted
# members); short reads (EOFError, OSError, struct.error); headers that claim absurd sizes
# (MemoryError, OverflowError); pickle errors for completeness (allow_pickle stays False).
_UNREADABLE = (
    zipfile.BadZipFile,
    zlib.error,
    ValueError,
    OSError,
    EOFError,
    struct.error,
    NotImplementedError,
    RuntimeError,
    tokenize.TokenError,
    SyntaxError,
    TypeError,
    pickle.UnpicklingError,
    MemoryError,
    OverflowError,
)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty zip (what np.load accepts)


def read_demos(path: str | Path, env_id: str, dims: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Read and check a demonstration .npz: recorded in ``env_id`` if its ``meta_env_id`` says
    where it was recorded; observations ``[N, O]`` and actions ``[N, A]`` of real numbers, all
    finite, N >= 1; integer episode_ends ``[E]``, strictly increasing, > 0, ending at N; with
    ``dims``, O and A equal to the env's. Any problem is one DatasetError line naming the file,
    the array and the fix. Returns the three arrays (episode_ends as int64)."""
    return read_recorded(path, env_id, dims)[0]


def read_metadata(path: str | Path) -> dict[str, str]:
    """The provenance a dataset file carries (``save_demos``' keyword arguments), without the
    ``meta_`` prefix; {} for a file without any. DatasetError when the file is unreadable."""
    path = Path(path).expanduser()
    with _open_npz(path) as data:
        return {
            key.removeprefix("meta_"): _meta_string(data, path, key) for key in data.files if key.startswith("meta_")
        }


def read_recorded(
    path: str | Path, env_id: str, dims: tuple[int, int] | None = None
) -> tuple[dict[str, np.ndarray], str | None]:
    """``read_demos``, and the env the file says it was recorded in (None when it does not say)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"demonstration file not found: {path} (pretrain.demos.path); record one with `flowrl collect "
            f"EXPERT_RUN --out {path}` (README, Locomotion) or point the key at an existing .npz with keys "
            f"{', '.join(DEMO_KEYS)}"
        )
    with _open_npz(path) as data:
        recorded = _meta_string(data, path, ENV_KEY) if ENV_KEY in data.files else None
        if recorded is not None and recorded != env_id:
            raise DatasetError(
                f"{path} was recorded in {recorded} but the experiment's env.id is {env_id}: pretrain on "
                f"demonstrations recorded in {env_id} (flowrl collect of a {env_id} run), or set env.id: {recorded}"
            )
        missing = [k for k in DEMO_KEYS if k not in data.files]
        if missing:
            has = ", ".join(repr(k) for k in data.files[:8]) + (", ..." if len(data.files) > 8 else "")
            raise DatasetError(
                f"{path}: missing arrays {', '.join(missing)} (it has {has or 'no arrays'}); a demonstration file "
                f"needs {_LAYOUT}: {_WRITE}"
            )
        shapes = {}
        for key in DEMO_KEYS:
            shapes[key] = _check_header(data, path, key)
        _check_sizes(path, env_id, shapes, dims)
        demos = {key: _read_array(data, path, key) for key in DEMO_KEYS}
    for key in ("observations", "actions"):
        _check_finite(path, key, demos[key])
    demos["episode_ends"] = _checked_ends(path, demos["episode_ends"], len(demos["observations"]))
    return demos, recorded


def _meta_string(data: Any, path: Path, key: str) -> str:
    """A provenance entry: a 0-d string array (what save_demos writes), checked before it is read."""
    shape, dtype, _ = _header(data, path, key)
    if shape != () or dtype.kind != "U":
        raise DatasetError(
            f"{path}: array {key} is not a string (dtype {dtype}, shape {shape}); provenance entries are 0-d "
            f"strings, e.g. {key}=np.array('Hopper-v5')"
        )
    return str(_read_array(data, path, key))


def _open_npz(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise DatasetError(f"cannot read demonstration file {path} ({brief(exc)}; pretrain.demos.path)") from None
    if not magic:
        raise DatasetError(f"demonstration file {path} is empty (pretrain.demos.path): {_WRITE}")
    if magic.startswith(b"\x93NUM"):
        raise DatasetError(
            f"{path} is a single .npy array, not an .npz archive of {_LAYOUT} (pretrain.demos.path): {_WRITE}"
        )
    if magic not in _ZIP_MAGIC:
        raise DatasetError(
            f"{path} is not an .npz archive (pretrain.demos.path needs a NumPy .npz of {_LAYOUT}): {_WRITE}"
        )
    try:
        return np.load(path, allow_pickle=False)
    except _UNREADABLE as exc:
        raise DatasetError(
            f"{path} is a truncated or corrupt .npz archive ({brief(exc)}; pretrain.demos.path): {_WRITE}"
        ) from None


def _corrupt(path: Path, key: str, exc: BaseException) -> DatasetError:
    return DatasetError(
        f"{path}: array {key} cannot be read ({brief(exc)}): the file is truncated or corrupt; {_WRITE}"
    )


def _header(data: Any, path: Path, key: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and stored size of array ``key`` from its .npy header (no data read)."""
    member = key + ".npy" if key + ".npy" in data.zip.namelist() else key
    try:
        info = data.zip.getinfo(member)
        with warnings.catch_warnings(), data.zip.open(member) as f:
            warnings.simplefilter("ignore")  # numpy's note on Python 2 headers: the data read warns once
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except _UNREADABLE as exc:
        raise _corrupt(path, key, exc) from None
    return tuple(shape), dtype, info.file_size


def _check_header(data: Any, path: Path, key: str) -> tuple[int, ...]:
    """Shape of array ``key`` from its .npy header, after checking its dtype and rank (no data read)."""
    shape, dtype, file_size = _header(data, path, key)
    ends = key == "episode_ends"
    want, cast = ("integers", "np.int64") if ends else ("real numbers", "np.float32")
    fix = f"save np.asarray({key}, dtype={cast})" + (" (cumulative episode lengths)" if ends else "")
    if dtype.hasobject:
        raise DatasetError(
            f"{path}: array {key} holds Python objects (dtype object), which flowrl does not unpickle; {fix}"
        )
    if dtype.kind not in ("iu" if ends else "fiu"):
        raise DatasetError(f"{path}: array {key} must hold {want}, not dtype {dtype}; {fix}")
    rank = 1 if ends else 2
    if len(shape) != rank:
        layout = {"observations": "[N, O]", "actions": "[N, A]", "episode_ends": "[E]"}[key]
        raise DatasetError(
            f"{path}: array {key} has shape {tuple(shape)}, expected {layout} ({rank}-D); reshape it "
            f"(e.g. {key}.reshape(len({key}), -1)) and save it again"
            if rank == 2
            else f"{path}: array episode_ends has shape {tuple(shape)}, expected [E] (1-D, the end of each "
            "episode); save episode_ends.ravel()"
        )
    nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if any(d < 0 for d in shape) or nbytes > file_size:
        raise DatasetError(
            f"{path}: array {key} claims shape {tuple(shape)} ({nbytes} bytes) but holds {file_size} bytes: "
            f"the file is truncated or corrupt; {_WRITE}"
        )
    return tuple(shape)


def _check_sizes(path: Path, env_id: str, shapes: dict[str, tuple[int, ...]], dims: tuple[int, int] | None) -> None:
    n = shapes["observations"][0]
    if n == 0:
        raise DatasetError(
            f"{path}: array observations holds no steps (shape {shapes['observations']}); record at least one episode"
        )
    for key, what in (("observations", "observation"), ("actions", "action")):
        if shapes[key][1] == 0:
            raise DatasetError(
                f"{path}: array {key} has shape {shapes[key]}, an empty {what} per step; each step needs at least one "
                "entry"
            )
    if shapes["actions"][0] != n:
        raise DatasetError(
            f"{path}: inconsistent arrays: {n} observations but {shapes['actions'][0]} actions; observations "
            "and actions need one row per step"
        )
    if shapes["episode_ends"][0] == 0:
        raise DatasetError(
            f"{path}: inconsistent arrays: episode_ends is empty; it lists where each episode ends (cumulative "
            f"lengths, the last one N = {n})"
        )
    if dims is None:
        return
    for key, have, want, what in (
        ("observations", shapes["observations"][1], dims[0], "observation"),
        ("actions", shapes["actions"][1], dims[1], "action"),
    ):
        if have != want:
            raise DatasetError(
                f"{path}: array {key} has {what} dim {have}, env {env_id} has {want}; use demonstrations "
                f"recorded in {env_id} (flowrl collect), or set env.id / env.kwargs to the env they come from"
            )


def _read_array(data: Any, path: Path, key: str) -> np.ndarray:
    try:
        return np.asarray(data[key])
    except _UNREADABLE as exc:
        raise _corrupt(path, key, exc) from None


def _check_finite(path: Path, key: str, array: np.ndarray) -> None:
    if array.dtype.kind != "f":
        return
    bad = ~np.isfinite(array)
    if bad.any():
        step, dim = np.argwhere(bad)[0]
        raise DatasetError(
            f"{path}: array {key} holds {int(bad.sum())} non-finite values (NaN or inf), the first at step "
            f"{step} (dimension {dim}); drop or repair those steps"
        )


def _checked_ends(path: Path, ends: np.ndarray, n: int) -> np.ndarray:
    """episode_ends as int64 after checking them against the N steps."""
    rule = "episode_ends are cumulative episode lengths: strictly increasing, > 0, the last one N"
    past = np.flatnonzero(ends > n)
    if len(past):
        i = past[0]
        raise DatasetError(
            f"{path}: inconsistent arrays: episode_ends[{i}] = {ends[i]} is past the last step N = {n}; {rule}"
        )
    ends = ends.astype(np.int64)
    if ends[0] <= 0:
        raise DatasetError(
            f"{path}: inconsistent arrays: episode_ends[0] = {ends[0]}, but every episode holds at least one "
            f"step; {rule}"
        )
    steps = np.flatnonzero(np.diff(ends) <= 0)
    if len(steps):
        i = steps[0]
        raise DatasetError(
            f"{path}: inconsistent arrays: episode_ends[{i + 1}] = {ends[i + 1]} does not follow "
            f"episode_ends[{i}] = {ends[i]}; {rule}"
        )
    if ends[-1] != n:
        raise DatasetError(
            f"{path}: inconsistent arrays: episode_ends ends at {ends[-1]}, but there are {n} steps (observations "
            f"[N, O] with N = {n}); {rule}"
        )
    return ends


def save_demos(demos: dict[str, np.ndarray], path: str | Path, **metadata: Any) -> Path:
    """Write the dataset (and its provenance as 0-d string arrays) atomically."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **demos, **{f"meta_{k}": np.array(str(v)) for k, v in metadata.items()})
    tmp.replace(path)
    return path


__all__ = ["DEMO_KEYS", "ENV_KEY", "read_demos", "read_metadata", "read_recorded", "save_demos"]
