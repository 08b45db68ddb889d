"""Read-only questions about the jobs table, asked by the daemon, the reaper and status.

They change nothing, so they live apart from the state machine (`runner.jobs`):
reviewing how a job moves between states never needs to read them, and they open
read transactions (`reading`) that on SQLite do not take the write lock, so
`runner status` or a progress line never makes a daemon's claim wait.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, func, select

from runner.db import READ_ONLY
from runner.jobs import Status
from runner.models import jobs


def reading(engine: Engine) -> Connection:
    """A connection that begins a deferred (read) transaction on SQLite."""
    return engine.connect().execution_options(**{READ_ONLY: True})


def count_pending(engine: Engine) -> int:
    with reading(engine) as conn:
        stmt = select(func.count()).where(jobs.c.status == Status.PENDING.value)
        return int(conn.execute(stmt).scalar_one())


def running_workers(engine: Engine) -> list[str]:
    """Worker ids holding running jobs: the reaper checks which of them are dead."""
    with reading(engine) as conn:
        stmt = select(jobs.c.worker_id).where(jobs.c.status == Status.RUNNING.value).distinct()
        return [w for w in conn.execute(stmt).scalars() if w]
