"""RewardPool with reward models that return RewardOutput: in this process and on Ray
(the Ray test is marked slow: run it with ``-m slow``).

Oracle: the same reward model called directly on the same batch.
"""

from __future__ import annotations

import functools

import pytest
import ray
import torch

from envs.shapes import sample_pairs
from flowrl.rewards import ImageBatch, RewardError, RewardOutput
from flowrl.rewards.registry import build_reward
from flowrl.rollout.ray_runtime import ray_session
from flowrl.rollout.reward_workers import RewardPool

SPEC = {"type": "multi", "components": [{"type": "verifier", "weight": 1.0}, {"type": "jpeg", "weight": 0.1}]}


def _batch(n: int = 5) -> ImageBatch:
    data = sample_pairs(n, seed=0)
    return ImageBatch(data.images, data.captions)


def _assert_same(got: RewardOutput, expected: RewardOutput) -> None:
    assert isinstance(got, RewardOutput) and torch.equal(got.scores, expected.scores)
    assert got.details.keys() == expected.details.keys()
    assert all(torch.equal(got.details[k], expected.details[k]) for k in expected.details)


def test_in_process_pool_returns_the_models_reward_output():
    pool = RewardPool(functools.partial(build_reward, SPEC), num_workers=2, use_ray=False)
    batches = [_batch(5), _batch(3)]
    futures = [pool.submit(b) for b in batches]
    for batch, future in zip(batches, futures, strict=True):
        _assert_same(pool.result(future), build_reward(SPEC)(batch))
    pool.close()


class NamedNaN:
    name = "broken_model"

    def __call__(self, batch):
        scores = torch.ones(len(batch))
        scores[2] = float("nan")
        return RewardOutput(scores, {"ok": torch.ones(len(batch))})


class BadDetail:
    name = "bad_detail"

    def __call__(self, batch):
        return RewardOutput(torch.ones(len(batch)), {"per_pixel": torch.ones(len(batch), 2)})


def test_pool_errors_name_the_model_and_the_sample():
    pool = RewardPool(NamedNaN, use_ray=False)
    with pytest.raises(
        RewardError, match="reward model 'broken_model' \\(worker 0\\) returned a non-finite score nan for sample 2"
    ):
        pool.score(_batch())
    pool = RewardPool(BadDetail, use_ray=False)
    with pytest.raises(
        RewardError,
        match="'bad_detail' \\(worker 0\\) returned detail 'per_pixel' of shape \\(5, 2\\), expected \\[5\\]",
    ):
        pool.score(_batch())


@pytest.fixture(scope="module")
def local_ray():
    ray.shutdown()
    with ray_session(None, num_cpus=2):
        yield


@pytest.mark.slow  # starting Ray and importing torch in an actor takes ~30 s on 2 cores
def test_ray_pool_returns_the_models_reward_output(local_ray):
    pool = RewardPool(functools.partial(build_reward, SPEC), use_ray=True)
    batch = _batch()
    _assert_same(pool.score(batch), build_reward(SPEC)(batch))
    pool.close()


def test_in_process_pool_keeps_the_learners_thread_count():
    """Only a reward actor (its own process) runs on one thread; in-process scoring must not
    drop the learner's process to one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        RewardPool(functools.partial(build_reward, SPEC), num_workers=1, use_ray=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
