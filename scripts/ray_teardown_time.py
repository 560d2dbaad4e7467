"""How long a local Ray's processes outlive a driver killed with SIGKILL (Linux).

Starts a driver the way `flowrl train` starts Ray (flowrl.rollout.ray_runtime.ray_session and
two env workers), waits until all of Ray's processes are up, SIGKILLs the driver and times how
long until the last of its descendants (GCS, raylet, agents, workers) is gone. Repeats, and
with --burn N runs N busy processes meanwhile (a loaded machine).

    python scripts/ray_teardown_time.py --repeats 5
    python scripts/ray_teardown_time.py --repeats 5 --burn 4
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from flowrl.runtime import descendants, process_stat

ROOT = Path(__file__).resolve().parents[1]
DRIVER = textwrap.dedent(
    """
    import time
    from flowrl.rollout.ray_collector import RayCollector
    from flowrl.rollout.ray_runtime import ray_session

    with ray_session(None, num_cpus=2):
        collector = RayCollector("flowrl/TwoGoal-v0", 4, 4, seed=0, num_workers=2)
        collector.where()
        print("ready", flush=True)
        time.sleep(600)
    """
)
BURN = "while True: pass"


def _alive(processes: dict[int, str]) -> list[int]:
    return [pid for pid, start in processes.items() if (st := process_stat(pid)) and st[1] == start and st[2] != "Z"]


def _agents_up(processes: dict[int, str]) -> bool:
    """Both of Ray's agents (dashboard, runtime-env) have started: they are the slowest to go."""
    names = []
    for pid in processes:
        try:
            names.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0])
        except OSError:
            continue
    return sum(name.startswith(b"ray::") and b"Agent" in name for name in names) >= 2


def measure_once(limit_s: float = 120.0) -> tuple[float, int]:
    """(seconds from the driver's SIGKILL until its last Ray process is gone, processes)."""
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        if driver.stdout.readline().strip() != "ready":
            raise RuntimeError("the driver did not start its Ray workers")
        end = time.monotonic() + 60
        while not _agents_up(processes := descendants(driver.pid)) and time.monotonic() < end:
            time.sleep(0.1)
        os.kill(driver.pid, signal.SIGKILL)
        killed = time.monotonic()
        driver.wait()
        while _alive(processes) and time.monotonic() - killed < limit_s:
            time.sleep(0.02)
        return time.monotonic() - killed, len(processes)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--burn", type=int, default=0, help="busy processes running meanwhile (load)")
    args = p.parse_args()
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(args.burn)]
    try:
        times = []
        for i in range(args.repeats):
            seconds, count = measure_once()
            times.append(seconds)
            load = os.getloadavg()[0]
            print(f"run {i + 1}: {count} Ray processes gone {seconds:.2f} s after the SIGKILL (load {load:.1f})")
        print(
            f"{args.repeats} runs, {args.burn} busy processes: median {statistics.median(times):.2f} s, "
            f"range {min(times):.2f}-{max(times):.2f} s"
        )
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


if __name__ == "__main__":
    main()
