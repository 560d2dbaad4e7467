"""A local Ray, started the way flowrl starts it, is closed to the network: every socket its
processes listen on is bound to the loopback interface, and none of its processes outlives the
session, nor a driver killed with SIGKILL.

The listing reads /proc (Linux): /proc/net/{tcp,tcp6,udp,udp6} for the listening sockets and
/proc/PID/fd for which process holds each of them.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import torch

from flowrl.config import build_config
from flowrl.models.build import build_actor, build_policy
from flowrl.rollout.ray_collector import RayCollector
from flowrl.rollout.ray_runtime import ray_session
from flowrl.rollout.shard import EnvSpec
from flowrl.runtime import descendants, process_stat

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")

ROOT = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 20.0  # measured: all gone 0-1 s after the session or the driver's SIGKILL (was ~62 s)


@dataclass(frozen=True)
class Listener:
    pid: int
    process: str
    proto: str
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def __str__(self) -> str:
        return f"{self.pid:>7} {self.process[:60]:<60} {self.proto:<4} {self.ip}:{self.port}"


def _alive(processes: dict[int, str]) -> dict[int, str]:
    """Those of ``processes`` (pid -> start time) still running, with their command lines."""
    out = {}
    for pid, start in processes.items():
        st = process_stat(pid)
        if st and st[1] == start and st[2] != "Z":
            out[pid] = _command(pid)
    return out


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in words if w]
    if not words or words[0].startswith("ray::"):  # Ray's workers and agents name themselves
        return " ".join(words) or "?"
    script = next((w for w in words[1:] if not w.startswith("-")), "")  # python -u .../monitor.py --logs-dir=...
    return f"{Path(words[0]).name} {Path(script).name}".strip()


def _address(hex_address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """/proc/net's "0100007F:1F90": the address in 32-bit words of host byte order, the port in hex."""
    address, port = hex_address.split(":")
    raw = bytes.fromhex(address)
    raw = b"".join(int.from_bytes(raw[i : i + 4], sys.byteorder).to_bytes(4, "big") for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw), int(port, 16)


def _listening_inodes() -> dict[int, tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """Socket inode -> (protocol, address, port) of every listening TCP socket and bound UDP socket."""
    table = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/net/{proto}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            ip, port = _address(fields[1])
            listening = fields[3] == "0A" if proto.startswith("tcp") else fields[3] == "07" and port != 0
            if listening:  # 0A: TCP LISTEN; 07: an unconnected UDP socket
                table[int(fields[9])] = (proto, ip, port)
    return table


def _listeners(pids) -> list[Listener]:
    table, found = _listening_inodes(), set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and (inode := int(target[8:-1])) in table:
                found.add(Listener(pid, _command(pid), *table[inode]))
    return sorted(found, key=lambda s: (s.pid, s.port))


def _loopback(ip) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, what a dual-stack socket on 127.0.0.1 shows
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _wait_gone(processes: dict[int, str], within: float) -> dict[int, str]:
    end = time.monotonic() + within
    while (left := _alive(processes)) and time.monotonic() < end:
        time.sleep(0.2)
    return left


def _policy():
    cfg = build_config({"name": "t", "policy": {"hidden_dims": [16], "time_embed_dim": 8}})
    torch.manual_seed(0)
    return build_policy(cfg, build_actor(cfg.policy, 2, 2))


def test_a_local_ray_listens_on_loopback_only_and_stops_with_its_session():
    ray.shutdown()
    me = os.getpid()
    before = descendants(me)
    mine_before = {(s.proto, s.ip, s.port) for s in _listeners([me])}  # whatever this process had already
    with ray_session(None, num_cpus=2):
        collector = RayCollector(EnvSpec("flowrl/TwoGoal-v0", 4, 4, seed=0), num_workers=2)
        try:
            collector.reset(0)
            collector.collect(_policy(), 3, 0)
            workers = {w["pid"] for w in collector.where()}
            started = {pid: start for pid, start in descendants(me).items() if before.get(pid) != start}
            listeners = [
                s for s in _listeners([me, *started]) if s.pid != me or (s.proto, s.ip, s.port) not in mine_before
            ]
        finally:
            collector.close()
    listing = "\n".join(map(str, listeners))
    print(f"listening sockets of the local Ray:\n{listing}")
    assert workers <= set(started), "the env workers are not among the driver's descendants"
    holders = {s.process for s in listeners}
    assert any("raylet" in p for p in holders) and any("gcs_server" in p for p in holders), listing
    assert workers & {s.pid for s in listeners}, f"no env worker among the listeners:\n{listing}"
    exposed = [s for s in listeners if not _loopback(s.ip)]
    assert not exposed, "listening outside the loopback interface:\n" + "\n".join(map(str, exposed))
    left = _wait_gone(started, GONE_WITHIN_S)
    assert not left, f"still running {GONE_WITHIN_S:.0f} s after the session ended: {left}"


DRIVER = textwrap.dedent(
    """
    import time
    from flowrl.rollout.ray_collector import RayCollector
    from flowrl.rollout.ray_runtime import ray_session
    from flowrl.rollout.shard import EnvSpec

    with ray_session(None, num_cpus=2):
        collector = RayCollector(EnvSpec("flowrl/TwoGoal-v0", 4, 4, seed=0), num_workers=2)
        print(" ".join(str(w["pid"]) for w in collector.where()), flush=True)
        time.sleep(600)
    """
)


def test_no_ray_process_outlives_a_killed_driver():
    # Without flowrl's reaper the GCS and raylet die with the driver and the workers ~3 s later, but
    # the dashboard and runtime-env agents linger ~62 s (they block on the dead GCS before exiting).
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        workers = {int(pid) for pid in driver.stdout.readline().split()}
        assert len(workers) == 2, "the driver did not start its env workers"
        end = time.monotonic() + 30  # the agents start alongside the workers; wait until both are up
        while time.monotonic() < end:
            ray_processes = descendants(driver.pid)
            if sum(_command(pid).startswith("ray::") and "Agent" in _command(pid) for pid in ray_processes) >= 2:
                break
            time.sleep(0.2)
        assert workers <= set(ray_processes)
        names = sorted(_alive(ray_processes).values())
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        left = _wait_gone(ray_processes, GONE_WITHIN_S)
        assert not left, f"still running {GONE_WITHIN_S:.0f} s after the driver's SIGKILL: {left} (of {names})"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
