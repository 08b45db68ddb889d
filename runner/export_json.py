"""The old script's JSON files (and the npz format's process.json/fail.json).

Vectors are written with orjson straight from the stored float32 bytes: each number
in the shortest text that reads back as the same float32 (``0.1``, not
``0.10000000149011612``), which makes the files ~40% smaller than json.dumps of the
float64 values and the export several times faster than a json.dump of the same
dict.  ``np.float32(value)`` of what any JSON parser reads is the stored float32,
bit for bit.

JSON has no NaN or Infinity, and orjson would quietly write ``null`` for them, so a
vector holding one is checked for and skipped (counted; `runner export` warns with
the first key): a corrupt vector must not make an invalid or silently altered file,
nor stop the export of every other vector.  ``--format npz``/``parquet`` write it as
stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import ijson
import numpy as np
import orjson
from sqlalchemy import Connection, bindparam, or_, select

from runner.errors import RunnerError
from runner.export_common import (
    SPEC_COLUMNS,
    atomic_binary,
    finished,
    spec_label,
    stream,
    vectors_where,
)
from runner.jobs import Status
from runner.models import jobs
from runner.spec import SpecGroup

VECTORS_FILE = "audio_vectors.json"
PROCESS_FILE = "audio_process.json"
FAIL_FILE = "audio_fail.json"
#: how the exported vectors were made (runner/spec.py); new beside the old three
SPECS_FILE = "audio_specs.json"
#: old entries per "which of these keys does this export cover" query
MERGE_BATCH = 2_000


def dumps(value: Any) -> bytes:
    """orjson, or json for what orjson refuses (an int beyond 64 bits, a lone
    surrogate) in an earlier file being merged: those must be kept, not crash."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, allow_nan=False).encode()


class JsonObjectWriter:
    """Writes ``{"key": value, ...}`` one entry at a time, as UTF-8 bytes."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.count = 0
        stream.write(b"{")

    def write_raw(self, key: str, value_json: bytes) -> None:
        self.stream.write((b"\n" if self.count == 0 else b",\n") + dumps(key) + b": " + value_json)
        self.count += 1

    def write(self, key: str, value: Any) -> None:
        self.write_raw(key, dumps(value))

    def close(self) -> None:
        self.stream.write(b"\n}\n" if self.count else b"}\n")


def vector_json(blob: bytes, dim: int) -> bytes | None:
    """``[[...]]`` (the old script's shape), or None if the vector has a NaN/Inf."""
    vector = np.frombuffer(blob, dtype="<f4", count=dim)
    if not np.isfinite(vector).all():
        return None
    # orjson takes native-endian arrays only: a no-op on little-endian machines
    matrix = vector.astype(np.float32, copy=False).reshape(1, dim)
    return orjson.dumps(matrix, option=orjson.OPT_SERIALIZE_NUMPY)


@dataclass
class Skipped:
    """Done vectors left out of the JSON files because they hold NaN or Inf."""

    keys: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.keys)

    @property
    def first(self) -> str | None:
        return self.keys[0] if self.keys else None


# --- --merge ------------------------------------------------------------------------


@dataclass(frozen=True)
class Coverage:
    """Which keys this export speaks for, so --merge knows which old entries to drop.

    The database is the authority for every key it knows, except where this run
    does not look: with --only-done-since, rows that finished before it (their old
    entries stay: that is what an incremental export into the same directory is
    for), and vectors skipped for NaN/Inf (not re-exported, so the old entry is the
    best there is).  A key the database knows and this run covers appears where
    its current state says, or nowhere (pending again): never twice.
    """

    since: float | None
    skipped: frozenset[str] = frozenset()

    def statement(self) -> Any:
        stmt = select(jobs.c.key).where(jobs.c.key.in_(bindparam("keys", expanding=True)))
        if self.since is not None:
            # NULL finished_at on a finished row: not exported, so not covered either
            finishing = (Status.DONE.value, Status.FAILED.value)
            stmt = stmt.where(
                or_(jobs.c.status.not_in(finishing), jobs.c.finished_at >= self.since)
            )
        return stmt


def _check_object(path: Path) -> None:
    """An earlier file that is not a JSON object would be read as empty and then
    replaced: refuse instead, so nothing in it is lost."""
    with path.open("rb") as stream:
        head = stream.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head and not head.startswith(b"{"):
        raise RunnerError(f"cannot merge {path}: it is not a JSON object ({{key: ...}})")


