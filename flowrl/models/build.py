"""Build policies (every family) from the experiment config; save and load their checkpoints."""

from __future__ import annotations

import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from flowrl.config import (
    LIKELIHOOD_FREE_ALGOS,
    AllStepsWindow,
    CPSConverterConfig,
    DiffusionPolicyConfig,
    ExperimentConfig,
    FlowPolicyConfig,
    FlowSDEConverterConfig,
    GaussianPolicyConfig,
    NoiseNetConverter,
    OneRandomStepWindow,
    PolicyConfig,
    SD3PolicyConfig,
    SlidingWindowConfig,
    TextImagePolicyConfig,
)
from flowrl.core.windows import AllSteps, OneRandomStep, SlidingWindow, StepWindow
from flowrl.errors import CheckpointError
from flowrl.models.diffusion_policy import DiffusionPolicy
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.gaussian_policy import GaussianPolicy
from flowrl.models.image_policy import TextImagePolicy
from flowrl.models.networks import GaussianActor, ReinFlowNoiseNet, ValueMLP, VelocityMLP, copy_obs_stats
from flowrl.models.policy import Policy
from flowrl.models.sampler import ChainSampler, Converter, CPSConverter, FlowSDEConverter, ReinFlowConverter
from flowrl.models.sd3_policy import LoRASpec, SD3Policy, load_sd3_policy
from flowrl.models.text_image import TextImageVelocity

# An SD3 policy is its own "network": its state is the LoRA (the base model stays in its folder).
Actor = VelocityMLP | GaussianActor | TextImageVelocity | SD3Policy


def arch_keys(cfg: PolicyConfig) -> tuple[str, ...]:
    """Policy keys a checkpoint's network depends on."""
    if cfg.type == "gaussian":
        return ("type", "horizon", "hidden_dims")
    if cfg.type == "diffusion":
        return ("type", "horizon", "hidden_dims", "time_embed_dim", "train_steps")
    return ("type", "horizon", "hidden_dims", "time_embed_dim")


def build_actor(cfg: PolicyConfig, obs_dim: int, action_dim: int) -> Actor:
    """The network of the policy family ``cfg.type``, with fresh weights.

    Flows get a velocity field (step-size conditioned for shortcut and MeanFlow), a
    diffusion policy an epsilon model of the same architecture, a Gaussian policy a mean MLP
    with a learned std.
    """
    if cfg.type == "gaussian":
        return GaussianActor(obs_dim, cfg.horizon, action_dim, cfg.hidden_dims, cfg.init_std)
    step_conditioned = cfg.type in ("shortcut", "meanflow")
    # MeanFlow's target has the field's time derivative: time features up to frequency 100
    # make it explode (one-step samples collapse); up to 5 it learns (tests/algos/test_flow_families.py).
    max_freq = 5.0 if cfg.type == "meanflow" else 100.0
    return VelocityMLP(
        obs_dim, cfg.horizon, action_dim, cfg.hidden_dims, cfg.time_embed_dim, step_conditioned, max_freq
    )


def build_window(cfg: ExperimentConfig) -> StepWindow:
    w = cfg.mdp.window
    if isinstance(w, AllStepsWindow):
        return AllSteps()
    if isinstance(w, OneRandomStepWindow):
        return OneRandomStep()
    assert isinstance(w, SlidingWindowConfig)
    return SlidingWindow(
        w.size, w.mode, w.shift_interval, w.stride, w.decay_rate, w.min_shift_interval, w.roll_back, seed=cfg.seed
    )


def build_converter(cfg: ExperimentConfig, actor: Actor | None) -> Converter:
    c = cfg.mdp.converter
    if isinstance(c, NoiseNetConverter):
        assert isinstance(actor, VelocityMLP)
        net = ReinFlowNoiseNet(
            actor.obs_dim,
            cfg.policy.horizon,
            actor.action_dim,
            c.std_min,
            c.std_max,
            c.hidden_dims,
            condition_on_x=c.type == "flow_noise",
        )
        copy_obs_stats(actor, net)
        return ReinFlowConverter(net)
    if isinstance(c, FlowSDEConverterConfig):
        return FlowSDEConverter(c.noise_level)
    assert isinstance(c, CPSConverterConfig)
    return CPSConverter(c.noise_level)


def build_sampler(cfg: ExperimentConfig, actor: Actor) -> ChainSampler:
    """The flow sampler of the experiment: grid, converter, window and solver (no converter for
    the likelihood-free algorithms: they sample with the ODE alone)."""
    assert isinstance(cfg.policy, FlowPolicyConfig | TextImagePolicyConfig)
    return ChainSampler(
        cfg.policy.denoising_steps,
        converter=None if cfg.algo.type in LIKELIHOOD_FREE_ALGOS else build_converter(cfg, actor),
        window=build_window(cfg),
        solver=cfg.mdp.solver,
        steps_after_window=cfg.mdp.steps_after_window,
        grid_kind="shifted",
        grid_shift=cfg.policy.time_shift,
    )


