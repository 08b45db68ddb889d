"""Leases and the reaper: what keeps work from being lost or done twice.

A claim holds a lease.  The heartbeat renews the leases of everything this
daemon holds, so a 3-hour video is never taken away while it is being worked on;
the reaper returns to pending whatever nobody renews (its daemon died, on this
machine or another).  On this machine we need not wait for the lease: a worker
id names its host, pid and pid namespace, and a pid that no longer exists there
cannot renew.

Both run as APScheduler interval jobs inside the daemon; the functions take
`now`, so tests call them directly with no sleeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from sqlalchemy import Engine

from runner import jobs

log = logging.getLogger(__name__)

HOSTNAME = socket.gethostname()
#: keeps a worker id within the column's 64 characters whatever the hostname
HOST = HOSTNAME[:32]


def _pid_space() -> str:
    """Which pid numbering this process lives in: this boot of this machine, and
    this pid namespace.  A hostname alone does not say it: two machines both named
    'ubuntu', or two containers of one pod, share a hostname, and reading the
    other's pid as dead here would take jobs from a live daemon."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    if not parts:  # no /proc: the machine (MAC address) is the best we know
        parts.append(f"{uuid.getnode():x}")
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:8]


PID_SPACE = _pid_space()


def worker_id_for(pid: int, nonce: str) -> str:
    """host:pid:pid-space:nonce — the nonce keeps a reused pid from inheriting old claims."""
    return f"{HOST}:{pid}:{PID_SPACE}:{nonce}"


def new_worker_id() -> str:
    return worker_id_for(os.getpid(), uuid.uuid4().hex[:8])


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
    """Workers of this machine and pid namespace whose process is gone.  Any other
    worker (another machine, another container, an id of an older format) is left
    to its lease."""
    dead = []
    for worker_id in worker_ids:
        parts = worker_id.split(":")
        if len(parts) != 4 or (parts[0], parts[2]) != (HOST, PID_SPACE):
            continue
        if parts[1].isdigit() and not alive(int(parts[1])):
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


def heartbeat(
    engine: Engine,
    *,
    worker_id: str,
    now: float,
    lease_s: float,
    job_ids: Iterable[int] | None = None,
) -> int:
    return jobs.renew_leases(engine, worker_id=worker_id, now=now, lease_s=lease_s, job_ids=job_ids)
