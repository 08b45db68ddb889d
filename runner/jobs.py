"""Every change of a job's state, and nothing else.

Each change is one guarded statement (``UPDATE ... WHERE <fence> RETURNING id``):
if the row is not in the state the caller assumed, nothing is written and
`JobStateError` is raised.  Keeping them together makes the state machine
reviewable in one place::

    pending --claim--> running --start--> running (try charged) --complete--> done
       ^  ^               |  |                  \\--fail------> failed
       |  |               |  +--retry_later (transient error, backoff via not_before)
       |  +---------------+--release (shutdown; host in backoff, never started)
       +--requeue_abandoned (lease expired on the database's clock, or worker dead)

Every change after the claim is fenced by the attempt: the job's id, the worker
that claimed it, and the claim number (``claims``, bumped by every claim).  A
stale attempt (its lease lapsed and the job was claimed again, even by the same
daemon) can therefore never store, fail or release the job.  Tries are charged by
`start`, when the attempt's download begins, not by the claim: a job claimed ahead
and never started costs nothing when its daemon dies, while a video that kills its
daemon mid-work still runs out of tries.  Times (leases, backoff, finish) come from
the database's clock (runner/dbclock.py); `now` overrides it for tests.

Callers pass plain values in and get frozen `Job` records out; no ORM object ever
crosses an ``await``.

Changes that are not a worker's are kept beside the rest of their feature, each
guarded in its own statement the same way: the catalogue import (a changed URL puts
a failed or running job back to pending) in `runner.catalogue`, adopting the old
script's results in `runner.adopt`, pruning in `runner.maintenance`; read-only
queries are in `runner.queries`.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    Select,
    Text,
    Update,
    and_,
    case,
    cast,
    exists,
    func,
    literal,
    select,
    tuple_,
)
from sqlalchemy import update as sql_update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from runner.dbclock import clock
from runner.errors import JobStateError
from runner.models import jobs

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


class Status(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Job:
    """One claim of one job: (id, worker_id, claims) is the fence of its writes."""

    id: int
    key: str
    url: str
    #: tries charged so far, this one included once `start` ran
    attempts: int
    #: the claim number; a later claim of the same job has a larger one
    claims: int
    worker_id: str
    #: where the URL came from: None the catalogue, 'api' POST /jobs (fetched guarded)
    origin: str | None = None


@dataclass(frozen=True)
class Result:
    """What a finished job stores."""

    vector: np.ndarray  # float32, shape (dim,)
    video_duration_s: float
    channels_count: int
    processing_audio_time_s: float
    model_id: str
    #: embed_specs.id of how the vector was made (runner/spec.py); None: unrecorded
    embed_spec: str | None = None


@dataclass(frozen=True)
class Failure:
    message: str
    error_class: str
    http_status: int | None = None


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended.

    `result` set: done.  `failure` set: failed, unless `retry_after_s` is set too,
    in which case the job waits in pending that long.  Neither: given back, never
    started (its host is backing off).
    """

    job: Job
    result: Result | None = None
    failure: Failure | None = None
    retry_after_s: float | None = None

    @property
    def kind(self) -> str:
        """done, failed or retry (given back counts as a retry: the job comes back)."""
        if self.result is not None:
            return "done"
        if self.failure is not None and self.retry_after_s is None:
            return "failed"
        return "retry"

    @property
    def finishes_job(self) -> bool:
        return self.kind != "retry"

    @property
    def error_class(self) -> str:
        return self.failure.error_class if self.failure is not None else ""


def _guarded(conn: Connection, stmt: Update, what: str, job: Job) -> None:
    if conn.execute(stmt.returning(jobs.c.id)).first() is None:
        raise JobStateError(
            f"cannot {what} job {job.key or job.id}: this attempt (claim {job.claims}) "
            "no longer holds it"
        )


