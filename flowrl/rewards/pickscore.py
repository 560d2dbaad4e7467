"""PickScore-style human-preference reward: a CLIP two-tower scorer (PickScore is a fine-tuned
CLIP-H) scoring ``logit_scale.exp() * cos(image, prompt)``, as PickScore's own inference code does.

The model folder is a transformers ``CLIPModel`` (e.g. a downloaded PickScore_v1); PickScore ships
no processor of its own, so ``processor`` names the folder of the CLIP-H processor it was trained
with (a downloaded CLIP-ViT-H-14 folder), or null when the model folder holds one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flowrl.rewards import ImageBatch, RewardOutput, check_images
from flowrl.rewards.clip_score import Device, check_clip_folder, check_processor_folder, clip_features, load_clip
from flowrl.rewards.registry import RewardSpec, register_reward


class PickScoreReward:
    """Scores ``[B]``: the model's logit scale (exp) times the image-prompt cosine."""

    name = "pickscore"

    def __init__(self, path: str, processor: str | None = None, device: Device = "auto") -> None:
        self.model, self.processor, self.device = load_clip(path, processor, device)

    def __call__(self, batch: ImageBatch) -> RewardOutput:
        check_images(batch, self.name)
        image, text = clip_features(self.model, self.processor, batch, self.device, text=True)
        assert text is not None
        cosine = (image * text).sum(-1)
        scores = (self.model.logit_scale.exp().float() * cosine).cpu()
        return RewardOutput(scores, {"pickscore_cosine": cosine.cpu()})


@register_reward
class PickScoreSpec(RewardSpec):
    """PickScore-style preference: logit_scale x cosine of a CLIP two-tower scorer (local folder)."""

    type: Literal["pickscore"] = "pickscore"
    path: str = Field(description="local folder of the preference model (a transformers CLIPModel, e.g. PickScore_v1)")
    processor: str | None = Field(
        None, description="folder of the CLIP processor it was trained with (PickScore: CLIP-ViT-H-14's); null = path"
    )
    device: Device = Field("auto", description="where the reward worker runs the model; auto = cuda when present")

    def preflight(self) -> None:
        check_clip_folder(self.path)
        check_processor_folder(self.processor or self.path, "processor" if self.processor else "path")

    def build(self) -> PickScoreReward:
        return PickScoreReward(self.path, self.processor, self.device)


__all__ = ["PickScoreReward", "PickScoreSpec"]
