"""DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward
Process", ICLR 2026): negative-aware fine-tuning on the forward process, no likelihoods.

The old policy (v_old, a frozen copy that follows the trained one) samples clean actions or
images with the deterministic ODE (any solver, ``flowrl.algos.likelihood_free``). Each sample
gets an optimality probability from its group advantage A (clipped to [-c, c]):

    r = clip(A, -c, c) / (2c) + 1/2                      (A = 0 -> r = 1/2)

and, noised again at every grid time t (x_t = (1 - t) eps + t x, target v* = x - eps), trains
two implicit policies built from the current and the old velocity fields:

    v+ = (1 - beta) v_old + beta v_theta      (positive: where good samples lie)
    v- = (1 + beta) v_old - beta v_theta      (negative: its reflection about v_old)
    L  = [ r e(v+) + (1 - r) e(v-) ] / beta

with e the flow-matching error of the row: the paper's adaptive weighting (``adaptive_weight``:
the squared error of the clean-sample estimate x_t + (1 - t) v, divided by its detached mean
absolute error) or the plain ||v - v*||^2. Minimising L pointwise gives v_theta = v_old +
(2 p / beta)(u+ - v_old), p the probability that x_t comes from a positive sample and u+ their
velocity (tests/algos/test_nft.py checks it on a Gaussian flow): a policy-improvement
direction, learned with the pretraining loss.

After each iteration the old policy follows: old <- d old + (1 - d) theta with d =
min(old_decay_rate * iteration, old_decay_max) (the paper's schedule, 0.001 and 0.5). With
``adv_mode: positive`` (the paper's positive_only) a negative sample has r = 1/2, whose loss is
stationary at v_theta = v_old: it holds the field instead of pushing it away, and the minimiser
becomes v_old + (p / beta)(u+ - v_old) (``flowrl.algos.likelihood_free`` for why).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from flowrl.algos.likelihood_free import LikelihoodFreeAlgorithm, NoisedRows, matching_error
from flowrl.config import NFTConfig
from flowrl.models.policy import Policy, frozen_copy


def optimality_probability(advantages: Tensor, clip: float) -> Tensor:
    """r = clip(A, -clip, clip) / (2 clip) + 1/2 in [0, 1]: ``[R] -> [R]``."""
    return advantages.clamp(-clip, clip) / (2.0 * clip) + 0.5


def implicit_velocities(v_theta: Tensor, v_old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The implicit positive and negative velocities ``(v+, v-)``, each ``[R, *E]``:
    v+ = (1 - beta) v_old + beta v_theta, v- = (1 + beta) v_old - beta v_theta (v_old detached)."""
    v_old = v_old.detach()
    return (1.0 - beta) * v_old + beta * v_theta, (1.0 + beta) * v_old - beta * v_theta


def nft_error(v: Tensor, target: Tensor, t: Tensor, adaptive: bool) -> Tensor:
    """One row's error of velocity ``v`` against ``target`` (``[R, *E] -> [R]``). Plain: mean
    (v - target)^2. Adaptive (DiffusionNFT's implementation): the clean-sample estimate's error
    (1 - t)(v - target), squared and averaged, divided by its detached mean absolute value
    (floored at 1e-5), so every row contributes at the scale of its own error."""
    if not adaptive:
        return matching_error(v, target)
    err = (1.0 - t).view(-1, *([1] * (v.ndim - 1))) * (v - target)
    scale = err.detach().abs().flatten(1).mean(dim=1).clamp(min=1e-5)
    return err.pow(2).flatten(1).mean(dim=1) / scale


def nft_loss(
    v_theta: Tensor, v_old: Tensor, target: Tensor, t: Tensor, r: Tensor, beta: float, adaptive: bool
) -> Tensor:
    """Per-row DiffusionNFT loss ``[r e(v+) + (1 - r) e(v-)] / beta``: ``[R]``."""
    v_pos, v_neg = implicit_velocities(v_theta, v_old, beta)
    return (r * nft_error(v_pos, target, t, adaptive) + (1.0 - r) * nft_error(v_neg, target, t, adaptive)) / beta


class NFT(LikelihoodFreeAlgorithm):
    """Policy + Adam + the old policy (samples, gives v_old) + a frozen reference when beta > 0."""

    name = "NFT"
    checkpoint_state = ("policy", "actor_opt", "generator", "reference", "old")
    cfg: NFTConfig

    def __init__(
        self,
        policy: Policy,
        cfg: NFTConfig,
        device: torch.device,
        seed: int,
        group_size: int,
        running_obs_stats: bool = False,
        bounds: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__(policy, cfg, device, seed, group_size, running_obs_stats, bounds)
        self.old = frozen_copy(policy)
        self._sampler_copy: Policy | None = None  # the old policy where the rollout policy lives

    def sampling_policy(self, policy: Policy) -> Policy:
        """The old policy samples (on the device of the trainer's rollout policy)."""
        if self._sampler_copy is None:
            self._sampler_copy = copy.deepcopy(policy)
        self._sampler_copy.load_state_dict(self.old.state_dict())
        return self._sampler_copy

    def row_loss(self, rows: NoisedRows, v: Tensor) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        with torch.no_grad():
            v_old = self.old.velocity(rows.cond, rows.x_t, rows.t, rows.t)
        r = optimality_probability(rows.advantages, cfg.adv_clip_max)
        loss = nft_loss(v, v_old, rows.target, rows.t, r, cfg.nft_beta, cfg.adaptive_weight).mean()
        return loss, {"nft/r_mean": r.mean().item(), "nft/old_distance": (v - v_old).pow(2).mean().item()}

    def anchor_policy(self) -> Policy | None:
        """The proximal term (``old_coef``) anchors to the old policy, which collected the rollout."""
        return self.old

    @torch.no_grad()
    def after_update(self, iteration: int) -> dict[str, float]:
        """old <- d old + (1 - d) theta (parameters); buffers (observation statistics) copied."""
        cfg = self.cfg
        d = min(cfg.old_decay_rate * iteration, cfg.old_decay_max)
        for p_old, p in zip(self.old.velocity.parameters(), self.policy.velocity.parameters(), strict=True):
            p_old.mul_(d).add_(p.detach(), alpha=1.0 - d)
        for b_old, b in zip(self.old.velocity.buffers(), self.policy.velocity.buffers(), strict=True):
            b_old.copy_(b)
        return {"nft/old_decay": d}
