"""Exports from the jobs table: the old script's JSON files, or NumPy files, and PCA.

Rows are streamed from the database and written as they come, so memory does not
grow with the catalogue: the JSON files hold one row at a time, and `--format npz`
holds the N x D float32 matrix once (preallocated from a count, filled from a
streamed query; never a list of lists).  Every pass of one export reads inside one
read transaction, so the files agree with each other even while the daemon writes.
Each file appears atomically (temp file, fsync, rename): a reader or a crash never
sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import ijson
import numpy as np
from sqlalchemy import Connection, Engine, bindparam, func, select

from runner.db import READ_ONLY
from runner.errors import RunnerError
from runner.jobs import Status
from runner.models import jobs

FORMATS = ("json", "npz")
VECTORS_FILE = "audio_vectors.json"
PROCESS_FILE = "audio_process.json"
FAIL_FILE = "audio_fail.json"
NPZ_FILE = "vectors.npz"
NPZ_PROCESS_FILE = "process.json"
NPZ_FAIL_FILE = "fail.json"
PCA_FILE = "pca.npz"
STREAM_ROWS = 500
MERGE_BATCH = 2_000
#: vectors per IncrementalPCA.partial_fit call (and per transform call)
PCA_CHUNK_ROWS = 4_096


@dataclass(frozen=True)
class ExportCounts:
    done: int
    failed: int
    merged: int = 0
    #: components of the PCA written to pca.npz, if any
    pca: int | None = None
    files: tuple[str, ...] = ()


def parse_timestamp(text: str) -> float:
    """Unix seconds from '1717200000', '2024-06-01', '2024-06-01T12:00:00+02:00'.

    An ISO 8601 time without an offset is UTC, so the same command means the same
    moment on every machine.
    """
    value = text.strip()
    with contextlib.suppress(ValueError):
        seconds = float(value)
        if math.isfinite(seconds):
            return seconds
    iso = value[:-1] + "+00:00" if value[-1:] in ("Z", "z") else value
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        raise RunnerError(
            f"{text!r} is not a time: give an ISO 8601 date or date-time "
            "(2024-06-01, 2024-06-01T12:00:00+02:00; UTC unless an offset is given) "
            "or unix seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class JsonObjectWriter:
    """Writes ``{"key": value, ...}`` one entry at a time."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.count = 0
        stream.write("{")

    def write_raw(self, key: str, value_json: str) -> None:
        self.stream.write(
            ("\n" if self.count == 0 else ",\n")
            + json.dumps(key, ensure_ascii=False)
            + ": "
            + value_json
        )
        self.count += 1

    def write(self, key: str, value: Any) -> None:
        self.write_raw(key, json.dumps(value, ensure_ascii=False))

    def close(self) -> None:
        self.stream.write("\n}\n" if self.count else "}\n")


@contextlib.contextmanager
def _atomic(path: Path, mode: str) -> Iterator[IO[Any]]:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        encoding = None if "b" in mode else "utf-8"
        with tmp.open(mode, encoding=encoding) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_text(path: Path) -> contextlib.AbstractContextManager[IO[str]]:
    return _atomic(path, "w")


def atomic_binary(path: Path) -> contextlib.AbstractContextManager[IO[bytes]]:
    return _atomic(path, "wb")


def vector_json(blob: bytes, dim: int) -> str:
    vector = np.frombuffer(blob, dtype="<f4", count=dim)
    return "[" + json.dumps(vector.tolist()) + "]"


@contextlib.contextmanager
def _reading(engine: Engine) -> Iterator[Connection]:
    """One read transaction for the whole export: a consistent snapshot (SQLite WAL
    gives one per transaction; PostgreSQL needs REPEATABLE READ for it)."""
    with engine.connect() as conn:
        conn = conn.execution_options(**{READ_ONLY: True})
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def _stream(conn: Connection, stmt: Any) -> Generator[Any, None, None]:
    result = conn.execute(stmt.execution_options(yield_per=STREAM_ROWS))
    try:
        yield from result
    finally:
        result.close()


