"""Every change of a job's state, and nothing else.

Each change is one guarded statement (``UPDATE ... WHERE id = :id AND status IN
(...) RETURNING id``): if the row is not in the state the caller assumed, nothing is
written and `JobStateError` is raised.  Keeping them together makes the state
machine reviewable in one place::

    pending --claim--> running --complete--> done
       ^  ^               |  \\--fail------> failed --(import new URL / retry)--> pending
       |  +--retry_later--+  (transient error, backoff via not_before)
       +--release / requeue_abandoned (shutdown; lease expired or worker dead)

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
from sqlalchemy import Connection, Engine, Text, Update, case, cast, func, literal, select, update

from runner.db import READ_ONLY
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
    """A job's end, or the end of one attempt.

    `result` set: done.  `failure` set: failed, unless `retry_at` is set too, in
    which case the job waits in pending until then.  `uncounted` gives the
    attempt back (the job never really ran, e.g. its host is backing off).
    """

    job_id: int
    result: Result | None = None
    failure: Failure | None = None
    retry_at: float | None = None
    uncounted: bool = False


def _guarded(conn: Connection, stmt: Update, what: str, job_id: int) -> None:
    if conn.execute(stmt.returning(jobs.c.id)).first() is None:
        raise JobStateError(f"cannot {what} job {job_id}: it is not in the expected state")


def _ours(job_id: int, worker_id: str) -> tuple[Any, ...]:
    """The guard of every change a worker makes to a job it claimed."""
    return (
        jobs.c.id == job_id,
        jobs.c.status == Status.RUNNING.value,
        jobs.c.worker_id == worker_id,
    )


def claim(engine: Engine, *, worker_id: str, now: float, limit: int, lease_s: float) -> list[Job]:
    """Move up to `limit` due pending jobs to running, oldest first, in one statement.

    Attempts are counted here rather than on failure, so a video that kills the
    process still uses up its tries.  ``FOR UPDATE SKIP LOCKED`` lets PostgreSQL
    daemons claim side by side; SQLite serialises writers and ignores it.
    """
    due = (jobs.c.status == Status.PENDING.value) & (
        jobs.c.not_before.is_(None) | (jobs.c.not_before <= now)
    )
    candidates = (
        select(jobs.c.id)
        .where(due)
        .order_by(jobs.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if engine.dialect.name == "postgresql":
        # A MATERIALIZED CTE runs exactly once; an IN (subquery) that the planner
        # chose to rescan could lock, and so claim, more than `limit` rows.
        picked = candidates.cte("picked").prefix_with("MATERIALIZED")
        chosen = jobs.c.id == picked.c.id
    else:
        chosen = jobs.c.id.in_(candidates.scalar_subquery())
    stmt = (
        update(jobs)
        .where(chosen, jobs.c.status == Status.PENDING.value)
        .values(
            status=Status.RUNNING.value,
            attempts=jobs.c.attempts + 1,
            worker_id=worker_id,
            claimed_at=now,
            lease_expires_at=now + lease_s,
            not_before=None,
        )
        .returning(jobs.c.id, jobs.c.key, jobs.c.url, jobs.c.attempts)
    )
    with engine.begin() as conn:
        rows = conn.execute(stmt).all()
    return sorted(
        (Job(id=r.id, key=r.key, url=r.url, attempts=r.attempts) for r in rows), key=lambda j: j.id
    )


def complete(conn: Connection, job_id: int, result: Result, *, worker_id: str, now: float) -> None:
    vector = np.ascontiguousarray(result.vector, dtype="<f4")
    stmt = (
        update(jobs)
        .where(*_ours(job_id, worker_id))
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


#: the attempt counted at the claim, given back: the job never really ran, or we cut it
_ATTEMPT_GIVEN_BACK = case((jobs.c.attempts > 0, jobs.c.attempts - 1), else_=0)


def _failure_values(failure: Failure) -> dict[str, Any]:
    return {
        "error": failure.message,
        "error_class": failure.error_class,
        "http_status": failure.http_status,
    }


def fail(conn: Connection, job_id: int, failure: Failure, *, worker_id: str, now: float) -> None:
    stmt = (
        update(jobs)
        .where(*_ours(job_id, worker_id))
        .values(
            status=Status.FAILED.value,
            finished_at=now,
            lease_expires_at=None,
            **_failure_values(failure),
        )
    )
    _guarded(conn, stmt, "fail", job_id)


def retry_later(
    conn: Connection,
    job_id: int,
    failure: Failure,
    *,
    worker_id: str,
    not_before: float,
    uncounted: bool = False,
) -> None:
    """Back to pending until `not_before`, keeping the error as the last one seen."""
    attempts = _ATTEMPT_GIVEN_BACK if uncounted else jobs.c.attempts
    stmt = (
        update(jobs)
        .where(*_ours(job_id, worker_id))
        .values(
            status=Status.PENDING.value,
            not_before=not_before,
            attempts=attempts,
            worker_id=None,
            lease_expires_at=None,
            **_failure_values(failure),
        )
    )
    _guarded(conn, stmt, "reschedule", job_id)


def store_outcomes(
    engine: Engine, outcomes: Sequence[Outcome], *, worker_id: str, now: float
) -> list[int]:
    """Write many job ends in one transaction (one commit, not one per job).

    Returns the ids whose guarded update matched nothing (the job was no longer
    ours: its lease ran out and it was reclaimed); the others are stored.
    """
    lost: list[int] = []
    with engine.begin() as conn:
        for outcome in outcomes:
            try:
                _store_one(conn, outcome, worker_id=worker_id, now=now)
            except JobStateError:
                lost.append(outcome.job_id)
    return lost


def _store_one(conn: Connection, outcome: Outcome, *, worker_id: str, now: float) -> None:
    if outcome.result is not None:
        complete(conn, outcome.job_id, outcome.result, worker_id=worker_id, now=now)
        return
    assert outcome.failure is not None
    if outcome.retry_at is None:
        fail(conn, outcome.job_id, outcome.failure, worker_id=worker_id, now=now)
    else:
        retry_later(
            conn,
            outcome.job_id,
            outcome.failure,
            worker_id=worker_id,
            not_before=outcome.retry_at,
            uncounted=outcome.uncounted,
        )


def _held_by(worker_id: str, job_ids: Iterable[int] | None) -> list[Any] | None:
    """WHERE terms for the running jobs `worker_id` holds (only `job_ids`, if given);
    None when `job_ids` is empty, so the caller can skip the statement."""
    held = [jobs.c.status == Status.RUNNING.value, jobs.c.worker_id == worker_id]
    if job_ids is None:
        return held
    ids = list(job_ids)
    return [*held, jobs.c.id.in_(ids)] if ids else None


def renew_leases(
    engine: Engine,
    *,
    worker_id: str,
    now: float,
    lease_s: float,
    job_ids: Iterable[int] | None = None,
) -> int:
    """Heartbeat: a job is never reclaimed while the worker holding it is alive.

    `job_ids`: renew only these (the daemon passes what it is working on), so a
    claim whose reply was lost to a database error, held but unknown to us,
    expires and is reaped instead of being held for as long as we live.
    """
    held = _held_by(worker_id, job_ids)
    if held is None:
        return 0
    stmt = update(jobs).where(*held).values(lease_expires_at=now + lease_s)
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount


def release(engine: Engine, job_ids: Iterable[int] | None, *, worker_id: str) -> int:
    """Give running jobs back to the queue (clean shutdown).

    `job_ids` None: every job `worker_id` still holds.  A stopping daemon releases
    that way, so a claim that committed while its task was being cancelled (the
    daemon never learnt which jobs it took) is not stranded.  The interrupted
    attempt was our doing, not the video's, so it is not counted.
    """
    held = _held_by(worker_id, job_ids)
    if held is None:
        return 0
    stmt = (
        update(jobs)
        .where(*held)
        .values(
            status=Status.PENDING.value,
            attempts=_ATTEMPT_GIVEN_BACK,
            worker_id=None,
            claimed_at=None,
            lease_expires_at=None,
        )
        .returning(jobs.c.id)
    )
    with engine.begin() as conn:
        return len(conn.execute(stmt).all())


def requeue_abandoned(
    engine: Engine, *, now: float, max_attempts: int, dead_workers: Sequence[str] = ()
) -> tuple[int, int]:
    """Reaper: running jobs whose lease expired, or whose worker is known dead.

    They go back to pending, or to failed once they have used `max_attempts`
    (a video that kills its worker every time must not do so forever).  The
    attempt stays counted.  Returns (requeued, failed).
    """
    abandoned = (jobs.c.status == Status.RUNNING.value) & (
        (jobs.c.lease_expires_at < now) | jobs.c.worker_id.in_(list(dead_workers))
    )
    gave_up = (
        update(jobs)
        .where(abandoned, jobs.c.attempts >= max_attempts)
        .values(
            status=Status.FAILED.value,
            finished_at=now,
            lease_expires_at=None,
            error_class=func.coalesce(jobs.c.error_class, "lost"),
            error=literal("gave up after ")
            + cast(jobs.c.attempts, Text)
            + literal(" attempts; the worker stopped (killed or crashed) during the last")
            + func.coalesce(literal("; previous error: ") + jobs.c.error, literal("")),
        )
    )
    requeue = (
        update(jobs)
        .where(abandoned, jobs.c.attempts < max_attempts)
        .values(status=Status.PENDING.value, worker_id=None, claimed_at=None, lease_expires_at=None)
    )
    with engine.begin() as conn:
        failed = conn.execute(gave_up).rowcount
        requeued = conn.execute(requeue).rowcount
    return requeued, failed


def running_workers(engine: Engine) -> list[str]:
    with _reading(engine) as conn:
        stmt = select(jobs.c.worker_id).where(jobs.c.status == Status.RUNNING.value).distinct()
        return [w for w in conn.execute(stmt).scalars() if w]


def requeue_failed(
    engine: Engine,
    *,
    keys: Sequence[str] = (),
    error_class: str | None = None,
    all_failed: bool = False,
) -> int:
    """`runner retry`: failed jobs back to pending with a fresh set of attempts."""
    conditions = [jobs.c.status == Status.FAILED.value]
    if keys:
        conditions.append(jobs.c.key.in_(list(keys)))
    if error_class:
        conditions.append(jobs.c.error_class == error_class)
    if not (keys or error_class or all_failed):
        return 0
    conditions.append(jobs.c.url.is_not(None))  # nothing to fetch: retrying cannot help
    stmt = (
        update(jobs)
        .where(*conditions)
        .values(
            status=Status.PENDING.value,
            attempts=0,
            not_before=None,
            finished_at=None,
            worker_id=None,
        )
    )
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount


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
# (CAST: PostgreSQL cannot infer a parameter's type from `IS NOT NULL` alone.)
_UPDATE_URL = (
    "UPDATE jobs SET url = :url, meta = :meta,"
    " status = CASE WHEN CAST(:invalid AS TEXT) IS NOT NULL THEN 'failed'"
    "               WHEN status = 'failed' THEN 'pending' ELSE status END,"
    " attempts = CASE WHEN status = 'failed' THEN 0 ELSE attempts END,"
    " error = :error, error_class = :error_class, http_status = NULL,"
    " finished_at = CASE WHEN CAST(:invalid AS TEXT) IS NOT NULL THEN :now ELSE finished_at END,"
    " not_before = NULL"
    " WHERE key = :key AND status IN ('pending', 'failed')"
)

_EXISTING = {
    "postgresql": "SELECT key, url, status FROM jobs WHERE key = ANY(:keys)",
    "sqlite": "SELECT key, url, status FROM jobs WHERE key IN (SELECT value FROM json_each(:keys))",
}

# PostgreSQL: the whole batch as one statement over column arrays; an executemany
# of single-row INSERTs costs a round trip per row (3x slower than SQLite's).
_INSERT_ARRAYS = (
    "INSERT INTO jobs (key, url, meta, status, attempts, error, error_class, created_at,"
    " finished_at) SELECT k, u, m, s, 0, e, c, :now, f FROM unnest(CAST(:key AS TEXT[]),"
    " CAST(:url AS TEXT[]), CAST(:meta AS TEXT[]), CAST(:status AS TEXT[]),"
    " CAST(:error AS TEXT[]), CAST(:error_class AS TEXT[]), CAST(:finished_at AS FLOAT8[]))"
    " AS t(k, u, m, s, e, c, f) ON CONFLICT (key) DO NOTHING"
)
_ARRAY_COLUMNS = ("key", "url", "meta", "status", "error", "error_class", "finished_at")


def _insert_new_records(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if conn.dialect.name != "postgresql":
        _driver(conn, _INSERT, rows)
        return
    arrays: dict[str, Any] = {name: [row[name] for row in rows] for name in _ARRAY_COLUMNS}
    _driver(conn, _INSERT_ARRAYS, {**arrays, "now": rows[0]["now"]})


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
        _insert_new_records(conn, inserts)
    if updates:
        _driver(conn, _UPDATE_URL, updates)
    return counts


# --- read-side helpers that the state machine owns --------------------------------


def _reading(engine: Engine) -> Connection:
    """A connection that begins a deferred (read) transaction on SQLite."""
    return engine.connect().execution_options(**{READ_ONLY: True})


def count_pending(engine: Engine) -> int:
    with _reading(engine) as conn:
        stmt = select(func.count()).where(jobs.c.status == Status.PENDING.value)
        return int(conn.execute(stmt).scalar_one())


def count_by_status(conn: Connection) -> dict[Status, int]:
    rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all()
    found = {Status(status): n for status, n in rows}
    return {s: found.get(s, 0) for s in Status}


# --- adopting old results and pruning ---
#
# `runner import-results` takes in what the old script computed so those keys are
# not computed again; `runner prune` drops what a long-running database no longer
# needs.  The rules every statement below carries in its WHERE clause: a job done in
# the database is never overwritten, and a running job belongs to its worker.
# (sqlalchemy names these need are imported in the functions, so this section never
# has to touch the module's import block.)

#: model_id of adopted vectors and error_class of adopted failures
ADOPTED = "adopted"


@dataclass(frozen=True)
class OldFailure:
    """An entry of the old script's audio_fail.json."""

    key: str
    url: str | None
    error: str
    http_status: int | None = None


