"""Evaluation of a text-to-image policy on the shapes world's held-out and training prompts.

Fixed lists of ``eval.episodes`` held-out prompts and as many training prompts of the
``env.benchmark`` split, drawn once from the seed by the same sampler
(``envs.shapes.evaluation_captions``: GenEval's category mix, stratified, for geneval), each
drawn ``env.group_size`` times with the deterministic ODE on ``policy.eval_denoising_steps``
steps from fixed initial noise, so successive evaluations compare the same prompts and noise
(common random numbers). Metrics:

    eval/return              mean score of the experiment's reward model (held-out prompts)
    eval/accuracy            share of held-out images the verifier finds correct (= eval/success_rate)
    eval/accuracy_<category> the same per caption category
    eval/train_accuracy      the same on the training prompts (and eval/train_accuracy_<category>)
    eval/jpeg_kb             mean JPEG size (quality 95; held-out images)
    eval/diversity           mean pairwise distance between the images of a prompt (RMS pixels)

and a grid of the first ``GRID_PROMPTS`` prompts (one row each, ``group_size`` images) as
``RUN/samples/iter_XXXX.png`` (its prompts in ``RUN/samples/prompts.txt``) and in TensorBoard
(``tensorboard/samples``, tag ``eval/samples``).

The reward model is called here, in the learner's process, not through the training's reward
pool: an exception it raises is a RewardError naming the reward type, the iteration and the
cause, like a reward model that fails in an in-process training pool (no retry: the same model
on the same images would fail again, and an evaluation without the reward is no evaluation).
The run stops there with one line; its checkpoints are untouched, and it resumes from the last.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from flowrl.models.image_policy import TextImagePolicy, to_pixels
from flowrl.rewards import ImageBatch, RewardError, RewardOutput, check_scores
from flowrl.rollout.prompts import category_accuracy, correct_of, group_diversity
from flowrl.runtime import derive_seed

if TYPE_CHECKING:
    from flowrl.config import ExperimentConfig

EVAL_STREAM = 10**6 + 7
GRID_PROMPTS = 8
GRID_SCALE = 4  # pixels per image pixel in the PNG (32 px images are tiny)
BATCH = 64  # images per evaluation forward pass


def image_grid(images: Tensor, columns: int, pad: int = 2) -> Tensor:
    """``images [N, 3, H, W]`` in [0, 1] -> one grid image ``[3, rows (H + pad) + pad, ...]``
    with ``columns`` images per row on a white background."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, columns)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = images[
            i
        ]
    return grid


def save_png(grid: Tensor, path: Path, scale: int = GRID_SCALE) -> None:
    """A ``[3, H, W]`` image in [0, 1] as a PNG, upscaled ``scale`` times (nearest)."""
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG")
    tmp.replace(path)