def _fence(job: Job) -> tuple[Any, ...]:
    """The guard of every change an attempt makes to the job it claimed."""
    return (
        jobs.c.id == job.id,
        jobs.c.status == Status.RUNNING.value,
        jobs.c.worker_id == job.worker_id,
        jobs.c.claims == job.claims,
    )


def _job(row: Any, worker_id: str) -> Job:
    return Job(
        id=row.id,
        key=row.key,
        url=row.url,
        attempts=row.attempts,
        claims=row.claims,
        worker_id=worker_id,
        origin=row.origin,
    )


def claim(
    engine: Engine,
    *,
    worker_id: str,
    limit: int,
    lease_s: float,
    skip_hosts: Collection[str] = (),
    exclude_ids: Collection[int] = (),
    now: float | None = None,
) -> list[Job]:
    """Move up to `limit` due pending jobs to running, oldest first, in one statement.

    One key per URL: a URL with a key running anywhere is skipped, and its other
    keys wait for that attempt's end to be shared (`_share_finished`); a claimed
    key whose URL is done already takes the vector and is not returned.
    `skip_hosts`: hosts in backoff, left pending and untouched.  `exclude_ids`:
    jobs this worker still holds an attempt of (never claimed twice by one
    worker).  No try is charged here (see `start`).  ``FOR UPDATE SKIP LOCKED``
    lets PostgreSQL daemons claim side by side; SQLite serialises writers.
    """
    at = clock(now)
    conditions = [
        jobs.c.status == Status.PENDING.value,
        jobs.c.not_before.is_(None) | (jobs.c.not_before <= at),
        jobs.c.url.is_not(None),
        ~_url_running(),
    ]
    if skip_hosts:
        conditions.append(jobs.c.host.is_(None) | jobs.c.host.not_in(list(skip_hosts)))
    if exclude_ids:
        conditions.append(jobs.c.id.not_in(list(exclude_ids)))
    if engine.dialect.name == "postgresql":
        conditions.append(_url_try_lock())
    for _ in range(CLAIM_ROUNDS):
        try:
            with engine.begin() as conn:
                if engine.dialect.name == "postgresql":
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{CLAIM_LOCK_WAIT_MS}ms'")
                rows = conn.execute(
                    _claim_statement(engine, conditions, limit, worker_id, at, lease_s)
                ).all()
                # keys whose URL is done already take its vector instead of a fetch,
                # and pass it on to their URL's other pending keys (a backlog left
                # by a cut-short sharing drains a chunk per claim, not a key)
                served = _share_finished(conn, claimed_ids=[r.id for r in rows])
                _share_finished(conn, source_ids=served)
            fetch = [_job(r, worker_id) for r in rows if r.id not in served]
            if fetch or not served:
                return sorted(fetch, key=lambda j: j.id)
            # every key claimed was served by its done URL: there may be more due
        except IntegrityError:
            # Another daemon claimed a key of the same URL in the same instant; the
            # unique index refused ours.  Its row is committed now: claim again.
            continue
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) not in _CLAIM_AGAIN_SQLSTATES:
                raise
    return []


#: deadlock detected, serialization failure, lock wait timed out: the claim's
#: transaction was rolled back whole, so claiming again is safe
_CLAIM_AGAIN_SQLSTATES = frozenset({"40P01", "40001", "55P03"})

#: PostgreSQL: the longest a claim waits for a lock.  A claim can wait on another
#: transaction's change to the unique index of running URLs while that one waits
#: for a row the claim locked (FOR UPDATE keeps a row that a recheck then drops).
#: Well under deadlock_timeout (1 s), so the claim, which is cheap to retry, is
#: the one that gives way, never a store, release or reaper.
CLAIM_LOCK_WAIT_MS = 200

#: the first key of PostgreSQL's two-int advisory locks: runner's URL locks (the
#: second key is 32 bits of the url_hash), apart from the one-bigint lock space
URL_LOCK_SPACE = 0x72756E  # "run"


