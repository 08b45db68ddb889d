"""What every export format shares: one read snapshot, streamed rows, atomic files.

Split out of runner/export.py so each format's module can use it without importing
the others (the façade, runner/export.py, imports them all).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from sqlalchemy import Connection, Engine, and_, func, or_, select

from runner.db import READ_ONLY
from runner.errors import RunnerError
from runner.jobs import Status
from runner.models import ADOPTED, jobs

#: rows per database round trip of a streamed query
STREAM_ROWS = 500
#: file buffer: one vector's JSON is ~11 KB, so the default 8 KB would mean a
#: write(2) per row
WRITE_BUFFER_BYTES = 1 << 20


#: inside `one_set_of_files`: the (temp, final) renames waiting for the set to end
_DEFERRED: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar(
    "runner_export_renames", default=None
)


@contextlib.contextmanager
def one_set_of_files() -> Iterator[None]:
    """The files written inside appear together or not at all: each is renamed into
    place only once every one of them is complete, so an export that fails half-way
    (a bad file to merge, a vector PCA refuses) leaves the earlier set as it was,
    never new vectors beside old failures."""
    pending: list[tuple[Path, Path]] = []
    token = _DEFERRED.set(pending)
    try:
        yield
        for tmp, path in pending:
            os.replace(tmp, path)
        pending.clear()
    finally:
        _DEFERRED.reset(token)
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


@contextlib.contextmanager
def _atomic(path: Path, mode: str) -> Iterator[IO[Any]]:
    """A reader or a crash never sees half a file: write a temp file in the same
    directory, fsync it, rename it over `path` (inside `one_set_of_files`, when the
    whole set is written).  On any error the temp file goes and whatever `path`
    held before stays."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    deferred = _DEFERRED.get()
    try:
        encoding = None if "b" in mode else "utf-8"
        with tmp.open(mode, buffering=WRITE_BUFFER_BYTES, encoding=encoding) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        if deferred is not None:
            deferred.append((tmp, path))
            return
        os.replace(tmp, path)
    finally:
        if deferred is None or (tmp, path) not in deferred:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def atomic_text(path: Path) -> contextlib.AbstractContextManager[IO[str]]:
    return _atomic(path, "w")


def atomic_binary(path: Path) -> contextlib.AbstractContextManager[IO[bytes]]:
    return _atomic(path, "wb")


@contextlib.contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """One read transaction for the whole export: a consistent snapshot (SQLite WAL
    gives one per transaction; PostgreSQL needs REPEATABLE READ for it).  Inside
    `only_spec`, it also looks up which vectors from before specs count as that spec."""
    with engine.connect() as conn:
        conn = conn.execution_options(**{READ_ONLY: True})
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            token = _LEGACY.set(_legacy_of(conn, _SPEC.get()))
            try:
                yield conn
            finally:
                _LEGACY.reset(token)


def stream(conn: Connection, stmt: Any) -> Generator[Any, None, None]:
    result = conn.execute(stmt.execution_options(yield_per=STREAM_ROWS))
    try:
        yield from result
    finally:
        result.close()


def finished(status: Status, since: float | None) -> list[Any]:
    where = [jobs.c.status == status.value]
    if since is not None:
        where.append(jobs.c.finished_at >= since)
    return where


#: `runner export --spec ID`: only the vectors of that embedding spec (inside `only_spec`)
_SPEC: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "runner_export_spec", default=None
)


@contextlib.contextmanager
def only_spec(spec_id: str | None) -> Iterator[None]:
    """Every format, PCA included, exports only the vectors of `spec_id` inside."""
    token = _SPEC.set(spec_id)
    try:
        yield
    finally:
        _SPEC.reset(token)


#: inside `only_spec` and `reading`: the model whose vectors from before specs were
#: recorded count as that spec (runner.spec.legacy_model), if it is recorded
_LEGACY: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "runner_export_legacy", default=None
)


def _legacy_of(conn: Connection, spec_id: str | None) -> str | None:
    from runner.spec import legacy_model, stored_specs

    if spec_id is None:
        return None
    recorded = stored_specs(conn, [spec_id]).get(spec_id)
    return None if recorded is None else legacy_model(recorded)


def vectors_where(since: float | None) -> list[Any]:
    """Done rows that have a vector (every format exports exactly these).  With
    `only_spec`, that spec's, including the vectors from before specs that the
    guard, `runner requeue --other-specs` and the mix check count as it."""
    where = [*finished(Status.DONE, since), jobs.c.vector.is_not(None)]
    spec_id = _SPEC.get()
    if spec_id is not None:
        legacy = _LEGACY.get()
        of_spec = jobs.c.embed_spec == spec_id
        if legacy is not None:
            unrecorded = and_(jobs.c.embed_spec.is_(None), jobs.c.model_id == legacy)
            of_spec = or_(of_spec, unrecorded)
        where.append(of_spec)
    return where


#: what the streamed rows need to say how their vector was made (`spec_label`)
SPEC_COLUMNS = (jobs.c.embed_spec, jobs.c.model_id)


def spec_label(row: Any) -> str:
    """The row's spec id, or for vectors without one 'adopted' or
    'unrecorded:MODEL' (as runner.spec.SpecGroup.label)."""
    if row.embed_spec is not None:
        return str(row.embed_spec)
    return ADOPTED if row.model_id == ADOPTED else f"unrecorded:{row.model_id}"


@dataclass(frozen=True)
class Shape:
    rows: int
    dim: int


def shape(conn: Connection, where: list[Any]) -> Shape:
    """How many vectors, of what dimension: what to preallocate or declare."""
    stmt = select(func.count(), func.min(jobs.c.vector_dim), func.max(jobs.c.vector_dim))
    rows, low, high = conn.execute(stmt.where(*where)).one()
    if rows and low != high:
        raise RunnerError(
            f"the done vectors have different dimensions ({low} to {high}), e.g. from "
            "different models; --format npz, --format parquet and --pca need one "
            "(--format json takes any)"
        )
    return Shape(rows=int(rows), dim=int(low or 0))


def chunks(
    conn: Connection, stmt: Any, dim: int, sizes: Iterable[int]
) -> Iterator[tuple[list[Any], np.ndarray]]:
    """(rows, their vectors as a float32 matrix) in the sizes asked for, from one
    streamed query whose rows have `vector`.  Only one chunk is in memory at a time."""
    rows = stream(conn, stmt)
    try:
        for size in sizes:
            batch = list(itertools.islice(rows, size))
            if len(batch) < size:  # only if the snapshot was not one (it should be)
                raise RunnerError("the database changed during the export; run it again")
            vectors = np.empty((size, dim), dtype=np.float32)
            for i, row in enumerate(batch):
                vectors[i] = np.frombuffer(row.vector, dtype="<f4", count=dim)
            yield batch, vectors
    finally:
        rows.close()


def even_sizes(rows: int, size: int) -> list[int]:
    """`rows` cut into chunks of `size` (the last one smaller)."""
    return [min(size, rows - start) for start in range(0, rows, max(1, size))]
