"""where a job's URL came from

``origin`` is NULL for the operator's catalogue (``runner import``) and 'api' for a
job queued with ``POST /jobs``.  A URL from an API caller is fetched through the
same guard as ``/encode_audio`` (no loopback, private or link-local address, on
any redirect hop or connected address) by every daemon, however it was checked
when it was queued: DNS answers change, redirects are decided at fetch time.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("origin", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("origin")
