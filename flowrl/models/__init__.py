"""Networks and policies: velocity fields, noise nets, critics, the chain sampler and the policy families."""

from flowrl.models.diffusion_policy import DiffusionPolicy
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.gaussian_policy import GaussianPolicy, GaussianSample
from flowrl.models.networks import (
    GaussianActor,
    ObsNormalizer,
    ReinFlowNoiseNet,
    SinusoidalTimeEmbedding,
    ValueMLP,
    VelocityMLP,
)
from flowrl.models.policy import Evaluation, Policy, frozen_copy
from flowrl.models.sampler import ChainSampler, CPSConverter, FlowSDEConverter, ReinFlowConverter

__all__ = [
    "CPSConverter",
    "ChainSampler",
    "DiffusionPolicy",
    "Evaluation",
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
    "frozen_copy",
]
