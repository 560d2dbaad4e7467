"""Tests of the JPEG (in)compressibility reward.

Oracles: pillow itself, called on uint8 arrays built here with numpy; a flat image against
random noise (noise never compresses as well).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from flowrl.rewards import ImageBatch, RewardError
from flowrl.rewards.jpeg import JpegReward


def _pillow_kb(image: np.ndarray, quality: int) -> float:
    """``image``: float [3, H, W] in [0, 1]."""
    pixels = np.clip(np.rint(np.clip(image, 0, 1) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


def _batch() -> ImageBatch:
    generator = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 32, 32), 0.4)
    noise = torch.rand(1, 3, 32, 32, generator=generator)
    gradient = torch.linspace(-0.2, 1.2, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64)  # out of range: clamped
    return ImageBatch(torch.cat([flat, noise, torch.nn.functional.interpolate(gradient, size=32)]), ["", "", ""])


@pytest.mark.parametrize("quality", [95, 50])
def test_sizes_equal_pillow_and_modes_are_opposite(quality):
    batch = _batch()
    expected = torch.tensor([_pillow_kb(image, quality) for image in batch.images.numpy()])
    compressibility, incompressibility = (
        JpegReward("compressibility", quality),
        JpegReward("incompressibility", quality),
    )
    small, large = compressibility(batch), incompressibility(batch)
    assert torch.allclose(small.details["jpeg_kb"], expected) and torch.allclose(large.details["jpeg_kb"], expected)
    assert torch.allclose(small.scores, -expected) and torch.allclose(large.scores, expected)
    assert small.scores[0] > small.scores[1], "a flat image must compress better than noise"
    assert (compressibility.name, incompressibility.name) == ("jpeg_compressibility", "jpeg_incompressibility")


def test_lower_quality_gives_smaller_files():
    batch = _batch()
    assert (JpegReward(quality=30)(batch).details["jpeg_kb"] < JpegReward(quality=95)(batch).details["jpeg_kb"]).all()


def test_bad_settings_and_images():
    with pytest.raises(ValueError, match="mode must be one of compressibility, incompressibility"):
        JpegReward("smaller")
    with pytest.raises(ValueError, match="quality must be an integer in 1..95"):
        JpegReward(quality=100)
    batch = _batch()
    batch.images[1, 0, 0, 0] = float("inf")
    with pytest.raises(RewardError, match="jpeg_compressibility: image 1 of the batch has non-finite pixels"):
        JpegReward()(batch)
