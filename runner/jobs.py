"""Every change of a job's state, and nothing else.

Each change is one guarded statement (``UPDATE ... WHERE id = :id AND status IN
(...) RETURNING id``): if the row is not in the state the caller assumed, nothing is
written and `JobStateError` is raised.  Keeping them together makes the state
machine reviewable in one place::

    pending --claim--> running --complete--> done
       ^                  |  \\--fail------> failed --(import new URL / retry)--> pending
       +----release-------+

Callers pass plain values in and get frozen `Job` records out; no ORM object ever
crosses an ``await``.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, Update, case, func, select, update

from runner.errors import JobStateError
from runner.models import jobs


class Status(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Job:
    id: int
    key: str
    url: str
    attempts: int


@dataclass(frozen=True)
class Result:
    """What a finished job stores."""

    vector: np.ndarray  # float32, shape (dim,)
    video_duration_s: float
    channels_count: int
    processing_audio_time_s: float
    model_id: str


@dataclass(frozen=True)
class Failure:
    message: str
    error_class: str
    http_status: int | None = None


@dataclass(frozen=True)
class Outcome:
    """A job's end: exactly one of result / failure is set."""

    job_id: int
    result: Result | None = None
    failure: Failure | None = None


def _guarded(conn: Connection, stmt: Update, what: str, job_id: int) -> None:
    if conn.execute(stmt.returning(jobs.c.id)).first() is None:
        raise JobStateError(f"cannot {what} job {job_id}: it is not in the expected state")


def claim(engine: Engine, *, worker_id: str, now: float, limit: int, lease_s: float) -> list[Job]:
    """Move up to `limit` pending jobs to running, oldest first, in one statement.

    Attempts are counted here rather than on failure, so a video that kills the
    process still uses up its tries.  ``FOR UPDATE SKIP LOCKED`` lets PostgreSQL
    daemons claim side by side; SQLite serialises writers and ignores it.
    """
    candidates = (
        select(jobs.c.id)
        .where(jobs.c.status == Status.PENDING.value)
        .order_by(jobs.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    stmt = (
        update(jobs)
        .where(jobs.c.id.in_(candidates), jobs.c.status == Status.PENDING.value)
        .values(
            status=Status.RUNNING.value,
            attempts=jobs.c.attempts + 1,
            worker_id=worker_id,
            claimed_at=now,
            lease_expires_at=now + lease_s,
            error=None,
            error_class=None,
            http_status=None,
        )
        .returning(jobs.c.id, jobs.c.key, jobs.c.url, jobs.c.attempts)
    )
    with engine.begin() as conn:
        rows = conn.execute(stmt).all()
    return sorted(
        (Job(id=r.id, key=r.key, url=r.url, attempts=r.attempts) for r in rows), key=lambda j: j.id
    )


def complete(conn: Connection, job_id: int, result: Result, *, now: float) -> None:
    vector = np.ascontiguousarray(result.vector, dtype="<f4")
    stmt = (
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.status == Status.RUNNING.value)
        .values(
            status=Status.DONE.value,
            finished_at=now,
            lease_expires_at=None,
            vector=vector.tobytes(),
            vector_dim=int(vector.shape[0]),
            video_duration_s=result.video_duration_s,
            channels_count=result.channels_count,
            processing_audio_time_s=result.processing_audio_time_s,
            model_id=result.model_id,
            error=None,
            error_class=None,
            http_status=None,
        )
    )
    _guarded(conn, stmt, "complete", job_id)


def fail(conn: Connection, job_id: int, failure: Failure, *, now: float) -> None:
    stmt = (
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.status == Status.RUNNING.value)
        .values(
            status=Status.FAILED.value,
            finished_at=now,
            lease_expires_at=None,
            error=failure.message,
            error_class=failure.error_class,
            http_status=failure.http_status,
        )
    )
    _guarded(conn, stmt, "fail", job_id)


def store_outcomes(engine: Engine, outcomes: Sequence[Outcome], *, now: float) -> list[int]:
    """Write many job ends in one transaction (one commit, not one per job).

    Returns the ids whose guarded update matched nothing (the job was taken away,
    e.g. released by shutdown); the others are stored regardless.
    """
    lost: list[int] = []
    with engine.begin() as conn:
        for outcome in outcomes:
            try:
                if outcome.result is not None:
                    complete(conn, outcome.job_id, outcome.result, now=now)
                else:
                    assert outcome.failure is not None
                    fail(conn, outcome.job_id, outcome.failure, now=now)
            except JobStateError:
                lost.append(outcome.job_id)
    return lost


def release(engine: Engine, job_ids: Iterable[int]) -> int:
    """Give running jobs back to the queue (clean shutdown).

    The interrupted attempt was our doing, not the video's, so it is not counted.
    """
    ids = list(job_ids)
    if not ids:
        return 0
    stmt = (
        update(jobs)
        .where(jobs.c.id.in_(ids), jobs.c.status == Status.RUNNING.value)
        .values(
            status=Status.PENDING.value,
            attempts=case((jobs.c.attempts > 0, jobs.c.attempts - 1), else_=0),
            worker_id=None,
            claimed_at=None,
            lease_expires_at=None,
        )
        .returning(jobs.c.id)
    )
    with engine.begin() as conn:
        return len(conn.execute(stmt).all())


