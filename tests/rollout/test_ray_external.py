"""`ray start --head` in a shell, then `flowrl train --ray-address`: the README's cluster recipe."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# slow: a whole cluster started by `ray start` (about a minute).
@pytest.mark.slow
def test_train_joins_a_cluster_started_with_ray_start(tmp_path):
    ray_cli = shutil.which("ray")
    assert ray_cli, "the ray command comes with ray[default]"
    port = _free_port()
    log = tmp_path / "ray-start.log"
    with open(log, "w") as out:  # --block: this process owns the cluster; SIGTERM stops what it started
        head = subprocess.Popen(
            [
                ray_cli,
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--num-cpus=2",
                "--include-dashboard=false",
                "--node-ip-address=127.0.0.1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "flowrl.cli",
                "train",
                str(ROOT / "experiments" / "quickstart.yaml"),
                "--ray-address",
                f"127.0.0.1:{port}",
                "algo.iterations=2",
                "pretrain.steps=100",
                "eval.episodes=4",
                f"runs_dir={tmp_path}",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"joined the Ray cluster at 127.0.0.1:{port} (1 nodes)" in proc.stderr
        assert "InvalidAuthToken" not in proc.stderr and "Traceback" not in proc.stderr
    finally:
        head.terminate()  # only this cluster: `ray stop` would stop every Ray on the machine
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
