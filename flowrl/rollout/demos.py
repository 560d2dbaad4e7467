"""Demonstration datasets: made by a policy (``flowrl collect``), read and checked for
pretraining (``load_demos``).

No D4RL downloads: a policy trained with flowrl (any family) acts in the env and every
primitive step is recorded. Like D4RL's "medium" datasets, the locomotion recipe is a partly
trained policy acting with its own stochasticity (``actions="sample"``: a Gaussian policy's
N(mean, std²), a flow or diffusion policy's stochastic sampler); ``"deterministic"`` records
its evaluation actions (mean, ODE, DDIM eta = 0), optionally with extra Gaussian
``action_noise``. Same policy, seed and settings give the same file.

Every file written by ``save_demos`` carries its provenance as ``meta_*`` string arrays, among
them ``meta_env_id``: pretraining refuses a dataset recorded in another env than the
experiment's (``read_demos``), whatever the dimensions.
"""

from __future__ import annotations

import logging
import pickle
import struct
import tokenize
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch

import envs as flowrl_envs
from flowrl.config import DemosConfig
from flowrl.errors import FlowRLError
from flowrl.models.policy import Policy
from flowrl.runtime import derive_seed
from flowrl.runtime import progress as progress_bar

log = logging.getLogger("flowrl")

DEMO_KEYS = ("observations", "actions", "episode_ends")
ENV_KEY = "meta_env_id"  # the env the dataset was recorded in (save_demos(..., env_id=...))
Actions = Literal["deterministic", "sample"]
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


class DatasetError(FlowRLError, ValueError):
    """A missing or malformed demonstration file; the message says how to fix it."""


def check_demos(cfg: DemosConfig, env_id: str, dims: tuple[int, int] | None = None) -> None:
    """Raises DatasetError when the demonstrations cannot be used, before any work starts.

    Scripted demos (path null) need the env to have a demonstrator. A file is opened and fully
    checked (as ``load_demos`` does): recorded in ``env_id`` when it says where it was recorded;
    with ``dims`` = (obs dim, action dim) of the env, its arrays' widths must match them.
    """
    if cfg.path is None:
        if env_id not in flowrl_envs.DEMONSTRATORS:
            raise DatasetError(
                f"env {env_id} has no scripted demonstrator: set pretrain.demos.path to a demonstration .npz "
                f"(keys {', '.join(DEMO_KEYS)}) or give policy.pretrained"
            )
        return
    read_demos(cfg.path, env_id, dims)