def _url_try_lock() -> Any:
    """PostgreSQL: this claim holds the URL until it commits, or skips its keys.

    FOR UPDATE SKIP LOCKED locks rows, not URLs: two daemons could each read other
    keys of the same URLs and insert into the unique index of running URLs in
    opposite orders, each waiting for the other's uncommitted entry (a deadlock).
    A try-lock per URL never waits; a URL another claim holds is skipped like a
    locked row.  Two URLs sharing 32 bits only make one wait a poll.
    """
    from sqlalchemy.dialects.postgresql import BIT  # PostgreSQL only: not on every import

    key = cast(cast(literal("x") + func.substr(jobs.c.url_hash, 1, 8), BIT(32)), Integer)
    return jobs.c.url_hash.is_(None) | func.pg_try_advisory_xact_lock(URL_LOCK_SPACE, key)


#: statements one claim may run: again after a collision with another daemon's
#: claim on one URL, or after every key it took was served by a done URL; then the
#: claimer waits for its next poll
CLAIM_ROUNDS = 8

#: a URL's keys that one fetch serves (`_share_finished`): at most this many due
#: rows are read per claimed job, so a run of keys of one URL still fills a claim
CANDIDATES_PER_CLAIM = 4


def _url_running() -> Any:
    """Some key of this row's URL is running (so this one waits: one fetch per URL)."""
    sibling = jobs.alias("sibling")
    return exists().where(
        sibling.c.url_hash == jobs.c.url_hash, sibling.c.status == Status.RUNNING.value
    )


def _candidates(conditions: list[Any], limit: int) -> Select:
    return (
        select(jobs.c.id, jobs.c.url_hash)
        .where(*conditions)
        .order_by(jobs.c.id)
        .limit(limit * CANDIDATES_PER_CLAIM)
        .with_for_update(skip_locked=True)
    )


#: keys that take one URL's end per transaction
SHARE_CHUNK = 5_000

#: what a key takes from a finished key of its URL: the vector and its facts, or the failure
_SHARED_END = (
    "status",
    "finished_at",
    "vector",
    "vector_dim",
    "video_duration_s",
    "channels_count",
    "processing_audio_time_s",
    "model_id",
    "embed_spec",
    "error",
    "error_class",
    "http_status",
)


def _share_finished(
    conn: Connection, *, source_ids: Collection[int] = (), claimed_ids: Collection[int] = ()
) -> set[int]:
    """Keys of a URL whose fetch ended take that end: one fetch serves them all.

    `source_ids`: jobs that just ended (done or failed); their pending siblings
    end the same way.  `claimed_ids`: jobs this transaction just claimed; those
    whose URL is done already take its vector instead of being fetched (a key
    added after its URL was done).  Done after the claim, on its few rows, so an
    idle poll costs no second scan.  Only keys of the same origin share: a URL an
    API caller queued is fetched guarded, so neither its refusal nor an unguarded
    fetch's vector may cross over.  Their own rows stay, with their own keys,
    metadata and tries.  Returns the ids of the keys that took an end.
    """
    if not (source_ids or claimed_ids):
        return set()
    src = jobs.alias("src")
    sibling = jobs.alias("sibling")
    terms = [
        jobs.c.url_hash == src.c.url_hash,
        jobs.c.id != src.c.id,
        func.coalesce(jobs.c.origin, "") == func.coalesce(src.c.origin, ""),
    ]
    values: dict[str, Any] = {name: src.c[name] for name in _SHARED_END}
    if claimed_ids:
        terms += [
            jobs.c.id.in_(list(claimed_ids)),
            jobs.c.status == Status.RUNNING.value,
            src.c.status == Status.DONE.value,
        ]
        # served, not fetched: no worker is credited with it
        values |= {"worker_id": None, "claimed_at": None}
    else:
        of_sources = select(sibling.c.url_hash, func.coalesce(sibling.c.origin, "")).where(
            sibling.c.id.in_(list(source_ids))
        )
        chunk = (
            select(jobs.c.id)
            .where(
                jobs.c.status == Status.PENDING.value,
                tuple_(jobs.c.url_hash, func.coalesce(jobs.c.origin, "")).in_(of_sources),
            )
            .limit(SHARE_CHUNK)
        )
        terms += [
            jobs.c.status == Status.PENDING.value,
            jobs.c.id.in_(chunk.scalar_subquery()),
            src.c.id.in_(list(source_ids)),
            src.c.status.in_([Status.DONE.value, Status.FAILED.value]),
        ]
    stmt = (
        sql_update(jobs)
        .where(*terms)
        .values(**values, lease_expires_at=None, not_before=None)
        .returning(jobs.c.id)
    )
    return set(conn.execute(stmt).scalars())


