"""Tests of the multi-reward, per-reward group advantages and the reward registry.

Oracles: advantages computed by hand for two rewards in two interleaved groups, and
flowrl.core.advantages.group_advantages for a single reward; the components called directly.
"""

from __future__ import annotations

import functools
import math
import pickle

import pytest
import torch

from envs.shapes import sample_pairs
from flowrl.config.loading import ConfigError
from flowrl.core.advantages import group_advantages
from flowrl.rewards import ImageBatch, RewardError, RewardOutput
from flowrl.rewards.jpeg import JpegReward
from flowrl.rewards.multi import MultiReward, combined_group_advantages
from flowrl.rewards.registry import build_reward, per_reward_weights, reward_types
from flowrl.rewards.verifier import ShapesVerifier


def test_combined_group_advantages_by_hand():
    group_ids = torch.tensor([5, 5, 9, 5, 9])
    components = {"a": torch.tensor([1.0, 2.0, 10.0, 3.0, 10.0]), "b": torch.tensor([0.0, 0.0, 5.0, 3.0, 7.0])}
    # group 5: a = 1, 2, 3 -> (-1, 0, 1) / sqrt(2/3); b = 0, 0, 3 -> (-1, -1, 2) / sqrt(2)
    # group 9: a = 10, 10 -> 0, 0 (no spread); b = 5, 7 -> -1, 1
    s = math.sqrt(1.5)
    expected = [
        2 * -s + 0.5 * -(1 / math.sqrt(2)),
        0.5 * -(1 / math.sqrt(2)),
        0.5 * -1,
        2 * s + 0.5 * math.sqrt(2),
        0.5,
    ]
    got = combined_group_advantages(components, {"a": 2.0, "b": 0.5}, group_ids, eps=1e-9)
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5)


def test_one_component_equals_grpo_group_advantages():
    rewards = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    expected, _ = group_advantages(rewards)
    got = combined_group_advantages({"r": rewards.flatten()}, {"r": 1.0}, torch.arange(4).repeat_interleave(6))
    assert torch.allclose(got.view(4, 6), expected, atol=1e-6)


def test_combined_group_advantages_rejects_mismatches():
    ids = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="components \\['a'\\] but weights \\['b'\\]"):
        combined_group_advantages({"a": torch.zeros(3)}, {"b": 1.0}, ids)
    with pytest.raises(ValueError, match="'a' scores \\(2,\\) vs group_ids \\(3,\\)"):
        combined_group_advantages({"a": torch.zeros(2)}, {"a": 1.0}, ids)


class Broken:
    name = "broken"

    def __call__(self, batch):
        scores = torch.zeros(len(batch))
        scores[1] = float("nan")
        return RewardOutput(scores)


class OldStyle:
    """Returns a plain list, as reward models did before RewardOutput."""

    name = "old"

    def __call__(self, batch):
        return [float(i) for i in range(len(batch))]


def test_multi_reward_is_the_weighted_sum_with_each_component_in_details():
    data = sample_pairs(6, seed=0)
    batch = ImageBatch(data.images, data.captions)
    multi = MultiReward([(ShapesVerifier(), 2.0), (JpegReward(), 0.5), (OldStyle(), -1.0)])
    out = multi(batch)
    verifier, jpeg = ShapesVerifier()(batch), JpegReward()(batch)
    assert torch.allclose(out.scores, 2.0 * verifier.scores + 0.5 * jpeg.scores - torch.arange(6.0))
    assert torch.equal(out.details["verifier"], verifier.scores)
    assert torch.equal(out.details["verifier/correct"], verifier.details["correct"])
    assert torch.equal(out.details["jpeg_compressibility/jpeg_kb"], jpeg.details["jpeg_kb"])
    assert torch.equal(out.details["old"], torch.arange(6.0))
    assert multi.weights == {"verifier": 2.0, "jpeg_compressibility": 0.5, "old": -1.0}


def test_multi_reward_names_the_failing_component():
    data = sample_pairs(3, seed=0)
    with pytest.raises(RewardError, match="reward model 'broken' returned a non-finite score nan for sample 1"):
        MultiReward([(JpegReward(), 1.0), (Broken(), 1.0)])(ImageBatch(data.images, data.captions))
    with pytest.raises(ValueError, match="names must differ, \\['jpeg_compressibility'\\]"):
        MultiReward([(JpegReward(), 1.0), (JpegReward(quality=50), 1.0)])


def test_registry_builds_every_type_and_its_factories_pickle():
    spec = {
        "type": "multi",
        "components": [{"type": "verifier", "weight": 2}, {"type": "jpeg", "mode": "incompressibility"}],
    }
    factory = pickle.loads(pickle.dumps(functools.partial(build_reward, spec)))
    model = factory()
    assert isinstance(model, MultiReward) and model.weights == {"verifier": 2.0, "jpeg_incompressibility": 1.0}
    assert model.advantages == "sum" and per_reward_weights(spec) is None  # GRPO: advantages of the weighted sum
    per_reward = {**spec, "advantages": "per_reward"}
    assert build_reward(per_reward).advantages == "per_reward"
    assert per_reward_weights(per_reward) == {"verifier": 2.0, "jpeg_incompressibility": 1.0}
    assert per_reward_weights({"type": "verifier"}) is None
    jpeg = build_reward({"type": "jpeg", "quality": 40})
    assert (jpeg.mode, jpeg.quality) == ("compressibility", 40)
    assert isinstance(build_reward({"type": "verifier"}), ShapesVerifier)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "clip"}, f"env.reward.type: 'clip' is not one of {', '.join(reward_types())} \\(or MODULE:NAME"),
        ({"mode": "compressibility"}, "env.reward.type: None is not one of"),
        (
            {"type": "jpeg", "qualty": 90},
            "env.reward: unknown key 'qualty' for type 'jpeg'; valid keys: type, mode, quality",
        ),
        (
            {"type": "jpeg", "quality": 100},
            "env.reward.quality: Input should be less than or equal to 95 \\(got 100\\)",
        ),
        (
            {"type": "jpeg", "mode": "smaller"},
            "env.reward.mode: Input should be 'compressibility' or 'incompressibility'",
        ),
        ({"type": "learned"}, "env.reward.path: Field required"),
        ({"type": "multi", "components": []}, "env.reward.components: List should have at least 1 item"),
        (
            {"type": "multi", "components": [{"type": "verifier"}, {"type": "jpeg", "weight": "heavy"}]},
            "env.reward.components\\[1\\].weight: Input should be a valid number",
        ),
        (
            {"type": "multi", "components": [{"type": "multi", "components": [{"type": "jpeg", "x": 1}]}]},
            "env.reward.components\\[0\\].components\\[0\\]: unknown key 'x' for type 'jpeg'",
        ),
        (
            {"type": "multi", "components": [{"type": "jpeg"}, {"type": "jpeg"}]},
            "env.reward: multi reward: component names",
        ),
        (
            {"type": "multi", "components": [{"type": "jpeg"}], "advantages": "each"},
            "env.reward.advantages: Input should be 'sum' or 'per_reward'",
        ),
    ],
)
def test_registry_errors_are_one_line_and_name_the_key(spec, message):
    with pytest.raises(ConfigError, match=message) as caught:
        build_reward(spec)
    assert "\n" not in str(caught.value)
