"""Leases, the reaper and pruning: what keeps work from being lost or done twice,
and the table from growing forever.

A claim holds a lease.  The heartbeat renews the leases of everything this
daemon holds, so a 3-hour video is never taken away while it is being worked on;
the reaper returns to pending whatever nobody renews (its daemon died, on this
machine or another).  On this machine we need not wait for the lease: a worker
id names its host, pid and pid namespace, and a pid that no longer exists there
cannot renew.

The heartbeat and the reaper run as APScheduler interval jobs inside the daemon;
the functions take `now`, so tests call them directly with no sleeps.  `prune_done`
is `runner prune`'s statement (`runner.adopt.prune` adds the VACUUM around it).
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
from typing import Any

from sqlalchemy import Engine, update

from runner import jobs, queries
from runner.jobs import Status
from runner.models import jobs as jobs_table

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
    engine: Engine,
    *,
    max_attempts: int,
    spare: Iterable[jobs.Job] = (),
    now: float | None = None,
    alive: Callable[[int], bool] = pid_alive,
) -> tuple[int, int]:
    """Requeue (or, out of attempts, fail) jobs of dead or silent workers, but never
    the attempts in `spare` (what the calling daemon is working on).

    Leases are compared with the database's clock unless a test passes `now`."""
    dead = dead_local_workers(queries.running_workers(engine), alive=alive)
    requeued, failed = jobs.requeue_abandoned(
        engine, now=now, max_attempts=max_attempts, dead_workers=dead, spare=spare
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
    lease_s: float,
    held: Iterable[jobs.Job] | None = None,
    now: float | None = None,
) -> set[int]:
    """Renew the leases of the attempts in `held` (None: all of `worker_id`'s);
    returns the ids renewed."""
    return jobs.renew_leases(engine, worker_id=worker_id, lease_s=lease_s, held=held, now=now)


def prune_done(engine: Engine, *, before: float, keep_results: bool) -> int:
    """`runner prune`: done jobs finished before `before`.

    Without `keep_results` the rows are deleted (vector and all).  With it the
    row and its results stay, so the key is never recomputed and still exported,
    and only the catalogue's copy of the record (meta) is dropped.  Failed jobs
    are never pruned: they are still to be retried or looked at.
    """
    finished = (jobs_table.c.status == Status.DONE.value, jobs_table.c.finished_at < before)
    stmt: Any = (
        update(jobs_table).where(*finished, jobs_table.c.meta.is_not(None)).values(meta=None)
        if keep_results
        else jobs_table.delete().where(*finished)
    )
    with engine.begin() as conn:
        return int(conn.execute(stmt).rowcount)
