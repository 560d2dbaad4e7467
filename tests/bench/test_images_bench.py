"""`flowrl bench images` end to end on a tiny model (the real one is a separate command)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowrl.cli import main
from flowrl.runlog import read_metrics
from tests.image_setup import TINY_OVERRIDES

# The image track's tiny network (tests/image_setup.py's TINY_OVERRIDES), with the verifier
# of the shipped files as the reward and an evaluation of 4 held-out prompts x 2 images.
TINY = [*TINY_OVERRIDES, "eval.episodes=4", "eval.every=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _valid_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()  # the whole file decodes
    with Image.open(path) as image:
        return image.size


def test_images_bench_fine_tunes_every_method_side_by_side(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default pretrained model lives in cache/, relative to here
    out = tmp_path / "out"
    # the default runs the first three; AC-Flow's 5 warm-up iterations need more than this test's 2
    every = ["--methods", "flow_grpo,mixgrpo,flash,nft,awm"]
    assert main(["bench", "images", *every, "--iterations", "2", "--out", str(out), "--no-progress", *TINY]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "images.json").read_text())

    # no pretrained model: shapes_pretrain.yaml made it, with the same overrides, where the next bench finds it
    assert results["pretrained"] == "cache/shapes/pretrain/pretrained.pt" and results["pretrain_s"] > 0
    assert (tmp_path / "cache" / "shapes" / "pretrain" / "pretrained.pt").is_file()
    assert results["commands"]["pretrain"].startswith("flowrl pretrain experiments/images/shapes_pretrain.yaml ")
    assert shlex.split(results["commands"]["bench"])[:3] == ["flowrl", "bench", "images"]

    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["Flow-GRPO", "MixGRPO", "Flash", "DiffusionNFT", "AWM"]
    times = {}
    for method, row in rows.items():
        (run,) = row["runs"]
        records = read_metrics(Path(run["run"]))
        trained = [r for r in records if "time/update_s" in r]
        assert [r["iteration"] for r in trained] == [1, 2]
        times[method] = np.mean([r["time/collect_s"] + r["time/update_s"] for r in trained])
        assert row["s_per_iteration"] == pytest.approx(times[method])
        for when in ("before", "after"):
            assert {"eval/accuracy", "eval/train_accuracy", "eval/jpeg_kb", "eval/diversity"} <= set(row[when])
            categories = [k for k in row[when] if k.startswith("eval/accuracy_")]
            assert categories and all(0 <= row[when][k] <= 1 for k in categories)
            assert row[when] == pytest.approx(run[when])  # one seed: the row is the run
        assert row["before"] == pytest.approx({k: records[0][k] for k in row["before"]})  # iteration 0's evaluation
        assert row["after"] == pytest.approx({k: records[-1][k] for k in row["after"]})
        assert [it for it, _ in run["curve"]] == [0, 1, 2]
        assert row["nfe_per_image"] == pytest.approx(np.mean([r["sampler/nfe_per_sample"] for r in trained]))
        assert 0 <= row["reward_hidden_fraction"] <= 1 and row["peak_rss_mb"] > 0
        argv = shlex.split(run["command"])
        assert argv[:2] == ["flowrl", "train"] and argv[2].startswith("experiments/images/shapes_")
        assert "algo.iterations=2" in argv and "seed=0" in argv
    # the same pretrained model and held-out evaluation: every method starts from one point
    assert rows["MixGRPO"]["before"] == pytest.approx(rows["Flow-GRPO"]["before"])
    assert rows["Flow-GRPO"]["nfe_per_image"] == 4  # K = 4, one evaluation per step
    for method, row in rows.items():
        assert row["time_vs_flow_grpo"] == pytest.approx(times[method] / times["Flow-GRPO"])

    grid = results["grid"]
    assert grid["columns"] == ["pretrained", *rows] and len(grid["prompts"]) == 4
    width, height = _valid_png(out / grid["file"])
    # 4 prompts x (6 blocks of 2 images + 5 blanks), 16 px tiles with 2 px gaps, upscaled 4x
    assert (width, height) == (4 * (17 * 18 + 2), 4 * (4 * 18 + 2))
    _valid_png(out / "images.png")
    assert "| Flow-GRPO |" in printed and "1.00x" in printed and "images.json" in printed

    # again, one method, another seed: the cached pretrained model is reused
    args = ["bench", "images", "--methods", "flash", "--seeds", "3", "--iterations", "1", "--out", str(tmp_path / "b")]
    assert main([*args, "--no-progress", *TINY]) == 0
    again = json.loads((tmp_path / "b" / "images.json").read_text())
    assert again["pretrain_s"] is None and "pretrain" not in again["commands"]
    ((row),) = again["rows"]
    assert row["method"] == "Flash" and row["seeds"] == [3] and row["time_vs_flow_grpo"] is None
    assert results["benchmark"] == "geneval" and "GenEval-fair split" in printed

    # the zero-shot split keeps its own pretrained model; the geneval one is refused for it, in one line
    zero = ["bench", "images", "--methods", "flash", "--out", str(tmp_path / "z"), "--no-progress", *TINY]
    assert main([*zero, "--pretrained", "cache/shapes/pretrain/pretrained.pt", "env.benchmark=zero_shot"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was pretrained on the geneval split" in err
    assert not (tmp_path / "z").exists()


def test_bad_input_is_a_one_line_error_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "images", "--methods", "dancegrpo", "--out", "o", *TINY]) == 2
    assert "unknown method(s) ['dancegrpo']; choose from flow_grpo, mixgrpo, flash" in capsys.readouterr().err
    missing = tmp_path / "model.pt"
    assert main(["bench", "images", "--pretrained", str(missing), "--out", "o", *TINY]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err
    assert main(["bench", "images", "--iterations", "0", "--out", "o", *TINY]) == 2
    assert "algo.iterations" in capsys.readouterr().err
    assert main(["bench", "rollout", "algo.iterations=3"]) == 2
    assert "takes no config overrides" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_a_pretrained_model_of_other_sizes_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    from flowrl.models.build import actor_record, build_image_network
    from flowrl.runlog import atomic_save
    from tests.image_setup import tiny_config

    cfg = tiny_config()  # channels [8, 8, 8]
    atomic_save(actor_record(build_image_network(cfg), cfg.policy), tmp_path / "pretrained.pt")
    args = ["bench", "images", "--pretrained", str(tmp_path / "pretrained.pt"), "--out", str(tmp_path / "o")]
    assert main([*args, *TINY, "policy.channels=[16,16,16]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "channels: checkpoint [8, 8, 8] vs experiment [16, 16, 16]" in err
    assert not (tmp_path / "o").exists()


def test_cli_help_lists_the_images_bench(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "images: Flow-GRPO, MixGRPO, MixGRPO-Flash, DiffusionNFT, AWM and AC-Flow" in text
    for option in ("--methods", "--iterations", "--pretrained", "--seeds", "--out", "--no-progress"):
        assert option in text


def test_every_method_of_each_size_resolves_to_a_valid_config():
    """Every method of the images bench loads from each size's folder (no training): the split
    and the network of the size's pretraining file, so all fine-tune the same pretrained model;
    the log-prob-free methods are there under their own algorithm."""
    from flowrl.bench.images import METHODS, SIZES, select_methods
    from flowrl.config import load_config

    assert {"nft", "awm", "ac_flow"} <= {m.key for m in METHODS}
    for folder in SIZES.values():
        pretrain = load_config(folder / "shapes_pretrain.yaml")
        for method in METHODS:
            (chosen,) = select_methods([method.key])
            assert chosen == method and select_methods([method.label]) == [method]
            cfg = load_config(folder / method.file)
            assert cfg.env.benchmark == pretrain.env.benchmark and cfg.policy.channels == pretrain.policy.channels
            if method.key in ("nft", "awm", "ac_flow"):
                assert cfg.algo.type == method.key
