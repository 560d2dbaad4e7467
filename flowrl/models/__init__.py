"""Networks and policies: velocity fields, noise nets, critics, and the policy families."""

from flowrl.models.diffusion_policy import DiffusionPolicy
from flowrl.models.flow_policy import (
    ChainSample,
    CPSConverter,
    FlowPolicy,
    FlowSDEConverter,
    ReinFlowConverter,
)
from flowrl.models.gaussian_policy import GaussianPolicy, GaussianSample
from flowrl.models.networks import (
    GaussianActor,
    ObsNormalizer,
    ReinFlowNoiseNet,
    SinusoidalTimeEmbedding,
    ValueMLP,
    VelocityMLP,
)
from flowrl.models.policy import Policy

__all__ = [
    "CPSConverter",
    "ChainSample",
    "DiffusionPolicy",
    "FlowPolicy",
    "FlowSDEConverter",
    "GaussianActor",
    "GaussianPolicy",
    "GaussianSample",
    "ObsNormalizer",
    "Policy",
    "ReinFlowConverter",
    "ReinFlowNoiseNet",
    "SinusoidalTimeEmbedding",
    "ValueMLP",
    "VelocityMLP",
]
