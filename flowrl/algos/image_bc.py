"""Pretraining the text-conditioned image flow by flow matching on the shapes world.

Every step draws a fresh batch of (image, caption) pairs from the pretraining captions of
``env.benchmark`` (geneval: all; zero_shot: the training captions)
(``envs.shapes.sample_pairs``, seeded from (seed, step), so a resumed pretraining sees the
same batches), replaces a share ``policy.caption_dropout`` of the captions by the empty one
(the unconditional field that classifier-free guidance needs), and takes a rectified-flow step
on pixels in [-1, 1]. The loop, EMA, logging (``pretrain_metrics.jsonl``), checkpoints and
resume are behaviour cloning's (``flowrl.algos.bc.fit``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from flowrl.algos.bc import Draw, fit
from flowrl.algos.flow_bc import flow_matching_loss
from flowrl.config import ExperimentConfig, TextImagePolicyConfig
from flowrl.models.image_policy import from_pixels
from flowrl.models.text_image import TextImageVelocity, drop_captions
from flowrl.runtime import derive_seed

PAIRS_STREAM = 5  # derive_seed(seed, PAIRS_STREAM, step): the pairs of a step


def shapes_batches(cfg: ExperimentConfig, device: torch.device) -> Draw:
    """``draw(step, generator) -> (caption ids [B, L], images [B, 3, H, W] in [-1, 1])``."""
    from envs.shapes import Tokenizer, sample_pairs

    assert cfg.pretrain is not None and isinstance(cfg.policy, TextImagePolicyConfig)
    tokenizer, size, batch = Tokenizer(), cfg.env.image_size, cfg.pretrain.batch_size
    dropout = cfg.policy.caption_dropout

    def draw(step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        seed = derive_seed(cfg.seed, PAIRS_STREAM, step)
        pairs = sample_pairs(batch, seed, split="pretrain", size=size, benchmark=cfg.env.benchmark)
        ids = tokenizer.encode(pairs.captions)[0].to(device)
        return drop_captions(ids, dropout, generator), from_pixels(pairs.images).to(device)

    return draw


def pretrain_images(
    network: TextImageVelocity,
    cfg: ExperimentConfig,
    device: torch.device,
    progress: bool = True,
    run_dir: Path | None = None,
) -> tuple[TextImageVelocity, dict[str, float]]:
    """Flow-matching pretraining of ``network`` for ``pretrain.steps``; returns the EMA copy
    (on ``device``) and the final loss."""
    assert cfg.pretrain is not None
    ema, metrics = fit(
        network.to(device), shapes_batches(cfg, device), flow_matching_loss, cfg.pretrain, cfg.seed, progress, run_dir
    )
    assert isinstance(ema, TextImageVelocity)
    return ema, metrics
