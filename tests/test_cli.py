"""End to end through the CLI: errors, determinism, kill-and-resume, and the quickstart's learning."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from flowrl.cli import main
from flowrl.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
# A few seconds of work: tiny pretraining, a few PPO iterations on a few envs (the minibatch
# fits the 4 envs x 4 steps of a rollout).
TINY = [
    "ray.enabled=false",  # the same env shards in-process: no Ray start-up per test (test_ray* cover Ray)
    "pretrain.steps=150",
    "pretrain.demos.episodes=40",
    "env.num_envs=4",
    "algo.steps_per_iteration=4",
    "algo.epochs=2",
    "algo.minibatch_size=8",
    "eval.episodes=8",
    "eval.every=2",
    "policy.hidden_dims=[32,32]",
]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flowrl.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _run_dir(runs: Path) -> Path:
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("no.such.key=1", "unknown key 'no'"),
        ("algo.clip=abc", "algo.clip"),
        ("mdp.converter.std_min=0.5", "noise range is inverted"),
        ("algo.minibatch_size=100000", "algo.minibatch_size=100000 is larger than"),
        ("algo.max_steps=8", "unknown key 'algo.max_steps'"),  # a GRPO key in a PPO experiment
        ("env.group_size=4", "env.group_size only applies to algo.type: grpo"),
        ("~algo.noise_lrr", "has no key 'algo.noise_lrr' to remove"),  # `~key` removes a key; a typo is an error
        ("mdp.converter={type: cps}", "remove it (on the command line: ~algo.noise_lr)"),
        # keys of an older flowrl name their new place
        ("ppo.clip=0.1", "'ppo' has moved to algo"),
        ("ray.num_workers=1", "'ray.num_workers' has moved to env.num_workers"),
    ],
)
def test_bad_config_is_one_line_error(override, needle, tmp_path):
    proc = _cli("train", QUICKSTART, override, f"runs_dir={tmp_path}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "quickstart.yaml" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir()), "no run folder for a config error"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("device=cuda", "no CUDA GPU is visible"),
        ("env.id=Nope-v0", "unknown env id 'Nope-v0'"),
        ("env.kwargs={bad: 1}", "env.kwargs do not fit"),
        ("policy.pretrained=/no/such.pt", "checkpoint not found"),
    ],
)
def test_bad_run_input_fails_before_a_run_folder_exists(override, needle, tmp_path, capsys):
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["train", QUICKSTART, override, f"runs_dir={tmp_path}", "--no-progress"]) == 2
    assert needle in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_missing_dataset_and_checkpoint_are_clear_errors(tmp_path, capsys):
    missing = tmp_path / "nope.npz"
    assert (
        main(["pretrain", QUICKSTART, f"pretrain.demos={{path: {missing}}}", f"runs_dir={tmp_path}", "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert "demonstration file not found" in err and str(missing) in err and "pretrain.demos.path" in err
    assert not any(tmp_path.iterdir())  # checked before a run folder exists
    assert main(["eval", QUICKSTART, "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def _strip_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_same_seed_same_metrics_and_eval_command(tmp_path, capsys):
    runs = []
    for name in ("a", "b"):
        assert (
            main(["train", QUICKSTART, *TINY, "algo.iterations=3", f"runs_dir={tmp_path / name}", "--no-progress"]) == 0
        )
        runs.append(_run_dir(tmp_path / name))
    first, second = (read_metrics(r) for r in runs)
    assert [r["iteration"] for r in first] == [0, 1, 2, 3]
    assert all("env_steps" in r for r in first)
    assert "eval/success_rate" in first[0] and "eval/return" in first[-1]
    assert _strip_time(first) == _strip_time(second)
    # The run folder holds what the README promises.
    run = runs[0]
    for name in ("config.yaml", "pretrained.pt", "policy.pt", "checkpoints/last.pt", "metrics.jsonl"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # `flowrl eval` on the fine-tuned policy reproduces the last logged evaluation.
    capsys.readouterr()
    assert main(["eval", QUICKSTART, *TINY, "--checkpoint", str(run / "policy.pt")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["eval/success_rate"] == first[-1]["eval/success_rate"]
    assert metrics["eval/return"] == first[-1]["eval/return"]
    # ... and so does `flowrl eval RUN_DIR` (its config.yaml and policy.pt), with no other argument
    assert main(["eval", str(run)]) == 0
    by_folder = json.loads(capsys.readouterr().out)
    assert by_folder["checkpoint"] == str(run / "policy.pt")
    assert {k: v for k, v in by_folder.items() if k != "checkpoint"} == {
        k: v for k, v in metrics.items() if k != "checkpoint"
    }
    for name in ("pretrain_metrics.json", "pretrain_metrics.jsonl", "events.log"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard" / "pretrain").glob("events.out.tfevents.*"))


def _tensorboard_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [event.step for event in acc.Scalars(tag)]


def test_sigkill_then_resume_gives_one_continuous_run(tmp_path, capsys):
    iterations = 30
    args = [
        "train",
        QUICKSTART,
        *TINY,
        f"algo.iterations={iterations}",
        "checkpoint_every=3",
        f"runs_dir={tmp_path}",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowrl.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 240
        killed_at = None
        while time.time() < deadline and proc.poll() is None:
            runs = [p for p in tmp_path.iterdir() if p.is_dir()]
            if runs and (runs[0] / "metrics.jsonl").exists():
                done = read_metrics(runs[0])
                if done and done[-1]["iteration"] >= 7:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    killed_at = done[-1]["iteration"]
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed_at is not None and killed_at < iterations, "the run ended before it could be killed"
    run = _run_dir(tmp_path)
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["iteration"] % 3 == 0 and checkpoint["iteration"] <= killed_at
    assert "algo" in checkpoint and "learner" not in checkpoint  # the algorithm's state (PPO: policy, critic, ...)

    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    records = read_metrics(run)
    assert [r["iteration"] for r in records] == list(range(iterations + 1))
    steps = [r["env_steps"] for r in records]
    assert steps == sorted(set(steps)), "env_steps must increase strictly across the resume"
    for tag in ("losses/value", "eval/success_rate"):
        tb_steps = _tensorboard_steps(run, tag)
        assert tb_steps == sorted(set(tb_steps)), f"{tag}: TensorBoard steps repeat or go back"
    assert _tensorboard_steps(run, "losses/value") == steps[1:]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["iteration"] == iterations
    # Resuming a finished run changes nothing and reports its real before/after.
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "has done all 30 iterations" in out.out
    assert f"-> after: {records[-1]['eval/return']:.3f} (success" in out.out
    assert len(read_metrics(run)) == iterations + 1


def test_resume_rejects_an_experiment_file(tmp_path, capsys):
    assert main(["train", QUICKSTART, "--resume", str(tmp_path)]) == 2
    assert "give no experiment file" in capsys.readouterr().err
    # a `~key` word there is an override of the run's config (this folder has none), not a file
    assert main(["train", "~algo.clip", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "give no experiment file" not in err and "config.yaml" in err


def test_resuming_a_run_of_an_older_flowrl_is_a_one_line_error(tmp_path, capsys):
    """An older run folder: a config.yaml with a `ppo:` section, or a checkpoint with a
    'learner' entry instead of 'algo', is a one-line error saying what to do."""
    assert main(["train", QUICKSTART, *TINY, "algo.iterations=1", f"runs_dir={tmp_path}", "--no-progress"]) == 0
    run = _run_dir(tmp_path)
    last = run / "checkpoints" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["iteration"] == 1 and "algo" in checkpoint
    checkpoint["learner"] = checkpoint.pop("algo")
    torch.save(checkpoint, last)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    # names the checkpoint, what it lacks, and how to go on (a new run from the run's policy)
    assert err.startswith("flowrl: error: ") and str(last) in err and "'algo'" in err and "policy.pretrained" in err

    config = yaml.safe_load((run / "config.yaml").read_text())
    config["ppo"] = config.pop("algo")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert str(run / "config.yaml") in err and "'ppo' has moved to algo" in err


def test_quickstart_learns(tmp_path):
    """The README's quickstart, unchanged: success <= 0.7 before fine-tuning, >= 0.9 after."""
    assert main(["train", QUICKSTART, f"runs_dir={tmp_path}", "--no-progress"]) == 0
    records = read_metrics(_run_dir(tmp_path))
    evals = [r["eval/success_rate"] for r in records if "eval/success_rate" in r]
    assert evals[0] <= 0.7, evals
    assert evals[-1] >= 0.9, evals


