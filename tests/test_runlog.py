"""Run-folder I/O: atomic checkpoints and resume bookkeeping of metrics.jsonl / TensorBoard."""

import json
import time

import torch

from flowrl.runlog import RunLog, atomic_save, read_metrics


def test_atomic_save_leaves_no_temporary_files(tmp_path):
    atomic_save({"a": torch.ones(2)}, tmp_path / "ck" / "last.pt")
    atomic_save({"a": torch.zeros(2)}, tmp_path / "ck" / "last.pt")
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["last.pt"]
    assert torch.equal(torch.load(tmp_path / "ck" / "last.pt")["a"], torch.zeros(2))


def test_resume_drops_records_after_the_checkpoint_and_a_torn_line(tmp_path):
    log = RunLog(tmp_path)
    for step in (0, 10, 20, 30):
        log.log(step, {"losses/value": float(step)}, iteration=step // 10)
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"env_steps": 40, "iteration": 4, "losses/va')  # killed mid-write
    resumed = RunLog(tmp_path, resume_after=20)
    assert [r["env_steps"] for r in read_metrics(tmp_path)] == [0, 10, 20]
    resumed.log(30, {"losses/value": -1.0}, iteration=3)
    resumed.close()
    records = read_metrics(tmp_path)
    assert [r["env_steps"] for r in records] == [0, 10, 20, 30] and records[-1]["losses/value"] == -1.0
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_non_finite_metrics_are_null_in_json(tmp_path):
    log = RunLog(tmp_path)
    log.log(5, {"train/explained_variance": float("nan"), "x": 1.0})
    log.close()
    assert read_metrics(tmp_path) == [{"env_steps": 5, "train/explained_variance": None, "x": 1.0}]


def _tensorboard_steps(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_resume_in_the_same_second_keeps_tensorboard_continuous(tmp_path):
    """The killed process's event file may carry the same timestamp and a higher pid (a child
    process killed and resumed by its parent within one second): the resume's file must still
    sort after it, or TensorBoard reads the new events first and the purge misses the old ones."""
    log = RunLog(tmp_path)
    for step in (10, 20, 30):
        log.log(step, {"losses/value": float(step)})
    log.close()
    (old,) = (tmp_path / "tensorboard").iterdir()
    parts = old.name.split(".")
    parts[3], parts[5] = str(int(time.time())), "99999999"  # now, and a pid above any real one
    old.rename(old.with_name(".".join(parts)))
    resumed = RunLog(tmp_path, resume_after=20)
    resumed.log(30, {"losses/value": -30.0})
    resumed.log(40, {"losses/value": -40.0})
    resumed.close()
    assert _tensorboard_steps(tmp_path / "tensorboard", "losses/value") == [10, 20, 30, 40]
    assert [r["losses/value"] for r in read_metrics(tmp_path)] == [10.0, 20.0, -30.0, -40.0]
