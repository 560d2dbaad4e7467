"""The reward registry: a reward model is one file (its spec, registered by itself), found
without a typed-out list; the config checks a spec without building it; a reward that cannot
be built stops the command with one line before any run folder exists; a reward added as one
file in a temporary folder (README "Adding a reward model": the brightness reward) runs a tiny
shapes GRPO iteration."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Literal

import pytest
import torch

from flowrl.cli import main
from flowrl.config import ConfigError, load_config
from flowrl.errors import FlowRLError
from flowrl.rewards import ImageBatch, RewardError
from flowrl.rewards.jpeg import JpegReward
from flowrl.rewards.registry import RewardSpec, build_reward, check_reward, register_reward, reward_types, spec_of
from flowrl.runlog import read_metrics
from tests.image_setup import TINY_OVERRIDES, tiny_config
from tests.readme import README, readme_block, readme_command

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "experiments" / "images" / "shapes_flow_grpo.yaml"
BRIGHTNESS = readme_block("# brightness.py")
TINY = [*TINY_OVERRIDES, "algo.iterations=1", "eval.episodes=2", "--no-progress"]


def _registered_in_files() -> set[str]:
    """The oracle: the ``type`` of every class decorated with ``@register_reward`` in the files of
    flowrl/rewards, read from the source (not by importing it)."""
    names = set()
    for path in (ROOT / "flowrl" / "rewards").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "register_reward" for d in node.decorator_list
            ):
                (field,) = [s for s in node.body if isinstance(s, ast.AnnAssign) and s.target.id == "type"]
                names.add(field.value.value)
    return names


def test_every_reward_file_of_the_package_is_found_without_a_list():
    assert set(reward_types()) == _registered_in_files() and len(reward_types()) >= 4
    assert all(reward_types().values())  # each described by its spec's docstring


def test_the_readme_reward_table_lists_the_registry():
    section = README.read_text().split("Reward models (`flowrl/rewards/`", 1)[1].split("\n\n", 2)[1]
    assert set(re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE)) == set(reward_types())


def test_the_config_checks_a_reward_spec_without_building_it(monkeypatch, tmp_path):
    """A learned reward's checkpoint is not loaded, no model is constructed, at config time (the
    old validator built the model: a missing checkpoint failed there, a raising constructor
    escaped as a traceback)."""

    def refuse(*args, **kwargs):
        raise AssertionError("built while the config was checked")

    monkeypatch.setattr(JpegReward, "__init__", refuse)
    cfg = tiny_config("env.reward={type: multi, components: [{type: jpeg}, {type: verifier}]}")
    assert cfg.env.reward["components"][0] == {"type": "jpeg"}
    cfg = tiny_config(f"env.reward={{type: learned, path: {tmp_path / 'none.pt'}}}")
    assert cfg.env.reward["path"] == str(tmp_path / "none.pt")
    with pytest.raises(ConfigError, match="env.reward: unknown key 'paht' for type 'learned'"):
        tiny_config("env.reward={type: learned, paht: x.pt}")


def _train(tmp_path: Path, *overrides: str) -> int:
    return main(["train", str(EXPERIMENT), *TINY, *overrides, f"runs_dir={tmp_path / 'runs'}"])


def test_a_reward_whose_constructor_raises_is_one_line_before_any_run_folder(monkeypatch, tmp_path, capsys):
    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(JpegReward, "__init__", broken)
    assert _train(tmp_path, "env.reward={type: jpeg}") == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "flowrl: error: env.reward: reward model 'jpeg' raised while being built: RuntimeError: CUDA out of memory"
    )
    assert not (tmp_path / "runs").exists()
    # where no preflight ran (a resumed run), building it in the run is the same one line
    with pytest.raises(RewardError, match="^env.reward: reward model 'jpeg' raised while being built: RuntimeError"):
        build_reward({"type": "jpeg"})


def test_a_missing_learned_checkpoint_is_one_line_before_any_run_folder(tmp_path, capsys):
    assert _train(tmp_path, f"env.reward={{type: learned, path: {tmp_path / 'none.pt'}}}") == 2
    err = capsys.readouterr().err.strip()
    assert "learned reward checkpoint not found" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_a_reward_added_as_one_file_runs_a_tiny_grpo_iteration(tmp_path, monkeypatch):
    """README's brightness.py, written to a temporary folder and named as FILE.py:NAME there
    (the README's command): the final evaluation's return is the mean red value of the
    evaluation images, computed here from the trained policy."""
    from flowrl.models.build import build_policy, load_image_network
    from flowrl.rollout.image_eval import ImageEvaluator

    (tmp_path / "brightness.py").write_text(BRIGHTNESS)
    monkeypatch.chdir(tmp_path)
    command = readme_command('flowrl train experiments/images/shapes_flow_grpo.yaml "env.reward={type: brightness')
    (reward,) = [w for w in command if w.startswith("env.reward=")]
    assert reward == "env.reward={type: brightness.py:brightness, channel: red}"
    assert _train(tmp_path, reward) == 0
    (run,) = (tmp_path / "runs").iterdir()
    records = read_metrics(run)
    assert [r["iteration"] for r in records] == [0, 1] and records[1]["grpo/kept_steps"] > 0
    cfg = load_config(run / "config.yaml")  # the saved config names the file: a resume finds it again
    assert cfg.env.reward == {"type": "brightness.py:brightness", "channel": "red"}
    evaluator = ImageEvaluator(cfg, None)
    images = evaluator.images(build_policy(cfg, load_image_network(run / "policy.pt", cfg)))
    assert records[1]["eval/return"] == pytest.approx(float(images[:, 0].mean()), rel=1e-5)
    assert 0.0 <= records[1]["charts/episode_return"] <= 1.0


def test_a_plugin_by_module_name_and_its_errors(tmp_path, monkeypatch):
    plugin = tmp_path / "my_rewards_pkg"
    plugin.mkdir()
    (plugin / "__init__.py").write_text("")
    (plugin / "bright.py").write_text(BRIGHTNESS)
    (tmp_path / "crashes.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    model = build_reward({"type": "my_rewards_pkg.bright:brightness"})
    images = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(model(ImageBatch(images, ["", "", ""])).scores, images.mean(dim=(1, 2, 3)))
    cases = [
        ({"type": "none.py:brightness"}, f"env.reward.type: 'none.py:brightness': no file {tmp_path / 'none.py'}"),
        ({"type": "nosuch_module_x:b"}, "cannot import module 'nosuch_module_x' (ModuleNotFoundError"),
        ({"type": "crashes.py:b"}, f"importing {tmp_path / 'crashes.py'} failed: ZeroDivisionError: division by zero"),
        ({"type": "my_rewards_pkg.bright:dark"}, "registers no reward 'dark' (it registers: brightness;"),
        (
            {"type": "my_rewards_pkg.bright:brightness", "channel": "purple"},
            "env.reward.channel: Input should be 'all'",
        ),
        ({"type": "brightness"}, "env.reward.type: 'brightness' is not one of"),  # a plugin is named by its module
    ]
    for spec, message in cases:
        with pytest.raises(ConfigError) as err:
            spec_of(spec)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


class _Misnamed:
    name = "not_the_spec_name"

    def __call__(self, batch: ImageBatch) -> torch.Tensor:
        return torch.zeros(len(batch))


@register_reward
class _MisnamedSpec(RewardSpec):
    """A model whose name is not its spec's reward_name."""

    type: Literal["misnamed"] = "misnamed"

    def build(self) -> _Misnamed:
        return _Misnamed()


def test_the_registry_refuses_specs_it_could_not_key():
    with pytest.raises(RewardError, match="named 'not_the_spec_name' but its spec's reward_name is 'misnamed'"):
        build_reward(_MisnamedSpec())
    with pytest.raises(FlowRLError, match="failed its check|named 'not_the_spec_name'"):
        check_reward(_MisnamedSpec())  # the default preflight builds it once
    with pytest.raises(TypeError, match="must be Literal"):

        @register_reward
        class _NoLiteral(RewardSpec):
            type: str = "loose"

    class _OtherJpeg(RewardSpec):
        type: Literal["jpeg"] = "jpeg"

    _OtherJpeg.__module__ = "flowrl.rewards.another_file"  # a second file of the package claiming the name
    with pytest.raises(TypeError, match="'jpeg' is registered twice"):
        register_reward(_OtherJpeg)
