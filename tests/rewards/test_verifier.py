"""Tests of the shapes verifier.

Oracles: the scenes that generated the images (shape, colour, position of every object), a
breadth-first flood fill for the connected components, and captions altered by hand so that
exactly one known constraint is false (a colour, a count, a relation, a colour binding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from envs.shapes import CATEGORIES, Scene, SceneObject, all_captions, parse_caption, render, sample_pairs, sample_scene
from flowrl.rewards import ImageBatch, RewardError
from flowrl.rewards.verifier import ShapesVerifier, detect_objects, label_components

VERIFIER = ShapesVerifier()


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (5 taps, edges replicated)."""
    taps = torch.exp(-(torch.arange(-2.0, 3.0) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    x = F.conv2d(F.pad(images, (2, 2, 0, 0), mode="replicate"), taps.view(1, 1, 1, 5).expand(3, 1, 1, 5), groups=3)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), taps.view(1, 1, 5, 1).expand(3, 1, 5, 1), groups=3)


def _score(images: torch.Tensor, captions: list[str]):
    return VERIFIER(ImageBatch(images, captions))


def test_accuracy_on_rendered_scenes_of_every_category():
    n = 0
    for split, seed in (("train", 0), ("heldout", 1)):
        data = sample_pairs(600, seed=seed, split=split, max_distractors=2)
        out = _score(data.images, data.captions)
        categories = {CATEGORIES[int(i)] for i in out.details["category"]}
        assert categories == (set(CATEGORIES) if split == "train" else set(CATEGORIES[2:]))
        assert out.details["correct"].mean().item() >= 0.99, [
            c for c, ok in zip(data.captions, out.details["correct"], strict=True) if not ok
        ]
        assert torch.equal(out.scores == 1.0, out.details["correct"] == 1.0)
        assert torch.equal(out.details["num_objects"], torch.tensor([float(len(s.objects)) for s in data.scenes]))
        n += len(data)
    assert n >= 1000


def test_accuracy_at_64_pixels_and_on_hard_edges():
    data = sample_pairs(200, seed=2, size=64, max_distractors=2)
    assert _score(data.images, data.captions).details["correct"].mean().item() >= 0.99
    hard = render(data.scenes, 32, antialias=False)
    assert _score(hard, data.captions).details["correct"].mean().item() >= 0.97


@pytest.mark.parametrize(("sigma", "noise"), [(0.5, 0.03), (0.7, 0.05)])
def test_robust_to_blur_and_noise(sigma, noise):
    data = sample_pairs(400, seed=4, max_distractors=2)
    torch.manual_seed(0)
    images = (_blur(data.images, sigma) + noise * torch.randn_like(data.images)).clamp(0, 1)
    assert _score(images, data.captions).details["correct"].mean().item() >= 0.98


def test_detected_objects_match_the_scene():
    data = sample_pairs(200, seed=5, max_distractors=3)
    for scene, found in zip(data.scenes, detect_objects(data.images), strict=True):
        assert len(found) == len(scene.objects)
        for obj in scene.objects:
            nearest = min(found, key=lambda f: (f.x - obj.x) ** 2 + (f.y - obj.y) ** 2)
            assert (nearest.shape, nearest.colour) == (obj.shape, obj.colour)
            assert abs(nearest.x - obj.x) * 32 < 0.5 and abs(nearest.y - obj.y) * 32 < 0.5
            assert abs(nearest.size - obj.size) * 32 < 0.6


def _wrong_captions(text: str) -> list[str]:
    """Captions that differ from ``text`` in one constraint that the scene cannot satisfy."""
    c = parse_caption(text)
    words = text.split()
    if c.category == "colors":
        return [f"a {colour} {words[2]}" for colour in ("red", "green", "blue", "yellow") if colour != words[1]]
    if c.category == "counting":
        return [f"{n} {words[1]}" for n in ("two", "three", "four") if n != words[0]]
    if c.category == "position":
        relation = words[4] if words[2] == "to" else words[2]
        swapped = {"left": "to the right of", "right": "to the left of", "above": "below", "below": "above"}[relation]
        across = ("above", "below") if relation in ("left", "right") else ("to the left of", "to the right of")
        return [f"a {words[1]} {r} a {words[-1]}" for r in (swapped, *across)]
    if c.category == "color_attr":  # the colours swapped between the two objects
        return [f"a {words[5]} {words[2]} and a {words[1]} {words[6]}"]
    return []


