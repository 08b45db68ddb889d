"""The database schema, as SQLAlchemy tables.

Alembic revisions in ``migrations/versions`` must produce exactly this metadata;
``tests/test_migrations.py`` compares the two so they cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    literal_column,
    text,
)

metadata = MetaData()

#: model_id of vectors adopted from the old script's files, and error_class of its
#: failures (runner/adopt.py); a plain constant here so readers need not import adopt
ADOPTED = "adopted"

#: One row per catalogue key.  Timestamps are unix seconds (float), so maintenance
#: functions can take ``now`` as a plain number and tests never sleep.
jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", Text, nullable=False, unique=True),
    Column("url", Text, nullable=True),
    Column("meta", Text, nullable=True),  # the record's other fields, as JSON text
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("error", Text, nullable=True),
    Column("error_class", String(32), nullable=True),
    Column("http_status", Integer, nullable=True),
    Column("worker_id", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("claimed_at", Float, nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    # results: the vector as little-endian float32 bytes plus its dimension
    Column("vector", LargeBinary, nullable=True),
    Column("vector_dim", Integer, nullable=True),
    Column("video_duration_s", Float, nullable=True),
    Column("channels_count", Integer, nullable=True),
    Column("processing_audio_time_s", Float, nullable=True),
    Column("model_id", Text, nullable=True),
    # unix seconds before which a pending job must not be claimed (retry backoff)
    Column("not_before", Float, nullable=True),
    Column("note", Text, nullable=True),
    # every claim bumps it: (id, worker_id, claims) names one attempt, fencing its writes
    Column("claims", Integer, nullable=False, server_default="0"),
    # when the attempt's download started, the moment its try is charged to `attempts`
    Column("started_at", Float, nullable=True),
    # the URL's host (runner/urls.py), so a claim can skip hosts in backoff
    Column("host", Text, nullable=True),
    # NULL: the operator's catalogue; 'api': queued by POST /jobs, fetched guarded
    Column("origin", String(16), nullable=True),
    # the URL up to spellings that fetch the same bytes (runner/urls.py): keys that
    # share it are fetched once, and at most one of them is ever running
    Column("url_hash", String(32), nullable=True),
    # embed_specs.id of the spec a done job's vector was made with
    Column("embed_spec", String(32), nullable=True),
    Index("ix_jobs_status_id", "status", "id"),
    Index("ix_jobs_finished_at", "finished_at"),
    Index("ix_jobs_url_hash", "url_hash", "status"),
    # done rows only: the spec guard and per-spec counts without reading vectors
    Index(
        "ix_jobs_done_spec",
        "status",
        "embed_spec",
        "model_id",
        sqlite_where=text("status = 'done'"),
        postgresql_where=text("status = 'done'"),
    ),
    Index(
        "ux_jobs_running_url",
        "url_hash",
        unique=True,
        sqlite_where=text("status = 'running'"),
        postgresql_where=text("status = 'running'"),
    ),
)

#: how much of a failure message names its reason in counts and in the top failures
#: (a whole message may be too long for an index entry)
REASON_CHARS = 200


def reason_of(error: Any) -> Any:
    """The message's first REASON_CHARS characters, as the index below and the
    triggers of migration 0006 spell it: written inline, not as bound parameters,
    or SQLite does not see the indexed expression in a query."""
    return func.substr(error, literal_column("1"), literal_column(str(REASON_CHARS)))


# failed rows by reason: their example keys, and on SQLite the reasons' counts
# read from the index alone (runner/counts.py names it with INDEXED BY).  A batch
# migration that recreates jobs on SQLite must create it again: reflection skips an
# index on an expression (tests/test_migrations.py checks it is there at head).
Index(
    "ix_jobs_failed_reason",
    jobs.c.error_class,
    reason_of(jobs.c.error),
    jobs.c.id,
    sqlite_where=text("status = 'failed'"),
    postgresql_where=text("status = 'failed'"),
)

#: Jobs per state and failed jobs per (error class, reason), as signed changes:
#: on PostgreSQL the triggers of migration 0006 append one row per state and
#: reason each statement on `jobs` changed, and runner/counts.py folds them now and
#: then.  Empty on SQLite, which counts the jobs table itself (see that migration).
job_counts = Table(
    "job_counts",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("error_class", String(32), nullable=True),
    Column("reason", Text, nullable=True),
    Column("n", BigInteger, nullable=False),
)

#: How vectors were made: model (id or path, and a hash of its config and weight
#: files' names and sizes), layer, pooling, dtype, as JSON; `id` hashes that JSON.
embed_specs = Table(
    "embed_specs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("spec", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)
