"""Engine creation and schema migration.

Every command calls `connect`, which upgrades the database to the newest Alembic
revision before anything else touches it, so users never run migrations by hand.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from runner.errors import RunnerError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 300_000


def alembic_config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL lets readers (export, status) run beside the daemon's writes; the busy
    timeout turns lock contention into waiting instead of 'database is locked'."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


#: Execution option for connections that only read (export, status): they begin a
#: deferred transaction, so a long export never holds SQLite's write lock.
READ_ONLY = "runner_read_only"


def _sqlite_begin(conn: Connection) -> None:
    """Writers take the write lock at BEGIN, so a transaction never fails half-way on
    upgrading a read lock to a write lock (SQLite's deadlock-avoidance error)."""
    if conn.get_execution_options().get(READ_ONLY):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise RunnerError(f"invalid --db URL {url!r}: {exc}") from None
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                parent = Path(parsed.database).expanduser().resolve().parent
                if not parent.is_dir():
                    raise RunnerError(f"database directory does not exist: {parent}")
            engine = create_engine(
                parsed,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "isolation_level": None},
            )
            event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(engine, "begin", _sqlite_begin)
        else:
            engine = create_engine(parsed, pool_pre_ping=True)
    except NoSuchModuleError as exc:
        raise RunnerError(f"unsupported --db URL {url!r}: {exc}") from None
    except ModuleNotFoundError as exc:
        raise RunnerError(f"--db {parsed.drivername}: driver not installed ({exc.name})") from None
    return engine


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine) -> None:
    """Upgrade to head; refuse a database written by a newer runner."""
    script = ScriptDirectory.from_config(alembic_config())
    try:
        current = current_revision(engine)
    except OperationalError as exc:
        raise RunnerError(f"cannot open database: {exc.orig}") from None
    if current == script.get_current_head():
        return
    if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
        raise RunnerError(
            f"database schema revision {current!r} is newer than this runner knows "
            f"(head {script.get_current_head()!r}); upgrade runner to use this database"
        )
    log.info("migrating database from %s to %s", current, script.get_current_head())
    command.upgrade(alembic_config(engine), "head")


def connect(url: str) -> Engine:
    engine = make_engine(url)
    migrate(engine)
    return engine
