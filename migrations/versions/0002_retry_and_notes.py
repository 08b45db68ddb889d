"""retry scheduling and notes

A job that failed transiently waits in pending until ``not_before`` (backoff);
``note`` records why a job is in its state when the error column does not say it
(e.g. an adopted zero vector queued for recomputation).  The finished_at index
serves incremental exports and pruning.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("not_before", sa.Float, nullable=True))
        batch.add_column(sa.Column("note", sa.Text, nullable=True))
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("note")
        batch.drop_column("not_before")
