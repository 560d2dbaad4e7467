"""Captions of the shapes world: GenEval's six categories, what each caption requires of an
image, and a fixed split into training and held-out captions.

| category | example | constraints (the image must contain ...) |
|---|---|---|
| single_object | a circle | a circle |
| two_object | a circle and a square | a circle; a square |
| counting | three triangles | a triangle; exactly three triangles |
| colors | a red circle | a circle; a red circle |
| position | a circle to the left of a square | a circle; a square; a circle left of a square |
| color_attr | a red circle and a blue square | a circle; a square; a red circle; a blue square |

As in GenEval, objects the caption does not name are allowed, and counting counts only the
named shape. The "exists" constraints before the attribute ones make the fraction of satisfied
constraints a dense reward (the right shape in the wrong colour earns half).

Two splits (``SPLITS``):

- ``geneval`` (the benchmark; GenEval-fair): pretraining sees every caption of the grammar, so
  every colour-shape pair, count and arrangement; RL trains on the ``training`` strings and
  evaluation asks for the held-out strings, which RL never prompts for: only the combinations
  (prompt strings) are new, as in Flow-GRPO's GenEval set-up. A fixed quarter of each of the six
  categories is held out (``GENEVAL_HELD_OUT_SHARE``, drawn once with ``GENEVAL_SPLIT_SEED``);
  prompts are drawn with GenEval's category mix (``GENEVAL_MIX``, its prompt counts).
- ``zero_shot`` (the earlier split, a separate test of pixel composition): some colour-shape
  pairs, count-shape pairs and spatial arrangements never occur in a pretraining or training
  caption (``HELD_OUT``); the held-out captions are exactly those that contain one. "a circle
  below a triangle" is the same arrangement as "a triangle above a circle", so both wordings
  are held out together. single_object and two_object name no colour, count or arrangement:
  all their captions are training captions. Categories are drawn uniformly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from itertools import permutations

import numpy as np

from envs.shapes.scene import COLOURS, SHAPES, SceneObject

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
RELATION_WORDS: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
SPLITS: tuple[str, ...] = ("geneval", "zero_shot")
# GenEval's prompts per category (553 in all): its evaluation mix, used for the geneval split's
# training and evaluation prompts.
GENEVAL_MIX: dict[str, int] = {
    "single_object": 80,
    "two_object": 99,
    "counting": 80,
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}
GENEVAL_HELD_OUT_SHARE = 0.25
GENEVAL_SPLIT_SEED = 21
# An object is "left of" another when its centre is further left by more than this
# (fraction of the image side); GenEval's position test also asks for a clear offset.
RELATION_MARGIN = 0.1

HELD_OUT: frozenset[tuple[str, ...]] = frozenset(
    {
        # one pair per colour and per shape: each colour keeps three training shapes and each
        # shape three training colours
        ("colour_shape", "green", "triangle"),
        ("colour_shape", "blue", "circle"),
        ("colour_shape", "yellow", "square"),
        ("colour_shape", "red", "diamond"),
        ("count_shape", "three", "triangle"),
        ("count_shape", "four", "circle"),
        ("count_shape", "two", "diamond"),
        # arrangements, written as (first shape, "left" or "above", second shape)
        ("position", "triangle", "above", "circle"),
        ("position", "square", "left", "diamond"),
        ("position", "circle", "above", "square"),
    }
)


@dataclass(frozen=True)
class Exists:
    """At least one object of ``shape`` (and of ``colour`` when given)."""

    shape: str
    colour: str | None = None

    def holds(self, objects: Sequence[SceneObject]) -> bool:
        return any(o.shape == self.shape and self.colour in (None, o.colour) for o in objects)


@dataclass(frozen=True)
class CountIs:
    """Exactly ``count`` objects of ``shape``."""

    shape: str
    count: int

    def holds(self, objects: Sequence[SceneObject]) -> bool:
        return sum(o.shape == self.shape for o in objects) == self.count


@dataclass(frozen=True)
class Related:
    """Some object of ``shape`` is ``relation`` (left, right, above, below) some object of ``other``."""

    shape: str
    relation: str
    other: str

    def holds(self, objects: Sequence[SceneObject]) -> bool:
        return any(
            relation_holds(a, b, self.relation)
            for a in objects
            if a.shape == self.shape
            for b in objects
            if b.shape == self.other and b is not a
        )


Constraint = Exists | CountIs | Related


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """``a`` is ``relation`` ``b`` (image coordinates: y grows downwards)."""
    offset = {"left": b.x - a.x, "right": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[relation]
    return offset > RELATION_MARGIN


@dataclass(frozen=True)
class Caption:
    """A caption and its meaning.

    ``objects``: the named objects in caption order as (shape, colour or None); a counting
    caption names its shape once and gives ``count``; a position caption relates
    ``objects[0]`` to ``objects[1]`` by ``relation``.
    """

    text: str
    category: str
    objects: tuple[tuple[str, str | None], ...]
    count: int | None = None
    relation: str | None = None

    @property
    def constraints(self) -> tuple[Constraint, ...]:
        present = tuple(Exists(shape) for shape, _ in self.objects)
        if self.count is not None:
            return (*present, CountIs(self.objects[0][0], self.count))
        if self.relation is not None:
            return (*present, Related(self.objects[0][0], self.relation, self.objects[1][0]))
        return (*present, *(Exists(shape, colour) for shape, colour in self.objects if colour is not None))

    @property
    def combinations(self) -> frozenset[tuple[str, ...]]:
        """The colour-shape pairs, count-shape pair and arrangement this caption names
        (the keys of ``HELD_OUT``)."""
        out = {("colour_shape", colour, shape) for shape, colour in self.objects if colour is not None}
        if self.count is not None:
            out.add(("count_shape", NUMBER_WORDS[self.count], self.objects[0][0]))
        if self.relation is not None:
            first, second = self.objects[0][0], self.objects[1][0]
            if self.relation in ("right", "below"):  # the same arrangement read from the other object
                first, second = second, first
            out.add(("position", first, "left" if self.relation in ("left", "right") else "above", second))
        return frozenset(out)

    @property
    def held_out(self) -> bool:
        return bool(self.combinations & HELD_OUT)


def _with_article(shape: str, colour: str | None = None) -> str:
    return f"a {colour} {shape}" if colour else f"a {shape}"


@cache
def _grammar() -> dict[str, Caption]:
    """Every caption of the grammar by its text, in a fixed order."""
    captions = [Caption(_with_article(s), "single_object", ((s, None),)) for s in SHAPES]
    captions += [
        Caption(f"{_with_article(a)} and {_with_article(b)}", "two_object", ((a, None), (b, None)))
        for a, b in permutations(SHAPES, 2)
    ]
    captions += [
        Caption(f"{word} {s}s", "counting", ((s, None),), count=n) for n, word in NUMBER_WORDS.items() for s in SHAPES
    ]
    captions += [Caption(_with_article(s, c), "colors", ((s, c),)) for c in COLOURS for s in SHAPES]
    captions += [
        Caption(f"{_with_article(a)} {words} {_with_article(b)}", "position", ((a, None), (b, None)), relation=rel)
        for a, b in permutations(SHAPES, 2)
        for rel, words in RELATION_WORDS.items()
    ]
    captions += [
        Caption(f"{_with_article(a, ca)} and {_with_article(b, cb)}", "color_attr", ((a, ca), (b, cb)))
        for a, b in permutations(SHAPES, 2)
        for ca, cb in permutations(COLOURS, 2)
    ]
    return {c.text: c for c in captions}


def parse_caption(text: str) -> Caption:
    """The Caption of ``text``; ValueError when it is not a caption of the shapes grammar."""
    caption = _grammar().get(" ".join(text.lower().split()))
    if caption is None:
        raise ValueError(
            f"{text!r} is not a caption of the shapes world (e.g. 'a red circle', 'three squares', "
            "'a circle to the left of a square'; all_captions() lists them)"
        )
    return caption


def _check(category: str | None, benchmark: str) -> None:
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"unknown caption category {category!r}; one of {', '.join(CATEGORIES)}")
    if benchmark not in SPLITS:
        raise ValueError(f"unknown benchmark split {benchmark!r}; one of {', '.join(SPLITS)}")


@cache
def geneval_held_out() -> frozenset[str]:
    """The geneval split's held-out strings: a fixed ``GENEVAL_HELD_OUT_SHARE`` of every
    category's captions (at least one), drawn once from ``GENEVAL_SPLIT_SEED``."""
    rng = np.random.default_rng(GENEVAL_SPLIT_SEED)
    out: set[str] = set()
    for category in CATEGORIES:
        texts = [t for t, c in _grammar().items() if c.category == category]
        take = max(1, round(GENEVAL_HELD_OUT_SHARE * len(texts)))
        out.update(texts[i] for i in rng.permutation(len(texts))[:take])
    return frozenset(out)


