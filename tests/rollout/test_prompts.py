"""The prompt collector (Rollout shapes, groups, determinism, shared noise, reward timing),
image evaluation (metrics, the PNG grid) and a NaN reward's error."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from flowrl.models.build import build_image_network, build_policy
from flowrl.rewards import RewardError, RewardOutput
from flowrl.rollout.image_eval import ImageEvaluator
from flowrl.rollout.prompts import PromptCollector, group_diversity, make_prompt_collector
from flowrl.rollout.reward_workers import RewardPool
from tests.image_setup import tiny_config


def _policy(cfg):
    torch.manual_seed(0)
    return build_policy(cfg, build_image_network(cfg))


def _collect(cfg, policy, iteration=0):
    collector = make_prompt_collector(cfg)
    try:
        return collector, collector.collect_episodes(policy, 1, iteration)
    finally:
        collector.close()


def test_the_rollout_is_one_step_of_groups_of_images():
    cfg = tiny_config("env.prompts_per_iteration=3", "env.reward={type: verifier}")
    policy = _policy(cfg)
    collector, rollout = _collect(cfg, policy)
    n, k = 6, cfg.policy.denoising_steps
    assert rollout.obs.shape == (1, n, 8) and rollout.obs.dtype == torch.long
    assert rollout.samples.final.shape == (1, n, 3, 16, 16)
    assert rollout.samples.x_in.shape == (1, n, k, 3, 16, 16) and rollout.samples.log_prob.shape == (1, n, k)
    assert rollout.rewards.shape == (1, n) and bool(rollout.valid.all()) and bool(rollout.terminated.all())
    assert rollout.group.tolist() == [0, 0, 1, 1, 2, 2] and rollout.env_steps == n
    assert torch.equal(rollout.episode_return, rollout.rewards[0])
    assert rollout.episode_success.dtype == torch.bool and bool(rollout.episode_done.all())
    # a group shares its prompt
    prompts = collector.prompts(0)
    ids = collector.tokenizer.encode(prompts)[0]
    assert torch.equal(rollout.obs[0], ids.repeat_interleave(2, dim=0))
    m = rollout.metrics
    assert {"charts/accuracy", "charts/jpeg_kb", "charts/diversity", "time/reward_wait_s"} <= set(m)
    assert 0 <= m["time/reward_hidden_fraction"] <= 1 and m["time/reward_score_s"] > 0
    assert any(key.startswith("charts/accuracy_") for key in m)


def test_prompts_and_images_are_determined_by_seed_and_iteration():
    cfg = tiny_config()
    policy = _policy(cfg)
    collector, a = _collect(cfg, policy, 3)
    _, b = _collect(cfg, policy, 3)
    _, c = _collect(cfg, policy, 4)
    assert torch.equal(a.samples.final, b.samples.final) and torch.equal(a.rewards, b.rewards)
    assert not torch.equal(a.samples.final, c.samples.final)
    assert collector.prompts(3) == collector.prompts(3)
    assert [collector.prompts(i) for i in range(5)] != [collector.prompts(0)] * 5


def test_same_noise_starts_a_group_from_one_noise():
    cfg = tiny_config("env.same_noise=true")
    _, rollout = _collect(cfg, _policy(cfg))
    x0 = rollout.samples.x_in[0, :, 0]  # the state entering step 0: the initial noise
    assert torch.equal(x0[0], x0[1]) and not torch.equal(x0[0], x0[2])
    assert not torch.equal(rollout.samples.final[0, 0], rollout.samples.final[0, 1])  # SDE steps differ


def test_group_diversity_is_the_mean_pairwise_rms_distance():
    images = torch.zeros(4, 3, 2, 2)
    images[1] = 1.0  # group 0: distance 1; group 1: identical images
    assert group_diversity(images, 2) == pytest.approx(0.5)
    assert group_diversity(images, 1) == 0.0


class _NaNReward:
    name = "broken_scorer"

    def __call__(self, batch):
        scores = torch.zeros(len(batch))
        scores[1] = math.nan
        return RewardOutput(scores)


def test_a_nan_reward_is_an_error_naming_the_reward_model_and_the_sample():
    cfg = tiny_config()
    pool = RewardPool(_NaNReward, use_ray=False, max_retries=0)
    collector = PromptCollector(pool, 0, prompts_per_iteration=2, group_size=2, prompts_per_chunk=2)
    with pytest.raises(RewardError, match=r"'broken_scorer'.*sample 1") as err:
        collector.collect_episodes(_policy(cfg), 1, 5)
    assert "iteration 5" in str(err.value)


def test_evaluation_logs_accuracy_per_category_and_writes_the_png_grid(tmp_path):
    cfg = tiny_config("eval.episodes=3", "env.benchmark=zero_shot")
    policy = _policy(cfg)
    evaluator = ImageEvaluator(cfg, tmp_path)
    try:
        first = evaluator(policy, 0)
        again = evaluator(policy, 7, env_steps=28)
    finally:
        evaluator.close()
    assert first == again  # fixed prompts and noise: common random numbers
    assert first["eval/success_rate"] == first["eval/accuracy"]
    assert first["eval/return"] < 0  # the JPEG compressibility reward: -kB
    assert first["eval/jpeg_kb"] == pytest.approx(-first["eval/return"], rel=1e-5)
    assert first["eval/diversity"] > 0
    categories = {k.removeprefix("eval/accuracy_") for k in first if k.startswith("eval/accuracy_")}
    assert categories and categories <= {"counting", "colors", "position", "color_attr"}  # held-out prompts
    assert 0 <= first["eval/train_accuracy"] <= 1 and any(k.startswith("eval/train_accuracy_") for k in first)
    for name in ("iter_0000.png", "iter_0007.png"):
        with Image.open(tmp_path / "samples" / name) as png:  # 3 rows of 2 images of 16 px, 2 px apart, x4
            assert png.size == ((2 * 18 + 2) * 4, (3 * 18 + 2) * 4)
    assert len((tmp_path / "samples" / "prompts.txt").read_text().splitlines()) == 3
    assert list((tmp_path / "tensorboard" / "samples").glob("events.out.tfevents.*"))


def test_geneval_evaluation_draws_held_out_and_training_prompts_with_genevals_mix():
    """The geneval split: held-out and training prompts by the same stratified sampler, each
    category's share GenEval's to within one prompt, no held-out string among the training ones."""
    from envs.shapes import GENEVAL_MIX, heldout_prompts, parse_caption, train_prompts

    cfg = tiny_config("eval.episodes=64", "env.benchmark=geneval")
    evaluator = ImageEvaluator(cfg, None)
    assert set(evaluator.prompts) <= set(heldout_prompts(benchmark="geneval"))
    assert set(evaluator.train_prompts) <= set(train_prompts(benchmark="geneval"))
    total = sum(GENEVAL_MIX.values())
    for prompts in (evaluator.prompts, evaluator.train_prompts):
        categories = [parse_caption(p).category for p in prompts]
        for category, weight in GENEVAL_MIX.items():
            assert abs(categories.count(category) - 64 * weight / total) < 1, category
