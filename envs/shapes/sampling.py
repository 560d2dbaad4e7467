"""Scenes that satisfy a caption, and (image, caption) pairs for pretraining.

Layout rules (all in fractions of the image side, so they hold at any resolution):
half-extents in ``SIZE_RANGE``, at least ``GAP`` between the boxes of two objects (the
verifier's connected components never merge), ``EDGE`` between a box and the border, at most
``MAX_OBJECTS`` objects. A position caption's two objects are placed clearly apart along the
named axis and within ``ALIGN`` of each other across it, so the image shows the named relation
and not a perpendicular one.

Under the zero_shot split, objects whose colour the caption leaves open never take a held-out
colour-shape pair, so pretraining images never show, say, a green triangle; under geneval every
colour is free. Distractors (optional) are objects of
shapes the caption does not name: they cannot change whether any of its constraints hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from envs.shapes.captions import (
    CATEGORIES,
    GENEVAL_MIX,
    HELD_OUT,
    Caption,
    heldout_prompts,
    parse_caption,
    pretraining_prompts,
    train_prompts,
)
from envs.shapes.scene import COLOURS, SHAPES, Scene, SceneObject, render

SIZE_RANGE = (0.13, 0.19)
GAP = 0.09
EDGE = 0.02
ALIGN = 0.04
MAX_OBJECTS = 4
_CANDIDATES = 64  # positions tried at once for each object
_ATTEMPTS = 200  # fresh sizes and positions for the whole scene before giving up


def _free_colour(shape: str, rng: np.random.Generator, benchmark: str = "zero_shot") -> str:
    allowed = [c for c in COLOURS if benchmark == "geneval" or ("colour_shape", c, shape) not in HELD_OUT]
    return allowed[rng.integers(len(allowed))]


def _free_position(size: float, placed: list[SceneObject], rng: np.random.Generator) -> tuple[float, float] | None:
    """A position for a box of half-extent ``size`` at least GAP from every placed box."""
    candidates = rng.uniform(size + EDGE, 1.0 - size - EDGE, size=(_CANDIDATES, 2))
    ok = np.ones(_CANDIDATES, dtype=bool)
    for o in placed:
        # boxes are apart when they are apart along x or along y
        apart = np.maximum(np.abs(candidates[:, 0] - o.x), np.abs(candidates[:, 1] - o.y)) - (size + o.size)
        ok &= apart >= GAP
    hits = np.flatnonzero(ok)
    return (float(candidates[hits[0], 0]), float(candidates[hits[0], 1])) if len(hits) else None


def _related_pair(
    a: tuple[str, str], b: tuple[str, str], relation: str, sizes: np.ndarray, rng: np.random.Generator
) -> list[SceneObject] | None:
    """Objects ``a`` and ``b`` with ``a`` clearly ``relation`` ``b``; None if this draw does not fit."""
    first, second = (a, b) if relation in ("left", "above") else (b, a)  # first is left of / above second
    r1, r2 = sizes
    main = np.sort(rng.uniform(max(r1, r2) + EDGE, 1.0 - max(r1, r2) - EDGE, size=(_CANDIDATES, 2)), axis=1)
    hits = np.flatnonzero(main[:, 1] - main[:, 0] >= r1 + r2 + GAP)
    if not len(hits):
        return None
    lo, hi = max(r1, r2) + EDGE, 1.0 - max(r1, r2) - EDGE
    across = rng.uniform(lo, hi)
    across2 = float(np.clip(across + rng.uniform(-ALIGN, ALIGN), lo, hi))
    (m1, m2), horizontal = main[hits[0]], relation in ("left", "right")
    p1, p2 = ((m1, across), (m2, across2)) if horizontal else ((across, m1), (across2, m2))
    return [
        SceneObject(first[0], first[1], float(p1[0]), float(p1[1]), float(r1)),
        SceneObject(second[0], second[1], float(p2[0]), float(p2[1]), float(r2)),
    ]


def sample_scene(
    caption: str | Caption, rng: np.random.Generator, max_distractors: int = 0, benchmark: str = "zero_shot"
) -> Scene:
    """A random scene that satisfies every constraint of ``caption``.

    It holds the named objects (``count`` of them for counting) plus 0 to ``max_distractors``
    objects of unnamed shapes (as room allows: at most MAX_OBJECTS in all); colours the caption
    leaves open are free under ``benchmark`` (see the module doc).
    """
    caption = parse_caption(caption) if isinstance(caption, str) else caption
    named = [(shape, colour or _free_colour(shape, rng, benchmark)) for shape, colour in caption.objects]
    named *= caption.count or 1
    others = [s for s in SHAPES if s not in {shape for shape, _ in caption.objects}]
    room = min(max_distractors, MAX_OBJECTS - len(named))
    extra_shapes = rng.choice(others, size=rng.integers(room + 1)) if room > 0 else []
    wanted = named + [(str(s), _free_colour(str(s), rng, benchmark)) for s in extra_shapes]
    for _ in range(_ATTEMPTS):
        sizes = rng.uniform(*SIZE_RANGE, size=len(wanted))
        placed: list[SceneObject] = []
        if caption.relation is not None:
            placed = _related_pair(wanted[0], wanted[1], caption.relation, sizes[:2], rng) or []
            if not placed:
                continue
        for (shape, colour), size in zip(wanted[len(placed) :], sizes[len(placed) :], strict=True):
            position = _free_position(float(size), placed, rng)
            if position is None:
                break
            placed.append(SceneObject(shape, colour, *position, float(size)))
        if len(placed) == len(wanted):
            scene = Scene(tuple(placed))
            if not all(c.holds(scene.objects) for c in caption.constraints):
                raise AssertionError(f"sample_scene drew a scene that does not show {caption.text!r}: {scene}")
            return scene
    raise RuntimeError(f"sample_scene: no layout for {caption.text!r} in {_ATTEMPTS} attempts (SIZE_RANGE too big?)")


@dataclass
class CaptionedImages:
    """``images``: float32 ``[N, 3, H, W]`` in [0, 1]; ``captions`` and ``scenes``: N of each."""

    images: torch.Tensor
    captions: list[str]
    scenes: list[Scene]

    def __len__(self) -> int:
        return len(self.captions)


SUBSETS = ("train", "heldout", "pretrain")


def category_weights(benchmark: str) -> dict[str, float]:
    """How often each category is drawn: GenEval's mix for geneval, uniform for zero_shot."""
    if benchmark == "geneval":
        total = sum(GENEVAL_MIX.values())
        return {c: GENEVAL_MIX[c] / total for c in CATEGORIES}
    return {c: 1.0 / len(CATEGORIES) for c in CATEGORIES}


