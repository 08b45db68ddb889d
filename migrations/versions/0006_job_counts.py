"""jobs per state and failures per reason, kept as the jobs change (PostgreSQL)

`runner status`, `/status` and the page lead with counts per state and the most
common failure reasons.  Read from the jobs table, at a million jobs that is a
parallel scan for the counts and one heap block per failed job for the reasons:
0.35-0.45 s on PostgreSQL, too slow for a command a person waits on.

On PostgreSQL, statement-level triggers with transition tables append signed
changes to `job_counts`, one row per state and reason a statement changed (never
one per job, and never an UPDATE of a shared row: with many daemons a counter row
that every claim and finish updated would serialise them all on its lock).  A
daemon folds the rows now and then (runner/counts.py).  The triggers are created
before the counts are taken from the table, in this migration's transaction:
CREATE TRIGGER locks out writers until it commits, so none is missed or counted
twice.

On SQLite `job_counts` stays empty.  A row-level trigger (SQLite has no other)
made a million-row import 35-65 % slower, over its 1.5x budget, while counting a
million rows there takes about 50 ms, read beside the other queries.

Both databases get `ix_jobs_failed_reason`, failed rows only, by error class and
the message's first `REASON_CHARS` characters (a whole message may be too long
for an index entry): SQLite groups the reasons from it alone (5 ms rather than
90 ms at 55k failures), and both find a reason's example keys through it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: as runner/counts.py's REASON_CHARS (a migration must not change with the code)
REASON_CHARS = 200

_REASON = f"substr(error, 1, {REASON_CHARS})"
#: the (state, reason) a row counts under: only failed rows have a reason
_KEYED = (
    "status,"
    " CASE WHEN status = 'failed' THEN error_class END AS error_class,"
    f" CASE WHEN status = 'failed' THEN {_REASON} END AS reason"
)


def _pg_functions(table: str) -> dict[str, str]:
    """The trigger functions' bodies, writing to `table` named with its schema: a
    trigger runs with the search_path of whoever writes to jobs (pg_restore sets it
    empty; a session's temporary table named job_counts would come first)."""
    insert = f"INSERT INTO {table} (status, error_class, reason, n)"
    return {
        "runner_counts_inserted": f"""
            {insert}
            SELECT status, error_class, reason, count(*)
            FROM (SELECT {_KEYED} FROM new_rows) AS changed
            GROUP BY status, error_class, reason;
        """,
        "runner_counts_deleted": f"""
            {insert}
            SELECT status, error_class, reason, -count(*)
            FROM (SELECT {_KEYED} FROM old_rows) AS changed
            GROUP BY status, error_class, reason;
        """,
        # every UPDATE of jobs runs it (a trigger with transition tables cannot name
        # columns); one that changes no state or reason (a lease renewal) adds nothing
        "runner_counts_updated": f"""
            {insert}
            SELECT status, error_class, reason, sum(d)
            FROM (
                SELECT {_KEYED}, -1 AS d FROM old_rows
                UNION ALL
                SELECT {_KEYED}, 1 AS d FROM new_rows
            ) AS changed
            GROUP BY status, error_class, reason
            HAVING sum(d) <> 0;
        """,
        # TRUNCATE, not DELETE: it waits for a fold in progress to commit and then
        # removes the fold's rows too, which a DELETE's snapshot would not see
        "runner_counts_truncated": f"TRUNCATE {table};",
    }


_PG_TRIGGERS = (
    ("runner_counts_insert", "AFTER INSERT", "REFERENCING NEW TABLE AS new_rows", "inserted"),
    ("runner_counts_delete", "AFTER DELETE", "REFERENCING OLD TABLE AS old_rows", "deleted"),
    (
        "runner_counts_update",
        "AFTER UPDATE",
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "updated",
    ),
    ("runner_counts_truncate", "AFTER TRUNCATE", "", "truncated"),
)


def upgrade() -> None:
    op.create_table(
        "job_counts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_class", sa.String(32), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("n", sa.BigInteger, nullable=False),
    )
    op.create_index(
        "ix_jobs_failed_reason",
        "jobs",
        ["error_class", sa.text(_REASON), "id"],
        sqlite_where=sa.text("status = 'failed'"),
        postgresql_where=sa.text("status = 'failed'"),
    )
    if op.get_bind().dialect.name == "postgresql":
        _count_with_triggers()


def _count_with_triggers() -> None:
    conn = op.get_bind()
    schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
    table = f"{conn.dialect.identifier_preparer.quote_schema(schema)}.job_counts"
    for name, body in _pg_functions(table).items():
        op.execute(
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
            f"BEGIN\n{body}\nRETURN NULL;\nEND\n$$"
        )
    for trigger, when, referencing, function in _PG_TRIGGERS:
        op.execute(
            f"CREATE TRIGGER {trigger} {when} ON jobs {referencing} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION runner_counts_{function}()"
        )
    # after the triggers: they hold writers off until this transaction commits
    op.execute(
        "INSERT INTO job_counts (status, error_class, reason, n) "
        f"SELECT status, error_class, reason, count(*) FROM (SELECT {_KEYED} FROM jobs) AS j "
        "GROUP BY status, error_class, reason"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for trigger, *_ in _PG_TRIGGERS:
            op.execute(f"DROP TRIGGER {trigger} ON jobs")
        for name in _pg_functions("job_counts"):
            op.execute(f"DROP FUNCTION {name}()")
    op.drop_index("ix_jobs_failed_reason", table_name="jobs")
    op.drop_table("job_counts")
