"""A small learned reward model: a CNN trained on the shapes world to predict a layout
preference, standing in for the learned aesthetic / preference models (PickScore, ImageReward)
of the text-to-image papers, which no model hub can supply here.

The preference is analytic (``layout_score``): images whose objects are balanced around the
image centre score higher. ``train_layout_model`` fits the CNN to it on rendered
scenes; ``save_layout_model`` / ``load_layout_model`` write and check a checkpoint;
``LearnedLayoutReward`` scores image batches with a loaded model (its prompts are ignored).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from envs.shapes.sampling import sample_pairs
from envs.shapes.scene import Scene
from flowrl.rewards import ImageBatch, RewardError, RewardOutput, check_images
from flowrl.rewards.registry import RewardSpec, register_reward
from flowrl.runlog import atomic_save

FORMAT = "flowrl.learned_layout.v1"
_UNIT_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}  # area / half-extent^2
_FIX = "train and save one with flowrl.rewards.learned.train_layout_model / save_layout_model"


def layout_score(scene: Scene) -> float:
    """Layout preference in [0, 1]: how close the objects' centre of mass (each object
    weighted by its area) is to the image centre, ``1 - distance / 0.5`` floored at 0."""
    weights = np.array([_UNIT_AREA[o.shape] * o.size**2 for o in scene.objects])
    centres = np.array([(o.x, o.y) for o in scene.objects])
    balance = weights @ centres / weights.sum()
    return max(0.0, 1.0 - float(np.linalg.norm(balance - 0.5)) / 0.5)


@dataclass(frozen=True)
class LayoutModelConfig:
    """The CNN's constructor arguments (saved with its weights)."""

    channels: tuple[int, ...] = (16, 32, 32)
    hidden: int = 64


class LayoutCNN(nn.Module):
    """Images ``[B, 3, H, W]`` -> predicted layout score ``[B]``.

    Strided 3x3 convolutions, then average pooling to a 4x4 grid that keeps where things
    are (the score depends on positions), then an MLP. Works at any image size >= 16.
    """

    def __init__(self, config: LayoutModelConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = 3
        for channels in config.channels:
            layers += [nn.Conv2d(width, channels, 3, stride=2, padding=1), nn.ReLU()]
            width = channels
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(width * 16, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)).squeeze(1)


@dataclass
class LayoutTrainConfig:
    """How ``train_layout_model`` fits the CNN (the default takes about a minute on 2 cores)."""

    num_images: int = 8000
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    image_size: int = 32
    max_distractors: int = 2  # scenes of 1 to 4 objects
    seed: int = 0
    model: LayoutModelConfig = LayoutModelConfig()


def train_layout_model(config: LayoutTrainConfig) -> tuple[LayoutCNN, dict[str, float]]:
    """A LayoutCNN fitted (MSE, Adam) to ``layout_score`` of rendered training-caption scenes.
    Returns the model (eval mode) and ``{"train_mse": ...}`` of the last epoch."""
    data = sample_pairs(config.num_images, config.seed, size=config.image_size, max_distractors=config.max_distractors)
    targets = torch.tensor([layout_score(s) for s in data.scenes], dtype=torch.float32)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = LayoutCNN(config.model)
    with torch.no_grad():
        model.head[-1].bias.fill_(targets.mean())  # start from the mean: the steps go to the layout
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs)
    for _ in range(config.epochs):
        total = 0.0
        for rows in torch.randperm(len(targets), generator=generator).split(config.batch_size):
            loss = (model(data.images[rows]) - targets[rows]).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        schedule.step()
    return model.eval(), {"train_mse": total / len(targets)}


def save_layout_model(model: LayoutCNN, path: str | Path) -> None:
    """Write ``model`` atomically: ``{"format", "config", "state_dict"}``."""
    atomic_save({"format": FORMAT, "config": asdict(model.config), "state_dict": model.state_dict()}, path)


