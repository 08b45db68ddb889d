"""Housekeeping of results: adopting the old script's output, pruning finished rows.

`import_results` reads the old script's three files (audio_vectors.json,
audio_process.json, audio_fail.json; any may be missing) so those keys are not
computed again.  The files can be large, so they are streamed with ijson and written
in batches, all in one transaction: a file that turns out to be broken half-way
writes nothing.  The old script's mean pooling produced vectors that are zero up to
rounding (max |v| about 1e-16); those carry no information and are queued for
recomputation instead of adopted.  What happens to each key is decided by the
guarded statements below (a done job is never overwritten, a running one belongs
to its worker), kept here rather than in `runner.jobs` because only this import
makes these changes.

`prune` drops done rows (or only their catalogue record) and gives the space back
to the file system: VACUUM after the transaction, since it cannot run inside one.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ijson
import numpy as np
from sqlalchemy import Connection, Engine, bindparam, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from runner import maintenance
from runner.counts import try_fold_counts
from runner.errors import RunnerError
from runner.jobs import Status
from runner.models import ADOPTED, jobs
from runner.urls import host_of

VECTORS_FILE = "audio_vectors.json"
PROCESS_FILE = "audio_process.json"
FAIL_FILE = "audio_fail.json"
#: a vector whose L2 norm is below this carries no information
ZERO_NORM = 1e-6
#: keys per batch: 500 vectors of 1024 floats is 2 MB, and under SQLite's
#: bound-parameter limit for the state look-up
BATCH = 500

T = TypeVar("T")


# --- the statements ---------------------------------------------------------------
#
# The rules every statement below carries in its WHERE clause: a job done in the
# database is never overwritten, and a running job belongs to its worker.


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
    stmt = select(jobs.c.key, jobs.c.status, jobs.c.attempts, jobs.c.error.is_not(None)).where(
        jobs.c.key.in_(bindparam("keys", expanding=True))
    )
    return {r[0]: (r[1], r[2], bool(r[3])) for r in conn.execute(stmt, {"keys": list(keys)})}


def _insert_new(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Rows for keys the database lacks; should one appear meanwhile (a concurrent
    import on PostgreSQL), the existing row wins."""
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
                    "host": None if failure.url is None else host_of(failure.url),
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


# --- reading the old files --------------------------------------------------------


def _usable_vector(value: Any) -> tuple[np.ndarray | None, str]:
    """The vector in an audio_vectors.json entry, or None and why it is not usable.

    The old script wrote ``[[floats]]`` (one row); a flat ``[floats]`` is accepted too.
    """
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    try:
        vector = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None, "old vector is not a list of numbers"
    if vector.ndim != 1 or vector.size == 0:
        return None, f"old vector has shape {vector.shape}, not one row of numbers"
    if not np.isfinite(vector).all():
        return None, "old vector holds NaN or infinity"
    norm = float(np.linalg.norm(vector))
    if norm < ZERO_NORM:
        return None, f"old vector is zero (norm {norm:.1e}): no information"
    return vector, ""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _failure(key: str, value: Any) -> OldFailure:
    if not isinstance(value, dict):
        return OldFailure(key=key, url=None, error=_text(value))
    url = value.get("url")
    status = value.get("http_status")
    return OldFailure(
        key=key,
        url=url if isinstance(url, str) and url.strip() else None,
        error=_text(value.get("error")),
        http_status=status if isinstance(status, int) and not isinstance(status, bool) else None,
    )


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "failed in the old script (no error recorded)"
    return json.dumps(value, ensure_ascii=False, default=str)


def _facts(key: str, value: Any) -> OldFacts | None:
    if not isinstance(value, dict):
        return None
    channels = value.get("channels_count")
    return OldFacts(
        key=key,
        processing_audio_time_s=_number(value.get("processing_audio_time")),
        video_duration_s=_number(value.get("video_duration")),
        channels_count=channels
        if isinstance(channels, int) and not isinstance(channels, bool)
        else None,
    )


def _batches(items: Iterator[T], size: int = BATCH) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextlib.contextmanager
def _entries(path: Path) -> Iterator[Iterator[tuple[str, Any]]]:
    """The (key, value) pairs of a JSON object file, streamed; one-line errors."""
    try:
        with path.open("rb") as stream:
            head = stream.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            stream.seek(0)
            if head[:1] != b"{":
                raise RunnerError(f"{path}: expected a JSON object {{key: ...}}")
            yield ijson.kvitems(stream, "", use_float=True)
    except (ijson.JSONError, UnicodeDecodeError) as exc:
        raise RunnerError(f"{path}: invalid JSON ({exc}); nothing was imported") from None
    except OSError as exc:
        raise RunnerError(f"cannot read {path}: {exc.strerror}") from None


