"""Smoke test of every experiment file (experiments/*.yaml and experiments/locomotion/) with a
tiny budget (the acceptance check that each file loads, pretrains, trains with its algorithm,
evaluates and checkpoints). The full locomotion runs are `flowrl bench locomotion`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from flowrl.cli import main
from flowrl.config import build_config
from flowrl.models.build import build_actor, build_policy
from flowrl.rollout.demos import collect_demos, save_demos
from flowrl.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
TOP_LEVEL = sorted(EXPERIMENTS.glob("*.yaml"))
LOCOMOTION = sorted((EXPERIMENTS / "locomotion").rglob("*.yaml"))
COMMON = ["ray.enabled=false", "env.num_workers=1", "algo.iterations=1", "algo.epochs=1", "eval.episodes=1"]
# The tiny budget of each algorithm (algo.type of the file): PPO collects steps_per_iteration
# policy steps per env; GRPO one episode of at most max_steps policy steps per env, in groups
# of envs sharing a reset state (8 policy steps let a TwoGoal episode end: 30 env steps).
GRPO_ENVS, GRPO_GROUP, GRPO_MAX_STEPS = 16, 8, 8
TINY = {
    "ppo": [*COMMON, "env.num_envs=2", "algo.steps_per_iteration=3", "algo.minibatch_size=4"],
    "grpo": [
        *COMMON,
        f"env.num_envs={GRPO_ENVS}",
        f"env.group_size={GRPO_GROUP}",
        f"algo.max_steps={GRPO_MAX_STEPS}",
        "algo.minibatch_size=16",
    ],
}


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
    names = {p.relative_to(EXPERIMENTS / "locomotion").as_posix() for p in LOCOMOTION}
    for task in ("hopper", "walker2d"):
        assert f"{task}_expert.yaml" in names
        for method in ("reinflow", "shortcut", "meanflow", "dppo", "gaussian"):
            assert f"{task}_{method}.yaml" in names and f"paper/{task}_{method}.yaml" in names


def test_both_algorithms_have_a_quickstart():
    algos = {p.name: yaml.safe_load(p.read_text())["algo"]["type"] for p in TOP_LEVEL}
    assert algos.get("quickstart.yaml") == "ppo" and algos.get("quickstart_grpo.yaml") == "grpo"


def _smoke(path: Path, overrides: list[str], tmp_path: Path) -> None:
    algo = yaml.safe_load(path.read_text())["algo"]["type"]
    tiny = TINY[algo]
    assert main(["train", str(path), *tiny, *overrides, f"runs_dir={tmp_path}", "--no-progress"]) == 0
    (run,) = tmp_path.iterdir()
    records = read_metrics(run)
    assert [r["iteration"] for r in records] == [0, 1]
    assert records[1]["train/ratio_check_dev"] <= 1e-4
    assert records[1]["env_steps"] > 0
    if algo == "ppo":
        assert "losses/value" in records[1]
    else:  # no critic; groups of env.group_size envs, one episode each of at most max_steps chunks
        assert "losses/value" not in records[1] and records[1]["grpo/groups"] == GRPO_ENVS / GRPO_GROUP
        assert records[1]["charts/episodes"] == GRPO_ENVS
        horizon = yaml.safe_load((run / "config.yaml").read_text())["policy"]["horizon"]
        assert records[1]["env_steps"] <= GRPO_ENVS * GRPO_MAX_STEPS * horizon
    assert (run / "policy.pt").is_file()
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["iteration"] == 1 and "algo" in checkpoint and "learner" not in checkpoint
    assert yaml.safe_load((run / "config.yaml").read_text())["algo"]["type"] == algo


@pytest.mark.parametrize("path", TOP_LEVEL, ids=lambda p: p.relative_to(EXPERIMENTS).as_posix())
def test_experiment_runs_with_a_tiny_budget(path, tmp_path):
    """The quickstarts pretrain on the env's scripted demonstrations (enough that some GRPO
    groups disagree on the outcome, so that the update runs)."""
    overrides = ["pretrain.demos.episodes=40", "pretrain.steps=300", "policy.hidden_dims=[32,32]"]
    _smoke(path, overrides, tmp_path)
    if yaml.safe_load(path.read_text())["algo"]["type"] == "grpo":
        (run,) = tmp_path.iterdir()
        update = read_metrics(run)[1]
        assert update["grpo/kept_steps"] > 0, f"every group tied: the GRPO update did not run ({update})"
        assert update["train/epochs"] == 1.0 and "losses/policy" in update


@pytest.mark.parametrize("path", LOCOMOTION, ids=lambda p: p.relative_to(EXPERIMENTS).as_posix())
def test_locomotion_experiment_runs_with_a_tiny_budget(path, datasets, tmp_path):
    text = path.read_text()
    env_id = "Hopper-v5" if "Hopper-v5" in text else "Walker2d-v5"
    overrides = []
    if "pretrain: null" not in text:
        overrides += [f"pretrain.demos.path={datasets[env_id]}", "pretrain.steps=3"]
    _smoke(path, overrides, tmp_path)
