"""Tests of the learned layout reward: its analytic target, its training, its checkpoints.

Oracles: layout scores computed by hand for placed objects; the analytic score of fresh
scenes (the trained CNN must correlate with it); files damaged by hand for the loader.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from envs.shapes import Scene, SceneObject, sample_pairs
from flowrl.rewards import ImageBatch, RewardError
from flowrl.rewards.learned import (
    FORMAT,
    LayoutCNN,
    LayoutModelConfig,
    LayoutTrainConfig,
    LearnedLayoutReward,
    layout_score,
    load_layout_model,
    save_layout_model,
    train_layout_model,
)
from flowrl.rewards.registry import build_reward

TINY = LayoutTrainConfig(num_images=1500, epochs=8, batch_size=32, model=LayoutModelConfig((8, 16), 32))


def test_layout_score_by_hand():
    def square(x: float, y: float, size: float = 0.1) -> SceneObject:
        return SceneObject("square", "red", x, y, size)

    assert layout_score(Scene((square(0.5, 0.5),))) == pytest.approx(1.0)
    assert layout_score(Scene((square(0.25, 0.5),))) == pytest.approx(0.5)  # 0.25 from the centre
    assert layout_score(Scene((square(0.2, 0.5), square(0.8, 0.5)))) == pytest.approx(1.0)  # balanced
    # a square of half-extent 0.2 weighs 4x one of 0.1: centre of mass x = (4 * 0.3 + 1 * 0.8) / 5 = 0.4
    assert layout_score(Scene((square(0.3, 0.5, 0.2), square(0.8, 0.5)))) == pytest.approx(1 - 0.1 / 0.5)
    # a circle of half-extent r weighs pi r^2 against a square's 4 r^2 (same r): x = (pi * 0.2 + 4 * 0.7) / (pi + 4)
    circle = SceneObject("circle", "red", 0.2, 0.5, 0.1)
    x = (math.pi * 0.2 + 4 * 0.7) / (math.pi + 4)
    assert layout_score(Scene((circle, square(0.7, 0.5)))) == pytest.approx(1 - abs(x - 0.5) / 0.5)
    assert layout_score(Scene((square(0.02, 0.02),))) == 0.0


@pytest.fixture(scope="module")
def trained() -> LayoutCNN:
    torch.manual_seed(123)  # training must not depend on the global seed
    model, info = train_layout_model(TINY)
    assert info["train_mse"] < 0.01
    return model


def test_trained_model_predicts_the_layout_score_of_fresh_scenes(trained):
    fresh = sample_pairs(400, seed=99, max_distractors=2)
    target = np.array([layout_score(s) for s in fresh.scenes])
    with torch.no_grad():
        predicted = trained(fresh.images).numpy()
    assert np.corrcoef(predicted, target)[0, 1] > 0.8


def test_checkpoint_round_trip_and_reward(trained, tmp_path):
    path = tmp_path / "layout.pt"
    save_layout_model(trained, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout.pt"]  # written through a temporary file
    record = torch.load(path, weights_only=True)
    assert record["format"] == FORMAT and record["config"] == {"channels": (8, 16), "hidden": 32}
    images = sample_pairs(8, seed=1).images
    reward = build_reward({"type": "learned", "path": str(path)})
    assert isinstance(reward, LearnedLayoutReward) and reward.name == "learned_layout"
    out = reward(ImageBatch(images, [""] * 8))
    with torch.no_grad():
        assert torch.equal(out.scores, trained(images)) and torch.equal(load_layout_model(path)(images), out.scores)
    images[3] = float("nan")
    with pytest.raises(RewardError, match="learned_layout: image 3 of the batch has non-finite pixels"):
        reward(ImageBatch(images, [""] * 8))


def _damaged(trained: LayoutCNN, how: str) -> object:
    record = {"format": FORMAT, "config": {"channels": [8, 16], "hidden": 32}, "state_dict": dict(trained.state_dict())}
    if how == "format":
        record["format"] = "something else"
    elif how == "config":
        record["config"] = {"channels": [8, 16]}
    elif how == "config_values":
        record["config"] = {"channels": [8, -1], "hidden": 32}
    elif how == "missing":
        record["state_dict"].pop("head.0.weight")
    elif how == "shape":
        record["state_dict"]["head.0.weight"] = torch.zeros(3, 3)
    elif how == "nan":
        record["state_dict"]["head.2.bias"] = torch.tensor([float("nan")])
    elif how == "not_a_dict":
        return [1, 2, 3]
    return record


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("format", "is not a learned layout reward checkpoint \\(format 'something else'"),
        ("config", "its 'config' must hold exactly \\['channels', 'hidden'\\]"),
        ("config_values", "bad 'config'"),
        ("missing", "do not fit the network its config describes \\(missing 'head.0.weight'\\)"),
        ("shape", "weight 'head.0.weight' is \\[3, 3\\], the network needs \\[32, 256\\]"),
        ("nan", "weight 'head.2.bias' holds non-finite"),
        ("not_a_dict", "is not a learned layout reward checkpoint \\(format 'list'"),
    ],
)
def test_bad_checkpoints_are_one_line_errors(trained, tmp_path, how, message):
    path = tmp_path / "bad.pt"
    torch.save(_damaged(trained, how), path)
    with pytest.raises(RewardError, match=message) as caught:
        load_layout_model(path)
    assert (
        str(path) in str(caught.value) and "\n" not in str(caught.value) and "train_layout_model" in str(caught.value)
    )


def test_missing_and_unreadable_files(trained, tmp_path):
    with pytest.raises(RewardError, match=f"learned reward checkpoint not found: {tmp_path / 'none.pt'}"):
        load_layout_model(tmp_path / "none.pt")
    good = tmp_path / "good.pt"
    save_layout_model(trained, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 10)
    for path in (truncated, garbage):
        with pytest.raises(RewardError, match=f"{path} cannot be read by torch.load"):
            load_layout_model(path)
