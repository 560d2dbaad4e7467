"""Tests of flowrl.algos.reflow and ``flowrl reflow``.

Oracle: a 1-D teacher whose ODE is known in closed form. With a | obs ~ N(m, s^2), m = obs, the
rectified-flow velocity of the independent coupling is linear in x,
v(x, t) = m + (x - t m) (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2), and its ODE maps noise z to
m + s z (the monotone map between the two Gaussians). One Euler step of it lands on m, an error of
s^2 per sample: the teacher is curved. The straight field of that coupling,
u(x, t) = m + (s - 1) (x - t m) / (1 - t + t s), moves z to m + s z in one step exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from flowrl.algos.reflow import (
    Pairs,
    ode_actions,
    pseudo_huber,
    reflow_loss,
    sample_timesteps,
    straightness,
    teacher_pairs,
    train_student,
)
from flowrl.cli import main
from flowrl.config import PretrainConfig, load_config
from flowrl.models.build import load_actor
from flowrl.models.networks import VelocityMLP

S = 0.5  # the data's std around m = obs


class GaussianTeacher(torch.nn.Module):
    """The exact rectified-flow velocity of N(obs, S^2) data: ``(obs [B, 1], x [B, 1, 1], t) -> [B, 1, 1]``."""

    def forward(self, obs, x, t, t_next=None):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1)
        m = obs.view(-1, 1, 1)
        return m + (x - t * m) * (t * S**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * S**2)


class StraightField(torch.nn.Module):
    """The straight velocity of the coupling z -> obs + S z."""

    def forward(self, obs, x, t, t_next=None):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1)
        m = obs.view(-1, 1, 1)
        return m + (S - 1) * (x - t * m) / (1 - t + t * S)


def _obs(n: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, generator=torch.Generator().manual_seed(seed)) * 4 - 2


def _pairs(n: int, seed: int, steps: int = 1024) -> Pairs:
    gen = torch.Generator().manual_seed(seed)
    return teacher_pairs(GaussianTeacher(), _obs(), n, steps, (1, 1), gen, progress=False)


def test_the_teachers_coupling_is_deterministic_and_the_closed_form_map() -> None:
    first, again = _pairs(256, seed=3), _pairs(256, seed=3)
    assert torch.equal(first.noise, again.noise) and torch.equal(first.actions, again.actions)
    # the same noise through the teacher again, in another order: the same actions (a map of z and obs)
    order = torch.randperm(256, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(9)
    redo = ode_actions(GaussianTeacher(), first.obs[order], first.noise[order], 1024)
    assert torch.allclose(redo, first.actions[order], atol=1e-6)
    exact = first.obs.view(-1, 1, 1) + S * first.noise
    assert (first.actions - exact).abs().max().item() < 5e-3  # 1024 Euler steps of the analytic field
    other = teacher_pairs(GaussianTeacher(), _obs(), 256, 64, (1, 1), gen, progress=False)
    assert not torch.allclose(other.noise, first.noise)


def test_the_curved_teacher_needs_many_steps_and_the_straight_field_one() -> None:
    obs = _obs(2000, seed=5)
    noise = torch.randn(2000, 1, 1, generator=torch.Generator().manual_seed(6))
    target = ode_actions(GaussianTeacher(), obs, noise, 1024)
    teacher = straightness(GaussianTeacher(), target, obs, noise)
    straight = straightness(StraightField(), target, obs, noise)
    assert teacher[1] == pytest.approx(S**2, rel=0.1)  # one step lands on m: error S^2 z^2
    assert straight[1] < 1e-4 and straight[2] < 1e-4


def test_the_exact_straight_field_has_zero_reflow_loss() -> None:
    pairs = _pairs(256, seed=0)
    gen = torch.Generator().manual_seed(0)
    for timesteps in ("uniform", "u_shaped"):
        for loss in ("l2", "huber"):
            value = reflow_loss(StraightField(), pairs.obs, pairs.noise, pairs.actions, timesteps, loss, gen)
            assert value.item() < 2e-3  # the pairs are 1024-step Euler: exact to ~1e-3; the Huber c ~ 5e-4


def test_the_students_one_step_map_approaches_the_teachers_coupling() -> None:
    """Reflow of the curved teacher: the student's 1-step error against the teacher's ODE falls
    with training, far below the teacher's own 1-step error."""
    torch.manual_seed(0)
    pairs = _pairs(4096, seed=1)
    obs = _obs(400, seed=7)
    noise = torch.randn(400, 1, 1, generator=torch.Generator().manual_seed(8))
    target = ode_actions(GaussianTeacher(), obs, noise, 1024)
    teacher_error = straightness(GaussianTeacher(), target, obs, noise)[1]
    student = VelocityMLP(1, 1, 1, (64, 64), 16)
    errors = [straightness(student, target, obs, noise)[1]]
    cfg = PretrainConfig(steps=150, batch_size=256, lr=3e-3, ema_decay=0.0)
    for stage in range(2):
        student, _ = train_student(student, pairs, cfg, "u_shaped", "l2", seed=stage, progress=False)
        errors.append(straightness(student, target, obs, noise)[1])
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < teacher_error / 5