def _mtime(path: Path, now: float) -> float:
    """When the old script wrote the file: the best 'finished at' its entries have."""
    return min(now, path.stat().st_mtime)


def _import_failures(conn: Connection, path: Path, now: float, counts: AdoptCounts) -> None:
    finished_at = _mtime(path, now)
    note = f"failure adopted from {path}"
    with _entries(path) as entries:
        for batch in _batches(_failure(k, v) for k, v in entries):
            counts.add(adopt_failures(conn, batch, now=now, finished_at=finished_at, note=note))


def _import_vectors(conn: Connection, path: Path, now: float, counts: AdoptCounts) -> None:
    finished_at = _mtime(path, now)
    note = f"vector adopted from {path}"
    good: list[tuple[str, np.ndarray]] = []
    useless: list[tuple[str, str]] = []

    def flush() -> None:
        if good:
            counts.add(adopt_vectors(conn, good, now=now, finished_at=finished_at, note=note))
            good.clear()
        if useless:
            counts.add(queue_recompute(conn, useless, now=now))
            useless.clear()

    with _entries(path) as entries:
        for key, value in entries:
            vector, why = _usable_vector(value)
            if vector is None:
                useless.append((key, f"{why}; not adopted from {path}, to be computed again"))
            else:
                good.append((key, vector.astype(np.float32)))
            if len(good) + len(useless) >= BATCH:
                flush()
        flush()


def _import_facts(conn: Connection, path: Path, counts: AdoptCounts) -> None:
    with _entries(path) as entries:
        facts = (f for f in (_facts(k, v) for k, v in entries) if f is not None)
        for batch in _batches(facts):
            counts.facts += adopt_facts(conn, batch)


def import_results(engine: Engine, directory: Path, *, now: float) -> AdoptCounts:
    """`runner import-results DIR`, in one transaction.

    Failures go first and vectors after, so a key that is in both ends up done;
    process facts go last because they are stored only on jobs adopted with a vector.
    """
    if not directory.is_dir():
        raise RunnerError(f"{directory}: no such directory")
    paths = {name: directory / name for name in (FAIL_FILE, VECTORS_FILE, PROCESS_FILE)}
    if not any(p.is_file() for p in paths.values()):
        raise RunnerError(f"{directory}: none of {VECTORS_FILE}, {PROCESS_FILE}, {FAIL_FILE}")
    counts = AdoptCounts()
    with engine.begin() as conn:
        if paths[FAIL_FILE].is_file():
            _import_failures(conn, paths[FAIL_FILE], now, counts)
        if paths[VECTORS_FILE].is_file():
            _import_vectors(conn, paths[VECTORS_FILE], now, counts)
        if paths[PROCESS_FILE].is_file():
            _import_facts(conn, paths[PROCESS_FILE], counts)
    try_fold_counts(engine)  # the per-key updates left a row of counts for each
    return counts


# --- pruning -------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneReport:
    rows: int
    #: database size on disk before and after (SQLite: the file plus its WAL;
    #: PostgreSQL: the jobs table with its indexes and TOAST)
    bytes_before: int
    bytes_after: int

    @property
    def reclaimed(self) -> int:
        return self.bytes_before - self.bytes_after


def _sqlite_files(engine: Engine) -> list[Path]:
    database = engine.url.database
    if not database or database == ":memory:":
        return []
    main = Path(database).expanduser()
    return [main, main.with_name(main.name + "-wal")]


def _size(engine: Engine) -> int:
    if engine.dialect.name == "sqlite":
        return sum(p.stat().st_size for p in _sqlite_files(engine) if p.exists())
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_total_relation_size('jobs')")).scalar_one())


def vacuum(engine: Engine) -> None:
    """Give free pages back to the file system.

    VACUUM refuses to run inside a transaction.  On SQLite the engine's begin hook
    would open one, so it runs on the driver connection, which is in autocommit
    mode; a WAL checkpoint then moves the rewritten pages into the file and
    truncates the WAL.  On PostgreSQL it needs an AUTOCOMMIT connection; plain
    VACUUM makes the space reusable but rarely shrinks the files.
    """
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert driver is not None
            driver.execute("VACUUM")
            driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM jobs"))


def prune(engine: Engine, *, before: float, keep_results: bool) -> PruneReport:
    """`runner prune`: see `runner.maintenance.prune_done` for what is dropped."""
    size_before = _size(engine)
    rows = maintenance.prune_done(engine, before=before, keep_results=keep_results)
    vacuum(engine)
    return PruneReport(rows=rows, bytes_before=size_before, bytes_after=_size(engine))


def format_bytes(n: int) -> str:
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
