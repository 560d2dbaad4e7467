"""Starting or joining Ray, quietly. Imported only when Ray is enabled."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from flowrl.errors import FlowRLError

log = logging.getLogger("flowrl")


def _token_auth_for_joining() -> None:
    """`ray start` (Ray >= 2.5x) runs clusters with token authentication, and a client that
    names an explicit address sends no token unless RAY_AUTH_MODE=token; it is then refused
    with InvalidAuthToken warnings. When a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
    or ~/.ray/auth_token, where `ray start` keeps it), send it; a cluster without
    authentication ignores it."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    default_path = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or default_path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def _quiet_environment() -> None:
    # No usage-stats prompt, no "metrics exporter" / dashboard chatter on a laptop.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None):
    """Join ``address`` ('auto' or 'HOST:PORT'), or start a local Ray (dashboard off);
    shut down on exit only what this call started. Re-uses an already initialised Ray."""
    if address is not None:
        _token_auth_for_joining()  # before Ray is imported: it reads its auth mode once
    import ray

    if ray.is_initialized():
        yield ray
        return
    _quiet_environment()
    # Workers' own output stays in Ray's session logs (/tmp/ray/session_latest/logs); failures
    # reach the console as flowrl's one-line messages.
    kwargs = {"logging_level": logging.ERROR, "log_to_driver": False, "configure_logging": True}
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
            log.info("started a local Ray with %s CPUs", int(ray.cluster_resources().get("CPU", 0)))
        else:
            ray.init(address=address, **kwargs)
            nodes = [n for n in ray.nodes() if n["Alive"]]
            log.info("joined the Ray cluster at %s (%d nodes)", address, len(nodes))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        raise FlowRLError(
            f"could not start or join {where}: {exc}. Check ray.address (or --ray-address); a cluster "
            "with token authentication needs its token here too (`ray get-auth-token` on the head, into "
            "~/.ray/auth_token or RAY_AUTH_TOKEN); or set ray.enabled: false to run without Ray"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


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
