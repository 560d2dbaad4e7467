"""PromptCollector: GRPO rollouts of a text-to-image policy on the shapes world.

Every iteration draws ``prompts_per_iteration`` prompts (deterministically from (seed,
iteration)), samples ``group_size`` images of each with the policy's stochastic sampler and
scores them with the reward model in a ``RewardPool``. Sampling runs in chunks of
``prompts_per_chunk`` prompts and each chunk goes to the reward workers as soon as it is
sampled, so chunk i is scored while chunk i + 1 is sampled (on Ray; in-process scoring is
serial). The Rollout has one step (T = 1) per image:

    obs, next_obs  [1, N, L]  caption token ids (the policy's condition), N = prompts x group_size
    samples        Transitions [1, N, S, ...] of the stochastic denoising steps
    rewards        [1, N] the reward model's scores; terminated and valid all True
    group          [N] prompt index (group_size consecutive images share a prompt)
    episode_return [N] = the scores; episode_success [N] = the verifier's "correct"

plus ``metrics``: per-category training accuracy, mean JPEG size, diversity within groups,
the time spent waiting for rewards and the share of the scoring hidden behind sampling.
A reward model that fails, or returns a NaN, is a RewardError naming it and the sample.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from flowrl.core.transitions import Transitions
from flowrl.errors import FlowRLError
from flowrl.models.image_policy import to_pixels
from flowrl.models.policy import Policy
from flowrl.rewards import ImageBatch, RewardError, RewardOutput
from flowrl.rollout.rollout import Rollout
from flowrl.runtime import derive_seed

if TYPE_CHECKING:
    from flowrl.config import ExperimentConfig
    from flowrl.rollout.reward_workers import RewardPool

PROMPT_STREAM, NOISE_STREAM = 6, 7  # derive_seed(seed, stream, iteration)
SCORE_TIME = "score_s"  # detail added by TimedReward: seconds the model took on the batch


class TimedReward:
    """The reward model of ``spec`` (``build_reward``), reporting in ``details["score_s"]``
    the seconds it took on each batch (to measure how much scoring hides behind sampling)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        from flowrl.rewards.registry import build_reward

        self.model = build_reward(spec)
        self.name = self.model.name

    def __call__(self, batch: ImageBatch) -> RewardOutput:
        start = time.perf_counter()
        out = self.model(batch)
        elapsed = torch.full((len(batch),), time.perf_counter() - start)
        if isinstance(out, RewardOutput):
            return RewardOutput(out.scores, {**out.details, SCORE_TIME: elapsed})
        return RewardOutput(out, {SCORE_TIME: elapsed})  # type: ignore[arg-type]  # checked by the pool


def correct_of(details: Mapping[str, Tensor]) -> Tensor | None:
    """The verifier's per-image "correct" among a reward's details (also inside a multi reward)."""
    for key in ("correct", "verifier/correct"):
        if key in details:
            return details[key]
    return None


def group_diversity(images: Tensor, group_size: int) -> float:
    """Mean pairwise distance between the images of a group, ``images [N, C, H, W]`` in [0, 1],
    groups of ``group_size`` consecutive images; the distance is the root mean square pixel
    difference (L2 / sqrt(C H W)), so it does not grow with the resolution. 0 for groups of 1."""
    if group_size < 2:
        return 0.0
    flat = images.reshape(-1, group_size, images[0].numel()).double()
    dist = torch.cdist(flat, flat) / flat.shape[-1] ** 0.5  # [P, G, G]
    return float(dist.sum() / (flat.shape[0] * group_size * (group_size - 1)))


def category_accuracy(prompts: list[str], correct: Tensor, prefix: str) -> dict[str, float]:
    """``{prefix}accuracy_<category>``: mean of ``correct [N]`` over the prompts of each category."""
    from envs.shapes import parse_caption

    categories = [parse_caption(p).category for p in prompts]
    return {
        f"{prefix}accuracy_{c}": float(correct[[i for i, k in enumerate(categories) if k == c]].mean())
        for c in sorted(set(categories))
    }