def _finished(status: Status, since: float | None) -> list[Any]:
    where = [jobs.c.status == status.value]
    if since is not None:
        where.append(jobs.c.finished_at >= since)
    return where


# --- the old script's JSON files ------------------------------------------------------


def _merge_old(engine: Engine, old_path: Path, writer: JsonObjectWriter) -> int:
    """Copy entries of an earlier export whose keys the database does not know."""
    if not old_path.exists():
        return 0
    known = select(jobs.c.key).where(jobs.c.key.in_(bindparam("keys", expanding=True)))
    kept = 0
    try:
        with old_path.open("rb") as stream, engine.connect() as conn:
            conn = conn.execution_options(**{READ_ONLY: True})
            batch: list[tuple[str, Any]] = []
            for entry in ijson.kvitems(stream, "", use_float=True):
                batch.append(entry)
                if len(batch) >= MERGE_BATCH:
                    kept += _write_unknown(conn, known, batch, writer)
                    batch.clear()
            kept += _write_unknown(conn, known, batch, writer)
    except ijson.JSONError as exc:
        raise RunnerError(f"cannot merge {old_path}: invalid JSON ({exc})") from None
    return kept


def _write_unknown(
    conn: Any, known: Any, batch: list[tuple[str, Any]], writer: JsonObjectWriter
) -> int:
    if not batch:
        return 0
    in_db = set(conn.execute(known, {"keys": [key for key, _ in batch]}).scalars())
    kept = 0
    for key, value in batch:
        if key not in in_db:
            writer.write(key, value)
            kept += 1
    return kept


def _process_facts(row: Any) -> dict[str, Any]:
    return {
        "processing_audio_time": row.processing_audio_time_s,
        "video_duration": row.video_duration_s,
        "channels_count": row.channels_count,
    }


_FACTS = (jobs.c.video_duration_s, jobs.c.channels_count, jobs.c.processing_audio_time_s)


def _write_done_json(
    engine: Engine, conn: Connection, out: Path, merge: bool, since: float | None
) -> tuple[int, int]:
    stmt = (
        select(jobs.c.key, jobs.c.vector, jobs.c.vector_dim, *_FACTS)
        .where(*_finished(Status.DONE, since))
        .order_by(jobs.c.id)
    )
    with atomic_text(out / VECTORS_FILE) as vstream, atomic_text(out / PROCESS_FILE) as pstream:
        vectors, process = JsonObjectWriter(vstream), JsonObjectWriter(pstream)
        for row in _stream(conn, stmt):
            vectors.write_raw(row.key, vector_json(row.vector, row.vector_dim))
            process.write(row.key, _process_facts(row))
        done = vectors.count
        merged = 0
        if merge:
            merged += _merge_old(engine, out / VECTORS_FILE, vectors)
            merged += _merge_old(engine, out / PROCESS_FILE, process)
        vectors.close()
        process.close()
    return done, merged


def _write_process(conn: Connection, path: Path, since: float | None) -> int:
    stmt = (
        select(jobs.c.key, *_FACTS)
        .where(*_finished(Status.DONE, since), jobs.c.vector.is_not(None))
        .order_by(jobs.c.id)
    )
    with atomic_text(path) as stream:
        writer = JsonObjectWriter(stream)
        for row in _stream(conn, stmt):
            writer.write(row.key, _process_facts(row))
        writer.close()
    return writer.count


def _write_failed(
    engine: Engine,
    conn: Connection,
    path: Path,
    merge: bool,
    since: float | None,
) -> tuple[int, int]:
    stmt = (
        select(
            jobs.c.key,
            jobs.c.url,
            jobs.c.error,
            jobs.c.error_class,
            jobs.c.http_status,
            jobs.c.attempts,
        )
        .where(*_finished(Status.FAILED, since))
        .order_by(jobs.c.id)
    )
    with atomic_text(path) as stream:
        writer = JsonObjectWriter(stream)
        for row in _stream(conn, stmt):
            writer.write(
                row.key,
                {
                    "url": row.url,
                    "error": row.error,
                    "error_class": row.error_class,
                    "http_status": row.http_status,
                    "attempts": row.attempts,
                },
            )
        failed = writer.count
        merged = _merge_old(engine, path, writer) if merge else 0
        writer.close()
    return failed, merged