def is_held_out(text: str, benchmark: str = "zero_shot") -> bool:
    """Whether the caption ``text`` is one of ``benchmark``'s held-out captions."""
    _check(None, benchmark)
    return text in geneval_held_out() if benchmark == "geneval" else _grammar()[text].held_out


def _select(category: str | None, held_out: bool | None, benchmark: str = "zero_shot") -> list[str]:
    _check(category, benchmark)
    return [
        text
        for text, c in _grammar().items()
        if category in (None, c.category) and held_out in (None, is_held_out(text, benchmark))
    ]


def all_captions(category: str | None = None) -> list[str]:
    """Every caption of the grammar (of one category), in a fixed order."""
    return _select(category, None)


def train_prompts(category: str | None = None, benchmark: str = "zero_shot") -> list[str]:
    """The captions RL trains on: those of ``benchmark`` without a held-out string (zero_shot:
    without a held-out combination; pretraining uses only these there)."""
    return _select(category, False, benchmark)


def heldout_prompts(category: str | None = None, benchmark: str = "zero_shot") -> list[str]:
    """``benchmark``'s held-out captions (zero_shot: none for single_object and two_object)."""
    return _select(category, True, benchmark)


def pretraining_prompts(category: str | None = None, benchmark: str = "zero_shot") -> list[str]:
    """The captions pretraining draws from: every caption for geneval (the base model sees
    every combination; only RL never prompts for the held-out strings), the training captions
    for zero_shot."""
    return all_captions(category) if benchmark == "geneval" else train_prompts(category, benchmark)


__all__ = [
    "CATEGORIES",
    "GENEVAL_HELD_OUT_SHARE",
    "GENEVAL_MIX",
    "GENEVAL_SPLIT_SEED",
    "HELD_OUT",
    "NUMBER_WORDS",
    "RELATION_MARGIN",
    "RELATION_WORDS",
    "SPLITS",
    "Caption",
    "Constraint",
    "CountIs",
    "Exists",
    "Related",
    "all_captions",
    "geneval_held_out",
    "heldout_prompts",
    "is_held_out",
    "parse_caption",
    "pretraining_prompts",
    "relation_holds",
    "train_prompts",
]
