"""README "Adding a task": a locomotion task added as YAML files only passes the suite's task
tests and runs end to end at tiny size from the command line, with no file edited.

The task's three files are the README's own blocks (tests/readme.py), so the worked example
the README shows is the one these tests run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flowrl.bench.tasks import TASKS_DIR_VAR, TaskError
from flowrl.cli import main
from flowrl.core.demos_file import read_metadata
from flowrl.runlog import read_metrics
from tests.readme import readme_command, readme_files

ROOT = Path(__file__).resolve().parents[2]
FILES = (
    "experiments/locomotion/tasks/doublependulum.yaml",
    "experiments/locomotion/doublependulum_expert.yaml",
    "experiments/locomotion/doublependulum_reinflow.yaml",
)
TINY = readme_command("flowrl bench locomotion --tasks doublependulum")[1:]  # the words after `flowrl`


def _checkout_copy(folder: Path) -> Path:
    """This checkout's code, tests and experiments (no .git, caches or results) under ``folder``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("flowrl", "envs", "tests", "experiments"):
        shutil.copytree(ROOT / name, folder / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, folder / name)
    return folder


def test_a_task_added_by_yaml_alone_passes_the_task_tests(tmp_path):
    """The issue's case: the task's files dropped into experiments/ of a checkout, nothing else
    changed. The task tests discover it (no list of tasks to extend), require only the method
    and size it declares, smoke-run its two files and check its env."""
    checkout = _checkout_copy(tmp_path / "checkout")
    readme_files(checkout, *FILES)
    env = {k: v for k, v in os.environ.items() if k != TASKS_DIR_VAR}
    tests = ["tests/test_experiments.py", "tests/bench/test_locomotion_tasks.py", "tests/envs/test_mujoco.py"]
    select = "ships or belongs or variants or doublependulum or InvertedDoublePendulum"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *tests, "-k", select],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = [line for line in proc.stdout.splitlines() if line.startswith("PASSED")]
    # the copy's own code ran (it alone knows the task): its structure test, two smoke runs, the env check
    for test in (
        "test_every_locomotion_task_ships_the_files_it_declares[doublependulum]",
        "test_locomotion_experiment_runs_with_a_tiny_budget[locomotion/doublependulum_expert.yaml]",
        "test_locomotion_experiment_runs_with_a_tiny_budget[locomotion/doublependulum_reinflow.yaml]",
        "test_chunked_mujoco_env_passes_the_checker_and_sums_rewards[InvertedDoublePendulum-v5]",
        "test_every_locomotion_file_belongs_to_a_task",
    ):
        assert any(test in line for line in passed), f"{test} did not pass:\n" + "\n".join(passed)


def test_the_readme_tiny_command_runs_the_new_task_end_to_end(tmp_path, monkeypatch):
    """Expert's experiment, dataset recipe, pretraining and fine-tuning all take their tiny
    settings from the command line; the tiny expert and data are cached under tagged names,
    apart from the task's own."""
    readme_files(tmp_path, *FILES)
    monkeypatch.chdir(tmp_path)  # the bench's cache/ is relative to the working folder
    args = [*TINY, "--tasks-dir", str(tmp_path / "experiments/locomotion/tasks")]
    args[args.index("--out") + 1] = str(tmp_path / "out")
    assert main(args) == 0
    results = json.loads((tmp_path / "out" / "locomotion.json").read_text())
    (row,) = results["tasks"]["doublependulum"]["rows"]
    assert row["variant"] == "ReinFlow rectified flow K=4" and row["env_steps"] > 0
    assert results["expert_overrides"] == [TINY[i + 1] for i, w in enumerate(TINY) if w == "--set-expert"]
    (dataset,) = (tmp_path / "cache" / "datasets").iterdir()
    assert dataset.name.startswith("doublependulum-medium-") and dataset.name != "doublependulum-medium.npz"
    recorded = read_metadata(dataset)
    assert recorded["episodes"] == "2" and recorded["policy_iterations"] == "1"  # --set-data
    (acting,) = (tmp_path / "cache" / "experts").iterdir()
    assert acting.name.startswith("doublependulum-it1-")
    records = read_metrics(acting)
    assert records[-1]["iteration"] == 1 and records[-1]["env_steps"] == 8 * 16  # --set-expert: 8 envs x 16 steps
    (run,) = [p for p in (tmp_path / "out" / "runs" / "doublependulum").iterdir() if "-pretrain-" not in p.name]
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1]  # --set algo.iterations=1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set-data", "large.episodes=2"], "--set-data large.episodes=2: task doublependulum has no dataset 'large'"),
        (["--set-data", "medium.episodes=0"], "datasets.medium.episodes: Input should be greater than or equal to 1"),
        (["--set-data", "medium=3"], "--set-data medium=3: expected DATASET.KEY=VALUE"),
        (["--set-data", "medium.noise=1"], "unknown key 'datasets.medium.noise'"),
        (
            ["--set-expert", "algo.nope=1"],
            "doublependulum_expert.yaml: unknown key 'algo.nope' (command-line override)",
        ),
        (["--set", "policy.horizon=0"], "doublependulum_reinflow.yaml: policy.horizon: Input should be greater than"),
    ],
)
def test_bad_overrides_of_any_step_are_one_line_before_any_work(flags, message, tmp_path, monkeypatch, capsys):
    readme_files(tmp_path, *FILES)
    monkeypatch.chdir(tmp_path)
    bench = ["bench", "locomotion", "--tasks", "doublependulum", "--tasks-dir", "experiments/locomotion/tasks"]
    assert main([*bench, "--out", "out", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_set_data_gives_a_task_with_the_recipe_overridden():
    from flowrl.bench.tasks import DEFAULT_TASKS_DIR, load_task

    hopper = load_task(DEFAULT_TASKS_DIR / "hopper.yaml")
    tiny = hopper.with_data_overrides(["medium.episodes=3", "medium.actions=deterministic"])
    assert (tiny.spec.datasets["medium"].episodes, tiny.spec.datasets["medium"].actions) == (3, "deterministic")
    assert (
        tiny.spec.datasets["expert"] == hopper.spec.datasets["expert"]
        and hopper.spec.datasets["medium"].episodes == 100
    )
    with pytest.raises(TaskError, match="--set-data ~medium.episodes: expected DATASET.KEY=VALUE"):
        hopper.with_data_overrides(["~medium.episodes"])