def load_demos(cfg: DemosConfig, env_id: str, seed: int, dims: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Demonstrations from ``cfg.path`` (checked, see ``read_demos``), or from the env's scripted
    demonstrator if null. A file that does not say which env it was recorded in (hand-made, or
    not from ``flowrl collect``) is used with a logged warning."""
    if cfg.path is None:
        check_demos(cfg, env_id)
        return flowrl_envs.DEMONSTRATORS[env_id](cfg.episodes, seed)
    demos, recorded = _read(Path(cfg.path).expanduser(), env_id, dims)
    if recorded is None:
        log.warning(
            "%s does not say which env it was recorded in (no %s array); using it for %s as it is. Files from "
            "`flowrl collect` carry it; for a hand-made file add %s=np.array(%r) to np.savez",
            cfg.path,
            ENV_KEY,
            env_id,
            ENV_KEY,
            env_id,
        )
    return demos


def read_demos(path: str | Path, env_id: str, dims: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Read and check a demonstration .npz: recorded in ``env_id`` if its ``meta_env_id`` says
    where it was recorded; observations ``[N, O]`` and actions ``[N, A]`` of real numbers, all
    finite, N >= 1; integer episode_ends ``[E]``, strictly increasing, > 0, ending at N; with
    ``dims``, O and A equal to the env's. Any problem is one DatasetError line naming the file,
    the array and the fix. Returns the three arrays (episode_ends as int64)."""
    return _read(Path(path).expanduser(), env_id, dims)[0]


def read_metadata(path: str | Path) -> dict[str, str]:
    """The provenance a dataset file carries (``save_demos``' keyword arguments), without the
    ``meta_`` prefix; {} for a file without any. DatasetError when the file is unreadable."""
    path = Path(path).expanduser()
    with _open_npz(path) as data:
        return {
            key.removeprefix("meta_"): _meta_string(data, path, key) for key in data.files if key.startswith("meta_")
        }


def _read(path: Path, env_id: str, dims: tuple[int, int] | None) -> tuple[dict[str, np.ndarray], str | None]:
    """``read_demos``, and the env the file says it was recorded in (None when it does not say)."""
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


def _detail(exc: BaseException) -> str:
    """Exception type and the first line of its message, short enough for a one-line error."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 100 else text[:97] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _open_npz(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise DatasetError(f"cannot read demonstration file {path} ({_detail(exc)}; pretrain.demos.path)") from None
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
            f"{path} is a truncated or corrupt .npz archive ({_detail(exc)}; pretrain.demos.path): {_WRITE}"
        ) from None


def _corrupt(path: Path, key: str, exc: BaseException) -> DatasetError:
    return DatasetError(
        f"{path}: array {key} cannot be read ({_detail(exc)}): the file is truncated or corrupt; {_WRITE}"
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


def collect_demos(
    policy: Policy,
    env_id: str,
    episodes: int,
    seed: int,
    action_noise: float = 0.0,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    actions: Actions = "deterministic",
) -> dict[str, np.ndarray]:
    """Run ``episodes`` episodes (all envs side by side, one policy batch per step).

    The policy plans a chunk of Ta actions and executes it: ``actions="deterministic"``, its
    evaluation actions (``act``: the mean, the ODE, DDIM eta = 0); ``"sample"``, a draw from
    its own stochastic policy (``sample``: a Gaussian policy's N(mean, std²), a flow's or
    diffusion's fine-tuning sampler), as D4RL's datasets were recorded. ``action_noise`` adds
    N(0, action_noise²) to every primitive action; then the env's bounds clip it. The recorded
    action is the executed (clipped) one.

    Returns observations ``[N, O]``, actions ``[N, Da]``, episode_ends ``[E]`` (cumulative
    lengths), episode_returns ``[E]``.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if action_noise < 0:
        raise ValueError(f"action noise must be >= 0, got {action_noise}")
    if actions not in ("deterministic", "sample"):
        raise ValueError(f"actions must be 'deterministic' or 'sample', got {actions!r}")
    env_list = [gym.make(env_id, **(env_kwargs or {})) for _ in range(episodes)]
    low, high = env_list[0].action_space.low, env_list[0].action_space.high
    base = derive_seed(seed, 7)
    obs = np.stack([env.reset(seed=base + i)[0] for i, env in enumerate(env_list)]).astype(np.float32)
    generator = torch.Generator().manual_seed(derive_seed(seed, 7, 1))
    noise_rng = np.random.default_rng(derive_seed(seed, 7, 2))
    horizon = policy.event_shape[0]
    records: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in range(episodes)]
    returns = np.zeros(episodes)
    active = np.ones(episodes, dtype=bool)
    bar = progress_bar(None, "collect", progress, total=episodes, unit="episode")
    while active.any():
        cond = torch.as_tensor(obs)  # every env, ended ones too: common random numbers
        chunk = policy.sample(cond, generator=generator).final if actions == "sample" else policy.act(cond, generator)
        chunks = chunk.numpy()
        for j in range(horizon):
            noise = noise_rng.normal(0.0, action_noise, chunks[:, j].shape) if action_noise > 0 else 0.0
            executed = np.clip(chunks[:, j] + noise, low, high).astype(np.float32)
            for i in np.flatnonzero(active):
                records[i][0].append(obs[i].copy())
                records[i][1].append(executed[i])
                o, r, term, trunc, _ = env_list[i].step(executed[i])
                obs[i] = o
                returns[i] += r
                if term or trunc:
                    active[i] = False
                    bar.update(1)
            if not active.any():
                break
    bar.close()
    for env in env_list:
        env.close()
    lengths = np.array([len(r[0]) for r in records])
    return {
        "observations": np.concatenate([np.stack(r[0]) for r in records]).astype(np.float32),
        "actions": np.concatenate([np.stack(r[1]) for r in records]).astype(np.float32),
        "episode_ends": np.cumsum(lengths),
        "episode_returns": returns,
    }


def save_demos(demos: dict[str, np.ndarray], path: str | Path, **metadata: Any) -> Path:
    """Write the dataset (and its provenance as 0-d string arrays) atomically."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **demos, **{f"meta_{k}": np.array(str(v)) for k, v in metadata.items()})
    tmp.replace(path)
    return path