class ImageEvaluator:
    """Evaluates a TextImagePolicy (``evaluator(policy, iteration, env_steps)``); see the
    module doc. ``run_dir`` None: metrics only, no PNG or TensorBoard image."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path | None) -> None:
        from envs.shapes import Tokenizer, evaluation_captions
        from flowrl.rewards.registry import build_reward
        from flowrl.rewards.verifier import ShapesVerifier

        env = cfg.env
        self.group_size, self.run_dir = env.group_size, run_dir
        rng = np.random.default_rng(derive_seed(cfg.seed, EVAL_STREAM))
        self.prompts = evaluation_captions(cfg.eval.episodes, rng, "heldout", env.benchmark)
        self.train_prompts = evaluation_captions(cfg.eval.episodes, rng, "train", env.benchmark)
        self.per_image = [p for p in self.prompts for _ in range(self.group_size)]
        self.train_per_image = [p for p in self.train_prompts for _ in range(self.group_size)]
        tokenizer = Tokenizer()
        self.ids = tokenizer.encode(self.per_image)[0]
        self.train_ids = tokenizer.encode(self.train_per_image)[0]
        shape = (len(self.per_image), 3, env.image_size, env.image_size)
        self.noise = torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, EVAL_STREAM, 1)))
        # the training prompts' images start from the held-out ones' noise: the two accuracies
        # differ by the prompts alone
        self.reward = build_reward(env.reward)
        self.reward_type = str(env.reward.get("type"))
        self.verifier = ShapesVerifier()
        self._writer: Any = None

    @torch.no_grad()
    def images(self, policy: TextImagePolicy, train: bool = False) -> Tensor:
        """The evaluation images ``[N, 3, H, W]`` in [0, 1] (prompt-major) of the held-out
        prompts (of the training prompts with ``train``)."""
        device = next(policy.parameters()).device
        ids = self.train_ids if train else self.ids
        out = [
            policy.images_from(ids[i : i + BATCH].to(device), self.noise[i : i + BATCH].to(device)).cpu()
            for i in range(0, len(ids), BATCH)
        ]
        return to_pixels(torch.cat(out))

    def __call__(self, policy: TextImagePolicy, iteration: int, env_steps: int = 0) -> dict[str, float]:
        from flowrl.rewards.jpeg import jpeg_kilobytes

        images = self.images(policy)
        batch = ImageBatch(images, self.per_image)
        scored = self._score(batch, iteration)
        details = scored.details if isinstance(scored, RewardOutput) else {}
        scores = scored.scores if isinstance(scored, RewardOutput) else scored
        correct = correct_of(details)
        if correct is None:
            correct = self.verifier(batch).details["correct"]
        accuracy = float(correct.mean())
        metrics = {
            "eval/return": float(scores.mean()),
            "eval/success_rate": accuracy,
            "eval/accuracy": accuracy,
            **category_accuracy(self.per_image, correct, "eval/"),
            **self._train_accuracy(policy),
            "eval/jpeg_kb": float(jpeg_kilobytes(images, 95).mean()),
            "eval/diversity": group_diversity(images, self.group_size),
        }
        if self.run_dir is not None:
            self._save_grid(images, iteration, env_steps)
        return metrics

    def _train_accuracy(self, policy: TextImagePolicy) -> dict[str, float]:
        """``eval/train_accuracy`` (and per category): the verifier on the training prompts' images."""
        correct = self.verifier(ImageBatch(self.images(policy, train=True), self.train_per_image)).details["correct"]
        return {
            "eval/train_accuracy": float(correct.mean()),
            **category_accuracy(self.train_per_image, correct, "eval/train_"),
        }

    def _score(self, batch: ImageBatch, iteration: int) -> RewardOutput | Tensor:
        """The reward model's checked scores of the evaluation images; RewardError (one line)
        when it raises or returns unusable scores."""
        name = getattr(self.reward, "name", self.reward_type)
        model = f"reward model {name!r}" + (
            f" (env.reward type {self.reward_type})" if name != self.reward_type else ""
        )
        where = f"evaluation at iteration {iteration}: {model}"
        try:
            with torch.no_grad():
                raw = self.reward(batch)
        except RewardError as exc:  # already one line naming the problem: say where it happened
            raise RewardError(f"{where}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the model's own failure, reported as one line
            run = self.run_dir if self.run_dir is not None else "RUN"
            raise RewardError(
                f"{where} raised {_describe(exc)} on the {len(batch)} held-out images; fix the reward model (or "
                f"env.reward); the run's checkpoints are kept: resume with flowrl train --resume {run}"
            ) from None
        return check_scores(raw, len(batch), where)

    def _save_grid(self, images: Tensor, iteration: int, env_steps: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        assert self.run_dir is not None
        rows = min(GRID_PROMPTS, len(self.prompts))
        grid = image_grid(images[: rows * self.group_size], self.group_size)
        folder = self.run_dir / "samples"
        save_png(grid, folder / f"iter_{iteration:04d}.png")
        listing = folder / "prompts.txt"
        if not listing.exists():
            listing.write_text("".join(f"row {i + 1}: {p}\n" for i, p in enumerate(self.prompts[:rows])))
        if self._writer is None:
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard" / "samples"))
        self._writer.add_image("eval/samples", grid, env_steps)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (a multi-line message would break the one-line error)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}"[:300] if lines else type(exc).__name__


__all__ = ["GRID_PROMPTS", "ImageEvaluator", "image_grid", "save_png"]
