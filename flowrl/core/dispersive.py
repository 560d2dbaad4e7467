"""Dispersive losses: regularisers that spread a batch's intermediate embeddings apart.

"Diffuse and Disperse" (Wang & He 2025) adds one of these to a diffusion model's regression
loss; DM1 and MP1 add it to the MeanFlow behaviour-cloning loss of a one-step policy, where it
keeps the representations of different observations from collapsing. Each is the repulsive half
of a contrastive loss (no positive pairs). ``z`` is a batch of embeddings ``[B, *F]`` (flattened
to ``[B, d]``); with ``D(z_i, z_j)`` a dissimilarity and every pair (i, j), the diagonal included:

- ``infonce_l2``: ``log mean_{i,j} exp(-D(z_i, z_j) / tau)``, ``D = ||z_i - z_j||^2 / d`` (the
  squared distance per feature, as the authors' public release scales it);
- ``infonce_cosine``: the same with ``D = -cos(z_i, z_j)``;
- ``hinge``: ``mean_{i,j} max(0, margin - D(z_i, z_j))^2`` with the ``infonce_l2`` distance;
- ``covariance``: ``sum_{m != n} C_mn^2``, C ``[d, d]`` the batch covariance (divided by B - 1)
  of the embeddings scaled to unit L2 norm: it decorrelates features rather than repelling pairs
  (it pushes two nearby embeddings apart only across a direction in which the batch is correlated).

Every function returns a scalar and is differentiable; lower is more dispersed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DispersiveVariant = Literal["infonce_l2", "infonce_cosine", "hinge", "covariance"]
VARIANTS: tuple[str, ...] = ("infonce_l2", "infonce_cosine", "hinge", "covariance")


def _flat(z: Tensor) -> Tensor:
    if z.ndim < 2 or z.shape[0] < 2:
        raise ValueError(f"dispersive loss: need a batch of at least 2 embeddings [B, *F], got {tuple(z.shape)}")
    flat = z.reshape(z.shape[0], -1)
    return flat if flat.dtype == torch.float64 else flat.float()  # half precision: the sums in float32


def squared_distances(z: Tensor) -> Tensor:
    """``D_ij = ||z_i - z_j||^2 / d``: z ``[B, *F]`` -> ``[B, B]`` (zero diagonal).

    From the Gram matrix (||a||^2 + ||b||^2 - 2 a.b): the [B, B, d] differences would cost ~100x
    the time at B = 256, d = 256; round-off can make it slightly negative, hence the clamp."""
    flat = _flat(z)
    sq = flat.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T).clamp_min(0.0) / flat.shape[1]
    return dist * (1.0 - torch.eye(len(flat), dtype=dist.dtype, device=dist.device))


def infonce_l2(z: Tensor, temperature: float) -> Tensor:
    """``log mean_{i,j} exp(-||z_i - z_j||^2 / (d tau))`` over all B^2 pairs: z ``[B, *F]`` -> ``[]``."""
    logits = (-squared_distances(z) / temperature).flatten()
    return torch.logsumexp(logits, 0) - math.log(logits.numel())


def infonce_cosine(z: Tensor, temperature: float) -> Tensor:
    """``log mean_{i,j} exp(cos(z_i, z_j) / tau)``: z ``[B, *F]`` -> ``[]``."""
    unit = F.normalize(_flat(z), dim=1, eps=1e-8)
    logits = (unit @ unit.T / temperature).flatten()
    return torch.logsumexp(logits, 0) - math.log(logits.numel())


def hinge(z: Tensor, margin: float) -> Tensor:
    """``mean_{i,j} max(0, margin - ||z_i - z_j||^2 / d)^2``: z ``[B, *F]`` -> ``[]``."""
    return torch.relu(margin - squared_distances(z)).pow(2).mean()


def covariance(z: Tensor) -> Tensor:
    """Sum of the squared off-diagonal entries of the batch covariance of ``z / ||z||``:
    z ``[B, *F]`` -> ``[]``."""
    unit = F.normalize(_flat(z), dim=1, eps=1e-8)
    centred = unit - unit.mean(0, keepdim=True)
    cov = centred.T @ centred / (unit.shape[0] - 1)
    off = cov - torch.diag_embed(torch.diagonal(cov))
    return off.pow(2).sum()


def dispersive_loss(z: Tensor, variant: str, temperature: float = 0.5, margin: float = 1.0) -> Tensor:
    """The ``variant`` loss of one embedding batch ``[B, *F]`` (``temperature``: the InfoNCE
    variants; ``margin``: hinge)."""
    if variant == "infonce_l2":
        return infonce_l2(z, temperature)
    if variant == "infonce_cosine":
        return infonce_cosine(z, temperature)
    if variant == "hinge":
        return hinge(z, margin)
    if variant == "covariance":
        return covariance(z)
    raise ValueError(f"unknown dispersive variant {variant!r}; valid: {', '.join(VARIANTS)}")


def layers_loss(
    hidden: list[Tensor], layers: list[int], variant: str, temperature: float = 0.5, margin: float = 1.0
) -> Tensor:
    """The mean over ``layers`` (indices into ``hidden``, negative from the end) of the
    ``variant`` loss of each hidden activation ``[B, H_l]``."""
    losses = [dispersive_loss(hidden[i], variant, temperature, margin) for i in layers]
    return torch.stack(losses).mean()