def test_u_shaped_timesteps_follow_their_density() -> None:
    t = sample_timesteps(200_000, "u_shaped", torch.Generator().manual_seed(0), torch.device("cpu")).numpy()
    assert t.min() >= 0 and t.max() <= 1
    grid = np.linspace(0, 1, 2001)
    density = np.cosh(4.0 * (2 * grid - 1))
    cdf = np.concatenate([[0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    cdf /= cdf[-1]
    for q in (0.05, 0.2, 0.5, 0.8, 0.95):
        assert (t <= q).mean() == pytest.approx(np.interp(q, grid, cdf), abs=5e-3)
    u = sample_timesteps(200_000, "uniform", torch.Generator().manual_seed(0), torch.device("cpu")).numpy()
    assert (u <= 0.2).mean() == pytest.approx(0.2, abs=5e-3)


def test_pseudo_huber_by_hand() -> None:
    err = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]])  # d = 2
    c = 0.00054 * math.sqrt(2)
    assert pseudo_huber(err).tolist() == pytest.approx([math.sqrt(25 + c * c) - c, 0.0])


# ------------------------------------------------------------------------------ the command
TINY_PRETRAIN = [
    "ray.enabled=false",
    "pretrain.steps=40",
    "pretrain.demos.episodes=10",
    "eval.episodes=2",
    "policy.hidden_dims=[16,16]",
]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("reflow") / "run"
    quickstart = str(Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml")
    assert main(["pretrain", quickstart, *TINY_PRETRAIN, "--run-dir", str(run), "--no-progress"]) == 0
    return str(run)


def test_flowrl_reflow_writes_a_student_that_fine_tuning_loads(pretrained_run, capsys) -> None:
    run = Path(pretrained_run)
    args = ["reflow", str(run), "--pairs", "64", "--teacher-steps", "3", "--steps", "5", "--batch-size", "16"]
    assert main([*args, "--eval-episodes", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "straightness" in out and "student_K1: success" in out
    report = json.loads((run / "reflow" / "reflow.json").read_text())
    assert set(report["straightness_after"]) == {"1_step", "2_step"}
    assert report["straightness_before"]["1_step"] >= 0
    (pairs_file,) = (run / "reflow").glob("pairs-*-K3-N64-H*-seed0.pt")
    saved = torch.load(pairs_file, weights_only=True)
    assert saved["noise"].shape == (64, 4, 2) and saved["actions"].shape == (64, 4, 2)
    finetune = load_config(run / "reflow" / "finetune.yaml", [])
    assert finetune.policy.denoising_steps == 1 and finetune.policy.pretrained == str(
        (run / "reflow" / "student.pt").resolve()
    )
    load_actor(finetune.policy.pretrained, finetune.policy, 2, 2)  # the pretrained.pt format
    assert yaml.safe_load((run / "reflow" / "finetune.yaml").read_text())["policy"]["denoising_steps"] == 1
    # the same teacher (named by its checkpoint this time) and settings, another --out: the pairs are reused
    again = ["reflow", str(run / "pretrained.pt"), *args[2:], "--out", str(run / "second"), "--eval-episodes", "0"]
    assert main([*again, "--no-progress"]) == 0
    assert "reusing" in capsys.readouterr().out
    assert torch.equal(torch.load(pairs_file, weights_only=True)["actions"], saved["actions"])
    assert (run / "second" / "student.pt").is_file() and len(list((run / "reflow").glob("pairs-*"))) == 1


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--pairs", "0"], "--pairs must be >= 1, got 0"),
        (["--teacher-steps", "0"], "--teacher-steps must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0"),
    ],
)
def test_bad_numbers_are_one_line_before_any_file(pretrained_run, extra, needle, capsys, tmp_path) -> None:
    out = tmp_path / "out"
    assert main(["reflow", pretrained_run, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flowrl: error: ") and needle in err[0]
    assert not out.exists()


def test_a_missing_run_or_checkpoint_is_one_line(tmp_path, capsys) -> None:
    assert main(["reflow", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["reflow", str(tmp_path / "empty")]) == 2
    assert "has no config.yaml" in capsys.readouterr().err


def test_a_run_of_another_policy_family_is_one_line(tmp_path, capsys) -> None:
    from flowrl.config import build_config, save_config

    run = tmp_path / "gaussian"
    run.mkdir()
    save_config(build_config({"name": "g", "policy": {"type": "gaussian"}}), run / "config.yaml")
    (run / "pretrained.pt").write_bytes(b"not read")
    assert main(["reflow", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trains a gaussian policy; reflow straightens flow policies" in err[0]


def test_a_locomotion_evaluation_reports_returns_and_no_success() -> None:
    """MuJoCo locomotion has no success: the reflow report and its summary give the return with
    its standard error only (they read 'success 0.00' before), while the quickstart's task keeps it."""
    from flowrl.algos.reflow import _evaluate, _summary
    from flowrl.models.build import build_actor

    root = Path(__file__).resolve().parents[2] / "experiments"
    cfg = load_config(root / "locomotion" / "hopper_reinflow.yaml", ["policy.hidden_dims=[8,8]", "seed=3"])
    found = _evaluate(cfg, build_actor(cfg.policy, 11, 3), 1, 2)
    assert set(found) == {"return", "return_se"} and found["return_se"] >= 0
    toy = load_config(root / "quickstart.yaml", ["policy.hidden_dims=[8,8]"])
    assert "success" in _evaluate(toy, build_actor(toy.policy, 2, 2), 1, 2)
    report = {
        "teacher_steps": 32,
        "held_out_observations": 8,
        "straightness_gain_1_step": 2.0,
        "student": "s.pt",
        "finetune_yaml": None,
        "straightness_before": {"1_step": 0.2, "2_step": 0.1},
        "straightness_after": {"1_step": 0.1, "2_step": 0.05},
        "success": {"student_K1": found, "episodes": 2},
    }
    line = next(line for line in _summary(report).splitlines() if "student_K1" in line)
    assert "success" not in line and f"return {found['return']:.3f} ± {found['return_se']:.3f}" in line
