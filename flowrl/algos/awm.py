"""Advantage-Weighted Matching (Xue et al., "Advantage Weighted Matching: Aligning RL with
Pretraining in Diffusion Models", 2025): the pretraining flow-matching loss, weighted by
GRPO-style advantages, on the policy's own clean samples.

The current policy samples clean actions or images with the deterministic ODE (any solver,
``flowrl.algos.likelihood_free``); each sample x, with its group advantage A clipped to
[-c, c] and scaled into [-1, 1] (w = clip(A, -c, c) / c, the paper's advantage_max = 1), is
noised again at every grid time t (x_t = (1 - t) eps + t x, target v* = x - eps, the
pretraining path) and trains

    L = mean over rows of  w * mean (v_theta(x_t, t) - v*)^2
        + old_coef * mean ||v_theta - v_old||^2  +  beta * mean ||v_theta - v_ref||^2

With every w = 1 the first term is the pretraining loss; its gradient pulls the field towards
samples of positive advantage and pushes it away from those of negative advantage (the paper's
policy-gradient view: the flow-matching error stands in for -log-likelihood). Pushing away is
unbounded on its own: the proximal term to the policy that collected the rollout (v_old, the
paper's ema_beta = 1) makes each row's loss convex for |w| < 1, and ``beta`` (the paper's
"Uniform" KL) keeps the field near the initial policy. Convex per update is not stable over
iterations: where negative samples dominate, each update's minimiser moves further away than
the last (``flowrl.algos.likelihood_free``); ``adv_mode: positive`` keeps every w >= 0.
"""

from __future__ import annotations

from torch import Tensor

from flowrl.algos.likelihood_free import LikelihoodFreeAlgorithm, NoisedRows, matching_error
from flowrl.config import AWMConfig


def awm_loss(v: Tensor, target: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """``mean_rows w * mean_dims (v - target)^2`` with ``w = clip(A, -clip, clip) / clip`` in [-1, 1]:
    v, target ``[R, *E]``, A ``[R]``."""
    return (advantages.clamp(-clip, clip) / clip * matching_error(v, target)).mean()


class AWM(LikelihoodFreeAlgorithm):
    """Policy + Adam (+ a frozen reference when beta > 0)."""

    name = "AWM"
    cfg: AWMConfig

    def row_loss(self, rows: NoisedRows, v: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss = awm_loss(v, rows.target, rows.advantages, self.cfg.adv_clip_max)
        return loss, {"awm/matching_error": matching_error(v.detach(), rows.target).mean().item()}
