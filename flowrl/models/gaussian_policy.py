"""GaussianPolicy: the Gaussian PPO baseline (and the expert that makes demonstrations).

Actions are a chunk ``[Ta, Da]`` drawn from N(mean(obs), std²) with a learned,
state-independent std; the log-prob sums over the chunk's dimensions (CleanRL's PPO).
Deterministic evaluation acts with the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowrl.core.batch import TensorBatch
from flowrl.core.steps import gaussian_log_prob
from flowrl.models.networks import GaussianActor


@dataclass
class GaussianSample(TensorBatch):
    """actions ``[B, Ta, Da]`` (unclipped; the env wrapper clips), log_prob ``[B]``."""

    actions: Tensor
    log_prob: Tensor


class GaussianPolicy(nn.Module):
    def __init__(self, actor: GaussianActor) -> None:
        super().__init__()
        self.actor = actor

    @property
    def event_shape(self) -> tuple[int, int]:
        return (self.actor.horizon, self.actor.action_dim)

    def noise_parameters(self) -> list[nn.Parameter]:
        return []  # the std is part of the actor (ppo.actor_lr)

    @torch.no_grad()
    def sample(self, obs: Tensor, iteration: int = 0, generator: torch.Generator | None = None) -> GaussianSample:
        mean, std = self.actor(obs)
        actions = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
        return GaussianSample(actions=actions, log_prob=gaussian_log_prob(actions, mean, std.expand_as(mean)))

    def log_prob(self, obs: Tensor, sample: GaussianSample) -> tuple[Tensor, Tensor]:
        mean, std = self.actor(obs)
        log_prob = gaussian_log_prob(sample.actions, mean, std.expand_as(mean))
        entropy = (0.5 + 0.5 * math.log(2 * math.pi) + std.log()).mean().expand(obs.shape[0])
        return log_prob, entropy

    @torch.no_grad()
    def act(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.actor(obs)[0]

    def coupled_actions(self, obs: Tensor, noise: Tensor) -> Tensor:
        mean, std = self.actor(obs)
        return mean + std * noise