class PromptCollector:
    """Collects GRPO rollouts of ``group_size`` images per prompt (see the module doc).

    rewards: the RewardPool that scores ``ImageBatch``es. split: the captions prompts are
    drawn from ("train" or "heldout") of the ``benchmark`` split ("geneval" or "zero_shot",
    ``envs.shapes.captions``). same_noise: a group's images start from one noise.
    reward_weights: a multi reward's component weights when GRPO takes per-reward advantages
    (``per_reward_weights``): the rollout then carries each component's scores.
    """

    def __init__(
        self,
        rewards: RewardPool,
        seed: int,
        prompts_per_iteration: int,
        group_size: int,
        prompts_per_chunk: int,
        same_noise: bool = False,
        split: str = "train",
        reward_weights: dict[str, float] | None = None,
        benchmark: str = "zero_shot",
    ) -> None:
        from envs.shapes import Tokenizer

        self.rewards, self.seed, self.split, self.benchmark = rewards, seed, split, benchmark
        self.prompts_per_iteration, self.group_size = prompts_per_iteration, group_size
        self.prompts_per_chunk, self.same_noise = prompts_per_chunk, same_noise
        self.reward_weights = reward_weights
        self.tokenizer = Tokenizer()
        self._verifier: Any = None

    def reset(self, epoch: int) -> None:
        """Nothing to reset: each iteration's prompts and noise come from (seed, iteration)."""

    def collect(self, policy: Policy, num_steps: int, iteration: int) -> Rollout:
        raise FlowRLError("the shapes world has no env steps to collect: use algo.type: grpo")

    def prompts(self, iteration: int) -> list[str]:
        """The prompts of ``iteration`` (the same for the same seed)."""
        from envs.shapes import sample_captions

        rng = np.random.default_rng(derive_seed(self.seed, PROMPT_STREAM, iteration))
        return sample_captions(self.prompts_per_iteration, rng, self.split, self.benchmark)

    def collect_episodes(self, policy: Policy, max_steps: int, iteration: int) -> Rollout:
        """One image per "env": ``prompts_per_iteration`` groups of ``group_size`` images.
        ``max_steps`` is ignored (an image is one step)."""
        prompts = self.prompts(iteration)
        g = self.group_size
        ids = self.tokenizer.encode(prompts)[0].repeat_interleave(g, dim=0)  # [N, L]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, NOISE_STREAM, iteration))
        samples: list[Transitions] = []
        futures = []
        sample_s = wait_s = 0.0
        for start in range(0, len(prompts), self.prompts_per_chunk):
            chunk = prompts[start : start + self.prompts_per_chunk]
            rows = slice(start * g, (start + len(chunk)) * g)
            t0 = time.perf_counter()
            shape = (len(chunk), *policy.event_shape) if self.same_noise else (len(chunk) * g, *policy.event_shape)
            noise = torch.randn(shape, generator=generator)
            if self.same_noise:
                noise = noise.repeat_interleave(g, dim=0)
            sample = policy.sample(ids[rows], iteration, generator, noise)
            t1 = time.perf_counter()
            images = to_pixels(sample.final)
            futures.append((rows, self.rewards.submit(ImageBatch(images, [p for p in chunk for _ in range(g)]))))
            wait_s += time.perf_counter() - t1  # in-process scoring happens in submit
            sample_s += t1 - t0
            samples.append(sample)
        outputs = []
        for j, (rows, future) in enumerate(futures):
            t0 = time.perf_counter()
            try:
                out = self.rewards.result(future)
            except RewardError as exc:
                raise RewardError(
                    f"iteration {iteration}, reward batch {j} (images {rows.start}..{rows.stop - 1} of the iteration; "
                    f"sample numbers below count within the batch): {exc}"
                ) from None
            wait_s += time.perf_counter() - t0
            outputs.append(out if isinstance(out, RewardOutput) else RewardOutput(out))
        return self._rollout(prompts, ids, samples, outputs, sample_s, wait_s)

    def _rollout(
        self,
        prompts: list[str],
        ids: Tensor,
        samples: list[Transitions],
        outputs: list[RewardOutput],
        sample_s: float,
        wait_s: float,
    ) -> Rollout:
        from flowrl.rewards.jpeg import jpeg_kilobytes

        g, n = self.group_size, ids.shape[0]
        stacked = Transitions.cat(samples).map(lambda t: t.unsqueeze(0))  # [1, N, ...]
        scores = torch.cat([o.scores for o in outputs])
        details = {k: torch.cat([o.details[k] for o in outputs]) for k in outputs[0].details}
        score_s = float(sum(o.details[SCORE_TIME][0] for o in outputs if SCORE_TIME in o.details))
        images = to_pixels(stacked.final[0])
        per_image = [p for p in prompts for _ in range(g)]
        correct = correct_of(details)
        if correct is None:  # the reward is no verifier: measure the accuracy anyway
            correct = self._verify(images, per_image)
        metrics = {
            "charts/accuracy": float(correct.mean()),
            **category_accuracy(per_image, correct, "charts/"),
            "charts/jpeg_kb": float(jpeg_kilobytes(images, 95).mean()),
            "charts/diversity": group_diversity(images, g),
            **{f"reward/{k}": float(v.nanmean()) for k, v in details.items() if k not in (SCORE_TIME, "category")},
            "time/sample_s": sample_s,
            "time/reward_wait_s": wait_s,
            "time/reward_score_s": score_s,
            "time/reward_hidden_fraction": max(0.0, 1.0 - wait_s / score_s) if score_s > 0 else 0.0,
        }
        ones = torch.ones(1, n, dtype=torch.bool)
        obs = ids.unsqueeze(0)
        return Rollout(
            obs=obs,
            next_obs=obs,
            samples=stacked,
            rewards=scores.view(1, n),
            terminated=ones,
            truncated=torch.zeros_like(ones),
            valid=ones.clone(),
            group=torch.arange(n) // g,
            env_steps=n,
            episode_returns=scores.tolist(),
            episode_successes=correct.tolist(),
            episode_return=scores,
            episode_success=correct.bool(),
            episode_done=torch.ones(n, dtype=torch.bool),
            metrics=metrics,
            reward_components={k: details[k] for k in self.reward_weights} if self.reward_weights else None,
            reward_weights=self.reward_weights,
        )

    def _verify(self, images: Tensor, prompts: list[str]) -> Tensor:
        from flowrl.rewards.verifier import ShapesVerifier

        if self._verifier is None:
            self._verifier = ShapesVerifier()
        return self._verifier(ImageBatch(images, prompts)).details["correct"]

    def close(self) -> None:
        self.rewards.close()


def make_prompt_collector(cfg: ExperimentConfig) -> PromptCollector:
    """The collector of ``env.type: shapes``: reward workers on Ray (ray.enabled) or in process."""
    from flowrl.rewards.registry import per_reward_weights
    from flowrl.rollout.reward_workers import RewardPool

    env = cfg.env
    retries = cfg.ray.max_restarts if cfg.ray.enabled else 0
    pool = RewardPool(
        functools.partial(TimedReward, env.reward),
        env.reward_workers,
        use_ray=cfg.ray.enabled,
        max_retries=retries,
        name="reward model",
    )
    return PromptCollector(
        pool,
        cfg.seed,
        env.prompts_per_iteration,
        env.group_size,
        env.prompts_per_chunk,
        env.same_noise,
        env.prompt_split,
        per_reward_weights(env.reward),
        env.benchmark,
    )


__all__ = ["PromptCollector", "TimedReward", "category_accuracy", "group_diversity", "make_prompt_collector"]