def _share_backoff(conn: Connection, source_ids: Collection[int]) -> None:
    """Pending keys of a URL put off by a transient error wait as long as it does,
    so a sibling does not fetch the same URL again at once."""
    if not source_ids:
        return
    src = jobs.alias("src")
    stmt = (
        sql_update(jobs)
        .where(
            jobs.c.status == Status.PENDING.value,
            jobs.c.url_hash == src.c.url_hash,
            jobs.c.id != src.c.id,
            src.c.id.in_(list(source_ids)),
            src.c.not_before.is_not(None),
            jobs.c.not_before.is_(None) | (jobs.c.not_before < src.c.not_before),
        )
        .values(not_before=src.c.not_before)
    )
    conn.execute(stmt)


def _claim_statement(
    engine: Engine, conditions: list[Any], limit: int, worker_id: str, at: Any, lease_s: float
) -> Any:
    """The claim's UPDATE: the oldest due row of each URL among the candidates.

    Keys of one URL are never claimed together (the unique index on running URLs
    would refuse the statement); the others wait for its end to be shared.
    """
    candidates = _candidates(conditions, limit)
    read: Any
    if engine.dialect.name == "postgresql":
        # A MATERIALIZED CTE runs exactly once; an IN (subquery) that the planner
        # chose to rescan could lock, and so claim, more than `limit` rows.
        read = candidates.cte("read").prefix_with("MATERIALIZED")
    else:
        read = candidates.subquery("read")
    first_of_url = (
        select(func.min(read.c.id).label("id"))
        .group_by(func.coalesce(read.c.url_hash, cast(read.c.id, Text)))
        .order_by(func.min(read.c.id))
        .limit(limit)
    )
    if engine.dialect.name == "postgresql":
        picked = first_of_url.cte("picked").prefix_with("MATERIALIZED")
        chosen = jobs.c.id == picked.c.id
    else:
        chosen = jobs.c.id.in_(first_of_url.scalar_subquery())
    return (
        sql_update(jobs)
        .where(chosen, jobs.c.status == Status.PENDING.value)
        .values(
            status=Status.RUNNING.value,
            claims=jobs.c.claims + 1,
            worker_id=worker_id,
            claimed_at=at,
            lease_expires_at=at + lease_s,
            started_at=None,
            not_before=None,
        )
        .returning(jobs.c.id, jobs.c.key, jobs.c.url, jobs.c.attempts, jobs.c.claims, jobs.c.origin)
    )


def start(engine: Engine, job: Job, *, now: float | None = None) -> Job:
    """The attempt's work begins: charge its try.  Returns the job as charged."""
    stmt = (
        sql_update(jobs)
        .where(*_fence(job), jobs.c.started_at.is_(None))
        .values(attempts=jobs.c.attempts + 1, started_at=clock(now))
    )
    with engine.begin() as conn:
        _guarded(conn, stmt, "start", job)
    return dataclasses.replace(job, attempts=job.attempts + 1)


