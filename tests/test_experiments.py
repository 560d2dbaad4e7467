"""Smoke test of every locomotion experiment file with a tiny budget (the acceptance check
that each file loads, pretrains, trains, evaluates and checkpoints). The full runs are
`flowrl bench locomotion`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowrl.cli import main
from flowrl.config import build_config
from flowrl.models.build import build_actor, build_policy
from flowrl.rollout.demos import collect_demos, save_demos
from flowrl.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LOCOMOTION = sorted((ROOT / "experiments" / "locomotion").rglob("*.yaml"))
TINY = [
    "ray.enabled=false",
    "ray.num_workers=1",
    "env.num_envs=2",
    "ppo.iterations=1",
    "ppo.steps_per_iteration=3",
    "ppo.epochs=1",
    "ppo.minibatch_size=4",
    "eval.episodes=1",
]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """A few short episodes of a random Gaussian policy per task: enough to run the pipeline."""
    out = {}
    for env_id, dims in {"Hopper-v5": (11, 3), "Walker2d-v5": (17, 6)}.items():
        cfg = build_config({"name": "d", "policy": {"type": "gaussian", "horizon": 1, "hidden_dims": [8]}})
        torch.manual_seed(0)
        policy = build_policy(cfg, build_actor(cfg.policy, *dims))
        demos = collect_demos(policy, env_id, episodes=3, seed=0, action_noise=1.0, progress=False)
        out[env_id] = save_demos(demos, tmp_path_factory.mktemp("data") / f"{env_id}.npz")
    return out


def test_every_locomotion_task_has_cpu_and_paper_files():
    names = {p.relative_to(ROOT / "experiments" / "locomotion").as_posix() for p in LOCOMOTION}
    for task in ("hopper", "walker2d"):
        assert f"{task}_expert.yaml" in names
        for method in ("reinflow", "shortcut", "meanflow", "dppo", "gaussian"):
            assert f"{task}_{method}.yaml" in names and f"paper/{task}_{method}.yaml" in names


@pytest.mark.parametrize("path", LOCOMOTION, ids=lambda p: p.relative_to(ROOT / "experiments").as_posix())
def test_locomotion_experiment_runs_with_a_tiny_budget(path, datasets, tmp_path):
    text = path.read_text()
    env_id = "Hopper-v5" if "Hopper-v5" in text else "Walker2d-v5"
    overrides = [*TINY, f"runs_dir={tmp_path}"]
    if "pretrain: null" not in text:
        overrides += [f"pretrain.demos.path={datasets[env_id]}", "pretrain.steps=3"]
    assert main(["train", str(path), *overrides, "--no-progress"]) == 0
    (run,) = tmp_path.iterdir()
    records = read_metrics(run)
    assert [r["iteration"] for r in records] == [0, 1]
    assert records[1]["train/ratio_check_dev"] <= 1e-4
    assert (run / "policy.pt").is_file() and (run / "checkpoints" / "last.pt").is_file()
