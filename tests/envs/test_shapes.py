"""Tests of the shapes world: renderer, captions and split, scene sampler, tokenizer.

Oracles: matplotlib's point-in-polygon test and the circle's equation evaluated pixel by pixel
in plain Python; each shape's area (pi r^2, 4 r^2, 2 r^2) for the anti-aliased coverage; the
layout rules re-checked from the scenes' numbers; hand-listed captions and held-out pairs.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch
from matplotlib.path import Path

from envs.shapes import (
    BACKGROUND,
    CATEGORIES,
    COLOURS,
    HELD_OUT,
    MAX_TOKENS,
    PALETTE,
    SHAPES,
    Scene,
    SceneObject,
    Tokenizer,
    all_captions,
    heldout_prompts,
    parse_caption,
    render,
    sample_pairs,
    sample_scene,
    train_prompts,
)
from envs.shapes.sampling import ALIGN, EDGE, GAP, MAX_OBJECTS, SIZE_RANGE


def _outline(shape: str, x: float, y: float, r: float) -> Path:
    """The shape as a matplotlib path, in pixel units."""
    corners = {
        "square": [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)],
        "triangle": [(x, y - r), (x + r, y + r), (x - r, y + r)],
        "diamond": [(x, y - r), (x + r, y), (x, y + r), (x - r, y)],
    }[shape]
    return Path(corners + [corners[0]], closed=True)


def _oracle_mask(obj: SceneObject, size: int) -> np.ndarray:
    x, y, r = obj.x * size, obj.y * size, obj.size * size
    centres = [(j + 0.5, i + 0.5) for i in range(size) for j in range(size)]
    if obj.shape == "circle":
        inside = [math.hypot(px - x, py - y) <= r for px, py in centres]
    else:
        inside = _outline(obj.shape, x, y, r).contains_points(centres)
    return np.array(inside).reshape(size, size)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_hard_render_matches_point_in_shape(shape, size):
    rng = np.random.default_rng(SHAPES.index(shape))
    objects = [SceneObject(shape, COLOURS[i], *rng.uniform(0.25, 0.75, 2), rng.uniform(*SIZE_RANGE)) for i in range(3)]
    images = render([Scene((o,)) for o in objects], size, antialias=False)
    for obj, image in zip(objects, images, strict=True):
        mask = _oracle_mask(obj, size)
        expected = np.where(
            mask[None], np.array(PALETTE[obj.colour])[:, None, None], np.array(BACKGROUND)[:, None, None]
        )
        np.testing.assert_allclose(image.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_antialiased_coverage_adds_up_to_the_area(shape):
    """Sum of coverage = the shape's area in pixels; interior pixels are the pure colour."""
    r, size = 0.17, 64
    obj = SceneObject(shape, "blue", 0.5 + 0.013, 0.5 - 0.007, r)
    image = render([Scene((obj,))], size)[0]
    tint = torch.tensor(PALETTE["blue"]) - torch.tensor(BACKGROUND)
    coverage = (image - torch.tensor(BACKGROUND).view(3, 1, 1))[2] / tint[2]
    area = {"circle": math.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}[shape] * (r * size) ** 2
    assert coverage.sum().item() == pytest.approx(area, rel=0.02)
    assert ((coverage > 0.001) & (coverage < 0.999)).any(), "edges should be blends"
    hard = torch.from_numpy(_oracle_mask(obj, size))
    eroded = -torch.nn.functional.max_pool2d(-hard[None, None].float(), 3, 1, 1)[0, 0] > 0.5
    assert torch.allclose(coverage[eroded], torch.ones(()), atol=1e-6)
    assert coverage[~hard].max() < 0.5 + 1e-6 and coverage[hard].min() >= 0.5 - 1e-6


def test_render_batches_scenes_of_different_lengths():
    scenes = [
        Scene(()),
        Scene((SceneObject("circle", "red", 0.3, 0.3, 0.15),)),
        Scene(
            tuple(
                SceneObject(s, c, x, y, 0.14)
                for s, c, (x, y) in zip(
                    SHAPES, COLOURS, [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)], strict=True
                )
            )
        ),
    ]
    images = render(scenes, 32, chunk=2)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(images[0], torch.tensor(BACKGROUND).view(3, 1, 1).expand(3, 32, 32))
    for obj in scenes[2].objects:  # each object's centre pixel holds its own colour
        pixel = images[2, :, int(obj.y * 32), int(obj.x * 32)]
        assert torch.allclose(pixel, torch.tensor(PALETTE[obj.colour]))
    assert torch.equal(render(scenes[1:2], 32)[0], images[1])


# --------------------------------------------------------------------------------------------
# captions and the split
# --------------------------------------------------------------------------------------------


