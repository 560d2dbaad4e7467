"""Locomotion tasks as data: one YAML file per task, read by ``flowrl bench locomotion``, its
``--help`` and the smoke tests of the experiment files (``tests/test_experiments.py``).
Adding a task takes files only, no code.

A task file is ``tasks/NAME.yaml``; NAME (lowercase letters, digits, ``_``) names the task,
its experiment files and its cached data::

    env_id: Hopper-v5              # gymnasium id: every experiment file of the task uses it
    expert: hopper_expert.yaml     # the experiment that trains the expert (Gaussian PPO from scratch)
    methods: [reinflow, dppo, gaussian]    # NAME_METHOD.yaml exists for each (see METHODS)
    sizes: [cpu, paper]            # cpu: NAME_METHOD.yaml; paper: paper/NAME_METHOD.yaml
    datasets:                      # cache/datasets/NAME-KEY.npz; the bench pretrains on "medium"
      medium: {policy_iterations: 100, actions: sample, episodes: 100}
      expert: {actions: sample, episodes: 100}

The experiment files live in the folder above ``tasks/`` (for the shipped tasks:
``experiments/locomotion/``). The folder of task files is ``experiments/locomotion/tasks`` of
this checkout, or ``$FLOWRL_LOCOMOTION_TASKS``, or ``flowrl bench locomotion --tasks-dir``.
Task files are validated strictly: an unknown key is an error naming the file and the key.
Nothing lists the tasks: the benchmark, its ``--help`` and the tests read the folder, and a
task needs only the methods and sizes it declares (README, "Adding a task").
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flowrl.errors import ConfigError, FlowRLError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TASKS_DIR = ROOT / "experiments" / "locomotion" / "tasks"
TASKS_DIR_VAR = "FLOWRL_LOCOMOTION_TASKS"

# The methods the benchmark knows (its variants, flowrl.bench.locomotion.VARIANTS, run them).
METHODS = ("reinflow", "shortcut", "meanflow", "grpo", "dppo", "gaussian", "nft", "awm", "ac_flow")
BENCH_DATASET = "medium"  # the dataset every method file of the benchmark pretrains on
_NAME = re.compile(r"^[a-z0-9_]+$")


class TaskError(FlowRLError, ValueError):
    """A bad task file or task name; the message names the file, the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetRecipe(_Strict):
    """How one demonstration dataset of a task is made: which policy acts, and how."""

    policy_iterations: int | None = Field(
        None,
        ge=1,
        description="the acting policy: the expert's experiment trained for only this many iterations (a run of its "
        "own, cached as cache/experts/NAME-itN; its linear learning-rate schedule anneals over them), i.e. a partly "
        "trained policy as D4RL's 'medium'; null = the expert itself",
    )
    actions: Literal["sample", "deterministic"] = Field(
        "sample",
        description="sample = the policy acts with its own stochasticity (N(mean, std²) for the Gaussian expert), as "
        "D4RL's datasets; deterministic = its mean action",
    )
    action_noise: float = Field(0.0, ge=0, description="std of extra Gaussian noise on every action; 0 = none")
    episodes: int = Field(100, ge=1, description="episodes recorded")


class TaskSpec(_Strict):
    """The contents of a task file."""

    env_id: str = Field(description="gymnasium id of the task; every experiment file of the task has this env.id")
    expert: str = Field(description="experiment file of the expert (Gaussian PPO from scratch), next to tasks/")
    methods: list[str] = Field(min_length=1, description=f"methods with experiment files NAME_METHOD.yaml: {METHODS}")
    sizes: list[Literal["cpu", "paper"]] = Field(
        ["cpu", "paper"], min_length=1, description="cpu: NAME_METHOD.yaml; paper: paper/NAME_METHOD.yaml"
    )
    datasets: dict[str, DatasetRecipe] = Field(
        description=f"name -> recipe; cache/datasets/NAME-KEY.npz; the benchmark pretrains on {BENCH_DATASET!r}"
    )

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
        if len(set(methods)) != len(methods):
            raise ValueError("a method is listed twice")
        return methods

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        if len(set(sizes)) != len(sizes):
            raise ValueError("a size is listed twice")
        return sizes

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, datasets: dict[str, DatasetRecipe]) -> dict[str, DatasetRecipe]:
        bad = [name for name in datasets if not _NAME.match(name)]
        if bad:
            raise ValueError(f"dataset names are lowercase letters, digits and _: {', '.join(map(repr, bad))}")
        if BENCH_DATASET not in datasets:
            raise ValueError(f"missing the {BENCH_DATASET!r} dataset (the one the benchmark pretrains on)")
        return datasets


