"""attempt fencing, charging at start, hosts

``claims`` counts every claim of a job: with the worker id it names one attempt,
so every state change after a claim is fenced by it and a stale attempt (its lease
lapsed, the job claimed again, even by the same daemon) can never store, fail or
release the job.  ``started_at`` is set when an attempt's download starts, the
moment its try is charged (``attempts``): a job claimed ahead and never started
goes back without losing a try.  ``host`` is the URL's host, so a claim can skip
hosts that asked us to back off instead of rewriting their rows one by one.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from runner.urls import host_of

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BACKFILL_ROWS = 10_000


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("claims", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("started_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("host", sa.Text, nullable=True))
    # Jobs running under the previous schema had their try charged at the claim:
    # mark them started, so the reaper still counts that try if their daemon died.
    op.execute("UPDATE jobs SET started_at = claimed_at WHERE status = 'running'")
    _backfill_hosts()


def _backfill_hosts() -> None:
    """Hosts of the rows already there, in batches (a catalogue has millions)."""
    conn = op.get_bind()
    select = sa.text(
        "SELECT id, url FROM jobs WHERE id > :after AND url IS NOT NULL ORDER BY id LIMIT :n"
    )
    update = sa.text("UPDATE jobs SET host = :host WHERE id = :id")
    after = 0
    while rows := conn.execute(select, {"after": after, "n": BACKFILL_ROWS}).all():
        conn.execute(update, [{"id": row.id, "host": host_of(row.url)} for row in rows])
        after = rows[-1].id


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("host")
        batch.drop_column("started_at")
        batch.drop_column("claims")
