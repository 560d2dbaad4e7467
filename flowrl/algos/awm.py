"""Advantage-Weighted Matching (Xue et al., "Advantage Weighted Matching: Aligning RL with
Pretraining in Diffusion Models", 2025): the pretraining flow-matching loss, weighted by
GRPO-style advantages, on the policy's own clean samples.

The current policy samples clean actions or images with the deterministic ODE (any solver,
``flowrl.algos.likelihood_free``); each sample x, with its group advantage A clipped to
[-c, c], is noised again at every grid time t (x_t = (1 - t) eps + t x, target v* = x - eps,
the pretraining path) and trains

    L = mean over rows of  clip(A, -c, c) * mean (v_theta(x_t, t) - v*)^2

With every A = 1 it is the pretraining loss; the gradient pulls the field towards samples of
positive advantage and pushes it away from those of negative advantage (the paper's
policy-gradient view: the flow-matching error stands in for -log-likelihood). The reference
regulariser ``beta`` (mean ||v_theta - v_ref||^2, the paper's "Uniform" KL) keeps the pushing
away bounded.
"""

from __future__ import annotations

from torch import Tensor

from flowrl.algos.likelihood_free import LikelihoodFreeAlgorithm, NoisedRows, matching_error
from flowrl.config import AWMConfig


def awm_loss(v: Tensor, target: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """``mean_rows clip(A, -clip, clip) * mean_dims (v - target)^2``: v, target ``[R, *E]``, A ``[R]``."""
    return (advantages.clamp(-clip, clip) * matching_error(v, target)).mean()


class AWM(LikelihoodFreeAlgorithm):
    """Policy + Adam (+ a frozen reference when beta > 0)."""

    name = "AWM"
    cfg: AWMConfig

    def row_loss(self, rows: NoisedRows, v: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss = awm_loss(v, rows.target, rows.advantages, self.cfg.adv_clip_max)
        return loss, {"awm/matching_error": matching_error(v.detach(), rows.target).mean().item()}