def load_layout_model(path: str | Path) -> LayoutCNN:
    """The LayoutCNN saved at ``path``. RewardError (one line: the file, the problem, the fix)
    for a missing, unreadable, truncated or foreign file, a bad config, weights whose names or
    shapes do not fit, and non-finite weights."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RewardError(f"learned reward checkpoint not found: {path}; {_FIX}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on the odd pickle protocols of damaged files
            record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file raises a dozen types (see models/build.py)
        raise RewardError(
            f"{path} cannot be read by torch.load ({type(exc).__name__}): truncated, corrupt or no checkpoint; {_FIX}"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise RewardError(
            f"{path} is not a learned layout reward checkpoint (format {found!r}, expected {FORMAT!r}); {_FIX}"
        )
    model = LayoutCNN(_config(path, record.get("config")))
    _check_state(path, record.get("state_dict"), model.state_dict())
    model.load_state_dict(record["state_dict"])
    return model.eval()


def _config(path: Path, raw: Any) -> LayoutModelConfig:
    fields = set(LayoutModelConfig.__dataclass_fields__)
    if not isinstance(raw, dict) or set(raw) != fields:
        raise RewardError(f"{path}: its 'config' must hold exactly {sorted(fields)}, got {raw!r}; {_FIX}")
    channels, hidden = raw["channels"], raw["hidden"]
    if not (
        isinstance(channels, (list, tuple))
        and channels
        and all(isinstance(c, int) and c > 0 for c in channels)
        and isinstance(hidden, int)
        and hidden > 0
    ):
        raise RewardError(f"{path}: bad 'config' {raw!r} (channels: positive ints, hidden: a positive int); {_FIX}")
    return LayoutModelConfig(tuple(channels), hidden)


def _check_state(path: Path, state: Any, expected: dict[str, torch.Tensor]) -> None:
    if not isinstance(state, dict):
        raise RewardError(f"{path}: 'state_dict' is a {type(state).__name__}, not a dict of tensors; {_FIX}")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise RewardError(f"{path}: its weights do not fit the network its config describes ({first}); {_FIX}")
    for name, want in expected.items():
        have = state[name]
        if not isinstance(have, torch.Tensor) or have.shape != want.shape:
            got = list(have.shape) if isinstance(have, torch.Tensor) else type(have).__name__
            raise RewardError(f"{path}: weight {name!r} is {got}, the network needs {list(want.shape)}; {_FIX}")
        if not have.is_floating_point() or not torch.isfinite(have).all():
            raise RewardError(f"{path}: weight {name!r} holds non-finite or non-float values; {_FIX}")


class LearnedLayoutReward:
    """Scores ``[B]``: the LayoutCNN's predicted layout preference (prompts are ignored)."""

    name = "learned_layout"

    def __init__(self, path: str | Path) -> None:
        self.model = load_layout_model(path)

    def __call__(self, batch: ImageBatch) -> RewardOutput:
        with torch.no_grad():
            return RewardOutput(self.model(check_images(batch, self.name)))


@register_reward
class LearnedSpec(RewardSpec):
    """Small CNN trained on the shapes world's layout score (a stand-in for learned preference models)."""

    type: Literal["learned"] = "learned"
    path: str = Field(description="checkpoint written by flowrl.rewards.learned.save_layout_model")

    @property
    def reward_name(self) -> str:
        return LearnedLayoutReward.name

    def preflight(self) -> None:
        """The checkpoint exists, reads, is a layout model whose weights fit (the small CNN loads
        in well under a second; a bigger model would check the file only)."""
        load_layout_model(self.path)

    def build(self) -> LearnedLayoutReward:
        return LearnedLayoutReward(self.path)


__all__ = [
    "FORMAT",
    "LayoutCNN",
    "LayoutModelConfig",
    "LayoutTrainConfig",
    "LearnedLayoutReward",
    "LearnedSpec",
    "layout_score",
    "load_layout_model",
    "save_layout_model",
    "train_layout_model",
]