def complete(conn: Connection, job: Job, result: Result, *, now: float | None = None) -> None:
    import numpy as np  # here, not at the top: `runner status` never stores a vector

    vector = np.ascontiguousarray(result.vector, dtype="<f4")
    if vector.ndim != 1 or not vector.size:
        raise ValueError(f"a result vector must be 1-D and non-empty, not {vector.shape}")
    stmt = (
        sql_update(jobs)
        .where(*_fence(job))
        .values(
            status=Status.DONE.value,
            finished_at=clock(now),
            lease_expires_at=None,
            vector=vector.tobytes(),
            vector_dim=int(vector.shape[0]),
            video_duration_s=result.video_duration_s,
            channels_count=result.channels_count,
            processing_audio_time_s=result.processing_audio_time_s,
            model_id=result.model_id,
            embed_spec=result.embed_spec,
            error=None,
            error_class=None,
            http_status=None,
        )
    )
    _guarded(conn, stmt, "complete", job)


def _failure_values(failure: Failure) -> dict[str, Any]:
    return {
        "error": failure.message,
        "error_class": failure.error_class,
        "http_status": failure.http_status,
    }


def fail(conn: Connection, job: Job, failure: Failure, *, now: float | None = None) -> None:
    stmt = (
        sql_update(jobs)
        .where(*_fence(job))
        .values(
            status=Status.FAILED.value,
            finished_at=clock(now),
            lease_expires_at=None,
            **_failure_values(failure),
        )
    )
    _guarded(conn, stmt, "fail", job)


#: back to pending: no worker, no lease, no running attempt
_UNCLAIMED: dict[str, Any] = {
    "status": Status.PENDING.value,
    "worker_id": None,
    "claimed_at": None,
    "lease_expires_at": None,
    "started_at": None,
}


def retry_later(
    conn: Connection, job: Job, failure: Failure, *, delay_s: float, now: float | None = None
) -> None:
    """Back to pending for `delay_s`, keeping the error as the last one seen."""
    stmt = (
        sql_update(jobs)
        .where(*_fence(job))
        .values(**_UNCLAIMED, not_before=clock(now) + delay_s, **_failure_values(failure))
    )
    _guarded(conn, stmt, "reschedule", job)


def give_back(conn: Connection, job: Job) -> None:
    """Back to pending, as it was: the attempt never started, so it charged nothing."""
    stmt = sql_update(jobs).where(*_fence(job), jobs.c.started_at.is_(None)).values(**_UNCLAIMED)
    _guarded(conn, stmt, "give back", job)


def store_outcomes(
    engine: Engine, outcomes: Sequence[Outcome], *, now: float | None = None
) -> list[Outcome]:
    """Write many attempts' ends in one transaction (one commit, not one per job).

    Returns the outcomes whose fence matched nothing (the attempt was stale: its
    lease ran out and the job was reclaimed); the others are stored.  Any other
    error rolls the whole batch back and is raised: the store stage then writes
    the outcomes one by one.
    """
    lost: list[Outcome] = []
    with engine.begin() as conn:
        for outcome in outcomes:
            try:  # a fenced UPDATE that matched nothing wrote nothing: the batch goes on
                _store_one(conn, outcome, now=now)
            except JobStateError:
                lost.append(outcome)
        lost_ids = {id(o) for o in lost}
        stored = [o for o in outcomes if id(o) not in lost_ids]
        finished = [o.job.id for o in stored if o.finishes_job]
        shared = _share_finished(conn, source_ids=finished)
        _share_backoff(conn, [o.job.id for o in stored if o.kind == "retry" and o.failure])
    # A URL listed under very many keys: the rest of its keys in transactions of
    # their own, so no single write holds the database for long (a review measured
    # a minute for a million keys in one).  The outcomes are stored by now: a chunk
    # that fails must not make the caller write them again, and the keys it left
    # pending take the vector when they are claimed (see `claim`).
    # Until a chunk shares nothing: one cut short by a concurrent claim (a key it
    # read as pending was claimed meanwhile) is no sign that the URL is through.
    try:
        while shared:
            with engine.begin() as conn:
                shared = _share_finished(conn, source_ids=finished)
    except DBAPIError as exc:
        log.warning("sharing a URL's end with its other keys stopped: %s", exc)
    return lost


