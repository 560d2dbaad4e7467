"""`ray start --head` in a shell, then `flowrl train --ray-address`: the README's cluster recipe."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# slow: `ray stop` at the end stops every Ray process on the machine, so not in the default run.
@pytest.mark.slow
def test_train_joins_a_cluster_started_with_ray_start(tmp_path):
    ray_cli = shutil.which("ray")
    assert ray_cli, "the ray command comes with ray[default]"
    port = _free_port()
    subprocess.run(
        [
            ray_cli,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "flowrl.cli",
                "train",
                str(ROOT / "experiments" / "quickstart.yaml"),
                "--ray-address",
                f"127.0.0.1:{port}",
                "ppo.iterations=2",
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
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)
