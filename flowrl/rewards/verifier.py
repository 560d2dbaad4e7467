"""ShapesVerifier: a GenEval-style compositional reward for the shapes world (envs.shapes).

Detection, in batched torch, no learned parts:
1. Foreground: each palette colour is the background plus a direction; a pixel's strength
   along colour c is ``alpha_c = <p - bg, d_c> / |d_c|^2`` (1 on the colour, 0.5 on a half
   blend with the background). Foreground = ``max_c alpha_c > 0.5``: the shapes' half-coverage
   outlines, whatever the blur.
2. Objects: 8-connected components of the foreground (objects are drawn at least GAP apart),
   ignoring specks smaller than ``MIN_AREA`` of the image.
3. Measurements weighted by ``alpha`` over each component grown by one pixel (so blurred and
   anti-aliased edges count by coverage): centroid, second and fourth moments.
4. Colour: the palette direction nearest (cosine >= ``COLOUR_COSINE``) to the component's mean
   ``p - bg``; a blend with the background does not change the direction. Else no colour.
5. Shape from scale-free moments: a triangle (apex up) is skewed along y; a square's mass is
   more spread along the diagonals than along the axes (fourth moments), a diamond's the
   other way round, a circle's equally. A component whose mass and spread do not fit the
   chosen shape's (a smear, two merged shapes) is no shape.

Score: the fraction of the caption's constraints the detected objects satisfy (dense reward);
``details["correct"]`` = 1 when all are (GenEval's strict accuracy), ``details["category"]`` =
index in ``envs.shapes.CATEGORIES``, ``details["num_objects"]`` = objects detected.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from envs.shapes.captions import CATEGORIES, parse_caption
from envs.shapes.scene import BACKGROUND, COLOURS, PALETTE, SceneObject
from flowrl.rewards import ImageBatch, RewardError, RewardOutput, check_images
from flowrl.rewards.registry import RewardSpec, register_reward

FOREGROUND = 0.5
MIN_AREA = 0.01  # of the image; the smallest object (a diamond of half-extent 0.13) covers 0.034
# Yellow is 45 degrees from red and from green; 0.93 (21.6 degrees) leaves ambiguous tints uncoloured.
COLOUR_COSINE = 0.93
# Rendered shapes at 32 px measure |kurtosis gap| < 0.1 (circle) and ~0.6 (square, diamond),
# y-skew ~0 and ~-0.57 (triangle); blur pulls square and diamond towards 0.
KURTOSIS_GAP = 0.22
TRIANGLE_SKEW = -0.25
# E[d^2] / r^2 and area / r^2 of each shape of half-extent r (d: distance to the centroid)
SPREAD = {"circle": 0.5, "square": 2 / 3, "triangle": 7 / 18, "diamond": 1 / 3}
AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}
MASS_TOLERANCE = 0.3  # measured mass within 30% of the area its spread implies
MAX_ANISOTROPY = 2.0  # E[dx^2] / E[dy^2] (a triangle's is 0.75)


def label_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of ``mask`` ``[N, H, W]`` (bool): long ``[N, H, W]``, 0 off the
    mask, else 1 + the smallest flat pixel index of the pixel's component.

    Min-label propagation: each pass takes the smallest label in a pixel's 3x3 neighbourhood,
    then jumps: a label names a pixel of the same component, whose own label may already be
    smaller. Stops when a pass changes nothing (about 6 passes for the world's shapes at 64 px).
    """
    n, h, w = mask.shape
    outside = float(h * w + 1)  # float32 labels: exact up to 2**24 pixels
    index = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(n, h, w)
    labels = torch.where(mask, index, outside)
    while True:
        updated = torch.where(mask, _min_pool3x3(labels, outside), outside)
        named = updated.view(n, -1).gather(1, (updated.view(n, -1).long() - 1).clamp(0, h * w - 1))
        updated = torch.where(mask, torch.minimum(updated, named.view(n, h, w)), outside)
        if torch.equal(updated, labels):
            return torch.where(mask, labels, 0.0).long()
        labels = updated