def test_grammar_has_every_category_with_the_expected_captions():
    counts = {c: len(all_captions(c)) for c in CATEGORIES}
    # shapes S=4, colours C=4, numbers 3, relations 4; ordered pairs of distinct shapes/colours
    assert counts == {
        "single_object": 4,
        "two_object": 4 * 3,
        "counting": 3 * 4,
        "colors": 4 * 4,
        "position": 4 * 3 * 4,
        "color_attr": (4 * 3) * (4 * 3),
    }
    examples = {
        "a circle": "single_object",
        "a circle and a square": "two_object",
        "three triangles": "counting",
        "a red circle": "colors",
        "a circle to the left of a square": "position",
        "a square above a triangle": "position",
        "a red circle and a blue square": "color_attr",
    }
    for text, category in examples.items():
        assert parse_caption(text).category == category


def test_split_is_fixed_disjoint_and_held_out_by_combination():
    train, heldout = train_prompts(), heldout_prompts()
    assert train == train_prompts() and heldout == heldout_prompts()  # deterministic order
    assert not set(train) & set(heldout) and sorted(train + heldout) == sorted(all_captions())
    for text in heldout:
        assert parse_caption(text).combinations & HELD_OUT, text
    for text in train:
        assert not parse_caption(text).combinations & HELD_OUT, text
    # hand-picked members: both wordings of a held-out arrangement are held out
    for text in ("a green triangle", "a triangle above a circle", "a circle below a triangle", "three triangles"):
        assert text in heldout
    for text in ("a red circle", "a triangle below a circle", "two triangles", "a circle and a triangle"):
        assert text in train
    assert heldout_prompts("single_object") == [] and heldout_prompts("two_object") == []
    for category in ("counting", "colors", "position", "color_attr"):
        assert heldout_prompts(category) and train_prompts(category)
    # every held-out combination is evaluated, and training still sees every word
    assert set().union(*(parse_caption(t).combinations for t in heldout)) >= HELD_OUT
    assert {w for t in train for w in t.split()} == {w for t in all_captions() for w in t.split()}


def test_caption_constraints():
    c = parse_caption("a red circle and a blue square")
    objects = [SceneObject("circle", "red", 0.2, 0.2, 0.1), SceneObject("square", "green", 0.7, 0.7, 0.1)]
    assert [k.holds(objects) for k in c.constraints] == [True, True, True, False]
    c = parse_caption("three squares")
    squares = [SceneObject("square", "red", 0.2 * i, 0.5, 0.05) for i in range(1, 4)]
    assert all(k.holds(squares + [SceneObject("circle", "red", 0.9, 0.9, 0.05)]) for k in c.constraints)
    assert [k.holds(squares[:2]) for k in c.constraints] == [True, False]
    c = parse_caption("a circle above a square")
    above = [SceneObject("circle", "red", 0.5, 0.2, 0.1), SceneObject("square", "red", 0.5, 0.6, 0.1)]
    assert all(k.holds(above) for k in c.constraints)
    flipped = [SceneObject("circle", "red", 0.5, 0.6, 0.1), SceneObject("square", "red", 0.5, 0.2, 0.1)]
    assert not c.constraints[-1].holds(flipped)
    with pytest.raises(ValueError, match="not a caption of the shapes world"):
        parse_caption("a purple circle")


# --------------------------------------------------------------------------------------------
# the sampler
# --------------------------------------------------------------------------------------------


def _check_layout(scene: Scene) -> None:
    assert 1 <= len(scene.objects) <= MAX_OBJECTS
    for o in scene.objects:
        assert SIZE_RANGE[0] <= o.size <= SIZE_RANGE[1]
        assert EDGE - 1e-9 <= o.x - o.size and o.x + o.size <= 1 - EDGE + 1e-9
        assert EDGE - 1e-9 <= o.y - o.size and o.y + o.size <= 1 - EDGE + 1e-9
    for a, b in combinations(scene.objects, 2):
        gap = max(abs(a.x - b.x), abs(a.y - b.y)) - a.size - b.size
        assert gap >= GAP - 1e-9


def _of(scene: Scene, shape: str, colour: str | None = None) -> list[SceneObject]:
    return [o for o in scene.objects if o.shape == shape and colour in (None, o.colour)]


@pytest.mark.parametrize("distractors", [0, 3])
def test_sampled_scenes_show_their_caption(distractors):
    rng = np.random.default_rng(distractors)
    for text in all_captions():
        c = parse_caption(text)
        named = {s for s, _ in c.objects}
        for _ in range(3):
            scene = sample_scene(text, rng, max_distractors=distractors)
            _check_layout(scene)
            words = text.split()
            if c.category == "counting":
                shape = words[1][:-1]
                assert len(_of(scene, shape)) == {"two": 2, "three": 3, "four": 4}[words[0]]
            elif c.category == "position":
                a, b = _of(scene, words[1])[0], _of(scene, words[-1])[0]
                dx, dy = b.x - a.x, b.y - a.y  # from a to b
                main, across = {
                    "left": (dx, dy),
                    "right": (-dx, dy),
                    "above": (dy, dx),
                    "below": (-dy, dx),
                }[words[4] if words[2] == "to" else words[2]]
                assert main > 0.3 and abs(across) <= ALIGN + 1e-9
            for shape, colour in c.objects:
                assert _of(scene, shape, colour)
            others = [o for o in scene.objects if o.shape not in named]
            assert len(others) <= distractors
            if distractors == 0:
                assert len(scene.objects) == (c.count or len(c.objects))


