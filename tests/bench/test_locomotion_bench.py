"""`flowrl bench locomotion` end to end with a tiny budget (the real one is a separate command)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import trim_mean

from flowrl.bench.locomotion import iqm, summarise
from flowrl.cli import main
from flowrl.config import build_config
from flowrl.core.demos_file import save_demos
from flowrl.models.build import build_actor, build_policy
from flowrl.rollout.demos import collect_demos

TINY = [
    "ray.enabled=false",
    "env.num_workers=1",
    "env.num_envs=2",
    "algo.iterations=2",
    "algo.steps_per_iteration=3",
    "algo.epochs=1",
    "algo.minibatch_size=4",
    "eval.episodes=1",
    "eval.every=1",
    "pretrain.steps=3",
]


def test_locomotion_bench_runs_variants_side_by_side(tmp_path, monkeypatch):
    cfg = build_config({"name": "d", "policy": {"type": "gaussian", "horizon": 1, "hidden_dims": [8]}})
    torch.manual_seed(0)
    demos = collect_demos(build_policy(cfg, build_actor(cfg.policy, 11, 3)), "Hopper-v5", 3, 0, 1.0, progress=False)
    save_demos(demos, tmp_path / "cache" / "datasets" / "hopper-medium.npz")
    monkeypatch.chdir(tmp_path)  # the bench's cache/ is relative to the working folder
    args = [
        "bench",
        "locomotion",
        "--tasks",
        "hopper",
        "--variants",
        "reinflow,Gaussian PPO",
        "--out",
        str(tmp_path / "out"),
        "--seeds",
        "0,1",
        "--eval-episodes",
        "3",
        "--no-progress",
    ]
    assert main([*args, *[a for o in TINY for a in ("--set", o)]]) == 0
    results = json.loads((tmp_path / "out" / "locomotion.json").read_text())
    assert results["seeds"] == [0, 1]
    rows = results["tasks"]["hopper"]["rows"]
    expected = [
        "ReinFlow rectified flow K=4",
        "ReinFlow rectified flow K=1",
        "Flow-SDE rectified flow K=4",
        "Gaussian PPO",
    ]
    assert [r["variant"] for r in rows] == expected
    for row in rows:
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        after = np.array([r["return_after"] for r in row["runs"]])
        assert row["return_after"] == pytest.approx(after.mean()) and row["return_after_std"] == pytest.approx(
            after.std()
        )
        for run in row["runs"]:
            config = yaml.safe_load((Path(run["run"]) / "config.yaml").read_text())
            assert config["seed"] == run["seed"]
            assert config["eval"]["episodes"] == 1  # --set wins over --eval-episodes
            assert run["env_steps"] > 0 and run["finetune_s"] > 0
            assert [round(r, 6) for _, r in run["curve"]][0] == round(run["return_before"], 6)
            assert len(run["curve"]) == 3  # before + every iteration
    # per seed, K = 4, K = 1 and Flow-SDE fine-tune the same pretrained network; every variant and seed has its
    # own run; Flow-SDE runs the ReinFlow file with the fixed noise in place of the learned one
    for seed in (0, 1):
        configs = [yaml.safe_load((Path(r["runs"][seed]["run"]) / "config.yaml").read_text()) for r in rows]
        pretrained = [c["policy"]["pretrained"] for c in configs]
        assert pretrained[0] == pretrained[1] == pretrained[2] != pretrained[3]
        assert configs[0]["mdp"]["converter"]["type"] == "reinflow" and "noise_lr" in configs[0]["algo"]
        assert configs[2]["mdp"]["converter"] == {"type": "flow_sde", "noise_level": 0.3}
        assert "noise_lr" not in configs[2]["algo"] and "entropy_coef" not in configs[2]["algo"]
    assert len({run["run"] for r in rows for run in r["runs"]}) == 8
    assert (tmp_path / "out" / "locomotion.png").stat().st_size > 0
    assert any((tmp_path / "out" / "tensorboard" / "hopper").rglob("events.out.tfevents.*"))


def test_iqm_is_scipys_trimmed_mean():
    rng = np.random.default_rng(0)
    for n in (1, 3, 4, 7, 20, 21):
        x = rng.normal(size=n)
        assert iqm(x) == pytest.approx(float(trim_mean(x, 0.25)))


def test_bad_seed_list_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "locomotion", "--tasks", "hopper", "--seeds", "a,b"])
    assert "comma list of integers" in capsys.readouterr().err


def _row(label: str, before: float, after: float) -> dict:
    """A variant's row of one seed's run: 1 s of fine-tuning, so s per +100 return = 100 / gain."""
    run = {
        "seed": 0,
        "run": "r",
        "return_before": before,
        "return_after": after,
        "iqm_after": after,
        "return_best": after,
        "return_worst": before,
        "env_steps": 10,
        "finetune_s": 1.0,
        "pretrain_s": 1.0,
        "curve": [(0, before), (10, after)],
    }
    return summarise(label, [run])


def test_tasks_run_as_separate_commands_share_one_results_file(tmp_path):
    from flowrl.bench.locomotion import RESULTS_FORMAT, _write

    def results(size: str = "cpu", seeds: list[int] = [0, 1, 2], fmt: int = RESULTS_FORMAT) -> dict:  # noqa: B006
        common = {"format": fmt, "size": size, "overrides": [], "seeds": seeds, "eval_episodes": 20}
        return {**common, "machine": {"cpus": 2}, "tasks": {}}

    _write(results(), tmp_path, "walker2d", [_row("DPPO", 1.0, 3.0)], {})
    hopper = results()
    _write(hopper, tmp_path, "hopper", [_row("ReinFlow rectified flow K=4", 1.0, 2.0), _row("DPPO", 1.0, 2.0)], {})
    saved = json.loads((tmp_path / "locomotion.json").read_text())
    assert set(saved["tasks"]) == {"walker2d", "hopper"}
    assert saved["tasks"]["walker2d"]["rows"][0]["return_after"] == 3.0
    # s per +100 return: 100 for both, so the ratio is 1
    assert saved["tasks"]["hopper"]["reinflow_vs_dppo_wall_per_improvement"] == {"ReinFlow rectified flow K=4": 1.0}
    # a newer walker2d result written meanwhile by another command wins over the stale copy
    _write(results(), tmp_path, "walker2d", [_row("DPPO", 1.0, 5.0)], {})
    _write(hopper, tmp_path, "hopper", [_row("DPPO", 1.0, 2.0)], {})
    saved = json.loads((tmp_path / "locomotion.json").read_text())
    assert saved["tasks"]["walker2d"]["rows"][0]["return_after"] == 5.0
    # results of another size are not mixed in
    _write(results("paper"), tmp_path, "hopper", [_row("DPPO", 1.0, 2.0)], {})
    assert set(json.loads((tmp_path / "locomotion.json").read_text())["tasks"]) == {"hopper"}
    # nor results over other seeds, nor a file of an older layout (its rows lack the per-seed runs)
    _write(results(), tmp_path, "walker2d", [_row("DPPO", 1.0, 3.0)], {})
    _write(results(seeds=[0]), tmp_path, "hopper", [_row("DPPO", 1.0, 2.0)], {})
    assert set(json.loads((tmp_path / "locomotion.json").read_text())["tasks"]) == {"hopper"}
    old = {**results(fmt=None), "tasks": {"walker2d": {"rows": [{"variant": "DPPO", "return_after": 3.0}]}}}
    (tmp_path / "locomotion.json").write_text(json.dumps({k: v for k, v in old.items() if k != "format"}))
    _write(results(), tmp_path, "hopper", [_row("DPPO", 1.0, 2.0)], {})
    assert set(json.loads((tmp_path / "locomotion.json").read_text())["tasks"]) == {"hopper"}
    assert not list(tmp_path.glob("locomotion.json.*"))  # no temporary file left behind