def _store_one(conn: Connection, outcome: Outcome, *, now: float | None) -> None:
    if outcome.result is not None:
        complete(conn, outcome.job, outcome.result, now=now)
    elif outcome.failure is None:
        give_back(conn, outcome.job)
    elif outcome.retry_after_s is None:
        fail(conn, outcome.job, outcome.failure, now=now)
    else:
        retry_later(conn, outcome.job, outcome.failure, delay_s=outcome.retry_after_s, now=now)


def _held_by_attempts(held: Iterable[Job]) -> Any | None:
    """WHERE term matching exactly these attempts; None for none."""
    fences = [(job.id, job.claims, job.worker_id) for job in held]
    if not fences:
        return None
    return tuple_(jobs.c.id, jobs.c.claims, jobs.c.worker_id).in_(fences)


def _held_by(worker_id: str, held: Iterable[Job] | None) -> list[Any] | None:
    """WHERE terms for the running jobs `worker_id` holds (only the attempts in
    `held`, if given); None when `held` is empty, so the caller can skip the statement."""
    terms = [jobs.c.status == Status.RUNNING.value, jobs.c.worker_id == worker_id]
    if held is None:
        return terms
    attempts = _held_by_attempts(held)
    return None if attempts is None else [*terms, attempts]


def renew_leases(
    engine: Engine,
    *,
    worker_id: str,
    lease_s: float,
    held: Iterable[Job] | None = None,
    now: float | None = None,
) -> set[int]:
    """Heartbeat: a job is never reclaimed while the worker holding it is alive.

    `held`: renew only these attempts (the daemon passes what it is working on),
    so a claim whose reply was lost to a database error, held but unknown to us,
    expires and is reaped instead of being held for as long as we live.  Returns
    the ids renewed: an attempt missing from it has lost its job.
    """
    terms = _held_by(worker_id, held)
    if terms is None:
        return set()
    stmt = (
        sql_update(jobs)
        .where(*terms)
        .values(lease_expires_at=clock(now) + lease_s)
        .returning(jobs.c.id)
    )
    with engine.begin() as conn:
        return set(conn.execute(stmt).scalars())


#: a started attempt's try given back: we cut it short, not the video
_TRY_GIVEN_BACK = case(
    (jobs.c.started_at.is_not(None) & (jobs.c.attempts > 0), jobs.c.attempts - 1),
    else_=jobs.c.attempts,
)


def release(
    engine: Engine,
    held: Iterable[Job] | None,
    *,
    worker_id: str,
    refund: bool = True,
    max_attempts: int | None = None,
) -> int:
    """Give running jobs back to the queue (shutdown).

    `held` None: every job `worker_id` still holds.  A stopping daemon releases
    that way, so a claim that committed while its task was being cancelled (the
    daemon never learnt which jobs it took) is not stranded.  On a clean stop the
    interrupted try was our doing, not the video's, so a started one is given back
    (`refund`); a daemon that stops because a stage crashed keeps it charged, and a
    started job that has then used `max_attempts` is failed as the reaper would, so a
    video that crashes its daemon runs out of tries.  Returns how many went back to
    pending.
    """
    terms = _held_by(worker_id, held)
    if terms is None:
        return 0
    attempts = _TRY_GIVEN_BACK if refund else jobs.c.attempts
    stmt = (
        sql_update(jobs).where(*terms).values(**_UNCLAIMED, attempts=attempts).returning(jobs.c.id)
    )
    with engine.begin() as conn:
        if not refund and max_attempts is not None:
            gave_up = _give_up(and_(*terms, _out_of_tries(max_attempts)), clock(None))
            _share_finished(conn, source_ids=conn.execute(gave_up).scalars().all())
        return len(conn.execute(stmt).all())


