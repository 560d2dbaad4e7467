"""`flowrl bench rollout` end to end on a tiny budget: every variant measured, files written."""

import json

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
