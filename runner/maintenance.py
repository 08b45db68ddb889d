"""Leases and the reaper: what keeps work from being lost or done twice.

A claim holds a lease.  The heartbeat renews the leases of everything this
daemon holds, so a 3-hour video is never taken away while it is being worked on;
the reaper returns to pending whatever nobody renews (its daemon died, on this
machine or another).  On this machine we need not wait for the lease: a worker
id names its host and pid, and a pid that no longer exists cannot renew.

Both run as APScheduler interval jobs inside the daemon; the functions take
`now`, so tests call them directly with no sleeps.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable

from sqlalchemy import Engine

from runner import jobs

log = logging.getLogger(__name__)

HOSTNAME = socket.gethostname()


def new_worker_id() -> str:
    """host:pid:nonce — the nonce keeps a reused pid from inheriting old claims."""
    return f"{HOSTNAME}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_local_workers(
    worker_ids: Iterable[str], *, alive: Callable[[int], bool] = pid_alive
) -> list[str]:
    dead = []
    for worker_id in worker_ids:
        host, _, rest = worker_id.partition(":")
        pid = rest.partition(":")[0]
        if host == HOSTNAME and pid.isdigit() and not alive(int(pid)):
            dead.append(worker_id)
    return dead


def reap(
    engine: Engine, *, now: float, max_attempts: int, alive: Callable[[int], bool] = pid_alive
) -> tuple[int, int]:
    """Requeue (or, out of attempts, fail) jobs of dead or silent workers."""
    dead = dead_local_workers(jobs.running_workers(engine), alive=alive)
    requeued, failed = jobs.requeue_abandoned(
        engine, now=now, max_attempts=max_attempts, dead_workers=dead
    )
    if requeued or failed:
        log.info(
            "reaper: %d abandoned job(s) back to pending, %d out of attempts failed",
            requeued,
            failed,
        )
    return requeued, failed


def heartbeat(engine: Engine, *, worker_id: str, now: float, lease_s: float) -> int:
    return jobs.renew_leases(engine, worker_id=worker_id, now=now, lease_s=lease_s)
