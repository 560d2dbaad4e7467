"""The pixel world of "shapes": a palette, scenes of flat shapes, and a batched renderer.

Coordinates are fractions of the image side, so one scene renders at any resolution: x grows
to the right, y grows downwards, (0, 0) is the top-left corner. An object's ``size`` is its
half-extent: every shape fills the square box ``[x - size, x + size] x [y - size, y + size]``
(the circle is inscribed in it, the triangle points up with its base on the box's bottom edge,
the diamond touches the middle of each side), so the box centre is the object's position for
every shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Dark grey, not black: noise around the background then stays inside [0, 1].
BACKGROUND = (0.1, 0.1, 0.1)
# Each colour is the background plus a saturated direction; the verifier classifies by that
# direction, which a blend with the background (blurred edges) does not change. The closest
# pair of directions (yellow against red or green) is 45 degrees apart.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.1),
    "blue": (0.1, 0.1, 0.9),
    "yellow": (0.9, 0.9, 0.1),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")


@dataclass(frozen=True)
class SceneObject:
    """One flat shape. ``x``, ``y``: box centre; ``size``: half-extent (fractions of the side).
    A detected object (``flowrl.rewards.verifier``) has shape None when it is no clean shape
    and colour None when its colour is none of the palette's."""

    shape: str | None
    colour: str | None
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class Scene:
    """The objects of one image, drawn on the plain background; they never overlap."""

    objects: tuple[SceneObject, ...]


def render(scenes: Sequence[Scene], size: int = 32, antialias: bool = True, chunk: int = 256) -> torch.Tensor:
    """Images of ``scenes``: float32 ``[B, 3, size, size]`` in [0, 1].

    ``antialias``: a pixel's coverage is ``clamp(0.5 - d, 0, 1)`` with ``d`` the signed distance
    (in pixels) from its centre to the shape's outline, a cheap stand-in for the box-filtered
    coverage; edge pixels are blends with the background. Without it a pixel belongs to a shape
    when its centre is inside. Vectorised over scenes and objects, ``chunk`` scenes at a time.
    """
    if size < 8:
        raise ValueError(f"render: need size >= 8, got {size}")
    images = torch.empty(len(scenes), 3, size, size)
    for start in range(0, len(scenes), chunk):
        images[start : start + chunk] = _render_chunk(scenes[start : start + chunk], size, antialias)
    return images


def _render_chunk(scenes: Sequence[Scene], size: int, antialias: bool) -> torch.Tensor:
    objects = [(b, obj) for b, scene in enumerate(scenes) for obj in scene.objects]
    owner = torch.tensor([b for b, _ in objects], dtype=torch.long)
    shape_id = torch.tensor([SHAPES.index(o.shape) for _, o in objects], dtype=torch.long)
    geometry = torch.tensor([(o.x, o.y, o.size) for _, o in objects], dtype=torch.float32).view(-1, 3) * size
    background = torch.tensor(BACKGROUND)
    tint = torch.tensor([PALETTE[o.colour] for _, o in objects], dtype=torch.float32).view(-1, 3) - background
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    coverage = torch.empty(len(objects), size, size)
    for i, name in enumerate(SHAPES):
        rows = (shape_id == i).nonzero().flatten()
        geo = geometry[rows]
        dx = (centres.view(1, 1, size) - geo[:, 0, None, None]).abs()  # [N, 1, size], pixel units
        dy = centres.view(1, size, 1) - geo[:, 1, None, None]  # [N, size, 1]
        distance = _signed_distance(name, dx, dy, geo[:, 2, None, None])
        coverage[rows] = (0.5 - distance).clamp(0.0, 1.0) if antialias else (distance <= 0).float()
    # objects never overlap, so a pixel blends the background with at most one object's colour
    images = background.view(1, 3, 1, 1).expand(len(scenes), 3, size, size).clone()
    for c in range(3):
        images[:, c].index_add_(0, owner, coverage * tint[:, c, None, None])
    return images.clamp_(0.0, 1.0)


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance to the outline (negative inside): exact for the circle, the largest
    distance to an edge's line otherwise. ``dx = |x - cx|``, ``dy = y - cy``, half-extent ``r``."""
    if shape == "circle":
        return (dx.square() + dy.square()).sqrt() - r
    if shape == "square":
        return torch.maximum(dx, dy.abs()) - r
    if shape == "triangle":
        # sides through the apex (0, -r) and the base corners (+-r, r): unit normal (2, -1) / sqrt(5)
        return torch.maximum((2 * dx - dy - r) / 5**0.5, dy - r)
    return (dx + dy.abs() - r) / 2**0.5  # diamond


__all__ = ["BACKGROUND", "COLOURS", "PALETTE", "SHAPES", "Scene", "SceneObject", "render"]
