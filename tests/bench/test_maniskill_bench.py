"""`flowrl bench maniskill` end to end on PickCube with a tiny budget (the real one is a separate
command): copies of the PickCube experiment files shrunk to 2-4 in-process envs, a 2-episode
motion-planner dataset the bench records itself, 20 pretraining steps, one iteration per method.

Oracles: each run's own metrics.jsonl (every number of the table is recomputed from it here),
the dataset's recorded seeds, the reset seeds the evaluation really used (a spy on the env) and
hand-computed targets. The end-to-end test skips, like tests/envs/test_maniskill.py, when
ManiSkill cannot make an env here (FLOWRL_REQUIRE_MANISKILL=1: fail instead).
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from flowrl.bench import maniskill
from flowrl.cli import main
from flowrl.core.demos_file import read_metadata
from flowrl.errors import FlowRLError
from flowrl.runlog import read_metrics
from flowrl.runtime import derive_seed

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ManiSkill's, under numpy 2

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments" / "maniskill"
TINY = [
    "ray.enabled=false",
    "env.num_workers=1",
    "policy.hidden_dims=[32,32]",
    "pretrain.steps=20",
    "pretrain.batch_size=16",
    "algo.epochs=1",
    "algo.minibatch_size=4",
    "eval.episodes=2",
]
# per algorithm (what --set cannot give every method: GRPO's groups and episode cap)
SHRUNK = {
    "ppo": {"env": {"num_envs": 2}, "algo": {"steps_per_iteration": 3}},
    "grpo": {"env": {"num_envs": 4, "group_size": 2}, "algo": {"max_steps": 3}},
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_files(folder: Path, demos: Path) -> Path:
    """Copies of experiments/maniskill/pickcube_*.yaml with SHRUNK's sizes, pretraining on ``demos``."""
    folder.mkdir(parents=True)
    for path in sorted(EXPERIMENTS.glob("pickcube_*.yaml")):
        data = yaml.safe_load(path.read_text())
        for section, values in SHRUNK[data["algo"]["type"]].items():
            data[section].update(values)
        data["env"]["kwargs"]["max_episode_steps"] = 24  # 3 chunks: evaluations of seconds, not minutes
        data["pretrain"]["demos"]["path"] = str(demos)
        (folder / path.name).write_text(yaml.safe_dump(data))
    return folder


def _require_maniskill() -> None:
    import gymnasium as gym

    from envs.maniskill import ManiSkillUnavailable

    try:
        gym.make("flowrl/PickCube-v1").close()
    except ManiSkillUnavailable as exc:
        if os.environ.get("FLOWRL_REQUIRE_MANISKILL"):
            raise
        pytest.skip(f"ManiSkill cannot make an env on this machine: {exc}")


def _valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()


