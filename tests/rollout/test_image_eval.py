"""The image evaluator's reward model failing: one line naming the reward, the iteration and
the cause (a RewardError), and through the CLI a run that stops without a traceback, keeps
its checkpoints and resumes from the last one.

Oracle: the reward model's own exception message and the checkpoint written before the fault.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowrl.cli import main
from flowrl.models.build import build_image_network, build_policy
from flowrl.rewards import RewardError
from flowrl.rollout.image_eval import ImageEvaluator
from tests.image_setup import TINY_OVERRIDES, tiny_config

FLOW_GRPO = Path(__file__).resolve().parents[2] / "experiments" / "images" / "shapes_flow_grpo.yaml"


class Raises:
    """A reward model that raises from its ``calls``-th call on (1-based)."""

    name = "flaky_model"

    def __init__(self, inner, fails_from: int, error: Exception) -> None:
        self.inner, self.fails_from, self.error, self.calls = inner, fails_from, error, 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls >= self.fails_from:
            raise self.error
        return self.inner(batch)


def _policy(cfg):
    torch.manual_seed(0)
    return build_policy(cfg, build_image_network(cfg))


def test_a_reward_model_that_raises_in_evaluation_is_one_line_naming_it_and_the_cause(tmp_path):
    cfg = tiny_config()
    evaluator = ImageEvaluator(cfg, None)
    evaluator.reward = Raises(evaluator.reward, 1, ValueError("weights file vanished\nsecond line of detail"))
    with pytest.raises(RewardError) as caught:
        evaluator(_policy(cfg), 7)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("evaluation at iteration 7: reward model 'flaky_model' (env.reward type jpeg)")
    assert "ValueError: weights file vanished" in message and "second line" not in message
    assert "fix the reward model" in message and "flowrl train --resume RUN" in message


def test_a_reward_error_raised_by_the_model_says_it_happened_in_evaluation():
    cfg = tiny_config()
    evaluator = ImageEvaluator(cfg, None)
    evaluator.reward = Raises(evaluator.reward, 1, RewardError("jpeg_compressibility: image 3 is odd"))
    with pytest.raises(RewardError, match=r"^evaluation at iteration 2: .*: jpeg_compressibility: image 3 is odd$"):
        evaluator(_policy(cfg), 2)


def test_a_non_finite_evaluation_score_still_names_the_sample():
    cfg = tiny_config()
    evaluator = ImageEvaluator(cfg, None)

    def nan_scores(batch):
        scores = torch.zeros(len(batch))
        scores[1] = float("nan")
        return scores

    evaluator.reward = nan_scores
    with pytest.raises(RewardError, match=r"evaluation at iteration 0: .*non-finite score nan for sample 1"):
        evaluator(_policy(cfg), 0)


def test_training_stops_in_one_line_when_the_evaluation_reward_fails_and_resumes(tmp_path, monkeypatch, capsys):
    """Evaluations at iterations 0 and 2 (eval.every=2), a checkpoint every iteration: the
    evaluation reward fails at iteration 2, after the iteration-1 checkpoint."""
    run = tmp_path / "run"
    args = [
        "train",
        str(FLOW_GRPO),
        "--run-dir",
        str(run),
        "--no-progress",
        *TINY_OVERRIDES,
        "env.reward={type: jpeg}",
        "eval.episodes=2",
        "algo.iterations=3",
        "eval.every=2",
        "checkpoint_every=1",
    ]
    built = ImageEvaluator.__init__

    def failing_init(self, cfg, run_dir):
        built(self, cfg, run_dir)
        self.reward = Raises(self.reward, 2, OSError("reward server unreachable"))

    monkeypatch.setattr(ImageEvaluator, "__init__", failing_init)
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("flowrl:")]
    assert lines == [
        f"flowrl: error: evaluation at iteration 2: reward model 'flaky_model' (env.reward type jpeg) raised "
        f"OSError: reward server unreachable on the 4 held-out images; fix the reward model (or env.reward); the "
        f"run's checkpoints are kept: resume with flowrl train --resume {run}"
    ]
    assert "Traceback" not in err
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 1

    monkeypatch.setattr(ImageEvaluator, "__init__", built)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
