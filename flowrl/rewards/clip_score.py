"""CLIP score: how well each image matches its prompt under a CLIP model from a local folder.

``score = scale * cos(image embedding, text embedding)`` with transformers' ``CLIPModel`` and the
folder's ``CLIPProcessor`` (its tokenizer, resize and normalisation), the reward of DDPO-style
prompt alignment. The folder is what ``CLIPModel.save_pretrained`` plus
``CLIPProcessor.save_pretrained`` write (e.g. a downloaded openai/clip-vit-large-patch14).

This file also holds what the other CLIP-based rewards (pickscore.py, aesthetic.py) share:
``check_clip_folder`` (one-line errors), ``load_clip`` and ``clip_features``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from flowrl.rewards import ImageBatch, RewardError, RewardOutput, check_images
from flowrl.rewards.registry import RewardSpec, register_reward

Device = Literal["auto", "cpu", "cuda"]


def check_clip_folder(path: str | Path, key: str = "path") -> Path:
    """A local folder holding a transformers CLIP model, or a one-line RewardError (missing folder,
    no config.json, another model type); cheap: no weights are read."""
    folder = Path(path).expanduser()
    fix = f"point env.reward.{key} at a folder written by CLIPModel.save_pretrained (config.json, weights)"
    if not folder.is_dir():
        raise RewardError(f"CLIP model folder not found: {folder}; {fix}")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        raise RewardError(f"{folder} has no readable config.json: not a transformers model folder; {fix}") from None
    if model_type != "clip":
        raise RewardError(f"{folder} holds a {model_type!r} model, not a CLIP model (model_type 'clip'); {fix}")
    return folder


def check_processor_folder(path: str | Path, key: str) -> Path:
    folder = Path(path).expanduser()
    # transformers 4 writes the image processor to preprocessor_config.json, 5 to processor_config.json
    images = any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json"))
    if not images or not (folder / "tokenizer_config.json").is_file():
        raise RewardError(
            f"{folder} holds no CLIP processor (preprocessor_config.json and tokenizer files); point "
            f"env.reward.{key} at a folder written by CLIPProcessor.save_pretrained"
        )
    return folder


def resolve(device: Device) -> torch.device:
    return torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )


def load_clip(path: str | Path, processor: str | Path | None, device: Device) -> tuple[Any, Any, torch.device]:
    """``(CLIPModel in eval mode, CLIPProcessor, device)`` from local folders (the processor from
    ``processor``, else from the model's folder)."""
    from transformers import CLIPModel, CLIPProcessor

    folder = check_clip_folder(path)
    proc_folder = check_processor_folder(processor or folder, "processor" if processor else "path")
    dev = resolve(device)
    model = CLIPModel.from_pretrained(folder).to(dev).eval().requires_grad_(False)
    return model, CLIPProcessor.from_pretrained(proc_folder), dev


def _pooled(out: Any) -> Tensor:
    """transformers 4 returns the projected features, 5 an output whose pooler_output holds them."""
    return out if isinstance(out, Tensor) else out.pooler_output


@torch.no_grad()
def clip_features(
    model: Any, processor: Any, batch: ImageBatch, device: torch.device, text: bool
) -> tuple[Tensor, Tensor | None]:
    """L2-normalised image embeddings ``[B, D]`` and, with ``text``, prompt embeddings ``[B, D]``.
    Images go through the processor as 8-bit arrays, as the models were trained on."""
    images = (batch.images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(device)
    image = _pooled(model.get_image_features(pixel_values=pixels)).float()
    image = image / image.norm(dim=-1, keepdim=True)
    if not text:
        return image, None
    tokens = processor.tokenizer(batch.prompts, padding=True, truncation=True, return_tensors="pt").to(device)
    words = _pooled(model.get_text_features(**tokens)).float()
    return image, words / words.norm(dim=-1, keepdim=True)


class ClipScoreReward:
    """Scores ``[B]``: ``scale`` times the cosine of each image's and its prompt's CLIP embedding."""

    name = "clip_score"

    def __init__(self, path: str, processor: str | None = None, scale: float = 1.0, device: Device = "auto") -> None:
        self.model, self.processor, self.device = load_clip(path, processor, device)
        self.scale = scale

    def __call__(self, batch: ImageBatch) -> RewardOutput:
        check_images(batch, self.name)
        image, text = clip_features(self.model, self.processor, batch, self.device, text=True)
        assert text is not None
        cosine = (image * text).sum(-1).cpu()
        return RewardOutput(self.scale * cosine, {"clip_cosine": cosine})


@register_reward
class ClipScoreSpec(RewardSpec):
    """CLIP score: scale x cosine of image and prompt embeddings (transformers' CLIPModel, local folder)."""

    type: Literal["clip_score"] = "clip_score"
    path: str = Field(description="local folder of a transformers CLIPModel (config.json and weights)")
    processor: str | None = Field(None, description="folder of its CLIPProcessor; null = the model's folder")
    scale: float = Field(1.0, gt=0, description="score = scale * cosine (CLIPScore's paper uses 2.5 and max(cos, 0))")
    device: Device = Field("auto", description="where the reward worker runs the model; auto = cuda when present")

    def preflight(self) -> None:
        """The folders exist and hold a CLIP model and processor (weights are read in the workers)."""
        check_clip_folder(self.path)
        check_processor_folder(self.processor or self.path, "processor" if self.processor else "path")

    def build(self) -> ClipScoreReward:
        return ClipScoreReward(self.path, self.processor, self.scale, self.device)


__all__ = ["ClipScoreReward", "ClipScoreSpec", "check_clip_folder", "clip_features", "load_clip"]
