"""The Alembic history must build exactly the schema the models describe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select, text

from runner import jobs
from runner.db import connect, current_revision, head_revision, make_engine
from runner.errors import RunnerError
from runner.models import REASON_CHARS, metadata, reason_of
from runner.models import jobs as jobs_table


# SQLAlchemy cannot reflect SQLite's index on an expression (ix_jobs_failed_reason):
# it is compared on PostgreSQL, and the next test reads it back on SQLite
@pytest.mark.filterwarnings(
    "ignore:Skipped unsupported reflection of expression-based index:sqlalchemy.exc.SAWarning"
)
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based")
def test_upgrade_head_on_empty_db_matches_models(any_db_url: str) -> None:
    engine = connect(any_db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
        assert MigrationContext.configure(conn).get_current_revision() == head_revision()


def test_failed_reason_index_is_the_expression_queries_use(tmp_path: Path) -> None:
    """SQLite uses an index on an expression only for that very expression, with
    its numbers written inline (runner.models.reason_of)."""
    engine = connect(f"sqlite:///{tmp_path / 'r.db'}")
    with engine.connect() as conn:
        sql = conn.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE name = 'ix_jobs_failed_reason'"
        ).scalar_one()
        query = str(select(reason_of(jobs_table.c.error)).compile(conn))
    assert f"substr(error, 1, {REASON_CHARS})" in sql
    assert f"substr(jobs.error, 1, {REASON_CHARS})" in query
    assert "WHERE status = 'failed'" in sql


def test_connect_is_idempotent(any_db_url: str) -> None:
    connect(any_db_url)
    connect(any_db_url)


def test_daemons_starting_together_migrate_once(any_db_url: str) -> None:
    """Several processes opening a fresh database at once: one creates the schema,
    the others wait for it and find it done (no 'table already exists')."""
    code = "import sys; from runner.db import connect; connect(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, any_db_url], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    errors = [proc.communicate(timeout=120)[1].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, errors
    assert current_revision(make_engine(any_db_url)) == head_revision()


def test_newer_database_is_refused_with_a_clear_error(any_db_url: str) -> None:
    url = any_db_url
    engine = connect(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(RunnerError, match="newer than this runner"):
        connect(url)


def test_wal_mode(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000


def test_0003_fills_in_the_host_of_existing_rows(any_db_url: str) -> None:
    """A database of the previous schema, running jobs and all, upgrades in place:
    every row with a URL gets its host (as the import computes it), claims start at 0."""
    from alembic import command

    from runner.db import alembic_config, migrate
    from runner.urls import host_of

    engine = make_engine(any_db_url)
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    urls = {
        "plain": "http://Example.COM/a.mp4",
        "port": "https://cdn.example.org:8443/b.mp4?x=1",
        "v6": "http://[::1]:80/c.mp4",
        "none": None,
    }
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (key, url, status, attempts, created_at) "
                "VALUES (:key, :url, 'pending', 0, 0)"
            ),
            [{"key": key, "url": url} for key, url in urls.items()],
        )
        # claimed by a daemon of the previous version: its try was charged at the claim
        conn.execute(
            text(
                "UPDATE jobs SET status = 'running', attempts = 5, worker_id = 'old:1:x:y',"
                " claimed_at = 10, lease_expires_at = 20 WHERE key = 'plain'"
            )
        )
    migrate(engine)
    with engine.connect() as conn:
        rows = {r.key: r for r in conn.execute(text("SELECT key, host, claims FROM jobs"))}
    assert {key: rows[key].host for key in urls} == {
        "plain": "example.com",
        "port": "cdn.example.org",
        "v6": "::1",
        "none": None,
    }
    assert {key: host_of(url) or None for key, url in urls.items()} == {
        key: rows[key].host for key in urls
    }
    assert {r.claims for r in rows.values()} == {0}
    # that daemon died: the charged try counts, and with it the job is out of tries
    assert jobs.requeue_abandoned(engine, now=30.0, max_attempts=5) == (0, 1)
    engine.dispose()


def test_0005_hashes_urls_and_keeps_one_running_key_per_url(any_db_url: str) -> None:
    """Keys of one URL that two daemons of the previous version ran at once: all but
    the first go back to pending (their attempts fenced out), so the unique index on
    running URLs can be built, and every URL gets the hash the import computes."""
    from alembic import command

    from runner.db import alembic_config, migrate
    from runner.urls import url_hash

    engine = make_engine(any_db_url)
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    urls = {"a": "http://Example.COM/v.mp4", "b": "http://example.com:80/v.mp4#x", "c": None}
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (key, url, status, attempts, created_at, worker_id, claims)"
                " VALUES (:key, :url, 'running', 1, 0, 'old:1:x:y', 1)"
            ),
            [{"key": key, "url": url} for key, url in urls.items()],
        )
    migrate(engine)
    with engine.connect() as conn:
        rows = {r.key: r for r in conn.execute(text("SELECT key, url_hash, status FROM jobs"))}
    assert {key: rows[key].url_hash for key in urls} == {k: url_hash(u) for k, u in urls.items()}
    assert rows["a"].url_hash == rows["b"].url_hash
    assert {key: rows[key].status for key in urls} == {
        "a": "running",
        "b": "pending",
        "c": "running",
    }
    engine.dispose()


def test_head_revision_constant_is_alembics_head() -> None:
    """`migrate` trusts HEAD_REVISION to skip alembic on an up-to-date database: a
    new migration must move it, or every command would think the database current."""
    from runner.db import HEAD_REVISION

    assert head_revision() == HEAD_REVISION