@pytest.mark.gpu
def test_learner_on_cuda(tmp_path):
    assert (
        main(["train", QUICKSTART, *TINY, "algo.iterations=2", "device=cuda", f"runs_dir={tmp_path}", "--no-progress"])
        == 0
    )
    assert len(read_metrics(_run_dir(tmp_path))) == 3


def test_training_survives_a_worker_killed_mid_iteration(tmp_path):
    """A Ray env worker's process dies during collection (FaultInjection env, os._exit at its
    40th step: during iteration 3; evaluation envs, made anew at each evaluation here, never get
    that far): the run finishes, events.log names the restart, metrics count it."""
    marker = tmp_path / "fault-fired"
    args = [a for a in TINY if a != "ray.enabled=false"]
    assert (
        main(
            [
                "train",
                QUICKSTART,
                *args,
                "algo.iterations=3",
                "env.id=flowrl/FaultInjection-v0",
                f"env.kwargs={{fail_at_step: 40, mode: exit, once_marker: {marker}}}",
                "eval.keep_envs=false",  # the fault counts an env's steps over its lifetime
                f"runs_dir={tmp_path / 'runs'}",
                "--no-progress",
            ]
        )
        == 0
    )
    run = _run_dir(tmp_path / "runs")
    assert marker.exists()
    events = (run / "events.log").read_text()
    assert "env worker" in events and "restarting it" in events and "died" in events
    records = read_metrics(run)
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["ray/worker_restarts"] == 1.0


