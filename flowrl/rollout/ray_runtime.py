"""Starting or joining Ray, quietly. Imported only when Ray is enabled.

A local Ray (``ray.address: null``) is closed to the network: every process it starts (GCS,
raylet and its object manager, the runtime-env and dashboard agents with their metrics
endpoints, the API server, the workers, this driver's own RPC server) listens on 127.0.0.1
only, the dashboard is off, and all of it stops when the session ends or the driver dies
(`tests/rollout/test_ray_network.py`). Only joining a cluster (``ray.address`` set) talks to
other machines, on the terms the cluster was started with.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager

from flowrl.errors import FlowRLError

log = logging.getLogger("flowrl")

_AUTH_MODE = "RAY_AUTH_MODE"


def _set_auth_mode(mode: str | None) -> None:
    """Set (or, with None, unset) RAY_AUTH_MODE for this process and the Ray processes it starts,
    and make Ray's cached config see it (what Ray itself does when it turns token mode on)."""
    if mode is None:
        os.environ.pop(_AUTH_MODE, None)
    else:
        os.environ[_AUTH_MODE] = mode
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication (< 2.5x): only the variable matters
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


# Asks a cluster's GCS once, without a token, whether it lets this client in. In its own process,
# with RAY_AUTH_MODE=disabled: the driver's Ray state stays untouched, and Ray's C++ warning about
# the refusal (it names InvalidAuthToken) stays out of the console.
_AUTH_PROBE = r"""
import socket, sys
from ray._common.network_utils import parse_address
from ray._private.services import canonicalize_bootstrap_address
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    gcs = canonicalize_bootstrap_address(sys.argv[1])
    host, port = parse_address(gcs)
    # A cheap reachability check first: GcsClient waits 40 s for a GCS that is not there.
    socket.create_connection((host, int(port)), timeout=5).close()
except Exception:
    sys.exit(2)
try:
    GcsClient(address=gcs)
except AuthenticationError:
    sys.exit(3)
except Exception:
    sys.exit(2)
"""


def _cluster_requires_token(address: str) -> bool | None:
    """Whether the cluster at ``address`` refuses a client that sends no token. None when that
    cannot be told (a Ray Client ``ray://`` address, nothing listening): ray.init then reports
    the problem itself."""
    if address.startswith("ray://"):
        return None
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _AUTH_PROBE, address],
            env={**os.environ, _AUTH_MODE: "disabled"},
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {0: False, 3: True}.get(probe.returncode)


def _auth_mode_for_joining(address: str) -> None:
    """Make the driver's authentication mode the cluster's. Both sides must agree: a driver in
    token mode also requires a token from the cluster's workers that call it back, so joining a
    cluster started without authentication in token mode cancels every actor ("Missing
    authorization header in request!"), and joining a token cluster without a token is refused.
    An explicit RAY_AUTH_MODE is the user's choice and is kept; otherwise the cluster is asked,
    and the token is found by Ray in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
    (where `ray start` keeps it)."""
    if _AUTH_MODE in os.environ:
        return
    requires = _cluster_requires_token(address)
    if requires is not None:
        # "disabled" also stops ray.init("auto") from turning token mode on because a token file exists.
        _set_auth_mode("token" if requires else "disabled")


def _quiet_environment() -> None:
    # No usage-stats prompt, no "metrics exporter" / dashboard chatter on a laptop.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@contextmanager
def _own_sessions_for_ray_processes():
    """While inside, the processes ray.init starts (GCS, raylet, dashboard, monitors) start in a
    session, hence a process group, of their own, as Ray's workers already do.

    Why: a SIGTERM to the driver's process group (``kill -TERM -PGID``, a shell stopping its job)
    would otherwise also stop the GCS and raylet; the driver then cannot finish the iteration it
    has to end with a checkpoint (``flowrl.runtime.graceful_stop``) and dies ~60 s later, when
    Ray gives up on its GCS. They still end with the driver: Ray ties them to it (the kernel's
    parent-death signal), and ``_REAPER`` follows them by pid. Ray starts them through
    ``ray._private.services.ConsolePopen``; without it (another Ray version) nothing changes."""
    try:
        from ray._private import services
    except ImportError:
        yield
        return
    original = getattr(services, "ConsolePopen", None)
    if original is None or not sys.platform.startswith("linux"):
        yield
        return

    class _OwnSession(original):
        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = _OwnSession
    try:
        yield
    finally:
        services.ConsolePopen = original