def test_maniskill_bench_fine_tunes_every_method_side_by_side(tmp_path, monkeypatch, capsys):
    _require_maniskill()
    from envs.maniskill import ManiSkillEnv

    resets: set[int] = set()  # every reset seed of this process (in-process workers and evaluation)
    reset = ManiSkillEnv.reset

    def spy(self, *, seed=None, options=None):
        resets.add(seed)
        return reset(self, seed=seed, options=options)

    monkeypatch.setattr(ManiSkillEnv, "reset", spy)
    monkeypatch.setattr(maniskill, "RAW_STEPS", 4)  # the raw-stepping figure's plumbing, not its precision
    demos, out, cache = tmp_path / "datasets" / "pickcube-hold3-2.npz", tmp_path / "out", tmp_path / "cache"
    folder = _tiny_files(tmp_path / "experiments", demos)
    bench = {"tasks": ["pickcube"], "iterations": 1, "cache": cache, "progress": False, "folder": folder}
    returned = maniskill.run_maniskill_bench(out, overrides=TINY, **bench)
    print(maniskill.format_table(returned))
    table = capsys.readouterr().out
    results = json.loads((out / "maniskill.json").read_text())
    assert results == json.loads(json.dumps(returned))
    task = results["tasks"]["pickcube"]

    # 1. the dataset was missing: the bench recorded the 2 episodes its name asks for, each holding the goal
    # for the 3 steps it asks for; held out from evaluation
    seeds = [int(s) for s in read_metadata(demos)["seeds"].split(",")]
    assert read_metadata(demos)["hold_steps"] == "3" and "--hold-steps 3" in task["commands"]["demos"]
    assert len(seeds) == 2 and task["demos"]["made_s"] > 0
    held = task["held_out"]
    assert held["demo_seeds"] == [min(seeds), max(seeds)] and held["demo_episodes"] == 2 and held["disjoint"]
    lo, hi = held["eval_seeds"]["0"]
    assert hi - lo == 1 and {lo, hi} <= resets  # the evaluation reset from exactly these seeds
    assert not set(seeds) & set(range(lo, hi + 1))
    # 2. one pretraining for the task, cached; every method fine-tunes it
    checkpoint = cache / "maniskill" / "pickcube" / "pretrain" / "pretrained.pt"
    assert task["pretrained"]["path"] == str(checkpoint) and task["pretrained"]["pretrain_s"] > 0
    assert checkpoint.is_file()
    raw = task["raw_env_steps_per_s"]
    assert raw > 0

    rows = {r["key"]: r for r in task["rows"]}
    assert list(rows) == [
        "flow_noise_ppo",
        "flow_sde_ppo",
        "flow_noise_grpo",
        "flow_sde_grpo",
    ]  # each converter x algorithm
    update_s = {}
    for key, row in rows.items():
        (run,) = row["runs"]
        run_dir = Path(run["run"])
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["policy"]["pretrained"] == str(checkpoint) and config["seed"] == 0
        records = read_metrics(run_dir)
        trained = [r for r in records if "time/update_s" in r]
        assert [r["iteration"] for r in records] == [0, 1]
        for when, record in (("before", records[0]), ("after", records[-1])):
            for metric in ("eval/success_once", "eval/success_rate"):
                assert row[when][metric] == pytest.approx(record[metric]) and 0 <= row[when][metric] <= 1
                assert row[f"{when}_std"][metric] == 0  # one seed
        assert row["env_steps"] == records[-1]["env_steps"] > 0
        update_s[key] = np.mean([r["time/update_s"] for r in trained])
        assert row["update_s"] == pytest.approx(update_s[key])
        assert row["env_steps_per_s"] == pytest.approx(np.mean([r["time/env_steps_per_s"] for r in trained]))
        collecting = records[-1]["env_steps"] / sum(r["time/collect_s"] for r in trained)
        assert row["collect_env_steps_per_s"] == pytest.approx(collecting)
        assert row["collector"] == "in_process" and row["worker_processes"] == 1
        assert row["collect_per_worker_vs_raw"] == pytest.approx(collecting / raw)
        assert row["finetune_s"] > row["update_s"]
        curve = [[r["env_steps"], r["eval/success_once"]] for r in records]  # evaluated before and after
        assert run["curves"]["eval/success_once"] == curve
        argv = shlex.split(run["command"])
        assert argv[:3] == ["flowrl", "train", str(folder / f"pickcube_{key}.yaml")]
        assert {"algo.iterations=1", "seed=0", f"policy.pretrained={checkpoint}", *TINY} <= set(argv)
        events = list((out / "tensorboard" / "pickcube" / f"{key}_seed0").glob("events.out.tfevents.*"))
        assert len(events) == 1
    # the same pretrained policy on the same held-out seeds: every method starts from one point
    assert all(row["before"] == rows["flow_noise_ppo"]["before"] for row in rows.values())
    for key, row in rows.items():
        assert row["update_vs_flow_noise"] == pytest.approx(update_s[key] / update_s["flow_noise_ppo"])
    verdicts = [(t["method"], t["hit"]) for t in task["targets"] if "Ray worker" in t["target"]]
    assert verdicts == [(r["method"], None) for r in rows.values()]  # in-process: the Ray target does not apply
    assert len(task["targets"]) == 4 + 1 + 4  # success per method, Flow-SDE PPO's step cost, rollout per method

    _valid_png(out / "maniskill.png")
    assert shlex.split(results["commands"]["bench"])[:5] == ["flowrl", "bench", "maniskill", "--tasks", "pickcube"]
    assert task["commands"]["demos"].startswith(f"flowrl demos flowrl/PickCube-v1 --episodes 2 --out {demos}")
    for text in (
        "| Flow-Noise PPO |",
        "| Flow-Noise GRPO |",
        "| Flow-SDE GRPO |",
        "1.00x",
        "disjoint from them",
        "Targets:",
        "n/a",
    ):
        assert text in table

    # again, one method: the dataset and the pretraining are reused
    again = maniskill.run_maniskill_bench(tmp_path / "again", methods=["flow_sde_ppo"], overrides=TINY, **bench)
    task = again["tasks"]["pickcube"]
    assert task["demos"]["made_s"] is None and task["pretrained"]["pretrain_s"] is None
    assert [r["key"] for r in task["rows"]] == ["flow_sde_ppo"] and task["rows"][0]["update_vs_flow_noise"] is None
    # a cached pretraining made with other settings is refused, not silently reused
    with pytest.raises(FlowRLError, match=r"pretrain\.steps: 20 vs 21\b.*move the folder away"):
        maniskill.run_maniskill_bench(tmp_path / "other", overrides=[*TINY, "pretrain.steps=21"], **bench)
    assert not (tmp_path / "other").exists()