def test_ray_training_equals_in_process_training(tmp_path):
    """Env workers on Ray and the same shards in this process: identical learning metrics."""
    records = {}
    for name, enabled in (("ray", "true"), ("local", "false")):
        assert (
            main(
                [
                    "train",
                    QUICKSTART,
                    *TINY,
                    "algo.iterations=2",
                    f"ray.enabled={enabled}",
                    f"runs_dir={tmp_path / name}",
                    "--no-progress",
                ]
            )
            == 0
        )
        records[name] = [
            {k: v for k, v in r.items() if not k.startswith(("time/", "ray/"))}
            for r in read_metrics(_run_dir(tmp_path / name))
        ]
    assert records["ray"] == records["local"]


def test_pretrain_then_train_from_the_checkpoint(tmp_path, capsys):
    assert main(["pretrain", QUICKSTART, *TINY, f"runs_dir={tmp_path / 'pre'}", "--no-progress"]) == 0
    pretrained = _run_dir(tmp_path / "pre") / "pretrained.pt"
    success = float(capsys.readouterr().out.split("(success ")[1].split(",")[0])
    assert (
        main(
            [
                "train",
                QUICKSTART,
                *TINY,
                "algo.iterations=1",
                f"policy.pretrained={pretrained}",
                f"runs_dir={tmp_path / 'ft'}",
                "--no-progress",
            ]
        )
        == 0
    )
    run = _run_dir(tmp_path / "ft")
    assert not (run / "pretrained.pt").exists(), "no pretraining when policy.pretrained is given"
    assert read_metrics(run)[0]["eval/success_rate"] == pytest.approx(success, abs=0.005)
    # The generated demonstrations were kept: pretraining from that file gives the same policy.
    demos = _run_dir(tmp_path / "pre") / "demos.npz"
    tiny_from_file = [a for a in TINY if not a.startswith("pretrain.demos.")]
    assert (
        main(
            [
                "pretrain",
                QUICKSTART,
                *tiny_from_file,
                f"pretrain.demos={{path: {demos}}}",
                f"runs_dir={tmp_path / 'file'}",
                "--no-progress",
            ]
        )
        == 0
    )
    again = torch.load(_run_dir(tmp_path / "file") / "pretrained.pt", weights_only=True)["actor"]
    first = torch.load(pretrained, weights_only=True)["actor"]
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_tilde_overrides_switch_a_reinflow_file_to_flow_sde(tmp_path):
    """`~key` words are overrides on the command line, before or after options."""
    switch = ["mdp.converter={type: flow_sde, noise_level: 0.3}", "~algo.noise_lr"]
    args = ["train", QUICKSTART, *TINY, "algo.iterations=1", *switch, "--no-progress", "~algo.entropy_coef"]
    assert main([*args, f"runs_dir={tmp_path}"]) == 0
    config = yaml.safe_load((_run_dir(tmp_path) / "config.yaml").read_text())
    assert config["mdp"]["converter"] == {"type": "flow_sde", "noise_level": 0.3}
    assert "noise_lr" not in config["algo"] and "entropy_coef" not in config["algo"]


