"""Locomotion tasks as data (flowrl.bench.tasks): a task added as files only, in a temporary
folder, is picked up by the benchmark, the CLI help and the smoke tests; task files are
validated strictly (one line naming the file and the key)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from flowrl.bench.locomotion import VARIANTS
from flowrl.bench.tasks import DEFAULT_TASKS_DIR, METHODS, TASKS_DIR_VAR, TaskError, load_task, load_tasks, select_tasks
from flowrl.cli import main
from flowrl.core.demos_file import read_metadata

ROOT = Path(__file__).resolve().parents[2]

# A new task on a cheap env (InvertedPendulum-v5: 4-dim observations, 1-dim actions), with a
# tiny expert and two methods, CPU-sized only.
TASK = {
    "env_id": "InvertedPendulum-v5",
    "expert": "pendulum_expert.yaml",
    "methods": ["reinflow", "gaussian"],
    "sizes": ["cpu"],
    "datasets": {
        "medium": {"policy_iterations": 1, "actions": "sample", "episodes": 2},
        "expert": {"actions": "sample", "episodes": 2},
    },
}
COMMON = {
    "seed": 0,
    "env": {"id": "InvertedPendulum-v5", "num_envs": 2, "num_workers": 1},
    "eval": {"episodes": 1, "every": 1},
    "ray": {"enabled": False},
}
PPO = {"type": "ppo", "iterations": 2, "steps_per_iteration": 4, "epochs": 1, "minibatch_size": 8}
EXPERIMENTS = {
    "pendulum_expert.yaml": {
        "name": "pendulum-expert",
        "policy": {"type": "gaussian", "horizon": 1, "hidden_dims": [8], "obs_norm": "running"},
        "pretrain": None,
        "algo": PPO,
    },
    "pendulum_gaussian.yaml": {
        "name": "pendulum-gaussian",
        "policy": {"type": "gaussian", "horizon": 2, "hidden_dims": [8]},
        "pretrain": {"demos": {"path": "cache/datasets/pendulum-medium.npz"}, "steps": 3, "batch_size": 8},
        "algo": PPO,
    },
    "pendulum_reinflow.yaml": {
        "name": "pendulum-reinflow",
        "policy": {"type": "rectified_flow", "horizon": 2, "denoising_steps": 2, "hidden_dims": [8]},
        "pretrain": {"demos": {"path": "cache/datasets/pendulum-medium.npz"}, "steps": 3, "batch_size": 8},
        "algo": {**PPO, "clip": 0.01},
    },
}


def _new_task(root: Path) -> Path:
    """tasks/pendulum.yaml and its experiment files under ``root``; returns the tasks folder."""
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "pendulum.yaml").write_text(yaml.safe_dump(TASK))
    for name, body in EXPERIMENTS.items():
        (root / name).write_text(yaml.safe_dump({**COMMON, **body}, sort_keys=False))
    return tasks


def test_a_task_added_as_data_is_listed_checked_and_in_the_cli_help(tmp_path, monkeypatch, capsys):
    folder = _new_task(tmp_path / "locomotion")
    (task,) = select_tasks(["all"], folder)
    assert task.name == "pendulum" and task.spec.env_id == "InvertedPendulum-v5"
    assert [p.name for p in task.files()] == [
        "pendulum_expert.yaml",
        "pendulum_reinflow.yaml",
        "pendulum_gaussian.yaml",
    ]
    with pytest.raises(TaskError, match="unknown locomotion task.*hopper.*tasks in .*: pendulum"):
        select_tasks(["hopper"], folder)
    with pytest.raises(TaskError, match="no paper-sized experiments"):
        task.method_file("gaussian", "paper")
    monkeypatch.setenv(TASKS_DIR_VAR, str(folder))
    with pytest.raises(SystemExit) as done:
        main(["bench", "--help"])
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    listed = help_text.split("locomotion (required):", 1)[1].split(";", 2)[1]  # "tasks in DIR: NAMES"
    assert "pendulum" in listed and "hopper" not in listed  # the names of the folder's tasks, read now


def test_the_smoke_tests_discover_and_run_a_task_added_as_data(tmp_path):
    folder = _new_task(tmp_path / "locomotion")
    env = {**os.environ, TASKS_DIR_VAR: str(folder)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_experiments.py", "-k", "pendulum"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "4 passed" in proc.stdout  # the task's files as it declares them; pendulum_expert, _reinflow, _gaussian


def test_the_benchmark_runs_a_task_added_as_data(tmp_path, monkeypatch, capsys):
    """Expert, D4RL-like medium dataset (a 1-iteration policy sampling its actions), pretraining
    and fine-tuning of a new task; --data-only makes the other datasets; a dataset recorded with
    another recipe is recorded again (its acting policy is cached)."""
    folder = _new_task(tmp_path / "locomotion")
    monkeypatch.chdir(tmp_path)  # the bench's cache/ is relative to the working folder
    bench = ["bench", "locomotion", "--tasks", "pendulum", "--tasks-dir", str(folder), "--no-progress"]
    assert main([*bench, "--variants", "Gaussian PPO", "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "locomotion.json").read_text())
    (row,) = results["tasks"]["pendulum"]["rows"]
    assert row["variant"] == "Gaussian PPO" and row["env_steps"] > 0
    medium = tmp_path / "cache" / "datasets" / "pendulum-medium.npz"
    recorded = read_metadata(medium)
    assert recorded["env_id"] == "InvertedPendulum-v5" and recorded["actions"] == "sample"
    assert recorded["policy_iterations"] == "1" and recorded["episodes"] == "2"
    assert recorded["policy"] == str(tmp_path / "cache" / "experts" / "pendulum-it1" / "policy.pt")
    assert not (tmp_path / "cache" / "experts" / "pendulum").exists(), "the expert itself is not needed yet"

    capsys.readouterr()
    assert main([*bench, "--data-only"]) == 0
    assert "pendulum: expert cache/datasets/pendulum-expert.npz, medium" in capsys.readouterr().out
    expert = read_metadata(tmp_path / "cache" / "datasets" / "pendulum-expert.npz")
    assert expert["policy_iterations"] == "2" and expert["actions"] == "sample"
    before = medium.stat().st_mtime_ns

    TASK["datasets"]["medium"]["episodes"] = 3
    try:
        (folder / "pendulum.yaml").write_text(yaml.safe_dump(TASK))
    finally:
        TASK["datasets"]["medium"]["episodes"] = 2
    assert main([*bench, "--data-only"]) == 0
    out = capsys.readouterr().out
    assert "episodes 2 instead of 3" in out and "re-recording" in out
    assert read_metadata(medium)["episodes"] == "3" and medium.stat().st_mtime_ns != before
    with np.load(medium) as data:
        assert len(data["episode_ends"]) == 3


def test_task_files_are_validated_strictly(tmp_path):
    def write(name: str, **changes) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**TASK, **changes}))
        return path

    cases = [
        (write("a", budget=3), "a.yaml: unknown key 'budget'; valid keys: env_id, expert, methods, sizes, datasets"),
        (
            write("b", datasets={"medium": {"noise": 0.5}}),
            "b.yaml: unknown key 'datasets.medium.noise'; valid keys in datasets.medium: policy_iterations",
        ),
        (write("c", methods=["reinflow", "sac"]), "c.yaml: methods: unknown method(s) sac"),
        (write("d", datasets={"expert": {}}), "d.yaml: datasets: missing the 'medium' dataset"),
        (write("e", sizes=["gpu"]), "e.yaml: sizes.0: Input should be 'cpu' or 'paper'"),
        (write("Bad-Name"), "a task's file name is its name"),
    ]
    for path, needle in cases:
        with pytest.raises(TaskError) as err:
            load_task(path)
        assert needle in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)


def test_every_method_a_task_may_list_has_bench_variants():
    assert {v.method for v in VARIANTS} == set(METHODS)
    shipped = load_tasks(DEFAULT_TASKS_DIR)  # whatever the folder holds: no list of tasks to keep in step
    assert shipped and all(task.file.parent == DEFAULT_TASKS_DIR for task in shipped.values())


@pytest.mark.parametrize("task", load_tasks(DEFAULT_TASKS_DIR).values(), ids=lambda t: t.name)
def test_every_variant_resolves_to_a_valid_config_side_by_side(task):
    """Each variant of a shipped task loads (its file with the variant's overrides, each size)
    without training; the log-prob-free methods run GRPO's budget: the likelihood-free ones
    (nft, awm) its groups, envs, episode length and iterations, AC-Flow its envs, episode length
    and iterations (one episode per env, no groups)."""
    from flowrl.config import load_config

    for size in task.spec.sizes:
        # a task added as data may list fewer methods (e.g. reinflow alone): no GRPO budget to compare
        grpo = load_config(task.method_file("grpo", size)) if "grpo" in task.spec.methods else None
        for variant in VARIANTS:
            if variant.method not in task.spec.methods:
                continue
            cfg = load_config(task.method_file(variant.method, size), list(variant.overrides))
            assert cfg.env.id == task.spec.env_id
            if grpo is not None and variant.method in ("nft", "awm", "ac_flow"):
                assert cfg.algo.type == variant.method
                assert (cfg.env.num_envs, cfg.algo.max_steps, cfg.algo.iterations) == (
                    grpo.env.num_envs,
                    grpo.algo.max_steps,
                    grpo.algo.iterations,
                )
                assert cfg.policy == grpo.policy and cfg.pretrain == grpo.pretrain  # the same pretrained network
            if grpo is not None and variant.method in ("nft", "awm"):
                assert cfg.env.group_size == grpo.env.group_size and cfg.algo.outcome == "return"
