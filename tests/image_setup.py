"""A tiny shapes-world experiment for the image track's tests (16 px images, a network of
about 20k parameters, K = 4, 2 prompts x 2 images)."""

from __future__ import annotations

import copy
from typing import Any

from flowrl.config import ExperimentConfig, build_config

TINY: dict[str, Any] = {
    "name": "tiny-images",
    "device": "cpu",
    "env": {
        "type": "shapes",
        "image_size": 16,
        "prompts_per_iteration": 2,
        "group_size": 2,
        "prompts_per_chunk": 1,
        "reward": {"type": "jpeg"},  # continuous: every group has a spread, so GRPO updates
    },
    "policy": {
        "type": "text_image",
        "channels": [8, 8, 8],
        "text_dim": 8,
        "time_dim": 8,
        "denoising_steps": 4,
        "eval_denoising_steps": 4,
    },
    "mdp": {"converter": {"type": "flow_sde", "noise_level": 0.7}, "sample_unit": "step"},
    "pretrain": {"steps": 2, "batch_size": 8},
    "algo": {"type": "grpo", "iterations": 1, "epochs": 1, "minibatch_size": 4},
    "eval": {"episodes": 2, "every": 1},
    "ray": {"enabled": False},
}


# The same tiny world and network as overrides of a shipped image experiment file (the smoke
# tests of experiments/images and the image benchmark's test add their reward and evaluation).
TINY_OVERRIDES = [
    "ray.enabled=false",
    "env.image_size=16",
    "env.prompts_per_iteration=2",
    "env.group_size=2",
    "env.prompts_per_chunk=1",
    "policy.channels=[8,8,8]",
    "policy.text_dim=8",
    "policy.time_dim=8",
    "policy.denoising_steps=4",
    "policy.eval_denoising_steps=4",
    "pretrain.steps=2",
    "pretrain.batch_size=8",
    "algo.minibatch_size=4",
]


def tiny_config(*overrides: str, data: dict[str, Any] | None = None) -> ExperimentConfig:
    """The tiny experiment with ``key=value`` overrides (and sections of ``data`` replaced)."""
    raw = copy.deepcopy(TINY)
    raw.update(copy.deepcopy(data or {}))
    return build_config(raw, "tiny", list(overrides))