@dataclass(frozen=True)
class OldFacts:
    """An entry of the old script's audio_process.json."""

    key: str
    processing_audio_time_s: float | None
    video_duration_s: float | None
    channels_count: int | None


@dataclass
class AdoptCounts:
    adopted: int = 0  # now done with an old vector
    queued: int = 0  # old vector useless: pending, to be computed by the daemon
    failed: int = 0  # failed: an old failure, or a useless vector with nothing to fetch
    no_url: int = 0  # of `failed`: useless vector and no URL to compute it from
    skipped: int = 0  # left alone: done, running, or already tried by this runner
    facts: int = 0  # audio_process.json entries stored on adopted jobs

    def add(self, other: AdoptCounts) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


def _states(conn: Connection, keys: Iterable[str]) -> dict[str, tuple[str, int, bool]]:
    """key -> (status, attempts, whether an error is recorded) for the keys it knows."""
    from sqlalchemy import bindparam

    stmt = select(jobs.c.key, jobs.c.status, jobs.c.attempts, jobs.c.error.is_not(None)).where(
        jobs.c.key.in_(bindparam("keys", expanding=True))
    )
    return {r[0]: (r[1], r[2], bool(r[3])) for r in conn.execute(stmt, {"keys": list(keys)})}


def _insert_new(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Rows for keys the database lacks; should one appear meanwhile (a concurrent
    import on PostgreSQL), the existing row wins."""
    from sqlalchemy.dialects import postgresql, sqlite

    if rows:
        dialect: Any = postgresql if conn.dialect.name == "postgresql" else sqlite
        conn.execute(dialect.insert(jobs).on_conflict_do_nothing(index_elements=["key"]), rows)


def adopt_vectors(
    conn: Connection,
    vectors: Sequence[tuple[str, np.ndarray]],
    *,
    now: float,
    finished_at: float,
    note: str,
) -> AdoptCounts:
    """Old vectors that carry information: their jobs become done with them.

    Pending and failed jobs take the vector (a result beats another try); done and
    running jobs are skipped.  `finished_at` is when the old script produced it
    (its file's mtime), so rates and `--only-done-since` do not count it as new.
    """
    from sqlalchemy import bindparam

    done = Status.DONE.value
    stmt = (
        update(jobs)
        .where(
            jobs.c.key == bindparam("b_key"),  # IN (...) would not executemany
            (jobs.c.status == Status.PENDING.value) | (jobs.c.status == Status.FAILED.value),
        )
        .values(
            status=done,
            vector=bindparam("b_vector"),
            vector_dim=bindparam("b_dim"),
            model_id=ADOPTED,
            finished_at=finished_at,
            note=note,
            error=None,
            error_class=None,
            http_status=None,
            not_before=None,
            worker_id=None,
            claimed_at=None,
            lease_expires_at=None,
        )
    )
    batch = dict(vectors)
    states = _states(conn, batch)
    counts = AdoptCounts()
    updates, inserts = [], []
    for key, vector in batch.items():
        blob = np.ascontiguousarray(vector, dtype="<f4")
        state = states.get(key)
        if state is None:
            inserts.append(
                {
                    "key": key,
                    "url": None,
                    "status": done,
                    "attempts": 0,
                    "created_at": now,
                    "finished_at": finished_at,
                    "vector": blob.tobytes(),
                    "vector_dim": int(blob.shape[0]),
                    "model_id": ADOPTED,
                    "note": note,
                }
            )
        elif state[0] in (Status.PENDING.value, Status.FAILED.value):
            updates.append({"b_key": key, "b_vector": blob.tobytes(), "b_dim": int(blob.shape[0])})
        else:
            counts.skipped += 1
            continue
        counts.adopted += 1
    if updates:
        conn.execute(stmt, updates)
    _insert_new(conn, inserts)
    return counts


def queue_recompute(
    conn: Connection, notes: Sequence[tuple[str, str]], *, now: float
) -> AdoptCounts:
    """Old vectors without information (all zeros): the key must be computed here.

    A pending job stays pending with the note.  A failed one stays failed with
    the note (`runner retry` decides).  A key the database lacks has no URL to
    compute it from, so it is stored failed 'no url' (error class 'invalid', as
    the catalogue import does): importing the catalogue later gives it its URL and
    puts it back to pending.  Done and running jobs are left alone.
    """
    from sqlalchemy import bindparam

    batch = dict(notes)
    states = _states(conn, batch)
    counts = AdoptCounts()
    noted: dict[str, list[dict[str, Any]]] = {Status.PENDING.value: [], Status.FAILED.value: []}
    inserts = []
    for key, note in batch.items():
        state = states.get(key)
        if state is None:
            inserts.append(
                {
                    "key": key,
                    "url": None,
                    "status": Status.FAILED.value,
                    "attempts": 0,
                    "created_at": now,
                    "finished_at": now,
                    "error": "no url",
                    "error_class": "invalid",
                    "note": note,
                }
            )
            counts.failed += 1
            counts.no_url += 1
        elif state[0] in noted:
            noted[state[0]].append({"b_key": key, "b_note": note})
            if state[0] == Status.PENDING.value:
                counts.queued += 1
            else:
                counts.failed += 1
        else:
            counts.skipped += 1
    for status, params in noted.items():
        if params:
            conn.execute(
                update(jobs)
                .where(jobs.c.key == bindparam("b_key"), jobs.c.status == status)
                .values(note=bindparam("b_note")),
                params,
            )
    _insert_new(conn, inserts)
    return counts


def adopt_failures(
    conn: Connection, failures: Sequence[OldFailure], *, now: float, finished_at: float, note: str
) -> AdoptCounts:
    """The old script's failures become failed jobs (error class 'adopted') that
    `runner retry --failed` can put back.

    Only keys this runner has not tried yet take the old verdict: a new key, or a
    pending job with no attempts and no error.  A job this runner already worked on
    (or that `runner retry` put back) keeps its own outcome; done and running jobs
    are never touched.
    """
    from sqlalchemy import bindparam

    stmt = (
        update(jobs)
        .where(
            jobs.c.key == bindparam("b_key"),
            jobs.c.status == Status.PENDING.value,
            jobs.c.attempts == 0,
            jobs.c.error.is_(None),
        )
        .values(
            status=Status.FAILED.value,
            error=bindparam("b_error"),
            error_class=ADOPTED,
            http_status=bindparam("b_http_status"),
            finished_at=finished_at,
            note=note,
            not_before=None,
        )
    )
    batch = {f.key: f for f in failures}
    states = _states(conn, batch)
    counts = AdoptCounts()
    updates, inserts = [], []
    for key, failure in batch.items():
        state = states.get(key)
        if state is None:
            inserts.append(
                {
                    "key": key,
                    "url": failure.url,
                    "status": Status.FAILED.value,
                    "attempts": 0,
                    "created_at": now,
                    "finished_at": finished_at,
                    "error": failure.error,
                    "error_class": ADOPTED,
                    "http_status": failure.http_status,
                    "note": note,
                }
            )
        elif state == (Status.PENDING.value, 0, False):
            updates.append(
                {"b_key": key, "b_error": failure.error, "b_http_status": failure.http_status}
            )
        else:
            counts.skipped += 1
            continue
        counts.failed += 1
    if updates:
        conn.execute(stmt, updates)
    _insert_new(conn, inserts)
    return counts


def adopt_facts(conn: Connection, facts: Sequence[OldFacts]) -> int:
    """audio_process.json's facts, stored on jobs adopted with a vector that have
    none yet; a job the daemon computed keeps its own facts."""
    from sqlalchemy import bindparam

    if not facts:
        return 0
    stmt = (
        update(jobs)
        .where(
            jobs.c.key == bindparam("b_key"),
            jobs.c.status == Status.DONE.value,
            jobs.c.model_id == ADOPTED,
            jobs.c.processing_audio_time_s.is_(None),
            jobs.c.video_duration_s.is_(None),
            jobs.c.channels_count.is_(None),
        )
        .values(
            processing_audio_time_s=bindparam("b_time"),
            video_duration_s=bindparam("b_duration"),
            channels_count=bindparam("b_channels"),
        )
    )
    params = [
        {
            "b_key": f.key,
            "b_time": f.processing_audio_time_s,
            "b_duration": f.video_duration_s,
            "b_channels": f.channels_count,
        }
        for f in {f.key: f for f in facts}.values()
    ]
    return int(conn.execute(stmt, params).rowcount)


def prune_done(engine: Engine, *, before: float, keep_results: bool) -> int:
    """`runner prune`: done jobs finished before `before`.

    Without `keep_results` the rows are deleted (vector and all).  With it the
    row and its results stay, so the key is never recomputed and still exported,
    and only the catalogue's copy of the record (meta) is dropped.  Failed jobs
    are never pruned: they are still to be retried or looked at.
    """
    finished = (jobs.c.status == Status.DONE.value, jobs.c.finished_at < before)
    stmt: Any = (
        update(jobs).where(*finished, jobs.c.meta.is_not(None)).values(meta=None)
        if keep_results
        else jobs.delete().where(*finished)
    )
    with engine.begin() as conn:
        return int(conn.execute(stmt).rowcount)