def _pools(split: str, benchmark: str) -> dict[str, list[str]]:
    prompts_of = {"train": train_prompts, "heldout": heldout_prompts, "pretrain": pretraining_prompts}.get(split)
    if prompts_of is None:
        raise ValueError(f"split must be one of {', '.join(SUBSETS)}, got {split!r}")
    pools = {category: prompts_of(category, benchmark) for category in CATEGORIES}
    return {c: p for c, p in pools.items() if p}


def sample_captions(
    num: int, rng: np.random.Generator, split: str = "train", benchmark: str = "zero_shot"
) -> list[str]:
    """``num`` captions of ``split`` ("train", "heldout" or "pretrain") of the ``benchmark``
    split: a category (among those with captions in the split; GenEval's mix for geneval
    training and held-out prompts, uniform otherwise), then a caption of it uniformly."""
    pools = list(_pools(split, benchmark).items())
    if benchmark == "geneval" and split != "pretrain":
        p = np.array([category_weights(benchmark)[c] for c, _ in pools])
        picks = rng.choice(len(pools), size=num, p=p / p.sum())
    else:  # the zero_shot split's draws, unchanged since it was the only one
        picks = rng.integers(len(pools), size=num)
    return [pools[i][1][rng.integers(len(pools[i][1]))] for i in picks]


def evaluation_captions(num: int, rng: np.random.Generator, split: str, benchmark: str) -> list[str]:
    """A fixed evaluation list of ``num`` captions. geneval: stratified, each category's share
    of ``num`` exactly GenEval's (largest remainders), cycling through a shuffle of the
    category's captions (every string once before any twice); zero_shot: ``sample_captions``
    (as this split has always been evaluated)."""
    if benchmark != "geneval":
        return sample_captions(num, rng, split, benchmark)
    pools = _pools(split, benchmark)
    weights = category_weights(benchmark)
    share = np.array([weights[c] for c in pools]) / sum(weights[c] for c in pools) * num
    counts = np.floor(share).astype(int)
    counts[np.argsort(-(share - counts), kind="stable")[: num - counts.sum()]] += 1
    out: list[str] = []
    for pool, count in zip(pools.values(), counts, strict=True):
        order = [pool[i] for i in rng.permutation(len(pool))]
        out += [order[i % len(order)] for i in range(count)]
    return out


def sample_pairs(
    num: int,
    seed: int,
    split: str = "train",
    size: int = 32,
    max_distractors: int = 0,
    antialias: bool = True,
    benchmark: str = "zero_shot",
) -> CaptionedImages:
    """``num`` (image, caption) pairs; the same seed gives the same pairs. Pretraining data
    comes from ``split="pretrain"`` (zero_shot: the training captions; geneval: all)."""
    rng = np.random.default_rng(seed)
    captions = sample_captions(num, rng, split, benchmark)
    scenes = [sample_scene(c, rng, max_distractors, benchmark) for c in captions]
    return CaptionedImages(render(scenes, size, antialias), captions, scenes)


__all__ = [
    "ALIGN",
    "EDGE",
    "GAP",
    "MAX_OBJECTS",
    "SIZE_RANGE",
    "SUBSETS",
    "CaptionedImages",
    "category_weights",
    "evaluation_captions",
    "sample_captions",
    "sample_pairs",
    "sample_scene",
]
