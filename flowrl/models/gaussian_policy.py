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
from flowrl.models.policy import Evaluation


@dataclass
class GaussianSample(TensorBatch):
    """final: the actions ``[B, Ta, Da]`` (unclipped; the env wrapper clips); log_prob
    ``[B, 1]``: one "step", summed over the chunk."""

    final: Tensor
    log_prob: Tensor


class GaussianPolicy(nn.Module):
    # One Gaussian per chunk: one sample per chunk, log-prob summed over its dims (CleanRL).
    sample_unit = "chain"
    log_prob_reduce = "sum"

    def __init__(self, actor: GaussianActor) -> None:
        super().__init__()
        self.actor = actor

    @property
    def network(self) -> GaussianActor:
        return self.actor

    @property
    def event_shape(self) -> tuple[int, int]:
        return (self.actor.horizon, self.actor.action_dim)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"actor": list(self.actor.parameters())}  # the std is part of the actor

    @torch.no_grad()
    def sample(
        self, obs: Tensor, iteration: int = 0, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> GaussianSample:
        mean, std = self.actor(obs)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        actions = mean + std * noise
        log_prob = gaussian_log_prob(actions, mean, std.expand_as(mean))
        return GaussianSample(final=actions, log_prob=log_prob.unsqueeze(1))

    def evaluate(self, obs: Tensor, sample: GaussianSample) -> Evaluation:
        mean, std = self.actor(obs)
        log_prob = gaussian_log_prob(sample.final, mean, std.expand_as(mean))
        entropy = (0.5 + 0.5 * math.log(2 * math.pi) + std.log()).mean().expand(obs.shape[0])
        return Evaluation(log_prob.unsqueeze(1), entropy, mean.unsqueeze(1), std.expand_as(mean).unsqueeze(1))

    @torch.no_grad()
    def act(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.actor(obs)[0]

    def coupled_actions(self, obs: Tensor, noise: Tensor) -> Tensor:
        mean, std = self.actor(obs)
        return mean + std * noise
