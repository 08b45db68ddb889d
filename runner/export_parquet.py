"""`runner export --format parquet`: vectors.parquet and failed.parquet.

For data tools (pyarrow, pandas, DuckDB, polars, Spark) rather than the old script's
consumers: one row per job, the vector as ``fixed_size_list<float32>[D]`` (DuckDB
and others read it as ``FLOAT[]``), the facts as typed columns, ``finished_at`` as a
UTC timestamp (microseconds).  Each file is written one row group per chunk of a
few thousand rows, streamed from the database, so memory does not grow with the
catalogue.  Vectors are written as stored, NaN/Inf included (Parquet holds them;
only the JSON format has to skip them).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Connection, select

from runner.export_common import (
    atomic_binary,
    chunks,
    even_sizes,
    finished,
    shape,
    spec_label,
    stream,
    vectors_where,
)
from runner.export_json import FAILURE_COLUMNS, dumps
from runner.jobs import Status
from runner.models import jobs
from runner.spec import SpecGroup

PARQUET_FILE = "vectors.parquet"
PARQUET_FAIL_FILE = "failed.parquet"
#: rows per row group, at most (fewer for vectors over 1024-d: ~16 MB a group)
PARQUET_GROUP_ROWS = 4_096
PARQUET_GROUP_BYTES = 16 << 20
#: dictionary-encode only columns whose values repeat; keys and URLs are unique
#: and vectors never repeat, where a dictionary only costs time
DICTIONARY_COLUMNS = ["model", "error", "error_class", "embed_spec"]
#: schema metadata key: the JSON list of how the vectors were made (audio_specs.json's)
SPECS_METADATA = b"runner.embed_specs"
TIMESTAMP = pa.timestamp("us", tz="UTC")


def vectors_schema(dim: int, groups: list[SpecGroup] | None = None) -> pa.Schema:
    """With more than one spec group, an `embed_spec` column (the label of each
    vector's: spec id, 'adopted' or 'unrecorded:MODEL') ends the row."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("video_duration", pa.float64()),
        pa.field("channels_count", pa.int32()),
        pa.field("processing_audio_time", pa.float64()),
        pa.field("model", pa.string()),
        pa.field("finished_at", TIMESTAMP),
    ]
    groups = groups or []
    if len(groups) > 1:
        fields.append(pa.field("embed_spec", pa.string()))
    return pa.schema(fields, metadata={SPECS_METADATA: dumps([g.as_dict() for g in groups])})


FAILED_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("error", pa.string()),
        pa.field("error_class", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("attempts", pa.int32()),
        pa.field("finished_at", TIMESTAMP),
    ]
)


def _micros(seconds: Iterable[float | None]) -> pa.Array:
    return pa.array([None if s is None else round(s * 1_000_000) for s in seconds], type=TIMESTAMP)


def _writer(out: Any, schema: pa.Schema) -> pq.ParquetWriter:
    return pq.ParquetWriter(out, schema, compression="snappy", use_dictionary=DICTIONARY_COLUMNS)


def write_vectors(
    conn: Connection, path: Path, since: float | None, groups: list[SpecGroup] | None = None
) -> int:
    """vectors.parquet; refuses (before writing) vectors of different dimensions."""
    wanted = shape(conn, vectors_where(since))
    schema = vectors_schema(wanted.dim, groups)
    per_vector = len(groups or []) > 1
    stmt = (
        select(
            jobs.c.key,
            jobs.c.url,
            jobs.c.vector,
            jobs.c.video_duration_s,
            jobs.c.channels_count,
            jobs.c.processing_audio_time_s,
            jobs.c.model_id,
            jobs.c.finished_at,
            jobs.c.embed_spec,
        )
        .where(*vectors_where(since))
        .order_by(jobs.c.id)
    )
    group_rows = max(1, min(PARQUET_GROUP_ROWS, PARQUET_GROUP_BYTES // max(1, 4 * wanted.dim)))
    with atomic_binary(path) as out, _writer(out, schema) as writer:
        for rows, vectors in chunks(conn, stmt, wanted.dim, even_sizes(wanted.rows, group_rows)):
            flat = pa.array(vectors.reshape(-1), type=pa.float32())
            columns = [
                pa.array([r.key for r in rows], type=pa.string()),
                pa.array([r.url for r in rows], type=pa.string()),
                pa.FixedSizeListArray.from_arrays(flat, wanted.dim),
                pa.array([r.video_duration_s for r in rows], type=pa.float64()),
                pa.array([r.channels_count for r in rows], type=pa.int32()),
                pa.array([r.processing_audio_time_s for r in rows], type=pa.float64()),
                pa.array([r.model_id for r in rows], type=pa.string()),
                _micros(r.finished_at for r in rows),
            ]
            if per_vector:
                columns.append(pa.array([spec_label(r) for r in rows], type=pa.string()))
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    return wanted.rows


def write_failed(conn: Connection, path: Path, since: float | None) -> int:
    stmt = (
        select(*FAILURE_COLUMNS, jobs.c.finished_at)
        .where(*finished(Status.FAILED, since))
        .order_by(jobs.c.id)
    )
    count = 0
    with atomic_binary(path) as out, _writer(out, FAILED_SCHEMA) as writer:
        batch: list[Any] = []
        for row in stream(conn, stmt):
            batch.append(row)
            if len(batch) >= PARQUET_GROUP_ROWS:
                writer.write_table(_failures(batch))
                count += len(batch)
                batch.clear()
        if batch:
            writer.write_table(_failures(batch))
            count += len(batch)
    return count


def _failures(rows: list[Any]) -> pa.Table:
    columns = [
        pa.array([r.key for r in rows], type=pa.string()),
        pa.array([r.url for r in rows], type=pa.string()),
        pa.array([r.error for r in rows], type=pa.string()),
        pa.array([r.error_class for r in rows], type=pa.string()),
        pa.array([r.http_status for r in rows], type=pa.int32()),
        pa.array([r.attempts for r in rows], type=pa.int32()),
        _micros(r.finished_at for r in rows),
    ]
    return pa.Table.from_arrays(columns, schema=FAILED_SCHEMA)
