"""one fetch per URL, and the embedding spec of every vector

``url_hash`` names a URL up to the spellings that fetch the same bytes (scheme and
host case, default port, fragment; ``runner/urls.py``).  Keys that share it are
fetched once: a partial unique index lets at most one of them be running, across
every daemon, and the attempt's end is shared with its pending siblings.

``embed_spec`` is the id of the row in ``embed_specs`` that says how a done job's
vector was made (model, a hash of its config and weights, layer, pooling, dtype),
so a daemon can refuse to add vectors of another spec, and exports can say which
spec they hold.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from runner.urls import url_hash

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BACKFILL_ROWS = 10_000


def upgrade() -> None:
    op.create_table(
        "embed_specs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("url_hash", sa.String(32), nullable=True))
        batch.add_column(sa.Column("embed_spec", sa.String(32), nullable=True))
    _backfill_url_hashes()
    _one_running_per_url()
    op.create_index("ix_jobs_url_hash", "jobs", ["url_hash", "status"])
    # Done rows only: the spec guard and per-spec counts read this instead of
    # stepping over every done row's vector, and pending rows cost the import nothing.
    # `status` leads so SQLite's planner picks it over ix_jobs_status_id (covering).
    op.create_index(
        "ix_jobs_done_spec",
        "jobs",
        ["status", "embed_spec", "model_id"],
        sqlite_where=sa.text("status = 'done'"),
        postgresql_where=sa.text("status = 'done'"),
    )
    op.create_index(
        "ux_jobs_running_url",
        "jobs",
        ["url_hash"],
        unique=True,
        sqlite_where=sa.text("status = 'running'"),
        postgresql_where=sa.text("status = 'running'"),
    )


def _backfill_url_hashes() -> None:
    """Hashes of the URLs already there, in batches (a catalogue has millions)."""
    conn = op.get_bind()
    select = sa.text(
        "SELECT id, url FROM jobs WHERE id > :after AND url IS NOT NULL ORDER BY id LIMIT :n"
    )
    update = sa.text("UPDATE jobs SET url_hash = :h WHERE id = :id")
    after = 0
    while rows := conn.execute(select, {"after": after, "n": BACKFILL_ROWS}).all():
        conn.execute(update, [{"id": row.id, "h": url_hash(row.url)} for row in rows])
        after = rows[-1].id


def _one_running_per_url() -> None:
    """Siblings running under the old schema: all but the first go back to pending.

    Their attempts are fenced out (the row is no longer running), which is what
    the unique index needs; their tries stay as charged.
    """
    op.execute(
        "UPDATE jobs SET status = 'pending', worker_id = NULL, claimed_at = NULL,"
        " lease_expires_at = NULL, started_at = NULL"
        " WHERE status = 'running' AND url_hash IS NOT NULL AND id > ("
        "  SELECT MIN(j2.id) FROM jobs AS j2"
        "  WHERE j2.url_hash = jobs.url_hash AND j2.status = 'running')"
    )


def downgrade() -> None:
    op.drop_index("ux_jobs_running_url", table_name="jobs")
    op.drop_index("ix_jobs_done_spec", table_name="jobs")
    op.drop_index("ix_jobs_url_hash", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("embed_spec")
        batch.drop_column("url_hash")
    op.drop_table("embed_specs")