def test_training_images_never_show_a_held_out_colour_shape_pair():
    data = sample_pairs(600, seed=3, max_distractors=3)
    assert set(data.captions) <= set(train_prompts())
    assert {parse_caption(c).category for c in data.captions} == set(CATEGORIES)
    shown = {("colour_shape", o.colour, o.shape) for s in data.scenes for o in s.objects}
    assert not shown & HELD_OUT
    assert data.images.shape == (600, 3, 32, 32)
    assert torch.equal(data.images, render(data.scenes, 32))


def test_sample_pairs_is_deterministic_and_covers_held_out_split():
    a, b, c = sample_pairs(50, seed=7), sample_pairs(50, seed=7), sample_pairs(50, seed=8)
    assert a.captions == b.captions and a.scenes == b.scenes and torch.equal(a.images, b.images)
    assert a.scenes != c.scenes
    held = sample_pairs(200, seed=1, split="heldout", size=64)
    assert set(held.captions) <= set(heldout_prompts()) and held.images.shape[-1] == 64
    with pytest.raises(ValueError, match="split must be"):
        sample_pairs(2, seed=0, split="test")


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_every_caption():
    tok = Tokenizer()
    captions = all_captions()
    ids, mask = tok.encode(captions)
    assert ids.shape == (len(captions), MAX_TOKENS) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert tok.decode(ids) == captions
    assert mask.sum(1).tolist() == [len(c.split()) for c in captions]
    assert (ids[~mask] == 0).all() and (ids[mask] > 0).all() and ids.max() < tok.vocab_size
    one, one_mask = tok.encode(["a red circle"])
    assert one[0, :3].tolist() == [tok.ids["a"], tok.ids["red"], tok.ids["circle"]] and one_mask[0].tolist()[:4] == [
        True,
        True,
        True,
        False,
    ]


def test_tokenizer_errors_name_the_problem():
    tok = Tokenizer()
    with pytest.raises(ValueError, match="unknown word 'purple' in prompt 'a purple circle'"):
        tok.encode(["a circle", "a purple circle"])
    with pytest.raises(ValueError, match="unknown word '<pad>'"):
        tok.encode(["a <pad>"])
    with pytest.raises(ValueError, match="has 9 words; the tokenizer takes 8"):
        tok.encode(["a circle to the left of a red square"])


# ---------------------------------------------------------------- the geneval (fair) split
def test_geneval_split_holds_out_strings_of_every_category_never_trained_on():
    from envs.shapes import GENEVAL_MIX, sample_captions

    train, heldout = train_prompts(benchmark="geneval"), heldout_prompts(benchmark="geneval")
    assert not set(train) & set(heldout) and sorted(train + heldout) == sorted(all_captions())
    assert list(GENEVAL_MIX) == list(CATEGORIES)
    for category in CATEGORIES:  # GenEval's six categories, a quarter of each held out
        n = len(all_captions(category))
        assert len(heldout_prompts(category, "geneval")) == max(1, round(n / 4)), category
    # what RL draws (many iterations' worth) never holds a held-out string
    drawn = sample_captions(5000, np.random.default_rng(0), "train", "geneval")
    assert not set(drawn) & set(heldout) and set(drawn) == set(train)
    with pytest.raises(ValueError, match="unknown benchmark split 'fair'"):
        train_prompts(benchmark="fair")


def test_every_geneval_held_out_caption_is_shown_in_pretraining_data():
    """Every held-out caption's pixels (its colour-shape pairs, its count, its arrangement, all
    at once) are in some pretraining scene; under zero_shot no pretraining scene shows a
    held-out colour-shape pair (the oracle: each caption's constraints checked on the scene's
    objects)."""
    from envs.shapes import sample_captions

    rng = np.random.default_rng(5)
    scenes = {}
    for benchmark in ("geneval", "zero_shot"):
        captions = sample_captions(4000, rng, "pretrain", benchmark)
        scenes[benchmark] = [sample_scene(c, rng, benchmark=benchmark) for c in captions]
    for text in heldout_prompts(benchmark="geneval"):
        constraints = parse_caption(text).constraints
        assert any(all(c.holds(s.objects) for c in constraints) for s in scenes["geneval"]), text
    pairs = {(o.colour, o.shape) for s in scenes["geneval"] for o in s.objects}
    assert pairs == {(c, s) for c in COLOURS for s in SHAPES}
    held = {(k[1], k[2]) for k in HELD_OUT if k[0] == "colour_shape"}
    assert not held & {(o.colour, o.shape) for s in scenes["zero_shot"] for o in s.objects}
