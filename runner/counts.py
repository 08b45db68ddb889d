"""Jobs per state and failures per reason, cheap at a million jobs.

Every view leads with them (the bar, `/metrics`, `runner status`, `/status`, the
page), and a person waits on `runner status`.  Counted from the jobs table, a
million jobs take a parallel scan on PostgreSQL (about 120 ms) and the reasons one
heap block per failed job (about 200 ms for 55k failures).

PostgreSQL: triggers (migration 0006) append signed changes to `job_counts`, a row
per state and reason that a statement changed, so reading is a sum over a small
table.  `fold_counts` folds the rows into one per state and reason; a daemon calls
it every `FOLD_EVERY_S` when rows were added, and only one fold runs at a time.

SQLite: `job_counts` stays empty (a row-level trigger made imports too slow, see
that migration) and the jobs table is counted, about 50 ms at a million; the
reasons are grouped from `ix_jobs_failed_reason` alone (about 5 ms).  SQLite's
planner, without statistics, would walk `ix_jobs_status_id` and read every failed
row, so the query names the index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, Executable, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from runner.jobs import Status
from runner.models import REASON_CHARS, job_counts, jobs, reason_of

__all__ = [
    "FOLD_EVERY_S",
    "Reason",
    "count_by_status",
    "counts_are_kept",
    "example_keys",
    "fold_counts",
    "top_reasons",
    "try_fold_counts",
]

log = logging.getLogger(__name__)

#: how often a daemon folds `job_counts` (when anything was added since)
FOLD_EVERY_S = 60.0
#: the most rows one fold statement takes (the oldest): a statement_timeout, or a
#: backlog left with no daemon running, must not make every fold fail
FOLD_SLICE_ROWS = 100_000
#: a slice of the rows up to :upto out, their sums back in (at ids past :upto, so
#: one pass never takes its own output again), in one statement (folding any subset
#: keeps every sum); how many rows went out
FOLD = text(
    "WITH gone AS (DELETE FROM job_counts WHERE id IN"
    " (SELECT id FROM job_counts WHERE id <= :upto ORDER BY id LIMIT :rows)"
    " RETURNING status, error_class, reason, n),"
    " kept AS (INSERT INTO job_counts (status, error_class, reason, n)"
    " SELECT status, error_class, reason, sum(n) FROM gone"
    " GROUP BY status, error_class, reason HAVING sum(n) <> 0 RETURNING 1)"
    " SELECT count(*) FROM gone"
)
#: how long a fold waits for a lock on job_counts (an operator's SELECT FOR UPDATE,
#: a VACUUM FULL) before it gives up until the next time: it runs on a daemon's
#: database thread, where heartbeats queue behind it
FOLD_LOCK_WAIT_MS = 2000
#: one fold at a time across every daemon (pg_try_advisory_xact_lock's key)
_FOLD_LOCK = 0x72756E6E65720006


@dataclass(frozen=True)
class Reason:
    """Failed jobs that share an error class and a message's first REASON_CHARS."""

    error_class: str | None
    reason: str | None
    count: int


def counts_are_kept(db: Connection | Engine) -> bool:
    """Whether triggers keep `job_counts` (PostgreSQL), so counting costs nothing."""
    return db.dialect.name == "postgresql"


def count_by_status(conn: Connection) -> dict[Status, int]:
    """Every state, with 0 for those no job is in, so callers can index any of them."""
    if counts_are_kept(conn):
        stmt = select(job_counts.c.status, func.sum(job_counts.c.n)).group_by(job_counts.c.status)
    else:
        stmt = select(jobs.c.status, func.count()).group_by(jobs.c.status)
    found = {Status(status): int(n) for status, n in conn.execute(stmt).all()}
    return {s: found.get(s, 0) for s in Status}


