"""Writing the old script's three JSON files from the jobs table.

Rows are streamed from the database and written as they come, so memory does not
grow with the catalogue.  Each file appears atomically (temp file, fsync, rename):
a reader or a crash never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import ijson
import numpy as np
from sqlalchemy import Engine, bindparam, select

from runner.db import READ_ONLY
from runner.errors import RunnerError
from runner.jobs import Status
from runner.models import jobs

VECTORS_FILE = "audio_vectors.json"
PROCESS_FILE = "audio_process.json"
FAIL_FILE = "audio_fail.json"
STREAM_ROWS = 500
MERGE_BATCH = 2_000


@dataclass(frozen=True)
class ExportCounts:
    done: int
    failed: int
    merged: int


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
def atomic_text(path: Path) -> Iterator[IO[str]]:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def vector_json(blob: bytes, dim: int) -> str:
    vector = np.frombuffer(blob, dtype="<f4", count=dim)
    return "[" + json.dumps(vector.tolist()) + "]"


def _stream(engine: Engine, stmt: Any) -> Iterator[Any]:
    with engine.connect() as conn:
        conn = conn.execution_options(
            **{READ_ONLY: True}, stream_results=True, yield_per=STREAM_ROWS
        )
        with conn.begin():
            yield from conn.execute(stmt)


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


def _write_done(engine: Engine, out: Path, merge: bool) -> tuple[int, int]:
    stmt = (
        select(
            jobs.c.key,
            jobs.c.vector,
            jobs.c.vector_dim,
            jobs.c.video_duration_s,
            jobs.c.channels_count,
            jobs.c.processing_audio_time_s,
        )
        .where(jobs.c.status == Status.DONE.value)
        .order_by(jobs.c.id)
    )
    with atomic_text(out / VECTORS_FILE) as vstream, atomic_text(out / PROCESS_FILE) as pstream:
        vectors, process = JsonObjectWriter(vstream), JsonObjectWriter(pstream)
        for row in _stream(engine, stmt):
            vectors.write_raw(row.key, vector_json(row.vector, row.vector_dim))
            process.write(
                row.key,
                {
                    "processing_audio_time": row.processing_audio_time_s,
                    "video_duration": row.video_duration_s,
                    "channels_count": row.channels_count,
                },
            )
        done = vectors.count
        merged = 0
        if merge:
            merged += _merge_old(engine, out / VECTORS_FILE, vectors)
            merged += _merge_old(engine, out / PROCESS_FILE, process)
        vectors.close()
        process.close()
    return done, merged


def _write_failed(engine: Engine, out: Path, merge: bool) -> tuple[int, int]:
    stmt = (
        select(
            jobs.c.key,
            jobs.c.url,
            jobs.c.error,
            jobs.c.error_class,
            jobs.c.http_status,
            jobs.c.attempts,
        )
        .where(jobs.c.status == Status.FAILED.value)
        .order_by(jobs.c.id)
    )
    with atomic_text(out / FAIL_FILE) as stream:
        writer = JsonObjectWriter(stream)
        for row in _stream(engine, stmt):
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
        merged = _merge_old(engine, out / FAIL_FILE, writer) if merge else 0
        writer.close()
    return failed, merged


def export(engine: Engine, out: Path, *, merge: bool = False) -> ExportCounts:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunnerError(f"cannot create output directory {out}: {exc.strerror}") from None
    done, merged_done = _write_done(engine, out, merge)
    failed, merged_failed = _write_failed(engine, out, merge)
    return ExportCounts(done=done, failed=failed, merged=merged_done + merged_failed)
