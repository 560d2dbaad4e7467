"""TextImagePolicy: the text-conditioned image flow as a policy (the shapes world's GRPO).

The condition is a batch of caption token ids ``[B, L]``; events are images ``[3, H, W]``
with pixels in [-1, 1] (``to_pixels`` maps them to [0, 1] for rewards and PNGs). Sampling,
re-evaluation and the reference's KL all go through the same (optionally guided, CFG)
velocity field, so the ratio = 1 check holds with guidance too. Evaluation integrates the
ODE with its own, usually finer, grid (``eval_denoising_steps``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.core.transitions import Reduce, SampleUnit
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.sampler import ChainSampler
from flowrl.models.text_image import GuidedVelocity, TextImageVelocity


def to_pixels(x: Tensor) -> Tensor:
    """Model space [-1, 1] -> pixels [0, 1] (clamped)."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def from_pixels(images: Tensor) -> Tensor:
    """Pixels [0, 1] -> model space [-1, 1]."""
    return images * 2.0 - 1.0


class TextImagePolicy(FlowPolicy):
    """A FlowPolicy around ``GuidedVelocity(network, cfg_scale)``; ``network`` (what
    checkpoints store) is the bare TextImageVelocity. ``eval_sampler``: ODE-only sampler of
    evaluation."""

    def __init__(
        self,
        network: TextImageVelocity,
        sampler: ChainSampler,
        eval_sampler: ChainSampler,
        cfg_scale: float = 1.0,
        sample_unit: SampleUnit = "step",
        log_prob_reduce: Reduce = "mean",
    ) -> None:
        super().__init__(GuidedVelocity(network, cfg_scale), sampler, sample_unit, log_prob_reduce)  # type: ignore[arg-type]
        self.eval_sampler = eval_sampler

    @property
    def network(self) -> TextImageVelocity:  # type: ignore[override]
        return self.velocity.velocity

    @torch.no_grad()
    def act(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Evaluation images ``[B, 3, H, W]`` in model space: the ODE on the evaluation grid."""
        noise = torch.randn((cond.shape[0], *self.event_shape), generator=generator, device=cond.device)
        return self.images_from(cond, noise)

    @torch.no_grad()
    def images_from(self, cond: Tensor, noise: Tensor) -> Tensor:
        """The evaluation ODE from the given initial noise ``[B, 3, H, W]`` (common random
        numbers across evaluations)."""
        return self.eval_sampler.ode(self.velocity, cond, noise)[0]