def build_policy(cfg: ExperimentConfig, actor: Actor) -> Policy:
    """The policy of ``cfg.policy.type`` around ``actor``: a FlowPolicy with the experiment's
    sampler, sample unit and reduction; a DiffusionPolicy; or a GaussianPolicy."""
    p = cfg.policy
    if isinstance(p, GaussianPolicyConfig):
        assert isinstance(actor, GaussianActor)
        return GaussianPolicy(actor)
    if isinstance(p, SD3PolicyConfig):
        assert isinstance(actor, SD3Policy)
        return actor
    if isinstance(p, TextImagePolicyConfig):
        assert isinstance(actor, TextImageVelocity)
        evaluation = ChainSampler(
            p.eval_denoising_steps, solver=cfg.mdp.solver, grid_kind="shifted", grid_shift=p.time_shift
        )
        sampler = build_sampler(cfg, actor)
        policy = TextImagePolicy(actor, sampler, evaluation, p.cfg_scale, cfg.mdp.sample_unit, cfg.mdp.log_prob_reduce)
        policy.velocity.detach_uncond = p.detach_uncond
        actor.text.requires_grad_(not p.freeze_text)  # frozen parameters stay out of the optimiser
        return policy
    assert isinstance(actor, VelocityMLP)
    if isinstance(p, DiffusionPolicyConfig):
        return DiffusionPolicy(actor, p.train_steps, p.denoising_steps, p.min_std, p.denoised_clip)
    return FlowPolicy(actor, build_sampler(cfg, actor), cfg.mdp.sample_unit, cfg.mdp.log_prob_reduce)


def build_critic(actor: Actor, hidden_dims: tuple[int, ...] = (256, 256)) -> ValueMLP:
    """A critic on the actor's observations, normalised with the actor's statistics."""
    critic = ValueMLP(actor.obs_dim, hidden_dims)
    copy_obs_stats(actor, critic)
    return critic


def actor_record(actor: Actor, cfg: PolicyConfig) -> dict[str, Any]:
    """What a checkpoint stores to rebuild the policy network (observation stats included;
    an image network's constructor arguments)."""
    if isinstance(actor, TextImageVelocity):
        return {"actor": actor.state_dict(), "arch": {"type": cfg.type, **_plain(actor.config)}}
    if isinstance(actor, SD3Policy):  # the LoRA tensors and their spec; the base model is policy.path's
        return {"actor": actor.state_dict(), "arch": {"type": cfg.type, **actor.lora.metadata()}}
    return {
        "actor": actor.state_dict(),
        "arch": {
            "obs_dim": actor.obs_dim,
            "action_dim": actor.action_dim,
            **{k: getattr(cfg, k) for k in arch_keys(cfg)},
        },
    }


# What torch.load raises on a truncated, corrupt or foreign file (found by fuzzing torch 2.x with
# truncated, bit-flipped and random files): the zip reader's RuntimeError, the weights-only
# unpickler's UnpicklingError, and from damaged pickles and headers EOFError, ValueError (also
# UnicodeDecodeError), KeyError, IndexError, AttributeError, TypeError, struct.error; OSError for an
# unreadable file (also a seek past the end of a truncated one); zipfile's, memory and overflow
# errors for completeness.
_UNREADABLE = (
    RuntimeError,
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    TypeError,
    struct.error,
    OSError,
    zipfile.BadZipFile,
    MemoryError,
    OverflowError,
    NotImplementedError,
)
_USE = "point policy.pretrained (or --checkpoint) at a pretrained.pt or policy.pt that flowrl wrote"


def load_actor(path: str | Path, cfg: PolicyConfig, obs_dim: int, action_dim: int) -> Actor:
    """Load the network of a pretrained (or fine-tuned) checkpoint, checking it fits.

    Raises CheckpointError (one line: the file, the problem, the fix) for a missing, truncated,
    corrupt or foreign file, an architecture that differs from ``cfg`` and the env's dims, weights
    whose names or shapes do not fit the network, and non-finite weights.
    """
    path = Path(path).expanduser()
    record = read_record(path)
    _check_arch(path, record["arch"], cfg, obs_dim, action_dim)
    actor = build_actor(cfg, obs_dim, action_dim)
    state = record["actor"]
    _check_state(path, state, actor.state_dict())
    try:
        actor.load_state_dict(state)
    except RuntimeError as exc:  # what _check_state does not foresee (e.g. a dtype that cannot be copied)
        first = (str(exc).strip().splitlines() or [""])[0][:150]
        raise CheckpointError(f"{path}: its weights do not load into the network ({first}); {_USE}") from None
    return actor


