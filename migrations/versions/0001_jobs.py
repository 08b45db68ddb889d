"""jobs table

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key", sa.Text, nullable=False, unique=True),
        sa.Column("url", sa.Text, nullable=True),
        sa.Column("meta", sa.Text, nullable=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("error_class", sa.String(32), nullable=True),
        sa.Column("http_status", sa.Integer, nullable=True),
        sa.Column("worker_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("claimed_at", sa.Float, nullable=True),
        sa.Column("lease_expires_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("vector", sa.LargeBinary, nullable=True),
        sa.Column("vector_dim", sa.Integer, nullable=True),
        sa.Column("video_duration_s", sa.Float, nullable=True),
        sa.Column("channels_count", sa.Integer, nullable=True),
        sa.Column("processing_audio_time_s", sa.Float, nullable=True),
        sa.Column("model_id", sa.Text, nullable=True),
    )
    op.create_index("ix_jobs_status_id", "jobs", ["status", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_id", table_name="jobs")
    op.drop_table("jobs")
