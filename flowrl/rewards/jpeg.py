"""JPEG (in)compressibility: DDPO's and Flow-GRPO's classic prompt-free reward.

Each image is encoded with pillow at a fixed quality; compressibility scores ``-size`` in kB
(smaller files are better), incompressibility ``+size``. ``details["jpeg_kb"]`` is the size.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, StrictInt

from flowrl.rewards import ImageBatch, RewardOutput, check_images
from flowrl.rewards.registry import RewardSpec, register_reward

MODES = ("compressibility", "incompressibility")


def jpeg_kilobytes(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Size in kB (1000 bytes) of each image of ``images`` ``[B, 3, H, W]`` (in [0, 1];
    clamped, rounded to 8 bits) as a pillow JPEG of ``quality``: float32 ``[B]``."""
    pixels = (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegReward:
    """``mode``: "compressibility" (score ``-kB``) or "incompressibility" (``+kB``);
    ``quality``: pillow's JPEG quality, 1 to 95."""

    def __init__(self, mode: str = "compressibility", quality: int = 95) -> None:
        if mode not in MODES:
            raise ValueError(f"jpeg reward: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
            raise ValueError(f"jpeg reward: quality must be an integer in 1..95 (pillow's range), got {quality!r}")
        self.mode, self.quality = mode, quality
        self.name = f"jpeg_{mode}"

    def __call__(self, batch: ImageBatch) -> RewardOutput:
        kilobytes = jpeg_kilobytes(check_images(batch, self.name), self.quality)
        scores = -kilobytes if self.mode == "compressibility" else kilobytes.clone()
        return RewardOutput(scores, {"jpeg_kb": kilobytes})


@register_reward
class JpegSpec(RewardSpec):
    """JPEG (in)compressibility: -kB or +kB of each image as a pillow JPEG."""

    type: Literal["jpeg"] = "jpeg"
    mode: Literal["compressibility", "incompressibility"] = Field("compressibility", description="-kB or +kB")
    quality: StrictInt = Field(95, ge=1, le=95, description="pillow's JPEG quality")

    @property
    def reward_name(self) -> str:
        return f"jpeg_{self.mode}"

    def build(self) -> JpegReward:
        return JpegReward(self.mode, self.quality)


__all__ = ["MODES", "JpegReward", "JpegSpec", "jpeg_kilobytes"]
