"""Build policies (every family) from the experiment config; save and load their checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowrl.config import (
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
    SlidingWindowConfig,
)
from flowrl.core.windows import AllSteps, OneRandomStep, SlidingWindow, StepWindow
from flowrl.errors import FlowRLError
from flowrl.models.diffusion_policy import DiffusionPolicy
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.gaussian_policy import GaussianPolicy
from flowrl.models.networks import GaussianActor, ReinFlowNoiseNet, ValueMLP, VelocityMLP, copy_obs_stats
from flowrl.models.policy import Policy
from flowrl.models.sampler import ChainSampler, Converter, CPSConverter, FlowSDEConverter, ReinFlowConverter


class CheckpointError(FlowRLError, ValueError):
    """A checkpoint that is missing or does not fit the experiment."""


Actor = VelocityMLP | GaussianActor


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


def build_converter(cfg: ExperimentConfig, actor: VelocityMLP) -> Converter:
    c = cfg.mdp.converter
    if isinstance(c, NoiseNetConverter):
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


def build_sampler(cfg: ExperimentConfig, actor: VelocityMLP) -> ChainSampler:
    """The flow sampler of the experiment: grid, converter, window and solver."""
    assert isinstance(cfg.policy, FlowPolicyConfig)
    return ChainSampler(
        cfg.policy.denoising_steps,
        converter=build_converter(cfg, actor),
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
    """What a checkpoint stores to rebuild the policy network (observation stats included)."""
    return {
        "actor": actor.state_dict(),
        "arch": {
            "obs_dim": actor.obs_dim,
            "action_dim": actor.action_dim,
            **{k: getattr(cfg, k) for k in arch_keys(cfg)},
        },
    }


def load_actor(path: str | Path, cfg: PolicyConfig, obs_dim: int, action_dim: int) -> Actor:
    """Load the network of a pretrained (or fine-tuned) checkpoint, checking it fits."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (policy.pretrained or --checkpoint)")
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or "actor" not in record or "arch" not in record:
        raise CheckpointError(f"{path} is not a flowrl policy checkpoint (no 'actor'/'arch' entries)")
    arch = record["arch"]
    expected = {"obs_dim": obs_dim, "action_dim": action_dim, **{k: getattr(cfg, k) for k in arch_keys(cfg)}}
    wrong = {k: (arch.get(k), v) for k, v in expected.items() if arch.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: checkpoint {a} vs experiment {b}" for k, (a, b) in wrong.items())
        raise CheckpointError(f"{path} does not fit this experiment ({detail}); set policy.* to match")
    actor = build_actor(cfg, obs_dim, action_dim)
    actor.load_state_dict(record["actor"])
    return actor
