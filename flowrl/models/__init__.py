"""Networks and policies: velocity fields, noise nets, critics, FlowPolicy."""

from flowrl.models.flow_policy import (
    ChainSample,
    CPSConverter,
    FlowPolicy,
    FlowSDEConverter,
    ReinFlowConverter,
)
from flowrl.models.networks import ReinFlowNoiseNet, SinusoidalTimeEmbedding, ValueMLP, VelocityMLP

__all__ = [
    "CPSConverter",
    "ChainSample",
    "FlowPolicy",
    "FlowSDEConverter",
    "ReinFlowConverter",
    "ReinFlowNoiseNet",
    "SinusoidalTimeEmbedding",
    "ValueMLP",
    "VelocityMLP",
]