def top_reasons(conn: Connection, top: int) -> list[Reason]:
    """The `top` most common reasons failed jobs have, most common first; ties by
    class, then reason (NULLs first)."""
    if top <= 0:
        return []
    stmt: Executable
    if counts_are_kept(conn):
        n = func.sum(job_counts.c.n)
        group = (job_counts.c.error_class, job_counts.c.reason)
        stmt = (
            select(*group, n)
            .where(job_counts.c.status == Status.FAILED.value)
            .group_by(*group)
            .having(n > 0)
            .order_by(n.desc(), *(c.asc().nulls_first() for c in group))
            .limit(top)
        )
    else:
        stmt = _SQLITE_TOP_REASONS.bindparams(top=top)
    return [Reason(row[0], row[1], int(row[2])) for row in conn.execute(stmt).all()]


# SQLite: SQLAlchemy renders no INDEXED BY for it, and the partial index is only
# usable with its condition written as a literal ('failed', not a parameter)
_SQLITE_TOP_REASONS = text(
    f"SELECT error_class, substr(error, 1, {REASON_CHARS}) AS reason, count(*) AS n"
    " FROM jobs INDEXED BY ix_jobs_failed_reason"
    f" WHERE status = '{Status.FAILED.value}'"
    " GROUP BY error_class, reason ORDER BY n DESC, error_class, reason LIMIT :top"
)


def example_keys(conn: Connection, reason: Reason, limit: int) -> list[str]:
    """Keys of the latest jobs that failed for `reason` (through ix_jobs_failed_reason)."""
    cls, text = jobs.c.error_class, reason_of(jobs.c.error)
    stmt = (
        select(jobs.c.key)
        .where(
            jobs.c.status == Status.FAILED.value,
            cls.is_(None) if reason.error_class is None else cls == reason.error_class,
            text.is_(None) if reason.reason is None else text == reason.reason,
        )
        .order_by(jobs.c.id.desc())
        .limit(limit)
    )
    return list(conn.execute(stmt).scalars())


def fold_counts(engine: Engine, *, above_id: int = 0, slice_rows: int = FOLD_SLICE_ROWS) -> int:
    """Fold `job_counts` into one row per state and reason, if it has rows past
    `above_id`; returns the highest id after, to pass next time (so a daemon with
    nothing to do folds nothing).  Nothing on SQLite, or while another fold runs.

    One pass over the rows there when it starts, a slice of `slice_rows` per
    transaction, oldest first.  Each slice is one statement: a reader sees its rows
    before it or after it, never half, and rows that triggers append meanwhile are
    not in its snapshot.  A pass leaves a row per group per slice; with more groups
    than a slice holds, later passes merge those further."""
    if slice_rows < 1:
        raise ValueError(f"slice_rows must be at least 1, not {slice_rows}")
    if not counts_are_kept(engine):  # and no write lock taken on SQLite to find out
        return above_id
    highest_id = select(func.max(job_counts.c.id))
    with engine.connect() as conn:
        upto = conn.execute(highest_id).scalar_one()
    if upto is None or upto <= above_id:  # nothing added since
        return above_id
    while True:
        with engine.begin() as conn:
            if not conn.execute(select(func.pg_try_advisory_xact_lock(_FOLD_LOCK))).scalar_one():
                return above_id
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{FOLD_LOCK_WAIT_MS}ms'")
            gone = conn.execute(FOLD, {"upto": upto, "rows": slice_rows}).scalar_one()
            highest = conn.execute(highest_id).scalar_one()
        if gone < slice_rows:
            return int(highest or upto)


def try_fold_counts(engine: Engine, *, above_id: int = 0) -> int:
    """`fold_counts` for callers whose own work is done or must go on (a daemon, an
    import that has committed): folding only keeps reads cheap, so an error (a
    server restarting, a statement or lock timeout) is logged, the next fold tries
    again, and the caller neither fails nor waits on retries."""
    try:
        return fold_counts(engine, above_id=above_id)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        log.warning("job counts not folded (a later fold tries again): %s", reason)
        return above_id
