"""Build policies from the experiment config; save and load velocity checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowrl.config import (
    AllStepsWindow,
    CPSConverterConfig,
    ExperimentConfig,
    FlowSDEConverterConfig,
    NoiseNetConverter,
    OneRandomStepWindow,
    PolicyConfig,
    SlidingWindowConfig,
)
from flowrl.core.windows import AllSteps, OneRandomStep, SlidingWindow, StepWindow
from flowrl.errors import FlowRLError
from flowrl.models.flow_policy import Converter, CPSConverter, FlowPolicy, FlowSDEConverter, ReinFlowConverter
from flowrl.models.networks import ReinFlowNoiseNet, VelocityMLP

ARCH_KEYS = ("horizon", "hidden_dims", "time_embed_dim")


class CheckpointError(FlowRLError, ValueError):
    """A checkpoint that is missing or does not fit the experiment."""


def build_velocity(cfg: PolicyConfig, obs_dim: int, action_dim: int, step_conditioned: bool = False) -> VelocityMLP:
    """``step_conditioned``: a shortcut-model field (see VelocityMLP)."""
    return VelocityMLP(obs_dim, cfg.horizon, action_dim, cfg.hidden_dims, cfg.time_embed_dim, step_conditioned)


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


def build_converter(cfg: ExperimentConfig, obs_dim: int, action_dim: int) -> Converter:
    c = cfg.mdp.converter
    if isinstance(c, NoiseNetConverter):
        net = ReinFlowNoiseNet(
            obs_dim,
            cfg.policy.horizon,
            action_dim,
            c.std_min,
            c.std_max,
            c.hidden_dims,
            condition_on_x=c.type == "flow_noise",
        )
        return ReinFlowConverter(net)
    if isinstance(c, FlowSDEConverterConfig):
        return FlowSDEConverter(c.noise_level)
    assert isinstance(c, CPSConverterConfig)
    return CPSConverter(c.noise_level)


def build_policy(cfg: ExperimentConfig, velocity: VelocityMLP, obs_dim: int, action_dim: int) -> FlowPolicy:
    """A FlowPolicy with the experiment's converter, window, grid and reduction."""
    return FlowPolicy(
        velocity,
        cfg.policy.denoising_steps,
        converter=build_converter(cfg, obs_dim, action_dim),
        window=build_window(cfg),
        grid_kind="shifted",
        grid_shift=cfg.policy.time_shift,
        log_prob_reduce=cfg.mdp.log_prob_reduce,
    )


def velocity_record(velocity: VelocityMLP, cfg: PolicyConfig) -> dict[str, Any]:
    """What a checkpoint stores to rebuild the velocity field."""
    return {
        "velocity": velocity.state_dict(),
        "arch": {
            "obs_dim": velocity.obs_dim,
            "action_dim": velocity.action_dim,
            "step_conditioned": velocity.step_conditioned,
            **{k: getattr(cfg, k) for k in ARCH_KEYS},
        },
    }


def load_velocity(path: str | Path, cfg: PolicyConfig, obs_dim: int, action_dim: int) -> VelocityMLP:
    """Load the velocity field of a pretrained (or fine-tuned) checkpoint, checking it fits."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (policy.pretrained or --checkpoint)")
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or "velocity" not in record or "arch" not in record:
        raise CheckpointError(f"{path} is not a flowrl policy checkpoint (no 'velocity'/'arch' entries)")
    arch = record["arch"]
    expected = {"obs_dim": obs_dim, "action_dim": action_dim, **{k: getattr(cfg, k) for k in ARCH_KEYS}}
    wrong = {k: (arch.get(k), v) for k, v in expected.items() if arch.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: checkpoint {a} vs experiment {b}" for k, (a, b) in wrong.items())
        raise CheckpointError(f"{path} does not fit this experiment ({detail}); set policy.* to match")
    velocity = build_velocity(cfg, obs_dim, action_dim, bool(arch.get("step_conditioned", False)))
    velocity.load_state_dict(record["velocity"])
    return velocity