def merge_old(
    conn: Connection, old_path: Path, writer: JsonObjectWriter, coverage: Coverage
) -> int:
    """Copy the entries of an earlier export that this export does not cover."""
    if not old_path.exists():
        return 0
    _check_object(old_path)
    covered = coverage.statement()
    kept = 0

    def flush(batch: list[tuple[str, Any]]) -> int:
        if not batch:
            return 0
        keys = [key for key, _ in batch]
        known = set(conn.execute(covered, {"keys": keys}).scalars()) - coverage.skipped
        for key, value in batch:
            if key not in known:
                writer.write(key, value)
        return sum(key not in known for key in keys)

    try:
        with old_path.open("rb") as source:
            batch: list[tuple[str, Any]] = []
            for entry in ijson.kvitems(source, "", use_float=True):
                batch.append(entry)
                if len(batch) >= MERGE_BATCH:
                    kept += flush(batch)
                    batch.clear()
            kept += flush(batch)
    except ijson.JSONError as exc:
        raise RunnerError(f"cannot merge {old_path}: invalid JSON ({exc})") from None
    return kept


# --- the files ----------------------------------------------------------------------


def process_facts(row: Any) -> dict[str, Any]:
    return {
        "processing_audio_time": row.processing_audio_time_s,
        "video_duration": row.video_duration_s,
        "channels_count": row.channels_count,
    }


FACTS = (jobs.c.video_duration_s, jobs.c.channels_count, jobs.c.processing_audio_time_s)


def write_done(
    conn: Connection, out: Path, merge: bool, since: float | None
) -> tuple[int, int, Skipped]:
    """audio_vectors.json and audio_process.json, together, so their keys agree."""
    stmt = (
        select(jobs.c.key, jobs.c.vector, jobs.c.vector_dim, *FACTS)
        .where(*vectors_where(since))
        .order_by(jobs.c.id)
    )
    skipped = Skipped()
    with (
        atomic_binary(out / VECTORS_FILE) as vstream,
        atomic_binary(out / PROCESS_FILE) as pstream,
    ):
        vectors, process = JsonObjectWriter(vstream), JsonObjectWriter(pstream)
        for row in stream(conn, stmt):
            text = vector_json(row.vector, row.vector_dim)
            if text is None:
                skipped.keys.append(row.key)
                continue
            vectors.write_raw(row.key, text)
            process.write(row.key, process_facts(row))
        done = vectors.count
        merged = 0
        if merge:
            coverage = Coverage(since, frozenset(skipped.keys))
            merged += merge_old(conn, out / VECTORS_FILE, vectors, coverage)
            merged += merge_old(conn, out / PROCESS_FILE, process, coverage)
        vectors.close()
        process.close()
    return done, merged, skipped


def write_process(conn: Connection, path: Path, since: float | None) -> int:
    stmt = select(jobs.c.key, *FACTS).where(*vectors_where(since)).order_by(jobs.c.id)
    with atomic_binary(path) as out:
        writer = JsonObjectWriter(out)
        for row in stream(conn, stmt):
            writer.write(row.key, process_facts(row))
        writer.close()
    return writer.count


FAILURE_COLUMNS = (
    jobs.c.key,
    jobs.c.url,
    jobs.c.error,
    jobs.c.error_class,
    jobs.c.http_status,
    jobs.c.attempts,
)


def failure_entry(row: Any) -> dict[str, Any]:
    return {
        "url": row.url,
        "error": row.error,
        "error_class": row.error_class,
        "http_status": row.http_status,
        "attempts": row.attempts,
    }


def write_failed(
    conn: Connection,
    path: Path,
    merge: bool,
    since: float | None,
    skipped: Iterable[str] = (),
) -> tuple[int, int]:
    stmt = select(*FAILURE_COLUMNS).where(*finished(Status.FAILED, since)).order_by(jobs.c.id)
    with atomic_binary(path) as out:
        writer = JsonObjectWriter(out)
        for row in stream(conn, stmt):
            writer.write(row.key, failure_entry(row))
        failed = writer.count
        merged = merge_old(conn, path, writer, Coverage(since, frozenset(skipped))) if merge else 0
        writer.close()
    return failed, merged


def write_specs(conn: Connection, path: Path, since: float | None, groups: list[SpecGroup]) -> None:
    """audio_specs.json: ``{"specs": [...], "keys": {key: label}}``: each way the
    exported vectors were made (spec, count, description), largest first, and,
    when there is more than one, which way each key's vector was (by label: the
    spec id, 'adopted' or 'unrecorded:MODEL').  Only the vectors this export read
    from the database: --merge keeps older entries it says nothing about."""
    with atomic_binary(path) as out:
        out.write(b'{"specs": ' + dumps([g.as_dict() for g in groups]))
        if len(groups) > 1:
            out.write(b', "keys": ')
            writer = JsonObjectWriter(out)
            stmt = select(jobs.c.key, *SPEC_COLUMNS).where(*vectors_where(since))
            for row in stream(conn, stmt.order_by(jobs.c.id)):
                writer.write(row.key, spec_label(row))
            writer.close()
            out.write(b"}\n")
        else:
            out.write(b"}\n")