def test_mismatched_captions_are_wrong():
    rng = np.random.default_rng(6)
    pairs = []
    for text in all_captions():
        for wrong in _wrong_captions(text):
            pairs.append((sample_scene(text, rng), wrong))
    images = render([scene for scene, _ in pairs], 32)
    out = _score(images, [wrong for _, wrong in pairs])
    kinds = {parse_caption(wrong).category for _, wrong in pairs}
    assert kinds == {"colors", "counting", "position", "color_attr"} and len(pairs) > 300
    assert out.details["correct"].sum().item() == 0
    # the dense score: the shapes are right, the attribute/count/relation is not
    expected = {"colors": 0.5, "counting": 0.5, "position": 2 / 3, "color_attr": 0.5}
    for (_, wrong), score in zip(pairs, out.scores.tolist(), strict=True):
        assert score == pytest.approx(expected[parse_caption(wrong).category]), wrong


def test_missing_objects_and_empty_images_score_by_constraint():
    red_circle = Scene((SceneObject("circle", "red", 0.3, 0.3, 0.15),))
    images = render([red_circle] * 4 + [Scene(())], 32)
    captions = ["a circle and a square", "a square", "a red circle and a blue square", "two circles", "a circle"]
    out = _score(images, captions)
    assert out.scores.tolist() == pytest.approx([0.5, 0.0, 0.5, 0.5, 0.0])
    assert out.details["correct"].tolist() == [0.0] * 5
    assert out.details["num_objects"].tolist() == [1, 1, 1, 1, 0]


def test_specks_are_ignored_and_off_palette_colours_are_uncoloured():
    scene = Scene((SceneObject("square", "green", 0.3, 0.3, 0.15), SceneObject("circle", "blue", 0.7, 0.7, 0.15)))
    image = render([scene], 32)
    specks = image.clone()
    specks[0, :, 2, 28] = 1.0  # two isolated bright pixels, far from the shapes
    specks[0, :, 29, 3] = torch.tensor([0.9, 0.1, 0.1])
    white = image.clone()
    circle = (image[0] - image[0, :, 0:1, 0:1]).abs().sum(0) > 0.1
    circle[:16] = False
    white[0][:, circle] = 1.0  # the circle painted white: a shape, but no palette colour
    out = _score(torch.cat([specks, white]), ["a green square and a blue circle"] * 2)
    assert out.details["correct"].tolist() == [1.0, 0.0]
    assert out.details["num_objects"].tolist() == [2.0, 2.0]
    found = detect_objects(white)[0]
    assert sorted((o.shape, o.colour) for o in found) == [("circle", None), ("square", "green")]


def test_smears_are_no_shape():
    image = render([Scene(())], 32)
    image[0, 0, 10:13, 2:30] = 0.9  # a long thin red bar
    found = detect_objects(image)[0]
    assert len(found) == 1 and found[0].shape is None and found[0].colour == "red"
    assert _score(image, ["a red square"]).scores.item() == 0.0


def _flood_fill_components(mask: np.ndarray) -> list[set[tuple[int, int]]]:
    seen, components = set(), []
    for start in zip(*np.nonzero(mask), strict=True):
        if start in seen:
            continue
        todo, component = [start], set()
        seen.add(start)
        while todo:
            y, x = todo.pop()
            component.add((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    n = (y + dy, x + dx)
                    if 0 <= n[0] < mask.shape[0] and 0 <= n[1] < mask.shape[1] and mask[n] and n not in seen:
                        seen.add(n)
                        todo.append(n)
        components.append(component)
    return components


def test_label_components_matches_a_flood_fill():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 17, 23, generator=generator) < torch.tensor([0.1, 0.3, 0.45, 0.55, 0.7, 0.0]).view(6, 1, 1)
    labels = label_components(masks)
    for mask, label in zip(masks.numpy(), labels.numpy(), strict=True):
        expected = {frozenset(c) for c in _flood_fill_components(mask)}
        got = {frozenset(zip(*np.nonzero(label == v), strict=True)) for v in np.unique(label) if v}
        assert got == expected
        for component in expected:  # label = 1 + the smallest flat index in the component
            assert {label[p] for p in component} == {1 + min(y * mask.shape[1] + x for y, x in component)}
    assert (labels[~masks] == 0).all()


def test_bad_inputs_are_reward_errors_naming_the_sample():
    data = sample_pairs(3, seed=0)
    images = data.images.clone()
    images[2, 1, 5, 5] = float("nan")
    with pytest.raises(RewardError, match="verifier: image 2 of the batch has non-finite pixels"):
        _score(images, data.captions)
    with pytest.raises(RewardError, match="verifier: prompt 1 of the batch: 'a purple circle' is not a caption"):
        _score(data.images, [data.captions[0], "a purple circle", data.captions[2]])
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        ImageBatch(data.images, data.captions[:2])