def test_shortcut_policy_fine_tunes_with_one_denoising_step(tmp_path):
    """A shortcut-model policy, pretrained and fine-tuned with ReinFlow at K = 1."""
    assert (
        main(
            [
                "train",
                QUICKSTART,
                *TINY,
                "algo.iterations=2",
                "policy.type=shortcut",
                "policy.denoising_steps=1",
                f"runs_dir={tmp_path}",
                "--no-progress",
            ]
        )
        == 0
    )
    run = _run_dir(tmp_path)
    records = read_metrics(run)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert records[1]["train/ratio_check_dev"] <= 1e-4
    assert torch.load(run / "policy.pt", weights_only=True)["arch"]["type"] == "shortcut"


def test_collect_from_a_trained_run_then_pretrain_on_the_dataset(tmp_path, capsys):
    """`flowrl collect` records a dataset with a finished run's policy; `flowrl pretrain` learns
    from that file (its observation statistics are the dataset's); a folder without policy.pt
    or without config.yaml is a one-line error."""
    import numpy as np

    from flowrl.algos.bc import load_demos
    from flowrl.config import DemosConfig
    from flowrl.core.demos_file import read_metadata

    train = ["train", QUICKSTART, *TINY, "algo.iterations=1", f"runs_dir={tmp_path / 'train'}", "--no-progress"]
    assert main(train) == 0
    run = _run_dir(tmp_path / "train")
    out = tmp_path / "data" / "demos.npz"
    args = ["collect", str(run), "--out", str(out), "--episodes", "6", "--action-noise", "0.2", "--seed", "3"]
    capsys.readouterr()
    assert main([*args, "--no-progress"]) == 0
    assert f"wrote {out}: 6 episodes" in capsys.readouterr().out
    demos = load_demos(DemosConfig(path=str(out)), "flowrl/TwoGoal-v0", 0)
    assert len(demos["episode_ends"]) == 6 and demos["episode_ends"][-1] == len(demos["observations"])
    assert np.abs(demos["actions"]).max() <= 1.0
    with np.load(out) as data:
        assert str(data["meta_policy"]) == str((run / "policy.pt").resolve())
        assert str(data["meta_action_noise"]) == "0.2" and str(data["meta_seed"]) == "3"
    again = tmp_path / "again.npz"
    assert main([*args[:3], str(again), *args[4:], "--no-progress"]) == 0
    with np.load(out) as a, np.load(again) as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("observations", "actions", "episode_ends"))
    # --actions sample: the policy's own stochastic sampler (here the ReinFlow noise), recorded as such
    sampled = tmp_path / "sampled.npz"
    assert main(["collect", str(run), "--out", str(sampled), "--episodes", "6", "--actions", "sample"]) == 0
    recorded = read_metadata(sampled)
    assert recorded["actions"] == "sample" and recorded["action_noise"] == "0.0" and recorded["episodes"] == "6"
    assert recorded["env_id"] == "flowrl/TwoGoal-v0" and recorded["policy_iterations"] == "1"
    with np.load(out) as a, np.load(sampled) as b:
        assert a["actions"].shape != b["actions"].shape or not np.array_equal(a["actions"], b["actions"])

    tiny_from_file = [a for a in TINY if not a.startswith("pretrain.demos.")]
    from_file = [f"pretrain.demos={{path: {out}}}", f"runs_dir={tmp_path / 'pre'}", "--no-progress"]
    assert main(["pretrain", QUICKSTART, *tiny_from_file, *from_file]) == 0
    assert "on 6 demonstration episodes" in capsys.readouterr().out
    pre = _run_dir(tmp_path / "pre")
    assert not (pre / "demos.npz").exists(), "a dataset given by path is not copied into the run"
    actor = torch.load(pre / "pretrained.pt", weights_only=True)["actor"]
    # policy.obs_norm: dataset -> the mean and (clamped, unbiased) std of the collected observations
    obs = demos["observations"].astype(np.float64)
    np.testing.assert_allclose(actor["obs_norm.mean"].numpy(), obs.mean(0), rtol=1e-5, atol=1e-6)
    std = np.maximum(obs.std(0, ddof=1), 1e-2)
    np.testing.assert_allclose(actor["obs_norm.var"].numpy(), std**2, rtol=1e-4)

    # A pretraining run folder has no policy.pt: a one-line error, unless --checkpoint names one.
    capsys.readouterr()
    assert main(["collect", str(pre), "--out", str(tmp_path / "x.npz"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "policy.pt not found" in err[0] and "--checkpoint" in err[0], err
    assert not (tmp_path / "x.npz").exists()
    with_checkpoint = ["--episodes", "2", "--checkpoint", str(pre / "pretrained.pt"), "--no-progress"]
    assert main(["collect", str(pre), "--out", str(tmp_path / "x.npz"), *with_checkpoint]) == 0
    assert (tmp_path / "x.npz").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["collect", str(empty), "--out", str(tmp_path / "y.npz"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config.yaml" in err[0] and str(empty) in err[0], err
    assert "--resume" not in err[0], "collect takes no --resume"


def test_a_dataset_of_another_env_stops_before_a_run_folder_and_locomotion_prints_no_success(tmp_path, capsys):
    """Walker2d-v5 and HalfCheetah-v5 both have 17-dim observations and 6-dim actions: only the
    env id the dataset records tells their data apart. Then, with Walker2d data, the run's
    summary has no success rate (MuJoCo locomotion reports none)."""
    from flowrl.config import build_config
    from flowrl.core.demos_file import save_demos
    from flowrl.models.build import build_actor, build_policy
    from flowrl.rollout.demos import collect_demos

    cfg = build_config({"name": "d", "policy": {"type": "gaussian", "horizon": 1, "hidden_dims": [8]}})
    policy = build_policy(cfg, build_actor(cfg.policy, 17, 6))
    data = {}
    for env_id in ("HalfCheetah-v5", "Walker2d-v5"):
        demos = collect_demos(policy, env_id, 1, 0, env_kwargs={"max_episode_steps": 40}, progress=False)
        data[env_id] = save_demos(demos, tmp_path / f"{env_id}.npz", env_id=env_id)
    walker = str(ROOT / "experiments" / "locomotion" / "walker2d_gaussian.yaml")
    runs = tmp_path / "runs"
    assert main(["train", walker, f"pretrain.demos.path={data['HalfCheetah-v5']}", f"runs_dir={runs}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert (
        f"{data['HalfCheetah-v5']} was recorded in HalfCheetah-v5 but the experiment's env.id is Walker2d-v5" in err[0]
    )
    assert not runs.exists(), "refused before a run folder exists"

    tiny = [
        "ray.enabled=false",
        "env.num_envs=2",
        "env.num_workers=1",
        "env.kwargs.max_episode_steps=40",
        "algo.iterations=1",
        "algo.steps_per_iteration=2",
        "algo.epochs=1",
        "algo.minibatch_size=4",
        "eval.episodes=1",
        "pretrain.steps=2",
    ]
    args = ["train", walker, *tiny, f"pretrain.demos.path={data['Walker2d-v5']}", f"runs_dir={runs}", "--no-progress"]
    assert main(args) == 0
    (summary,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("return before:")]
    assert "success" not in summary, summary


# The command table: every command's arguments reach its handler, and the handlers are found.


def test_every_command_and_bench_of_the_table_has_a_handler():
    from flowrl import cli

    parser = cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(sub.choices) == [c.name for c in cli.COMMANDS]
    (bench,) = [a for a in sub.choices["bench"]._actions if a.dest == "bench"]
    assert list(bench.choices) == list(cli.BENCHES)
    for ref in [c.handler for c in cli.COMMANDS] + list(cli.BENCHES.values()):
        assert callable(cli._handler(ref)), ref


def test_help_imports_no_torch():
    """``flowrl --help`` and every command's --help stay instant: the handlers (and torch) are
    imported only when a command runs."""
    from flowrl.cli import COMMANDS

    names = [command.name for command in COMMANDS]
    script = (
        "import sys\nfrom flowrl.cli import main\n"
        f"for argv in [['--help']] + [[n, '--help'] for n in {names!r}]:\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('heavy:', sorted(m for m in ('torch', 'flowrl.experiment', 'flowrl.commands') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "heavy: []"


def _bench_oracle(module: str, function: str, returns: dict, monkeypatch) -> list[dict]:
    """Replace ``module.function`` (the benchmark's run) and its format_table with recorders;
    the returned list fills with the arguments of each call (by parameter name, defaults included)."""
    import importlib
    import inspect

    mod = importlib.import_module(module)
    signature = inspect.signature(getattr(mod, function))
    calls = []

    def record(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return returns

    monkeypatch.setattr(mod, function, record)
    monkeypatch.setattr(mod, "format_table", lambda results: "TABLE")
    return calls


# argv, the benchmark's module and run function, what the fake run returns, the arguments it must
# get, the lines printed (the old cli.py's branches passed exactly these)
BENCH_CASES = [
    (
        ["rollout", "--tasks", "toy, mujoco", "--num-envs", "4"],
        ("flowrl.bench.rollout", "run_rollout_bench", {}),
        {"out_dir": "benchmarks/results", "tasks": ["toy", "mujoco"], "num_envs": 4, "steps": 50, "max_workers": None},
        ["TABLE", "written: benchmarks/results/rollout.json, benchmarks/results/rollout.png"],
    ),
    (
        ["rollout", "--tasks", ""],  # an empty list: the default tasks, as not given
        ("flowrl.bench.rollout", "run_rollout_bench", {}),
        {"tasks": ["toy", "mujoco"]},
        None,
    ),
    (
        ["locomotion", "--tasks", "hopper,walker2d", "--variants", ",", "--set", "a=1", "b=2", "--set-data", "m.e=2"],
        ("flowrl.bench.locomotion", "run_locomotion_bench", {"tasks": {}}),
        {
            "out_dir": "benchmarks/results",
            "tasks": ["hopper", "walker2d"],
            "variants": [],  # given but empty: the bench says no variant matches (not all of them)
            "size": "cpu",
            "overrides": ["a=1", "b=2"],
            "progress": True,
            "tasks_dir": None,
            "data_only": False,
            "seeds": [0, 1, 2],
            "eval_episodes": 20,
            "expert_overrides": [],
            "data_overrides": ["m.e=2"],
        },
        ["TABLE", "written: benchmarks/results/locomotion.json, benchmarks/results/locomotion.png"],
    ),
    (
        ["locomotion", "--tasks", "all", "--data-only", "--seeds", "4", "--no-progress", "--out", "o"],
        ("flowrl.bench.locomotion", "run_locomotion_bench", {"datasets": {"hopper": {"medium": {"path": "m.npz"}}}}),
        {"out_dir": "o", "tasks": ["all"], "variants": None, "data_only": True, "seeds": [4], "progress": False},
        ["hopper: medium m.npz"],
    ),
    (
        ["images", "--methods", "flash", "--iterations", "2", "--seeds", "1,2", "--set", "x=1", "y=2", "--out", "o"],
        ("flowrl.bench.images", "run_images_bench", {"grid": {"file": "grid.png"}}),
        {
            "out_dir": Path("o"),
            "methods": ["flash"],
            "iterations": 2,
            "seeds": [1, 2],
            "overrides": ["x=1", "y=2"],
            "pretrained": None,
            "size": "cpu",
            "progress": True,
        },
        ["TABLE", "written: o/images.json, o/images.png, o/grid.png"],
    ),
    (
        ["maniskill", "--tasks", "pickcube", "--size", "paper", "--no-progress"],
        ("flowrl.bench.maniskill", "run_maniskill_bench", {}),
        {
            "out_dir": Path("benchmarks/results/maniskill"),
            "tasks": ["pickcube"],
            "methods": None,
            "seeds": [0],
            "iterations": None,
            "overrides": [],
            "size": "paper",
            "progress": False,
        },
        [
            "TABLE",
            "written: benchmarks/results/maniskill/maniskill.json, benchmarks/results/maniskill/maniskill.png, "
            "benchmarks/results/maniskill/tensorboard",
        ],
    ),
]


@pytest.mark.parametrize(("argv", "target", "expected", "printed"), BENCH_CASES)
def test_bench_arguments_reach_the_benchmark(argv, target, expected, printed, monkeypatch, capsys):
    calls = _bench_oracle(*target, monkeypatch)
    assert main(["bench", *argv]) == 0
    (call,) = calls
    assert {key: call[key] for key in expected} == expected
    if printed is not None:
        assert capsys.readouterr().out.splitlines() == printed


@pytest.mark.parametrize("bench", ["rollout", "images", "maniskill"])
def test_locomotion_only_options_are_refused_by_the_other_benches(bench, capsys):
    assert main(["bench", bench, "--set-data", "medium.episodes=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"flowrl: error: flowrl bench {bench}: --set-expert and --set-data are for bench locomotion; use --set"
    )