# --- vectors as arrays: npz and PCA ----------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    rows: int
    dim: int
    key_chars: int


def _vectors_where(since: float | None) -> list[Any]:
    return [*_finished(Status.DONE, since), jobs.c.vector.is_not(None)]


def _shape(conn: Connection, where: list[Any]) -> _Shape:
    """How many vectors, of what dimension: what to preallocate."""
    stmt = select(
        func.count(),
        func.min(jobs.c.vector_dim),
        func.max(jobs.c.vector_dim),
        func.max(func.length(jobs.c.key)),
    ).where(*where)
    rows, low, high, key_chars = conn.execute(stmt).one()
    if rows and low != high:
        raise RunnerError(
            f"the done vectors have different dimensions ({low} to {high}), e.g. from "
            "different models; --format npz and --pca need one (--format json takes any)"
        )
    return _Shape(rows=int(rows), dim=int(low or 0), key_chars=max(1, int(key_chars or 1)))


def _chunks(
    conn: Connection, where: list[Any], shape: _Shape, slices: Iterable[slice]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(keys, vectors) arrays of the sizes `slices` ask for, filled from one
    streamed query in id order."""
    stmt = select(jobs.c.key, jobs.c.vector).where(*where).order_by(jobs.c.id)
    rows = _stream(conn, stmt)
    try:
        for part in slices:
            size = part.stop - part.start
            keys = np.empty(size, dtype=f"<U{shape.key_chars}")
            vectors = np.empty((size, shape.dim), dtype=np.float32)
            for i in range(size):
                row = next(rows, None)
                if row is None:  # only if the snapshot was not one (it should be)
                    raise RunnerError("the database changed during the export; run it again")
                keys[i] = row.key
                vectors[i] = np.frombuffer(row.vector, dtype="<f4", count=shape.dim)
            yield keys, vectors
    finally:
        rows.close()


def _batches(rows: int, size: int, min_rows: int = 0) -> list[slice]:
    """Like sklearn's gen_batches: a last batch smaller than `min_rows` is merged
    into the one before, since partial_fit needs at least n_components rows."""
    from sklearn.utils import gen_batches

    return list(gen_batches(rows, size, min_batch_size=min_rows))


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_binary(path) as stream:
        np.savez(stream, **arrays)  # type: ignore[arg-type]


def _check_pca(components: int, everything: _Shape) -> None:
    if everything.rows == 0:
        raise RunnerError("--pca: there are no done vectors to fit")
    if components > everything.dim:
        raise RunnerError(f"--pca {components} is more than the vector dimension {everything.dim}")
    if everything.rows < components:
        raise RunnerError(
            f"--pca {components} needs at least {components} vectors; "
            f"the database has {everything.rows} done"
        )


def _write_pca(
    conn: Connection,
    path: Path,
    components: int,
    everything: _Shape,
    since: float | None,
    matrix: tuple[np.ndarray, np.ndarray] | None,
    chunk_rows: int,
) -> None:
    """Fit IncrementalPCA on all done vectors, chunk by chunk, and write the reduced
    vectors (those since `since`) with the fitted components and mean.

    Chunks come from the npz matrix when it already holds every vector, else
    from the database; either way no more than one chunk is copied at a time.
    """
    from sklearn.decomposition import IncrementalPCA

    size = max(chunk_rows, components)
    fit_slices = _batches(everything.rows, size, components)
    if matrix is not None and since is None:
        fit_chunks: Iterable[np.ndarray] = (matrix[1][s] for s in fit_slices)
    else:
        fit_chunks = (v for _, v in _chunks(conn, _vectors_where(None), everything, fit_slices))
    pca = IncrementalPCA(n_components=components, batch_size=size)
    with np.errstate(divide="ignore", invalid="ignore"):  # constant data: 0/0 ratios
        for chunk in fit_chunks:
            pca.partial_fit(chunk)

    if matrix is not None:
        keys, source = matrix
        reduced = np.empty((keys.shape[0], components), dtype=np.float32)
        for s in _batches(keys.shape[0], size):
            reduced[s] = pca.transform(source[s])
    else:
        wanted = _shape(conn, _vectors_where(since))
        keys = np.empty(wanted.rows, dtype=f"<U{wanted.key_chars}")
        reduced = np.empty((wanted.rows, components), dtype=np.float32)
        slices = _batches(wanted.rows, size)
        for s, (chunk_keys, chunk) in zip(
            slices, _chunks(conn, _vectors_where(since), wanted, slices), strict=True
        ):
            keys[s] = chunk_keys
            reduced[s] = pca.transform(chunk)
    _write_npz(
        path,
        keys=keys,
        vectors=reduced,
        components=pca.components_,
        mean=pca.mean_,
        explained_variance=pca.explained_variance_,
        explained_variance_ratio=pca.explained_variance_ratio_,
    )


def _load_matrix(conn: Connection, since: float | None) -> tuple[np.ndarray, np.ndarray]:
    shape = _shape(conn, _vectors_where(since))
    if shape.rows == 0:
        return np.empty(0, dtype="<U1"), np.empty((0, 0), dtype=np.float32)
    ((keys, vectors),) = _chunks(conn, _vectors_where(since), shape, [slice(0, shape.rows)])
    return keys, vectors


def export(
    engine: Engine,
    out: Path,
    *,
    merge: bool = False,
    fmt: str = "json",
    pca: int | None = None,
    since: float | None = None,
    pca_chunk_rows: int = PCA_CHUNK_ROWS,
) -> ExportCounts:
    """`runner export`.

    json: audio_vectors.json, audio_process.json, audio_fail.json (the old script's
    files).  npz: vectors.npz (keys: str, vectors: float32 N x D, in job order),
    process.json and fail.json (the same shapes as the JSON format's files).
    `pca`: also pca.npz, fitted on every done vector; the other files are unchanged.
    `since`: only jobs that finished at or after it (unix seconds).
    """
    if fmt not in FORMATS:
        raise RunnerError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if pca is not None and pca < 1:
        raise RunnerError(f"--pca must be at least 1 (got {pca})")
    if merge and fmt != "json":
        raise RunnerError("--merge works with --format json only")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunnerError(f"cannot create output directory {out}: {exc.strerror}") from None
    with _reading(engine) as conn:
        everything = None
        if pca is not None:  # refuse before any file is written
            everything = _shape(conn, _vectors_where(None))
            _check_pca(pca, everything)
        matrix = None
        if fmt == "json":
            done, merged_done = _write_done_json(engine, conn, out, merge, since)
            failed, merged_failed = _write_failed(engine, conn, out / FAIL_FILE, merge, since)
            files = [VECTORS_FILE, PROCESS_FILE, FAIL_FILE]
        else:
            matrix = _load_matrix(conn, since)
            done, merged_done = matrix[0].shape[0], 0
            _write_npz(out / NPZ_FILE, keys=matrix[0], vectors=matrix[1])
            _write_process(conn, out / NPZ_PROCESS_FILE, since)
            failed, merged_failed = _write_failed(engine, conn, out / NPZ_FAIL_FILE, False, since)
            files = [NPZ_FILE, NPZ_PROCESS_FILE, NPZ_FAIL_FILE]
        if pca is not None and everything is not None:
            _write_pca(conn, out / PCA_FILE, pca, everything, since, matrix, pca_chunk_rows)
            files.append(PCA_FILE)
    return ExportCounts(
        done=done,
        failed=failed,
        merged=merged_done + merged_failed,
        pca=pca,
        files=tuple(files),
    )
