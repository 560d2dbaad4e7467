"""`flowrl bench rollout` end to end on a tiny budget: every variant measured, files written;
an unknown task or a size below 1 is one line, before Ray starts."""

import json
import re

import pytest

from flowrl.cli import main


def test_rollout_bench_writes_json_and_chart(tmp_path, capsys):
    assert (
        main(
            [
                "bench",
                "rollout",
                "--tasks",
                "toy",
                "--num-envs",
                "2",
                "--steps",
                "2",
                "--max-workers",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "rollout.json").read_text())
    row = results["tasks"]["flowrl/TwoGoal-v0"]["env_steps_per_s"]
    assert set(row) == {"raw_env", "in_process", "ray_1", "ray_2"}
    assert all(v > 0 for v in row.values())
    res = results["tasks"]["flowrl/TwoGoal-v0"]
    assert res["ray_2_vs_raw"] == row["ray_2"] / row["raw_env"]
    assert res["ray_1_efficiency"] == 1.0
    assert (tmp_path / "rollout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Ray collector, 2 workers |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--tasks", "nosuchtask"], r"unknown task 'nosuchtask' \(--tasks\); give toy \(flowrl/TwoGoal-v0\), mujoco "),
        (["--tasks", "toy,nosuchtask"], r"unknown task 'nosuchtask'.*flowrl/TwoGoal-v0"),
        (["--tasks", ","], r"--tasks names no task; give toy"),
        (["--tasks", "toy", "--num-envs", "0"], r"--num-envs must be at least 1, got 0"),
        (["--tasks", "toy", "--max-workers", "0"], r"--max-workers must be at least 1, got 0"),
    ],
)
def test_bad_tasks_and_sizes_are_one_line_before_ray_starts(tmp_path, capsys, monkeypatch, argv, expected):
    import flowrl.rollout.ray_runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr(flowrl.rollout.ray_runtime, "ray_session", no_ray)
    out = tmp_path / "out"
    assert main(["bench", "rollout", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("flowrl: error: flowrl bench rollout: ")
    assert re.search(expected, err), err
    assert not out.exists()