@dataclass(frozen=True)
class Task:
    """A locomotion task: its name, its file and what the file says (``spec``)."""

    name: str
    file: Path
    spec: TaskSpec

    @property
    def folder(self) -> Path:
        """Where the task's experiment files are: the folder above ``tasks/``."""
        return self.file.parent.parent

    @property
    def expert_file(self) -> Path:
        return self.folder / self.spec.expert

    def method_file(self, method: str, size: str = "cpu") -> Path:
        if method not in self.spec.methods:
            raise TaskError(f"task {self.name} has no {method} experiment (methods: {', '.join(self.spec.methods)})")
        if size not in self.spec.sizes:
            raise TaskError(f"task {self.name} has no {size}-sized experiments (sizes: {', '.join(self.spec.sizes)})")
        return (self.folder if size == "cpu" else self.folder / "paper") / f"{self.name}_{method}.yaml"

    def files(self) -> list[Path]:
        """Every experiment file of the task: the expert's, then each size's method files."""
        return [self.expert_file, *(self.method_file(m, s) for s in self.spec.sizes for m in self.spec.methods)]

    def dataset_path(self, cache: Path, dataset: str = BENCH_DATASET, tag: str = "") -> Path:
        """``cache/datasets/NAME-DATASET[TAG].npz``; ``tag`` keeps the data of a run with
        overridden recipes (``--set-expert``, ``--set-data``) apart from the task's own."""
        return Path(cache) / "datasets" / f"{self.name}-{dataset}{tag}.npz"

    def with_data_overrides(self, overrides: list[str]) -> Task:
        """The task with its dataset recipes overridden by ``DATASET.KEY=VALUE`` words
        (``medium.episodes=2``: the value is YAML), validated like the file; TaskError naming
        the word otherwise."""
        from flowrl.config.loading import DELETE, parse_override

        data = self.spec.model_dump()
        for text in overrides:
            try:
                key, value = parse_override(text)
            except ConfigError as exc:
                raise TaskError(f"--set-data: {exc}") from None
            dataset, _, field = key.partition(".")
            if value is DELETE or not field or "." in field:
                raise TaskError(f"--set-data {text}: expected DATASET.KEY=VALUE, e.g. medium.episodes=2")
            if dataset not in data["datasets"]:
                known = ", ".join(data["datasets"])
                raise TaskError(f"--set-data {text}: task {self.name} has no dataset {dataset!r} (datasets: {known})")
            data["datasets"][dataset][field] = value
        try:
            return Task(self.name, self.file, TaskSpec.model_validate(data))
        except ValidationError as exc:
            where = f"{self.file} with --set-data {' '.join(overrides)}"
            raise TaskError("\n".join(_problem(Path(where), err) for err in exc.errors())) from None

    def check(self) -> None:
        """Every experiment file exists, loads, and runs in the task's env with the expert's
        env.kwargs (the demonstrations come from the expert's env); TaskError otherwise."""
        from flowrl.config import load_config

        missing = [p for p in self.files() if not p.is_file()]
        if missing:
            raise TaskError(
                f"{self.file}: missing experiment file(s) {', '.join(str(p) for p in missing)}; add them or drop "
                "the method (methods) or size (sizes)"
            )
        expert = load_config(self.expert_file).env
        for path in self.files():
            env = load_config(path).env
            if env.id != self.spec.env_id:
                raise TaskError(f"{path}: env.id is {env.id} but its task ({self.file}) is {self.spec.env_id}")
            if env.kwargs != expert.kwargs:
                raise TaskError(
                    f"{path}: env.kwargs {env.kwargs} differ from the expert's {expert.kwargs} ({self.expert_file}): "
                    "the demonstrations come from the expert's env; use the same kwargs"
                )


def tasks_dir(folder: str | Path | None = None) -> Path:
    """``folder``, else ``$FLOWRL_LOCOMOTION_TASKS``, else this checkout's experiments/locomotion/tasks."""
    return Path(folder or os.environ.get(TASKS_DIR_VAR) or DEFAULT_TASKS_DIR).expanduser()


def task_names(folder: str | Path | None = None) -> list[str]:
    """The task names in the folder (file names only, nothing parsed: for ``--help``)."""
    folder = tasks_dir(folder)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_task(path: str | Path) -> Task:
    """One task file, validated; TaskError naming the file and the key otherwise."""
    path = Path(path)
    if not _NAME.match(path.stem):
        raise TaskError(f"{path}: a task's file name is its name: lowercase letters, digits and _ (e.g. hopper.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise TaskError(f"{path}: cannot read the task file ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}: a task file is a mapping of keys (env_id, expert, methods, datasets)")
    try:
        return Task(path.stem, path, TaskSpec.model_validate(data))
    except ValidationError as exc:
        raise TaskError("\n".join(_problem(path, err) for err in exc.errors())) from None


def _problem(path: Path, err: dict) -> str:
    key = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = err["loc"][:-1]
        model = DatasetRecipe if parent[:1] == ("datasets",) else TaskSpec
        return f"{path}: unknown key '{key}'; valid keys{' in ' + key.rpartition('.')[0] if parent else ''}: " + (
            ", ".join(model.model_fields)
        )
    if err["type"] == "missing":
        return f"{path}: missing required key '{key}'"
    got = f" (got {err['input']!r})" if err["type"] != "value_error" else ""
    return f"{path}: {key}: {err['msg'].removeprefix('Value error, ')}{got}"


def load_tasks(folder: str | Path | None = None) -> dict[str, Task]:
    """Every task of the folder (see ``tasks_dir``), by name, sorted."""
    folder = tasks_dir(folder)
    if not folder.is_dir():
        raise TaskError(f"no folder of locomotion task files at {folder} ({TASKS_DIR_VAR} or --tasks-dir)")
    return {name: load_task(folder / f"{name}.yaml") for name in task_names(folder)}


def select_tasks(names: list[str], folder: str | Path | None = None) -> list[Task]:
    """The named tasks (``all``: every task), each checked (``Task.check``)."""
    tasks = load_tasks(folder)
    if names == ["all"]:
        names = list(tasks)
    unknown = [n for n in names if n not in tasks]
    if unknown or not names:
        raise TaskError(
            f"unknown locomotion task(s) {', '.join(unknown) or '(none given)'}; tasks in {tasks_dir(folder)}: "
            f"{', '.join(tasks) or 'none'} (or all); a task is a file TASK.yaml there"
        )
    chosen = [tasks[n] for n in dict.fromkeys(names)]
    for task in chosen:
        task.check()
    return chosen
