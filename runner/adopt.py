"""Housekeeping of results: adopting the old script's output, pruning finished rows.

`import_results` reads the old script's three files (audio_vectors.json,
audio_process.json, audio_fail.json; any may be missing) so those keys are not
computed again.  The files can be large, so they are streamed with ijson and written
in batches, all in one transaction: a file that turns out to be broken half-way
writes nothing.  The old script's mean pooling produced vectors that are zero up to
rounding (max |v| about 1e-16); those carry no information and are queued for
recomputation instead of adopted.  What happens to each key is decided by the
guarded statements in `runner.jobs` (a done job is never overwritten).

`prune` drops done rows (or only their catalogue record) and gives the space back
to the file system: VACUUM after the transaction, since it cannot run inside one.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ijson
import numpy as np
from sqlalchemy import Connection, Engine, text

from runner import jobs
from runner.errors import RunnerError

VECTORS_FILE = "audio_vectors.json"
PROCESS_FILE = "audio_process.json"
FAIL_FILE = "audio_fail.json"
#: a vector whose L2 norm is below this carries no information
ZERO_NORM = 1e-6
#: keys per batch: 500 vectors of 1024 floats is 2 MB, and under SQLite's
#: bound-parameter limit for the state look-up
BATCH = 500

T = TypeVar("T")


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


def _failure(key: str, value: Any) -> jobs.OldFailure:
    if not isinstance(value, dict):
        return jobs.OldFailure(key=key, url=None, error=_text(value))
    url = value.get("url")
    status = value.get("http_status")
    return jobs.OldFailure(
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


def _facts(key: str, value: Any) -> jobs.OldFacts | None:
    if not isinstance(value, dict):
        return None
    channels = value.get("channels_count")
    return jobs.OldFacts(
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


def _import_failures(conn: Connection, path: Path, now: float, counts: jobs.AdoptCounts) -> None:
    finished_at = _mtime(path, now)
    note = f"failure adopted from {path}"
    with _entries(path) as entries:
        for batch in _batches(_failure(k, v) for k, v in entries):
            counts.add(
                jobs.adopt_failures(conn, batch, now=now, finished_at=finished_at, note=note)
            )


def _import_vectors(conn: Connection, path: Path, now: float, counts: jobs.AdoptCounts) -> None:
    finished_at = _mtime(path, now)
    note = f"vector adopted from {path}"
    good: list[tuple[str, np.ndarray]] = []
    useless: list[tuple[str, str]] = []

    def flush() -> None:
        if good:
            counts.add(jobs.adopt_vectors(conn, good, now=now, finished_at=finished_at, note=note))
            good.clear()
        if useless:
            counts.add(jobs.queue_recompute(conn, useless, now=now))
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


def _import_facts(conn: Connection, path: Path, counts: jobs.AdoptCounts) -> None:
    with _entries(path) as entries:
        facts = (f for f in (_facts(k, v) for k, v in entries) if f is not None)
        for batch in _batches(facts):
            counts.facts += jobs.adopt_facts(conn, batch)


def import_results(engine: Engine, directory: Path, *, now: float) -> jobs.AdoptCounts:
    """`runner import-results DIR`, in one transaction.

    Failures go first and vectors after, so a key that is in both ends up done;
    process facts go last because they are stored only on jobs adopted with a vector.
    """
    if not directory.is_dir():
        raise RunnerError(f"{directory}: no such directory")
    paths = {name: directory / name for name in (FAIL_FILE, VECTORS_FILE, PROCESS_FILE)}
    if not any(p.is_file() for p in paths.values()):
        raise RunnerError(f"{directory}: none of {VECTORS_FILE}, {PROCESS_FILE}, {FAIL_FILE}")
    counts = jobs.AdoptCounts()
    with engine.begin() as conn:
        if paths[FAIL_FILE].is_file():
            _import_failures(conn, paths[FAIL_FILE], now, counts)
        if paths[VECTORS_FILE].is_file():
            _import_vectors(conn, paths[VECTORS_FILE], now, counts)
        if paths[PROCESS_FILE].is_file():
            _import_facts(conn, paths[PROCESS_FILE], counts)
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
    """`runner prune`: see `runner.jobs.prune_done` for what is dropped."""
    size_before = _size(engine)
    rows = jobs.prune_done(engine, before=before, keep_results=keep_results)
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