def _out_of_tries(max_attempts: int) -> Any:
    """A started attempt that used the last try."""
    return jobs.c.started_at.is_not(None) & (jobs.c.attempts >= max_attempts)


def _give_up(where: Any, at: Any) -> Update:
    """Failed as 'lost' (unless an earlier error says more): its worker stopped,
    killed or crashed, during its last try."""
    return (
        sql_update(jobs)
        .where(where)
        .values(
            status=Status.FAILED.value,
            finished_at=at,
            lease_expires_at=None,
            error_class=func.coalesce(jobs.c.error_class, "lost"),
            error=literal("gave up after ")
            + cast(jobs.c.attempts, Text)
            + literal(" attempts; the worker stopped (killed or crashed) during the last")
            + func.coalesce(literal("; previous error: ") + jobs.c.error, literal("")),
        )
        .returning(jobs.c.id)
    )


def requeue_abandoned(
    engine: Engine,
    *,
    max_attempts: int,
    dead_workers: Sequence[str] = (),
    spare: Iterable[Job] = (),
    now: float | None = None,
) -> tuple[int, int]:
    """Reaper: running jobs whose lease expired, or whose worker is known dead.

    They go back to pending, or to failed once a started attempt has used the
    last of `max_attempts` (a video that kills its worker every time must not do
    so forever).  A claim that never started charged nothing and simply goes
    back.  `spare`: the attempts the reaping daemon itself is working on; its own
    reaper must not take them when its heartbeat was held up behind a long write
    (other daemons' reapers still do, once the lease has lapsed).  Returns
    (requeued, failed).
    """
    at = clock(now)
    abandoned = (jobs.c.status == Status.RUNNING.value) & (
        (jobs.c.lease_expires_at < at) | jobs.c.worker_id.in_(list(dead_workers))
    )
    spared = _held_by_attempts(spare)
    if spared is not None:
        abandoned = abandoned & ~spared
    out_of_tries = _out_of_tries(max_attempts)
    gave_up = _give_up(abandoned & out_of_tries, at)
    requeue = sql_update(jobs).where(abandoned, ~out_of_tries).values(**_UNCLAIMED)
    with engine.begin() as conn:
        failed_ids = conn.execute(gave_up).scalars().all()
        _share_finished(conn, source_ids=failed_ids)
        requeued = conn.execute(requeue).rowcount
    failed = len(failed_ids)
    return requeued, failed


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
        sql_update(jobs)
        .where(*conditions)
        .values(
            status=Status.PENDING.value,
            attempts=0,
            not_before=None,
            finished_at=None,
            worker_id=None,
            started_at=None,
        )
    )
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount


# --- embedding specs (runner/spec.py) -------------------------------------------------


def requeue_other_specs(conn: Connection, *, keep: str, legacy_model: str | None) -> int:
    """`runner requeue --other-specs`: done jobs whose vector is not of spec `keep`
    back to pending, their results cleared, with a fresh set of attempts.

    Adopted vectors stay (no spec says how they were made); vectors from before
    specs were recorded stay if they are of `legacy_model` (see runner/spec.py).
    """
    from runner.spec import foreign_done

    stmt = (
        sql_update(jobs)
        .where(foreign_done(keep, legacy_model), jobs.c.url.is_not(None))
        .values(
            **_UNCLAIMED,
            attempts=0,
            not_before=None,
            finished_at=None,
            vector=None,
            vector_dim=None,
            video_duration_s=None,
            channels_count=None,
            processing_audio_time_s=None,
            model_id=None,
            embed_spec=None,
            error=None,
            error_class=None,
            http_status=None,
        )
    )
    return int(conn.execute(stmt).rowcount or 0)
