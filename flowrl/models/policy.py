"""What PPO needs from a policy, whatever its family (flow, diffusion, Gaussian)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from flowrl.core.batch import TensorBatch


class PolicySample(Protocol):
    """A ``TensorBatch`` with at least ``actions [B, Ta, Da]`` and ``log_prob [B]`` (or
    ``[B, K]`` plus a ``mask [B, K]`` when every denoising step is its own PPO sample)."""

    actions: Tensor
    log_prob: Tensor


class Policy(Protocol):
    """The interface of FlowPolicy, DiffusionPolicy and GaussianPolicy.

    ``actor`` is the network checkpoints store; ``event_shape`` is ``(Ta, Da)``.
    """

    actor: nn.Module
    event_shape: tuple[int, int]

    def sample(self, obs: Tensor, iteration: int = 0, generator: torch.Generator | None = None) -> TensorBatch:
        """Stochastic actions for ``obs [B, O]`` with what re-evaluation needs."""
        ...

    def log_prob(self, obs: Tensor, sample) -> tuple[Tensor, Tensor]:
        """``(log_prob, entropy [B])`` of a stored sample under the current parameters;
        log_prob has the shape of ``sample.log_prob``; entropy is per action dimension."""
        ...

    def act(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Deterministic actions ``[B, Ta, Da]`` for evaluation (the ODE, DDIM eta = 0, the mean)."""
        ...

    def coupled_actions(self, obs: Tensor, noise: Tensor) -> Tensor:
        """Differentiable actions from the given noise ``[B, Ta, Da]``; two policies fed the
        same noise are coupled, so their mean squared action distance bounds W2²."""
        ...

    def noise_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with ppo.noise_lr (a learned exploration noise); may be empty."""
        ...

    def parameters(self, recurse: bool = True): ...