def _start_local(ray, num_cpus: int | None, kwargs: dict) -> None:
    """ray.init of a one-machine Ray whose processes all listen on 127.0.0.1 only.

    Ray binds a component to the loopback interface when the node's IP is the loopback address
    (gRPC servers of the GCS, raylet, object manager and workers; the agents' HTTP and metrics
    servers; the autoscaler monitor's and API server's metrics), and to every interface
    otherwise. ray.init turns a node IP of 127.0.0.1 into the machine's address, except in its
    single-machine mode (ENABLE_RAY_CLUSTER off, the default on macOS and Windows), which this
    turns on for the call only; no environment variable of Ray 2.60 sets the node IP."""
    from ray._private import ray_constants

    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _own_sessions_for_ray_processes():
            # address "local": a new Ray even where RAY_ADDRESS names a cluster
            ray.init("local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node
    node_ip = ray.util.get_node_ip_address()
    if node_ip not in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "the local Ray listens on %s, not only on 127.0.0.1 (this Ray version ignores the setting)", node_ip
        )


# Runs in its own small process (stdlib only) while a local Ray runs: it follows the processes
# Ray started (the driver's new children and their descendants, by pid and start time) and, when
# its stdin closes (the session ended, or the driver died, even by SIGKILL), ends those still alive.
_REAPER = r"""# flowrl: stops the processes of a local Ray once its driver is gone
import os, select, signal, sys, time

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19], fields[0]  # parent pid, start time, state

seen = {}
for pid in map(int, sys.argv[1:]):
    st = stat(pid)
    if st:
        seen[pid] = st[1]

def scan():
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = stat(int(name))
            if st:
                children.setdefault(st[0], []).append((int(name), st[1]))
    todo = [pid for pid, start in seen.items() if (stat(pid) or (0, None))[1] == start]
    while todo:
        for child, start in children.get(todo.pop(), ()):
            if child not in seen:
                seen[child] = start
                todo.append(child)

def alive():
    out = []
    for pid, start in seen.items():
        st = stat(pid)
        if st and st[1] == start and st[2] != "Z":
            out.append(pid)
    return out

# Scan at once and often: once the raylet dies its children (the agents) belong to init and can
# no longer be found as its descendants.
scan()
while True:
    ready, _, _ = select.select([0], [], [], 0.2)
    if ready and not os.read(0, 64):
        break
    scan()
for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 0.0)):
    left = alive()
    for pid in left:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    end = time.monotonic() + grace
    while left and time.monotonic() < end:
        time.sleep(0.1)
        left = alive()
"""


def _children() -> set[int]:
    """Pids of this process's children (Linux /proc; empty elsewhere)."""
    me, kids = str(os.getpid()), set()
    if not os.path.isdir("/proc/self"):
        return kids
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        kids.add(int(name))
            except (OSError, IndexError):
                pass
    return kids


def _start_reaper(ray_processes: set[int]) -> subprocess.Popen | None:
    """The reaper of ``_REAPER`` for the processes Ray started (Linux only).

    Why: after a SIGKILL of the driver, the GCS and raylet die with it (kernel fate-sharing) and
    the workers within ~3 s, but the runtime-env and dashboard agents notice the raylet's death
    after ~2 s and then block ~60 s publishing it to the dead GCS before they exit (Ray 2.60)."""
    if not ray_processes or not sys.platform.startswith("linux"):
        return None
    try:
        return subprocess.Popen(
            [sys.executable, "-I", "-c", _REAPER, *map(str, sorted(ray_processes))],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # no Ctrl-C of the terminal's process group: it must outlive the driver
        )
    except OSError:
        return None


def _stop_reaper(reaper: subprocess.Popen | None) -> None:
    if reaper is None:
        return
    reaper.stdin.close()  # EOF: it ends what Ray left running and exits
    try:
        reaper.wait(timeout=10)
    except subprocess.TimeoutExpired:
        reaper.kill()
        reaper.wait()