def requeue_running(engine: Engine) -> int:
    """Return every running job to pending: what a daemon that died left behind.

    Only correct while one daemon owns the database; the attempt stays counted, so
    a video that crashes the daemon every time runs out of tries.
    """
    stmt = (
        update(jobs)
        .where(jobs.c.status == Status.RUNNING.value)
        .values(status=Status.PENDING.value, worker_id=None, claimed_at=None, lease_expires_at=None)
        .returning(jobs.c.id)
    )
    with engine.begin() as conn:
        return len(conn.execute(stmt).all())


# --- catalogue import -----------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One catalogue entry; `invalid` holds why its URL cannot be used, if so."""

    key: str
    url: str | None
    meta: dict
    invalid: str | None = None


@dataclass
class ImportCounts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    invalid: int = 0

    def add(self, other: ImportCounts) -> None:
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.invalid += other.invalid


_INSERT = (
    "INSERT INTO jobs (key, url, meta, status, attempts, error, error_class, created_at,"
    " finished_at) VALUES (:key, :url, :meta, :status, 0, :error, :error_class, :now,"
    " :finished_at) ON CONFLICT (key) DO NOTHING"
)

# A not-done job whose URL changed takes the new URL.  A failed one goes back to
# pending when the new URL is usable; a usable URL replaced by an unusable one fails.
# Done and running rows are never touched: the guard is in the statement itself.
_UPDATE_URL = (
    "UPDATE jobs SET url = :url, meta = :meta,"
    " status = CASE WHEN :invalid IS NOT NULL THEN 'failed'"
    "               WHEN status = 'failed' THEN 'pending' ELSE status END,"
    " attempts = CASE WHEN status = 'failed' THEN 0 ELSE attempts END,"
    " error = :error, error_class = :error_class, http_status = NULL,"
    " finished_at = CASE WHEN :invalid IS NOT NULL THEN :now ELSE finished_at END"
    " WHERE key = :key AND status IN ('pending', 'failed')"
)

_EXISTING = {
    "postgresql": "SELECT key, url, status FROM jobs WHERE key = ANY(:keys)",
    "sqlite": "SELECT key, url, status FROM jobs WHERE key IN (SELECT value FROM json_each(:keys))",
}

_encode_meta = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _driver(conn: Connection, sql: str, params: Any) -> Any:
    """Run SQL straight on the DB-API cursor: the import's hot path cannot afford
    SQLAlchemy's per-row parameter processing (it doubled the import time)."""
    if conn.dialect.paramstyle == "pyformat":
        sql = re.sub(r"(?<!:):(\w+)", r"%(\1)s", sql)
    return conn.exec_driver_sql(sql, params)


def _existing(conn: Connection, keys: list[str]) -> dict[str, Any]:
    dialect = conn.dialect.name
    keys_param: Any = keys if dialect == "postgresql" else json.dumps(keys)
    rows = _driver(conn, _EXISTING[dialect], {"keys": keys_param})
    return {row[0]: row for row in rows}


def upsert_records(conn: Connection, records: Sequence[Record], *, now: float) -> ImportCounts:
    """Apply one batch of catalogue records; idempotent, never touches done rows."""
    batch = {r.key: r for r in records}  # a key repeated in the file: the last wins
    counts = ImportCounts(unchanged=len(records) - len(batch))
    existing = _existing(conn, list(batch))
    inserts, updates = [], []
    for record in batch.values():
        params = {
            "key": record.key,
            "url": record.url,
            "now": now,
            "invalid": record.invalid,
            "meta": _encode_meta(record.meta) if record.meta else None,
            "status": Status.FAILED.value if record.invalid else Status.PENDING.value,
            "error": record.invalid,
            "error_class": "invalid" if record.invalid else None,
            "finished_at": now if record.invalid else None,
        }
        row = existing.get(record.key)
        if row is None:
            inserts.append(params)
        elif row[2] in (Status.PENDING.value, Status.FAILED.value) and row[1] != record.url:
            updates.append(params)
        elif not record.invalid:
            counts.unchanged += 1
            continue
        # A record with an unusable URL is reported as invalid on every import,
        # whether or not it changed anything, so the user sees it each time.
        if record.invalid:
            counts.invalid += 1
        elif row is None:
            counts.inserted += 1
        else:
            counts.updated += 1
    if inserts:
        _driver(conn, _INSERT, inserts)
    if updates:
        _driver(conn, _UPDATE_URL, updates)
    return counts


# --- read-side helpers that the state machine owns --------------------------------


def count_by_status(conn: Connection) -> dict[Status, int]:
    rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all()
    found = {Status(status): n for status, n in rows}
    return {s: found.get(s, 0) for s in Status}