def read_record(path: Path) -> dict[str, Any]:
    """The ``{"actor": weights, "arch": ...}`` dict of a flowrl policy checkpoint; CheckpointError
    (one line) for a missing, unreadable, truncated, corrupt or foreign file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (policy.pretrained or --checkpoint)")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:  # e.g. no permission: torch's own errors would not say so
        raise CheckpointError(f"cannot read checkpoint {path} ({exc.strerror or exc}); {_USE}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on the odd pickle protocols of damaged files
            record = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as exc:
        raise CheckpointError(
            f"{path} cannot be read by torch.load ({type(exc).__name__}): the file is truncated, corrupt or not a "
            f"PyTorch checkpoint of plain tensors; {_USE}"
        ) from None
    if not (
        isinstance(record, dict) and isinstance(record.get("actor"), dict) and isinstance(record.get("arch"), dict)
    ):
        what = (
            f"entries {', '.join(repr(k) for k in list(record)[:8])}"
            if isinstance(record, dict)
            else f"a {type(record).__name__}"
        )
        raise CheckpointError(
            f"{path} is not a flowrl policy checkpoint (it holds {what}; flowrl's hold 'actor' and 'arch' "
            f"dicts): {_USE}"
        )
    return record


def build_sd3_policy(cfg: ExperimentConfig) -> SD3Policy:
    """``policy.type: sd3``: the folder's SD3 with a fresh LoRA (or ``policy.pretrained``'s), every
    caption of the shapes world (and the empty one, CFG's) embedded once."""
    from envs.shapes import Tokenizer, all_captions

    p = cfg.policy
    assert isinstance(p, SD3PolicyConfig)
    prompts = ["", *all_captions()]
    sampler = {
        "converter": build_converter(cfg, None),
        "window": build_window(cfg),
        "solver": cfg.mdp.solver,
        "steps_after_window": cfg.mdp.steps_after_window,
    }
    policy = load_sd3_policy(
        p.path,
        prompts,
        Tokenizer().encode(prompts)[0],
        image_size=cfg.env.image_size,
        denoising_steps=p.denoising_steps,
        eval_denoising_steps=p.eval_denoising_steps,
        sampler_kwargs=sampler,
        lora=LoRASpec(p.lora.rank, p.lora.alpha, tuple(p.lora.targets)),
        cfg_scale=p.cfg_scale,
        time_shift=p.time_shift,
        max_sequence_length=p.max_sequence_length,
        mixed_precision=p.mixed_precision == "bf16",
        gradient_checkpointing=p.gradient_checkpointing,
        sample_unit=cfg.mdp.sample_unit,
        log_prob_reduce=cfg.mdp.log_prob_reduce,
    )
    if p.pretrained is not None:
        _load_sd3_weights(policy, Path(p.pretrained).expanduser())
    return policy


def _load_sd3_weights(policy: SD3Policy, path: Path) -> None:
    """LoRA weights from a ``save_lora`` .safetensors or a flowrl checkpoint (policy.pt, last.pt)."""
    if path.suffix == ".safetensors":
        policy.load_lora(path)
        return
    record = read_record(path)
    arch = {k: v for k, v in record["arch"].items() if k != "type"}
    if record["arch"].get("type") != "sd3" or arch != policy.lora.metadata():
        raise CheckpointError(
            f"{path} does not fit this experiment (its policy {record['arch']}, the experiment's: sd3 with LoRA "
            f"{policy.lora.metadata()}); set policy.lora to the checkpoint's or use a checkpoint of this experiment"
        )
    try:
        policy.load_state_dict(record["actor"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def build_image_network(cfg: ExperimentConfig) -> TextImageVelocity | SD3Policy:
    """The text-conditioned velocity field of ``policy.type: text_image`` for ``env.image_size``
    and the shapes world's tokenizer, with fresh weights (``sd3``: ``build_sd3_policy``)."""
    from envs.shapes import MAX_TOKENS, Tokenizer

    if cfg.policy.type == "sd3":
        return build_sd3_policy(cfg)
    p = cfg.policy
    assert isinstance(p, TextImagePolicyConfig)
    return TextImageVelocity(
        Tokenizer().vocab_size,
        MAX_TOKENS,
        image_size=cfg.env.image_size,
        patch=p.patch,
        channels=tuple(p.channels),
        text_dim=p.text_dim,
        time_dim=p.time_dim,
    )


def load_image_network(path: str | Path, cfg: ExperimentConfig) -> TextImageVelocity | SD3Policy:
    """The network of a text_image checkpoint (pretrained.pt, policy.pt), checked like
    ``load_actor``: readable, a flowrl checkpoint, the experiment's sizes, fitting finite weights.
    ``sd3``: the policy with the LoRA of ``path`` (a flowrl checkpoint or a ``save_lora`` file)."""
    path = Path(path).expanduser()
    if cfg.policy.type == "sd3":
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path} (policy.pretrained or --checkpoint)")
        policy = build_sd3_policy(cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"pretrained": None})}))
        _load_sd3_weights(policy, path)
        return policy
    record = read_record(path)
    network = build_image_network(cfg)
    expected = {"type": cfg.policy.type, **_plain(network.config)}
    arch = record["arch"]
    wrong = {k: (arch.get(k), v) for k, v in expected.items() if arch.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: checkpoint {a} vs experiment {b}" for k, (a, b) in wrong.items())
        keys = {"image_size": "env.image_size", "vocab_size": None, "max_len": None, "image_channels": None}
        fixes = [f"{keys.get(k, 'policy.' + k)}={_yaml(a)}" for k, (a, _) in wrong.items() if keys.get(k, k)]
        fix = f"set {' '.join(fixes)}" if fixes and "type" not in wrong else _USE
        raise CheckpointError(f"{path} does not fit this experiment ({detail}); {fix}")
    _check_state(path, record["actor"], network.state_dict())
    network.load_state_dict(record["actor"])
    return network


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """A network's config with lists for tuples (as a checkpoint and the YAML hold them)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def check_checkpoint(path: str | Path, cfg: PolicyConfig, obs_dim: int, action_dim: int) -> None:
    """Raises CheckpointError when ``load_actor`` would (before any work starts)."""
    load_actor(path, cfg, obs_dim, action_dim)


def _check_arch(path: Path, arch: dict[str, Any], cfg: PolicyConfig, obs_dim: int, action_dim: int) -> None:
    expected = {"obs_dim": obs_dim, "action_dim": action_dim, **{k: getattr(cfg, k) for k in arch_keys(cfg)}}
    wrong = {k: (arch.get(k), v) for k, v in expected.items() if arch.get(k) != v}
    if not wrong:
        return
    if arch.get("type") is not None and "type" in wrong:  # another family: its arch has other keys
        wrong = {k: v for k, v in wrong.items() if v[0] is not None or k in ("obs_dim", "action_dim")}
    detail = ", ".join(f"{k}: checkpoint {a} vs experiment {b}" for k, (a, b) in wrong.items())
    fixes = []
    keys = [k for k, (a, _) in wrong.items() if k not in ("obs_dim", "action_dim") and a is not None]
    if keys:
        fixes.append("set " + " ".join(f"policy.{k}={_yaml(wrong[k][0])}" for k in keys))
    if "obs_dim" in wrong or "action_dim" in wrong:
        fixes.append("use a checkpoint trained on this env (env.id, env.kwargs)")
    lacking = [k for k, (a, _) in wrong.items() if a is None]
    if lacking:
        fixes.append(f"its 'arch' entry lacks {', '.join(lacking)} (not written by this flowrl): {_USE}")
    raise CheckpointError(f"{path} does not fit this experiment ({detail}); {'; '.join(fixes)}")


def _yaml(value: Any) -> str:
    """A value as a command-line override writes it."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(_yaml(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _check_state(path: Path, state: dict[Any, Any], expected: dict[str, torch.Tensor]) -> None:
    """The checkpoint's weights against a fresh network's: names, shapes, finite values."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected"
        raise CheckpointError(
            f"{path}: its weights do not fit the network its 'arch' describes ({first}; {counts}): the file "
            f"was edited or written by another program; {_USE}"
        )
    for name, want in expected.items():
        have = state[name]
        if not isinstance(have, torch.Tensor):
            raise CheckpointError(f"{path}: weight {name!r} is a {type(have).__name__}, not a tensor; {_USE}")
        if have.shape != want.shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(have.shape)}, the network needs {list(want.shape)} (the "
                f"file does not match its 'arch' entry); {_USE}"
            )
        if want.is_floating_point() and not have.is_floating_point():
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {str(have.dtype).removeprefix('torch.')}, the network needs real "
                f"numbers ({str(want.dtype).removeprefix('torch.')}); {_USE}"
            )
        if have.is_floating_point():
            bad = int((~torch.isfinite(have)).sum())
            if bad:
                raise CheckpointError(
                    f"{path}: tensor {name!r} holds {bad} non-finite values (NaN or inf), the weights of a diverged "
                    "run; use an earlier checkpoint (e.g. the run's pretrained.pt or checkpoints/last.pt) or "
                    "train again with lower learning rates"
                )