def _signal_handlers() -> dict[signal.Signals, object]:
    """The Python handlers of SIGINT and SIGTERM (empty outside the main thread, where they
    can be neither read back into force nor changed)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict[signal.Signals, object]) -> None:
    """Put back the handlers ``ray.init`` replaced. ray.init sets a Python SIGTERM handler that
    exits at once, and its core worker installs a C++ failure handler for SIGTERM that prints a
    stack dump and kills the process, so without this a scheduler's SIGTERM skips
    ``flowrl.runtime.graceful_stop`` (no stop checkpoint, the last iterations redone). Setting a
    handler through ``signal.signal`` replaces the C++ one too (one sigaction per signal); Ray's
    handlers for crashes (SIGSEGV, SIGABRT, ...) stay."""
    for sig, handler in handlers.items():
        if handler is not None:  # None: set outside Python, cannot be put back from here
            signal.signal(sig, handler)


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None):
    """Join ``address`` ('auto' or 'HOST:PORT'), or start a local Ray that listens on 127.0.0.1
    only (dashboard off); shut down on exit only what this call started, and leave
    RAY_AUTH_MODE as it was. Re-uses an already initialised Ray."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    _quiet_environment()
    auth_mode = os.environ.get(_AUTH_MODE)  # ray.init of a local Ray, or the join below, may set it
    # Workers' own output stays in Ray's session logs (/tmp/ray/session_latest/logs); failures
    # reach the console as flowrl's one-line messages.
    kwargs = {"logging_level": logging.ERROR, "log_to_driver": False, "configure_logging": True}
    reaper = None
    handlers = _signal_handlers()
    try:
        if address is None:
            before = _children()
            _start_local(ray, num_cpus, kwargs)
            reaper = _start_reaper(_children() - before)
            log.info("started a local Ray with %s CPUs", int(ray.cluster_resources().get("CPU", 0)))
        else:
            _auth_mode_for_joining(address)
            ray.init(address=address, **kwargs)
            nodes = [n for n in ray.nodes() if n["Alive"]]
            log.info("joined the Ray cluster at %s (%d nodes)", address, len(nodes))
        _restore_signal_handlers(handlers)
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        # ray.init's own handler met a SIGTERM while Ray started: stop like a second Ctrl-C (nothing
        # ran since the last checkpoint), with Ray's processes shut down
        ray.shutdown()
        _restore_signal_handlers(handlers)
        _stop_reaper(reaper)
        _set_auth_mode(auth_mode)
        raise KeyboardInterrupt from None
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        ray.shutdown()
        _restore_signal_handlers(handlers)
        _stop_reaper(reaper)
        _set_auth_mode(auth_mode)
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        raise FlowRLError(
            f"could not start or join {where}: {exc}. Check ray.address (or --ray-address); a cluster "
            "with token authentication needs its token here too (`ray get-auth-token` on the head, into "
            "~/.ray/auth_token or RAY_AUTH_TOKEN); or set ray.enabled: false to run without Ray"
        ) from None
    try:
        yield ray
    finally:
        try:
            ray.shutdown()
        finally:
            _restore_signal_handlers(handlers)
            _stop_reaper(reaper)
            _set_auth_mode(auth_mode)


def local_cpus(num_cpus: int | None) -> float:
    """The CPUs a local Ray started with ``ray.num_cpus`` will have: that number, else what Ray
    detects on this machine (its own function: cgroup and container limits count)."""
    if num_cpus is not None:
        return float(num_cpus)
    try:
        from ray._private.utils import get_num_cpus

        return float(get_num_cpus(override_docker_cpu_warning=True))
    except (ImportError, TypeError):  # another Ray version: the count Ray falls back to
        return float(os.cpu_count() or 1)


def check_local_cpus(num_workers: int, cpus_per_worker: float, num_cpus: int | None) -> None:
    """Refuse env workers that a local Ray cannot place, before any run folder or pretraining
    (RayCollector checks it again against the running cluster, the only check when joining one)."""
    need, have = num_workers * cpus_per_worker, local_cpus(num_cpus)
    if need > have:
        where = f"ray.num_cpus: {num_cpus}" if num_cpus is not None else "this machine's CPUs"
        raise FlowRLError(
            f"{num_workers} env workers x {cpus_per_worker:g} CPUs need {need:g} CPUs, the local Ray has {have:g} "
            f"({where}): lower env.num_workers or ray.cpus_per_worker (or raise ray.num_cpus), or set "
            "ray.enabled: false to run the workers in this process"
        )


def describe_failure(exc: BaseException) -> str:
    """One line saying why a Ray worker call failed: the task's own exception, or a death."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(exc, RayTaskError):
        inner = exc.cause if getattr(exc, "cause", None) is not None else exc
        lines = str(inner).strip().splitlines()
        return f"{type(inner).__name__}: {lines[-1] if lines else ''}"[:300]
    if isinstance(exc, RayActorError):
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        detail = lines[-1] if lines else ""
        if "Worker exit detail" in detail or "Some common causes" in detail:
            detail = detail.split(". ")[0]
        return f"worker process died ({detail[:200]})"
    return f"{type(exc).__name__}: {exc}"[:300]
