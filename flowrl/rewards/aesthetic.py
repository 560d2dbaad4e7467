"""Aesthetic score: the LAION-style MLP on L2-normalised CLIP image embeddings (prompts ignored).

The MLP is the "improved aesthetic predictor"'s: ``Linear(D, 1024), Dropout, Linear(1024, 128),
Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1)`` under the name ``layers``, so
its published ``.pth`` state dict (for CLIP ViT-L/14, D = 768) loads as it is; ``.pt``/``.pth``
(a torch state dict) and ``.safetensors`` are read. D is the CLIP model's projection size.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from flowrl.rewards import ImageBatch, RewardError, RewardOutput, check_images
from flowrl.rewards.clip_score import Device, check_clip_folder, check_processor_folder, clip_features, load_clip
from flowrl.rewards.registry import RewardSpec, register_reward

_FIX = "point env.reward.mlp at the aesthetic MLP's state dict (.pth/.pt or .safetensors, keys layers.N.weight/bias)"


class AestheticMLP(nn.Module):
    """Normalised CLIP image embeddings ``[B, D]`` -> aesthetic score ``[B]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings).squeeze(-1)


def read_state(path: str | Path) -> dict[str, Tensor]:
    """The MLP's tensors from a .safetensors or torch file; RewardError (one line) otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RewardError(f"aesthetic MLP file not found: {path}; {_FIX}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file raises many types
        raise RewardError(
            f"{path} cannot be read ({type(exc).__name__}): truncated, corrupt or not weights; {_FIX}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise RewardError(f"{path} is not a state dict of tensors; {_FIX}")
    return state


def load_mlp(path: str | Path, dim: int) -> AestheticMLP:
    """An AestheticMLP for ``dim``-sized embeddings with the weights at ``path``, checked."""
    mlp = AestheticMLP(dim)
    state, expected = read_state(path), mlp.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise RewardError(f"{path} is not a LAION-style aesthetic MLP ({first}); {_FIX}")
    for name, want in expected.items():
        if state[name].shape != want.shape:
            raise RewardError(
                f"{path}: {name} has shape {list(state[name].shape)}, needs {list(want.shape)} (an MLP for CLIP "
                f"embeddings of size {state['layers.0.weight'].shape[-1]}, the CLIP model's are {dim}): use the "
                "MLP trained on this CLIP model's embeddings"
            )
        if not torch.isfinite(state[name]).all():
            raise RewardError(f"{path}: {name} holds non-finite values; {_FIX}")
    mlp.load_state_dict(state)
    return mlp.eval().requires_grad_(False)


class AestheticReward:
    """Scores ``[B]``: the MLP on each image's normalised CLIP embedding."""

    name = "aesthetic"

    def __init__(self, clip: str, mlp: str, processor: str | None = None, device: Device = "auto") -> None:
        self.model, self.processor, self.device = load_clip(clip, processor, device)
        self.mlp = load_mlp(mlp, self.model.config.projection_dim).to(self.device)

    def __call__(self, batch: ImageBatch) -> RewardOutput:
        check_images(batch, self.name)
        image, _ = clip_features(self.model, self.processor, batch, self.device, text=False)
        with torch.no_grad():
            return RewardOutput(self.mlp(image).float().cpu())


@register_reward
class AestheticSpec(RewardSpec):
    """LAION-style aesthetic MLP on normalised CLIP image embeddings (local CLIP folder and MLP file)."""

    type: Literal["aesthetic"] = "aesthetic"
    clip: str = Field(description="local folder of the CLIP model the MLP was trained on (LAION's: ViT-L/14)")
    mlp: str = Field(description="the MLP's weights: .pth/.pt state dict or .safetensors (keys layers.N.*)")
    processor: str | None = Field(None, description="folder of the CLIP processor; null = the clip folder")
    device: Device = Field("auto", description="where the reward worker runs the models; auto = cuda when present")

    def preflight(self) -> None:
        """The folders hold a CLIP model and processor; the MLP file reads and has the MLP's keys."""
        check_clip_folder(self.clip, "clip")
        check_processor_folder(self.processor or self.clip, "processor" if self.processor else "clip")
        read_state(self.mlp)

    def build(self) -> AestheticReward:
        return AestheticReward(self.clip, self.mlp, self.processor, self.device)


__all__ = ["AestheticMLP", "AestheticReward", "AestheticSpec", "load_mlp"]
