"""FlowPolicy: a velocity field integrated in K steps, made into an MDP by a ChainSampler.

The sampler (flowrl/models/sampler.py) holds the grid, the converter (the stochastic
transition of a denoising step), the window (which steps are stochastic in a rollout) and
the deterministic solver elsewhere. Sampling stores only the stochastic steps
(``Transitions``), which is all that re-evaluation of the log-prob needs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowrl.core.steps import gaussian_entropy
from flowrl.core.transitions import Reduce, SampleUnit, Transitions
from flowrl.models.networks import VelocityMLP
from flowrl.models.policy import Evaluation
from flowrl.models.sampler import ChainSampler


class FlowPolicy(nn.Module):
    """Flow-matching policy over events ``[*E]`` with an exact per-step log-prob.

    ``sample_unit``: ``chain`` (one PPO/GRPO sample per chain, ReinFlow) or ``step`` (one
    per stochastic denoising step, Flow-GRPO / MixGRPO). ``log_prob_reduce``: ``mean``
    divides log-probs by the number of summed dims (and steps), the per-dimension average
    ReinFlow and piRL use, which keeps the clip range independent of the sizes.
    """

    def __init__(
        self,
        velocity: VelocityMLP,
        sampler: ChainSampler,
        sample_unit: SampleUnit = "chain",
        log_prob_reduce: Reduce = "mean",
    ) -> None:
        super().__init__()
        if log_prob_reduce not in ("sum", "mean"):
            raise ValueError(f"log_prob_reduce must be 'sum' or 'mean', got {log_prob_reduce!r}")
        if sample_unit not in ("chain", "step"):
            raise ValueError(f"sample_unit must be 'chain' or 'step', got {sample_unit!r}")
        self.velocity = velocity
        self.sampler = sampler
        self.sample_unit = sample_unit
        self.log_prob_reduce = log_prob_reduce

    @property
    def num_steps(self) -> int:
        return self.sampler.num_steps

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.velocity.event_shape)

    @property
    def network(self) -> VelocityMLP:
        """The network a checkpoint stores (the converter's noise net is fine-tuning state)."""
        return self.velocity

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"actor": list(self.velocity.parameters())}
        noise = list(self.sampler.converter.parameters()) if self.sampler.converter is not None else []
        if noise:
            groups["noise"] = noise
        return groups

    @torch.no_grad()
    def sample(
        self, cond: Tensor, iteration: int = 0, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Transitions:
        """Sample chains for ``cond`` ``[B, O]`` with the window of ``iteration``."""
        return self.sampler.sample(self.velocity, cond, self.event_shape, cond.shape[0], iteration, generator, noise)

    def evaluate(self, cond: Tensor, sample: Transitions) -> Evaluation:
        """Re-evaluate stored steps: log-prob ``[B, S]``, entropy ``[B]`` (mean per-dimension
        Gaussian entropy of the stochastic steps), mean and std ``[B, S, *E]``."""
        b, s = sample.steps.shape
        rows, out = self.sampler.evaluate(self.velocity, cond, sample)
        dims = math.prod(self.event_shape)
        std = torch.broadcast_to(out.std, out.mean.shape)
        entropy = gaussian_entropy(std, self.event_shape) / dims
        zeros = torch.zeros(b, device=out.log_prob.device, dtype=out.log_prob.dtype)
        entropy = zeros.index_add(0, rows, entropy) / max(s, 1)
        return Evaluation(
            log_prob=out.log_prob.view(b, s),
            entropy=entropy,
            mean=out.mean.view(b, s, *self.event_shape),
            std=std.view(b, s, *self.event_shape),
        )

    @torch.no_grad()
    def act(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Deterministic evaluation: the ODE from x_0 ~ N(0, I). ``[B, O] -> [B, *E]``."""
        x = torch.randn((cond.shape[0], *self.event_shape), generator=generator, device=cond.device)
        return self.coupled_actions(cond, x)

    def coupled_actions(self, cond: Tensor, noise: Tensor) -> Tensor:
        """The ODE's events from the given initial noise ``[B, *E]``, differentiable.

        Two policies fed the same noise give a coupling of their action distributions, so
        the mean squared distance of their actions bounds W2² (the W2 regulariser)."""
        return self.sampler.ode(self.velocity, cond, noise)[0]