def _min_pool3x3(x: torch.Tensor, fill: float) -> torch.Tensor:
    """Minimum over each pixel's 3x3 neighbourhood of ``x`` ``[N, H, W]`` (separable, and on
    CPU several times faster than max_pool2d)."""
    p = F.pad(x, (1, 1, 0, 0), value=fill)
    rows = torch.minimum(torch.minimum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    p = F.pad(rows, (0, 0, 1, 1), value=fill)
    return torch.minimum(torch.minimum(p[:, :-2], p[:, 1:-1]), p[:, 2:])


class Moments(NamedTuple):
    """Step 3's measurements of each component, alpha-weighted, in pixels (tensors ``[m]`` float64,
    or one component's floats): centroid, mass (summed alpha), spread E[dx² + dy²], anisotropy
    E[dx²] / E[dy²], y-skew and the diagonals' kurtosis minus the axes'."""

    cx: Any
    cy: Any
    mass: Any
    spread: Any
    anisotropy: Any
    skew_y: Any
    kurtosis_gap: Any


def detect_objects(images: torch.Tensor) -> list[list[SceneObject]]:
    """The objects in each image of ``images`` ``[B, 3, H, W]``: shape (None if the component
    is no clean shape), colour (None if none of the palette's), centre and half-extent as
    fractions of the image side, like the scenes the world renders (steps 1-5 of the module doc)."""
    b, _, h, w = images.shape
    alpha, offset, directions = _colour_strength(images)
    foreground = alpha > FOREGROUND
    labels = _grown_components(foreground)
    inside = labels > 0
    keys, component = torch.unique((torch.arange(b).view(b, 1, 1) * (h * w + 1) + labels)[inside], return_inverse=True)
    m = len(keys)
    weight = alpha[inside].clamp(0.0, 1.0).double()
    moments = _moments(component, m, inside, weight)
    pixels = torch.bincount(component, foreground[inside].double(), minlength=m)
    tint = torch.zeros(m, 3, dtype=torch.float64).index_add_(
        0, component, weight[:, None] * offset.permute(0, 2, 3, 1)[inside].double()
    )
    cosine = F.normalize(tint, dim=1) @ F.normalize(directions.double(), dim=1).T  # [m, C]
    best_cosine, best_colour = cosine.max(dim=1)

    found: list[list[SceneObject]] = [[] for _ in range(b)]
    columns = (keys // (h * w + 1), pixels, best_cosine, best_colour, *moments)
    for image, n_pixels, cos, colour, *measured in zip(*(c.tolist() for c in columns), strict=True):
        if n_pixels < MIN_AREA * h * w:
            continue  # a speck of noise
        shape, x, y, r = _classify(Moments(*measured))
        found[image].append(SceneObject(shape, COLOURS[colour] if cos >= COLOUR_COSINE else None, x / w, y / h, r / w))
    return found


def _colour_strength(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 1: ``alpha`` ``[B, H, W]``, each pixel's strength along its strongest palette colour;
    the offsets ``p - bg`` ``[B, 3, H, W]``; the palette's directions ``[C, 3]``."""
    background = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    directions = torch.tensor([PALETTE[c] for c in COLOURS]) - background.view(1, 3)  # [C, 3]
    offset = images.clamp(0.0, 1.0) - background
    alpha = torch.einsum("bchw,kc->bkhw", offset, directions / directions.square().sum(1, keepdim=True)).amax(1)
    return alpha, offset, directions


def _grown_components(foreground: torch.Tensor) -> torch.Tensor:
    """Step 2: the labels of ``label_components`` ``[B, H, W]``, each component grown by one pixel
    so its soft edge is measured too (objects are >= 2 px apart)."""
    labels = label_components(foreground).float()
    return torch.where(labels > 0, labels, F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0]).long()


def _moments(component: torch.Tensor, m: int, inside: torch.Tensor, weight: torch.Tensor) -> Moments:
    """Step 3: the Moments ``[m]`` of the ``m`` components; ``component`` and ``weight`` (alpha) are
    those of the pixels ``inside`` ``[B, H, W]`` a component, in that mask's order."""
    b, h, w = inside.shape
    mass = torch.bincount(component, weight, minlength=m)

    def mean(values: torch.Tensor) -> torch.Tensor:  # alpha-weighted mean per component [m]
        return torch.bincount(component, weight * values, minlength=m) / mass

    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    xs, ys = xs.expand(b, h, w)[inside] + 0.5, ys.expand(b, h, w)[inside] + 0.5
    cx, cy = mean(xs), mean(ys)
    dx, dy = xs - cx[component], ys - cy[component]
    u, v = (dx + dy) / math.sqrt(2), (dx - dy) / math.sqrt(2)
    var = {name: mean(d.square()) for name, d in (("x", dx), ("y", dy), ("u", u), ("v", v))}
    kurtosis = {name: mean(d**4) / var[name].square() for name, d in (("x", dx), ("y", dy), ("u", u), ("v", v))}
    return Moments(
        cx=cx,
        cy=cy,
        mass=mass,
        spread=var["x"] + var["y"],
        anisotropy=var["x"] / var["y"],
        skew_y=mean(dy**3) / var["y"] ** 1.5,
        kurtosis_gap=(kurtosis["u"] + kurtosis["v"] - kurtosis["x"] - kurtosis["y"]) / 2,
    )


def _classify(c: Moments) -> tuple[str | None, float, float, float]:
    """Step 5 for one component: its shape (None when its mass or anisotropy does not fit the
    chosen shape's: a smear, two merged shapes), then its centre x, y and half-extent r in pixels."""
    if c.skew_y < TRIANGLE_SKEW:
        shape = "triangle"
    elif abs(c.kurtosis_gap) <= KURTOSIS_GAP:
        shape = "circle"
    else:
        shape = "square" if c.kurtosis_gap > 0 else "diamond"
    r = math.sqrt(c.spread / SPREAD[shape])  # pixels
    fits = abs(c.mass / (AREA[shape] * r * r) - 1.0) <= MASS_TOLERANCE
    fits &= 1 / MAX_ANISOTROPY <= c.anisotropy <= MAX_ANISOTROPY
    y = c.cy - r / 3 if shape == "triangle" else c.cy  # a triangle's centroid sits r/3 below its box centre
    return shape if fits else None, c.cx, y, r


class ShapesVerifier:
    """Scores images against shapes-world captions; see the module docstring."""

    name = "verifier"

    def __call__(self, batch: ImageBatch) -> RewardOutput:
        images = check_images(batch, self.name)
        captions = []
        for i, prompt in enumerate(batch.prompts):
            try:
                captions.append(parse_caption(prompt))
            except ValueError as exc:
                raise RewardError(f"{self.name}: prompt {i} of the batch: {exc}") from None
        found = detect_objects(images)
        fraction = torch.tensor(
            [
                sum(c.holds(objects) for c in caption.constraints) / len(caption.constraints)
                for caption, objects in zip(captions, found, strict=True)
            ],
            dtype=torch.float32,
        )
        return RewardOutput(
            fraction,
            {
                "correct": (fraction == 1.0).float(),
                "category": torch.tensor([CATEGORIES.index(c.category) for c in captions], dtype=torch.float32),
                "num_objects": torch.tensor([len(objects) for objects in found], dtype=torch.float32),
            },
        )


@register_reward
class VerifierSpec(RewardSpec):
    """Compositional verifier of the shapes world (GenEval-style): share of the caption's constraints met."""

    type: Literal["verifier"] = "verifier"

    def build(self) -> ShapesVerifier:
        return ShapesVerifier()


__all__ = ["ShapesVerifier", "VerifierSpec", "detect_objects", "label_components"]
