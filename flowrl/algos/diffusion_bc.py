"""DDPM behaviour cloning of an action-chunk policy: the epsilon-prediction loss.

``a`` is the demonstrated action chunk ``[Ta, Da]`` that follows ``obs``; tau ~ U{0, ..., T-1},
eps ~ N(0, I), x_tau = sqrt(ᾱ_tau) a + sqrt(1 - ᾱ_tau) eps, and the denoiser learns
|| eps_theta(obs, x_tau, (tau + 1) / T) - eps ||² (Ho et al. 2020, the "simple" loss). The
time input is the one DiffusionPolicy samples with (``diffusion_time``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.models.diffusion_policy import diffusion_time
from flowrl.models.networks import VelocityMLP


def diffusion_loss(
    denoiser: VelocityMLP,
    obs: Tensor,
    chunks: Tensor,
    alphas_cumprod: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Epsilon-prediction MSE on a batch: obs ``[B, O]``, chunks ``[B, Ta, Da]``,
    alphas_cumprod ``[T]`` (e.g. ``DiffusionPolicy.alphas_cumprod``). Returns a scalar.

    Runs in the dtype of ``chunks``; tau is drawn before eps, both with ``generator``.
    """
    if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 1:
        raise ValueError(f"alphas_cumprod must be [T] with T >= 1, got {tuple(alphas_cumprod.shape)}")
    if chunks.ndim != 3 or obs.shape[0] != chunks.shape[0]:
        raise ValueError(f"need obs [B, O] and chunks [B, Ta, Da], got {tuple(obs.shape)} and {tuple(chunks.shape)}")
    b, dev, dtype = chunks.shape[0], chunks.device, chunks.dtype
    train_steps = alphas_cumprod.shape[0]
    tau = torch.randint(0, train_steps, (b,), generator=generator, device=dev)
    eps = torch.randn(chunks.shape, generator=generator, device=dev, dtype=dtype)
    alpha_bar = alphas_cumprod.to(device=dev)[tau].to(dtype).view(-1, 1, 1)
    x_tau = alpha_bar.sqrt() * chunks + (1.0 - alpha_bar).sqrt() * eps
    pred = denoiser(obs, x_tau, diffusion_time(tau, train_steps).to(device=dev, dtype=dtype))
    return ((pred - eps) ** 2).mean()
