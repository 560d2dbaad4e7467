"""Smoke test of every experiment file (experiments/*.yaml, and every file of every locomotion
task) with a tiny budget (the acceptance check that each file loads, pretrains, trains with its
algorithm, evaluates and checkpoints). The full locomotion runs are `flowrl bench locomotion`.

The locomotion files are found through the task files (flowrl.bench.tasks: the folder
experiments/locomotion/tasks, or $FLOWRL_LOCOMOTION_TASKS), so a task added as data is
smoke-tested too, each file on its own env (its env.id and env.kwargs). The ManiSkill files
(experiments/maniskill, and paper/) are checked for what `flowrl bench maniskill` needs; their
tiny runs are marked slow (ManiSkill's envs take seconds to build)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from flowrl.bench.tasks import DEFAULT_TASKS_DIR, METHODS, Task, load_tasks
from flowrl.cli import main
from flowrl.config import GymEnvConfig, build_config, load_config
from flowrl.core.demos_file import save_demos
from flowrl.experiment import env_dims
from flowrl.models.build import build_actor, build_policy
from flowrl.rollout.demos import collect_demos
from flowrl.runlog import read_metrics
from tests.image_setup import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
TOP_LEVEL = sorted(EXPERIMENTS.glob("*.yaml"))


def locomotion_files(tasks: dict[str, Task]) -> list[tuple[Task, Path]]:
    """Every experiment file of every task (its expert's, then each size's method files)."""
    return [(task, path) for task in tasks.values() for path in task.files()]


def _file_id(item: tuple[Task, Path]) -> str:
    task, path = item
    return path.relative_to(task.folder.parent).as_posix()  # e.g. locomotion/paper/hopper_dppo.yaml


LOCOMOTION = locomotion_files(load_tasks())  # every file of every task found in the tasks folder
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
    # AC-Flow: one episode per env, like GRPO, without groups; no critic warm-up, so the actor's update runs
    "ac_flow": [
        *COMMON,
        "env.num_envs=4",
        f"algo.max_steps={GRPO_MAX_STEPS}",
        "algo.minibatch_size=16",
        "algo.critic_warmup_iterations=0",
    ],
}
TINY["nft"] = TINY["awm"] = TINY["grpo"]  # the likelihood-free algorithms collect GRPO's groups


@pytest.fixture(scope="module")
def dataset_for(tmp_path_factory):
    """A few short episodes of a random Gaussian policy in an experiment's env (made once per
    env id and kwargs): enough to run the pipeline."""
    made: dict[str, Path] = {}

    def make(env: GymEnvConfig) -> Path:
        key = json.dumps([env.id, env.kwargs], sort_keys=True)
        if key not in made:
            cfg = build_config({"name": "d", "policy": {"type": "gaussian", "horizon": 1, "hidden_dims": [8]}})
            torch.manual_seed(0)
            policy = build_policy(cfg, build_actor(cfg.policy, *env_dims(env.id, env.kwargs)))
            demos = collect_demos(policy, env.id, 3, 0, action_noise=1.0, env_kwargs=env.kwargs, progress=False)
            folder = tmp_path_factory.mktemp("data")
            made[key] = save_demos(demos, folder / f"{env.id}.npz", env_id=env.id)
        return made[key]

    return make


TASKS = load_tasks()  # experiments/locomotion/tasks, or $FLOWRL_LOCOMOTION_TASKS: discovered, never listed


@pytest.mark.parametrize("task", TASKS.values(), ids=list(TASKS))
def test_every_locomotion_task_ships_the_files_it_declares(task):
    """A task needs only the methods and sizes its file lists (``Task.check``: each file exists,
    in the task's env, with the expert's env.kwargs); its expert trains from scratch and its
    medium dataset is D4RL-like."""
    assert set(task.spec.methods) <= set(METHODS) and task.spec.sizes
    task.check()
    expert = load_config(task.expert_file)
    assert expert.policy.type == "gaussian" and expert.pretrain is None  # from scratch
    # D4RL-like: a partly trained policy acting with its own stochasticity, no extra noise
    medium = task.spec.datasets["medium"]
    assert medium.actions == "sample" and medium.action_noise == 0
    assert 0 < medium.policy_iterations < expert.algo.iterations


def test_every_locomotion_file_belongs_to_a_task():
    """A file no task lists would be skipped by the benchmark and the smoke test."""
    listed = {path for _, path in locomotion_files(load_tasks(DEFAULT_TASKS_DIR))}
    folder = DEFAULT_TASKS_DIR.parent
    on_disk = {p for p in folder.rglob("*.yaml") if DEFAULT_TASKS_DIR not in p.parents}
    assert on_disk - listed == set()


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
    if algo in ("nft", "awm"):  # no log-probs stored: no ratio = 1 check
        assert "train/ratio_check_dev" not in records[1]
    else:
        assert records[1]["train/ratio_check_dev"] <= 1e-4
    assert records[1]["env_steps"] > 0
    if algo == "ppo":
        assert "losses/value" in records[1]
    elif algo == "ac_flow":  # a critic on the chain's states, and the critic-weighted actor loss
        assert "losses/value" in records[1] and "losses/fm" in records[1]
    else:  # no critic; groups of env.group_size envs, one episode each of at most max_steps chunks
        assert "losses/value" not in records[1] and records[1]["grpo/groups"] == GRPO_ENVS / GRPO_GROUP
        # one episode per env: finished, or cut at max_steps (HalfCheetah's never finish early)
        assert records[1].get("charts/episodes", 0) + records[1]["grpo/unfinished_episodes"] == GRPO_ENVS
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
    if yaml.safe_load(path.read_text())["algo"]["type"] in ("grpo", "nft", "awm"):
        (run,) = tmp_path.iterdir()
        update = read_metrics(run)[1]
        assert update["grpo/kept_steps"] > 0, f"every group tied: the GRPO update did not run ({update})"
        assert update["train/epochs"] == 1.0 and "losses/policy" in update


@pytest.mark.parametrize(("task", "path"), LOCOMOTION, ids=[_file_id(item) for item in LOCOMOTION])
def test_locomotion_experiment_runs_with_a_tiny_budget(task, path, dataset_for, tmp_path):
    env = load_config(path).env
    assert env.id == task.spec.env_id
    overrides = ["env.kwargs.max_episode_steps=50"]  # gym.make's time limit: short evaluation episodes
    if load_config(path).pretrain is not None:
        overrides += [f"pretrain.demos.path={dataset_for(env)}", "pretrain.steps=3"]
    _smoke(path, overrides, tmp_path)


IMAGES = sorted((EXPERIMENTS / "images").glob("*.yaml"))
PAPER_IMAGES = sorted((EXPERIMENTS / "images" / "paper").glob("*.yaml"))  # `flowrl bench images --size paper`
# The image track's files on a tiny network: 16 px, K = 4, 2 prompts x 2 images, a JPEG
# reward (continuous, so every group has a spread and the GRPO update runs).
IMAGE_TINY = [*TINY_OVERRIDES, "env.reward={type: jpeg}", "algo.iterations=1", "eval.episodes=2"]


def test_the_image_track_ships_pretraining_and_every_window_mode():
    names = {p.name for p in IMAGES}
    assert {"shapes_pretrain.yaml", "shapes_flow_grpo.yaml", "shapes_mixgrpo.yaml", "shapes_flash.yaml"} <= names
    windows = {p.name: load_config(p).mdp for p in IMAGES}
    assert windows["shapes_flow_grpo.yaml"].window.type == "all"
    assert windows["shapes_mixgrpo.yaml"].window.type == "sliding"
    flash = windows["shapes_flash.yaml"]
    assert flash.window.type == "sliding" and flash.solver == "dpm_solver_2m" and flash.steps_after_window


def test_every_image_file_has_a_paper_sized_twin_of_the_same_method():
    cpu = {p.name: load_config(p) for p in IMAGES}
    paper = {p.name: load_config(p) for p in PAPER_IMAGES}
    assert sorted(paper) == sorted(cpu)

    def method(cfg) -> tuple:
        m = cfg.mdp
        return m.window.type, m.solver, m.converter.type, m.sample_unit, m.steps_after_window is None, cfg.algo.type

    for name, big in paper.items():
        small = cpu[name]
        assert method(big) == method(small), name
        assert big.env.image_size == 64 and sum(big.policy.channels) > sum(small.policy.channels), name
        assert big.pretrain.steps > small.pretrain.steps, name


@pytest.mark.parametrize("path", IMAGES + PAPER_IMAGES, ids=lambda p: p.relative_to(EXPERIMENTS).as_posix())
def test_image_experiment_runs_with_a_tiny_budget(path, tmp_path):
    from flowrl.models.build import load_image_network

    command = "pretrain" if path.name == "shapes_pretrain.yaml" else "train"
    algo = (yaml.safe_load(path.read_text()).get("algo") or {}).get("type")
    extra = ["algo.critic_warmup_iterations=0"] if algo == "ac_flow" else []  # one iteration: the actor's
    assert main([command, str(path), *IMAGE_TINY, *extra, f"runs_dir={tmp_path}", "--no-progress"]) == 0
    (run,) = tmp_path.iterdir()
    cfg = load_config(run / "config.yaml")
    load_image_network(run / "pretrained.pt", cfg)  # the checked loader reads it back
    assert (run / "samples" / "iter_0000.png").is_file()
    if command == "pretrain":
        return
    records = read_metrics(run)
    assert [r["iteration"] for r in records] == [0, 1]
    update = records[1]
    if cfg.algo.type in ("nft", "awm"):  # no log-probs stored: no ratio = 1 check
        assert "train/ratio_check_dev" not in update and update["grpo/kept_steps"] == 4
    else:
        assert update["train/ratio_check_dev"] <= 1e-4
    if cfg.algo.type == "grpo":
        assert update["grpo/kept_steps"] == 4 and "losses/policy" in update
    elif cfg.algo.type == "ac_flow":  # a critic on the chain's images, and the critic-weighted actor loss
        assert "losses/value" in update and "losses/fm" in update
    else:
        assert "losses/policy" in update
    assert {"eval/accuracy", "eval/jpeg_kb", "eval/diversity", "charts/accuracy", "time/reward_wait_s"} <= set(update)
    assert (run / "samples" / "iter_0001.png").is_file() and (run / "policy.pt").is_file()
    load_image_network(run / "policy.pt", cfg)


SD3_FILES = sorted((EXPERIMENTS / "images" / "sd3").glob("*.yaml"))
# The SD3 files name SD3.5-Medium and PickScore folders the user downloads: the smoke test puts a
# tiny random SD3 built here (tests/sd3_setup.py) in their place, with a JPEG reward, on the CPU.
SD3_TINY = [
    "device=cpu",
    "env.image_size=16",
    "env.prompts_per_iteration=2",
    "env.group_size=2",
    "env.reward={type: jpeg}",
    "policy.denoising_steps=6",
    "policy.eval_denoising_steps=4",
    "policy.max_sequence_length=8",
    "policy.lora={rank: 2, alpha: 4}",
    "algo.iterations=1",
    "algo.minibatch_size=4",
    "eval.episodes=2",
]


def test_the_sd3_files_are_the_papers_methods_at_k_25():
    cfgs = {p.name: load_config(p) for p in SD3_FILES}
    assert sorted(cfgs) == ["sd3_flash.yaml", "sd3_flow_grpo.yaml", "sd3_mixgrpo.yaml"]
    assert all(c.policy.type == "sd3" and c.policy.denoising_steps == 25 for c in cfgs.values())
    assert cfgs["sd3_mixgrpo.yaml"].mdp.window.size == 4 and cfgs["sd3_flash.yaml"].mdp.steps_after_window


def test_an_sd3_file_with_its_placeholder_paths_is_one_line(capsys):
    assert main(["train", str(SD3_FILES[0]), "device=cpu", "env.reward={type: jpeg}"]) == 2
    assert "SD3 model folder not found" in capsys.readouterr().err


@pytest.mark.parametrize("path", SD3_FILES, ids=lambda p: p.name)
def test_sd3_experiment_runs_on_a_tiny_sd3(path, tmp_path_factory):
    pytest.importorskip("peft")
    from flowrl.models.build import load_image_network
    from tests.sd3_setup import build_tiny_sd3

    folder = build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")
    runs = tmp_path_factory.mktemp("runs")
    assert main(["train", str(path), *SD3_TINY, f"policy.path={folder}", f"runs_dir={runs}", "--no-progress"]) == 0
    (run,) = runs.iterdir()
    update = read_metrics(run)[1]
    assert update["train/ratio_check_dev"] <= 1e-4 and update["grpo/kept_steps"] > 0
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert all("lora_" in name for name in checkpoint["actor"])  # LoRA-only
    policy = load_image_network(run / "policy.pt", load_config(run / "config.yaml"))
    assert torch.equal(next(iter(policy.state_dict().values())), next(iter(checkpoint["actor"].values())))
    if path.name != "sd3_flow_grpo.yaml":
        return
    # resume from the LoRA-only checkpoint: one more iteration, from where the first one left the LoRA
    assert main(["train", "--resume", str(run), "algo.iterations=2", "--no-progress"]) == 0
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1, 2]
    resumed = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["iteration"] == 2 and set(resumed["actor"]) == set(checkpoint["actor"])
    assert any(not torch.equal(resumed["actor"][k], checkpoint["actor"][k]) for k in checkpoint["actor"])


MANISKILL = sorted((EXPERIMENTS / "maniskill").glob("*.yaml"))
PAPER_MANISKILL = sorted((EXPERIMENTS / "maniskill" / "paper").glob("*.yaml"))  # `flowrl bench maniskill --size paper`


def _method_of(cfg) -> tuple:
    return cfg.policy.type, cfg.policy.denoising_steps, cfg.mdp.converter.type, cfg.mdp.window.type, cfg.algo.type


def test_every_maniskill_task_ships_every_method_in_both_sizes():
    """`flowrl bench maniskill` runs TASK_METHOD.yaml for each of its methods and pretrains once
    per task, so a task's files agree on what the pretraining depends on; the paper/ twin of a
    file is the same method with more envs and iterations."""
    from flowrl.bench.maniskill import METHODS as MANISKILL_METHODS
    from flowrl.bench.maniskill import task_names

    tasks = task_names(EXPERIMENTS / "maniskill")
    assert {"pickcube", "pushcube"} <= set(tasks)
    assert [p.name for p in MANISKILL] == sorted(f"{t}_{m.key}.yaml" for t in tasks for m in MANISKILL_METHODS)
    assert [p.name for p in PAPER_MANISKILL] == [p.name for p in MANISKILL]
    for files in (MANISKILL, PAPER_MANISKILL):
        for task in tasks:
            configs = [load_config(p) for p in files if p.name.startswith(f"{task}_")]
            shared = [(c.policy, c.pretrain, c.env.id, c.env.kwargs) for c in configs]
            assert all(s == shared[0] for s in shared), f"{task}: the method files differ in policy, pretrain or env"
    for small_path, big_path in zip(MANISKILL, PAPER_MANISKILL, strict=True):
        small, big = load_config(small_path), load_config(big_path)
        assert _method_of(big) == _method_of(small), big_path.name
        assert big.env.id == small.env.id and big.env.kwargs == small.env.kwargs, big_path.name
        assert big.env.num_envs >= 256 > small.env.num_envs and big.algo.iterations > small.algo.iterations


@pytest.mark.slow  # ~10-20 s per file: a ManiSkill env takes ~1-10 s to build on a loaded machine
@pytest.mark.parametrize("path", MANISKILL + PAPER_MANISKILL, ids=lambda p: p.relative_to(EXPERIMENTS).as_posix())
def test_maniskill_experiment_runs_with_a_tiny_budget(path, dataset_for, tmp_path):
    """Pretrained on a few random episodes of the task (the motion-planner demonstrations are
    `flowrl bench maniskill`'s, tests/bench/test_maniskill_bench.py)."""
    from envs.maniskill import ManiSkillUnavailable

    try:
        demos = dataset_for(load_config(path).env)
    except ManiSkillUnavailable as exc:
        pytest.skip(f"ManiSkill cannot make an env on this machine: {exc}")
    _smoke(path, [f"pretrain.demos.path={demos}", "pretrain.steps=3", "policy.hidden_dims=[32,32]"], tmp_path)
