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

Split: some colour-shape pairs, count-shape pairs and spatial arrangements never occur in a
training caption (``HELD_OUT``); the held-out captions are exactly those that contain one.
"a circle below a triangle" is the same arrangement as "a triangle above a circle", so both
wordings are held out together. single_object and two_object name no colour, count or
arrangement: all their captions are training captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from itertools import permutations

from envs.shapes.scene import COLOURS, SHAPES, SceneObject

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
RELATION_WORDS: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
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


def _select(category: str | None, held_out: bool | None) -> list[str]:
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"unknown caption category {category!r}; one of {', '.join(CATEGORIES)}")
    return [text for text, c in _grammar().items() if category in (None, c.category) and held_out in (None, c.held_out)]


def all_captions(category: str | None = None) -> list[str]:
    """Every caption of the grammar (of one category), in a fixed order."""
    return _select(category, None)


def train_prompts(category: str | None = None) -> list[str]:
    """Captions without a held-out combination: pretraining and RL training use only these."""
    return _select(category, False)


def heldout_prompts(category: str | None = None) -> list[str]:
    """Captions with at least one held-out combination (none for single_object and two_object)."""
    return _select(category, True)


__all__ = [
    "CATEGORIES",
    "HELD_OUT",
    "NUMBER_WORDS",
    "RELATION_MARGIN",
    "RELATION_WORDS",
    "Caption",
    "Constraint",
    "CountIs",
    "Exists",
    "Related",
    "all_captions",
    "heldout_prompts",
    "parse_caption",
    "relation_holds",
    "train_prompts",
]