def test_bad_input_is_a_one_line_error_before_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["--tasks", "stackcube"], "unknown task(s) ['stackcube']; choose from pickcube, pushcube"),
        (
            ["--methods", "dppo"],
            "unknown method(s) ['dppo']; choose from flow_noise_ppo, flow_sde_ppo, flow_noise_grpo, flow_sde_grpo",
        ),
        (["--iterations", "0"], "algo.iterations"),
        (["--set", "algo.no_such_key=1"], "no_such_key"),
    ]
    for args, message in cases:
        assert main(["bench", "maniskill", *args, "--out", "o"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    # the methods of a task must share their pretraining
    folder = _tiny_files(tmp_path / "experiments", tmp_path / "pickcube-2.npz")
    grpo = yaml.safe_load((folder / "pickcube_flow_sde_grpo.yaml").read_text())
    grpo["pretrain"]["lr"] = 0.002
    (folder / "pickcube_flow_sde_grpo.yaml").write_text(yaml.safe_dump(grpo))
    with pytest.raises(FlowRLError, match=r"differ in pretrain\.lr: 0\.001 vs 0\.002; the methods of a task"):
        maniskill.run_maniskill_bench("o", overrides=TINY, folder=folder)
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()
    assert not (tmp_path / "pickcube-2.npz").exists()


def test_evaluation_on_a_demonstration_seed_is_refused(tmp_path):
    """The held-out check against a dataset that (by construction) holds seed 1's evaluation seeds."""
    from flowrl.core.demos_file import save_demos

    met = maniskill.evaluation_seeds(1, 3)
    assert len(met) == 3 and met[0] == derive_seed(1, 10**6) and met[-1] < 2**31
    arrays = {"observations": np.zeros((1, 2)), "actions": np.zeros((1, 1)), "episode_ends": np.array([1])}
    path = save_demos(arrays, tmp_path / "d.npz", seeds=f"0,5,{met[2]}")
    with pytest.raises(
        FlowRLError, match=r"evaluation of seed\(s\) \[1\] would reset from seeds of the demonstrations"
    ):
        maniskill._held_out(path, [0, 1], 3)
    held = maniskill._held_out(path, [0], 3)
    assert (
        held["demo_seeds"] == [0, met[2]]
        and held["disjoint"]
        and held["eval_seeds"]["0"][1] - held["eval_seeds"]["0"][0] == 2
    )
    unrecorded = save_demos(arrays, tmp_path / "e.npz")
    assert maniskill._held_out(unrecorded, [0], 3)["disjoint"] is None


def _row(key: str, update_s: float, after: float, ray: bool = True, ratio: float = 1.0) -> dict:
    """A method's row of one seed's run (50 evaluation episodes, 2 Ray workers when ``ray``),
    whose collection per worker is ``ratio`` times the raw stepping of 100 env steps/s."""
    run = {
        "seed": 0,
        "eval_episodes": 50,
        "before": {k: 0.5 for k in maniskill.REPORTED},
        "after": {k: after for k in maniskill.REPORTED},
        "env_steps": 1000,
        "finetune_s": 600.0,
        "update_s": update_s,
        "env_steps_per_s": 150.0,
        "collect_env_steps_per_s": 100.0 * ratio * (2 if ray else 1),
        "collector": "ray" if ray else "in_process",
        "workers": 2,
    }
    method = next(m for m in maniskill.METHODS if m.key == key)
    return maniskill.summarise(method, [run], raw=100.0)


def test_targets_against_hand_computed_values():
    rows = [
        _row("flow_noise_ppo", 1.0, 0.90, ratio=0.8),
        _row("flow_sde_ppo", 0.5, 0.84, ratio=0.79),  # 2 standard errors of the difference: 0.134
        _row("flow_sde_grpo", 0.4, 0.70, ray=False),
    ]
    maniskill._ratios(rows)
    assert [r["update_vs_flow_noise"] for r in rows] == [1.0, 0.5, 0.4]
    assert rows[0]["collect_per_worker_vs_raw"] == pytest.approx(0.8)  # 160 env steps/s over 2 workers
    hits = [(t["method"], t["hit"]) for t in maniskill.targets(rows)]
    assert hits == [
        ("Flow-Noise PPO", True),  # 0.5 -> 0.9 in 10 min
        ("Flow-SDE PPO", False),  # after 0.84 < 0.9
        ("Flow-SDE GRPO", False),
        ("Flow-SDE PPO", True),  # 0.5x, success 0.84 vs 0.90 within 0.134 (GRPO's step is not judged)
        ("Flow-Noise PPO", True),
        ("Flow-SDE PPO", False),
        ("Flow-SDE GRPO", None),
    ]

    def step_cost(update_s: float, after: float) -> bool:
        judged = [rows[0], _row("flow_sde_ppo", update_s, after)]
        maniskill._ratios(judged)
        (target,) = [t for t in maniskill.targets(judged) if "training step" in t["target"]]
        return target["hit"]

    assert not step_cost(0.4, 0.70)  # cheap, but 0.70 vs 0.90 is more than 2 standard errors (0.155) apart
    assert not step_cost(0.6, 0.90)  # equal success, but 0.6x
    assert step_cost(0.5, 0.96)


def test_cli_help_lists_the_maniskill_bench(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps lines after hyphens
    assert (
        "Flow-Noise and Flow-SDE, each under PPO and GRPO, fine-tuning one pretrained policy per ManiSkill task" in text
    )
    assert (
        "flow_noise_ppo, flow_sde_ppo, flow_noise_grpo, flow_sde_grpo" in text
        and "benchmarks/results/maniskill" in text
    )
