"""A small text-conditioned velocity field on pixels: the image model of the shapes world.

``TextImageVelocity(cond, x, t)``: cond is a caption's token ids ``[B, L]`` (0 = padding; an
all-padding row is the empty caption, which classifier-free guidance uses as the
unconditional input), x the image being denoised ``[B, C, H, W]`` and t in [0, 1]
(t = 0 noise, t = 1 data). A compact U-Net: residual conv blocks modulated (FiLM) by the
time and the pooled caption, and cross-attention from the low-resolution feature map to the
caption's tokens, which is what lets it bind a colour to a shape and put shapes left of or
above each other. ``GuidedVelocity`` wraps a field with classifier-free guidance.

The constructor arguments are recorded in ``config`` so a checkpoint rebuilds the network
(``TextImageVelocity(**config)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flowrl.models.networks import SinusoidalTimeEmbedding, _batch_time

PAD = 0  # token id of padding; a caption of only padding is the empty (unconditional) caption


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` -> token features ``[B, L, D]``, key padding mask ``[B, L]`` (True =
    padding) and a pooled caption vector ``[B, D]``. The empty caption pools to a learned
    null vector and attends to one learned null token."""

    def __init__(self, vocab_size: int, max_len: int, dim: int, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.max_len = max_len
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.positions = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if ids.ndim != 2 or ids.shape[1] > self.max_len:
            raise ValueError(f"token ids must be [B, L <= {self.max_len}], got {tuple(ids.shape)}")
        pad = ids == PAD
        empty = pad.all(dim=1)
        h = self.tokens(ids) + self.positions[: ids.shape[1]]
        # The empty caption: one unmasked null token, so attention never sees a fully masked row.
        pad = pad.clone()
        pad[empty, 0] = False
        h = torch.where(empty[:, None, None], torch.zeros_like(h), h)
        h[empty, 0] = self.null
        h = self.encoder(h, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1)
        pooled = torch.where(empty[:, None], self.null.expand_as(pooled), pooled)
        return h, pad, pooled


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with a FiLM (scale, shift) from the embedding."""

    def __init__(self, channels_in: int, channels: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * channels)
        self.norm2 = nn.GroupNorm(8, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(channels_in, channels, 1) if channels_in != channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb).chunk(2, dim=-1)
        h = self.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(h))


class CrossAttention(nn.Module):
    """Pixels of a feature map ``[B, C, h, w]`` (with a learned position embedding) attend to
    the caption's tokens; residual."""

    def __init__(self, channels: int, text_dim: int, size: int, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.pos = nn.Parameter(torch.randn(size * size, channels) * 0.02)
        self.attn = nn.MultiheadAttention(channels, heads, kdim=text_dim, vdim=text_dim, batch_first=True)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, tokens: Tensor, pad: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2) + self.pos
        a, _ = self.attn(q, tokens, tokens, key_padding_mask=pad, need_weights=False)
        return x + self.out(a).transpose(1, 2).reshape(b, c, h, w)


class TextImageVelocity(nn.Module):
    """v(x, t | caption) on images ``[C, H, W]`` (H = W, divisible by 4 * patch).

    channels: widths at the patch grid's full, half and quarter resolution; attention at half
    and quarter.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        image_size: int = 32,
        image_channels: int = 3,
        patch: int = 2,
        channels: tuple[int, int, int] = (64, 96, 128),
        text_dim: int = 64,
        time_dim: int = 64,
    ) -> None:
        super().__init__()
        if image_size % (4 * patch):
            raise ValueError(f"image_size must be divisible by 4 * patch = {4 * patch}, got {image_size}")
        self.config: dict[str, Any] = {
            "vocab_size": vocab_size,
            "max_len": max_len,
            "image_size": image_size,
            "image_channels": image_channels,
            "patch": patch,
            "channels": tuple(channels),
            "text_dim": text_dim,
            "time_dim": time_dim,
        }
        c1, c2, c3 = channels
        emb = 4 * time_dim
        self.text = TextEncoder(vocab_size, max_len, text_dim)
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        self.embed = nn.Sequential(nn.Linear(time_dim + text_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        grid = image_size // patch
        self.stem = nn.Conv2d(image_channels, c1, patch, stride=patch)
        self.down1 = ResBlock(c1, c1, emb)
        self.down2 = ResBlock(c1, c2, emb)
        self.attn2 = CrossAttention(c2, text_dim, grid // 2)
        self.down3 = ResBlock(c2, c3, emb)
        self.attn3 = CrossAttention(c3, text_dim, grid // 4)
        self.mid = ResBlock(c3, c3, emb)
        self.up3 = ResBlock(c3 + c3, c2, emb)
        self.up_attn = CrossAttention(c2, text_dim, grid // 2)
        self.up2 = ResBlock(c2 + c2, c1, emb)
        self.up1 = ResBlock(c1 + c1, c1, emb)
        self.head = nn.Sequential(
            nn.GroupNorm(8, c1), nn.SiLU(), nn.ConvTranspose2d(c1, image_channels, patch, stride=patch)
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @property
    def event_shape(self) -> tuple[int, int, int]:
        s = self.config["image_size"]
        return (self.config["image_channels"], s, s)

    def forward(self, cond: Tensor, x: Tensor, t: Tensor | float, t_next: Tensor | float | None = None) -> Tensor:
        b = x.shape[0]
        tokens, pad, pooled = self.text(cond)
        emb = self.embed(torch.cat([self.time_embed(_batch_time(t, b, x)), pooled], dim=-1))
        h1 = self.down1(self.stem(x), emb)  # the patch grid
        h2 = self.attn2(self.down2(F.avg_pool2d(h1, 2), emb), tokens, pad)  # 1/2
        h3 = self.attn3(self.down3(F.avg_pool2d(h2, 2), emb), tokens, pad)  # 1/4
        h = self.mid(h3, emb)
        h = self.up3(torch.cat([h, h3], dim=1), emb)
        h = self.up_attn(F.interpolate(h, scale_factor=2.0, mode="nearest"), tokens, pad)
        h = self.up2(torch.cat([h, h2], dim=1), emb)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        return self.head(h)


class GuidedVelocity(nn.Module):
    """Classifier-free guidance: ``v_uncond + scale * (v_cond - v_uncond)`` (scale 1 = the
    conditional field alone; the unconditional field sees the empty caption).

    ``detach_uncond``: the value is the same, but no gradient flows through ``v_uncond``. With
    it, a policy-gradient step moves the field only through the conditional branch; without it
    the unconditional branch, which every prompt shares, takes gradient with weight
    ``1 - scale`` (-1.5 at 2.5)."""

    def __init__(self, velocity: TextImageVelocity, scale: float, detach_uncond: bool = False) -> None:
        super().__init__()
        self.velocity, self.scale, self.detach_uncond = velocity, scale, detach_uncond

    @property
    def event_shape(self) -> tuple[int, int, int]:
        return self.velocity.event_shape

    def forward(self, cond: Tensor, x: Tensor, t: Tensor | float, t_next: Tensor | float | None = None) -> Tensor:
        if self.scale == 1.0:
            return self.velocity(cond, x, t)
        b = x.shape[0]
        t_b = _batch_time(t, b, x)
        both = self.velocity(torch.cat([cond, torch.full_like(cond, PAD)]), torch.cat([x, x]), torch.cat([t_b, t_b]))
        v_cond, v_uncond = both[:b], both[b:]
        if self.detach_uncond:
            v_uncond = v_uncond.detach()
        return v_uncond + self.scale * (v_cond - v_uncond)


def drop_captions(ids: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each caption by the empty one with probability ``p`` (training for CFG)."""
    drop = torch.rand(ids.shape[0], generator=generator, device=ids.device) < p
    return torch.where(drop[:, None], torch.full_like(ids, PAD), ids)
