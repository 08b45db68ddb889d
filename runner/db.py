"""Engine creation and schema migration.

Every command calls `connect`, which upgrades the database to the newest Alembic
revision before anything else touches it, so users never run migrations by hand.
SQLite (one machine) gets WAL, a busy timeout and write locks taken at BEGIN;
PostgreSQL (many daemons on many machines, README "Scaling out") a small pool.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    NoSuchModuleError,
    OperationalError,
)

from runner.errors import RunnerError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

#: The newest revision in migrations/versions (tests/test_migrations.py checks it is
#: alembic's head).  A database already there is opened without importing alembic,
#: a tenth of a second of every short command such as `runner status`.
HEAD_REVISION = "0006"

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 300_000


def alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
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


def shown_url(url: str | URL) -> str:
    """The URL for messages and logs, password hidden: error lines end up in terminals,
    CI logs and bug reports, and a --db URL often carries the database password."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        pass
    # Unparseable, so SQLAlchemy cannot say where the password is: hide everything
    # between the scheme's "://" (or the start) and the last "@", but the user name.
    if "@" not in url:
        return url
    head, tail = url.rsplit("@", 1)
    scheme, sep, userinfo = head.rpartition("://")
    user = userinfo.split(":", 1)[0] if sep else ""
    return f"{scheme}{sep}{user}:***@{tail}" if user else f"{scheme}{sep}***@{tail}"


def _scrub(message: str, url: str | URL) -> str:
    """`message` with the URL and its password replaced: driver and SQLAlchemy error
    texts may quote the connection string or its parts back at us."""
    raw = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    message = message.replace(raw, shown_url(url))
    try:
        password = url.password if isinstance(url, URL) else make_url(url).password
    except (ArgumentError, ValueError):
        password = None
    if password:
        message = message.replace(str(password), "***")
    return message


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is no number
        raise RunnerError(f"invalid --db URL {shown_url(url)!r}: {_scrub(str(exc), url)}") from None
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
            engine = _server_engine(parsed)
    except NoSuchModuleError as exc:
        raise RunnerError(
            f"unsupported --db URL {shown_url(parsed)!r}: {_scrub(str(exc), url)}"
        ) from None
    except ModuleNotFoundError as exc:
        raise RunnerError(f"--db {parsed.drivername}: driver not installed ({exc.name})") from None
    return engine


#: Connections one process keeps open to a database server.  A daemon does all its
#: database work on one thread, so it holds one; the rest serve readers beside it
#: (the HTTP API).  README "Scaling out" sizes the server's max_connections from these.
POOL_SIZE = 2
POOL_OVERFLOW = 3
CONNECT_TIMEOUT_S = 10


def _server_engine(parsed: URL) -> Engine:
    """PostgreSQL (or another server): a small pool whose connections are checked
    before use, since a daemon outlives server restarts and idle-connection timeouts."""
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":  # SQLAlchemy would pick psycopg2
            parsed = parsed.set(drivername="postgresql+psycopg")
        if "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    isolation: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        # every statement is written for READ COMMITTED (a claim's SKIP LOCKED, the
        # count triggers' seed and folds); a server whose default is stricter would
        # fail them with serialization errors or count from a stale snapshot
        isolation["isolation_level"] = "READ COMMITTED"
    engine = create_engine(
        parsed,
        **isolation,
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
        pool_pre_ping=True,
        pool_recycle=3600,
        connect_args=connect_args,
    )
    # An engine dropped without dispose() would leave its pooled connections to the
    # garbage collector (a ResourceWarning each); close them when the engine goes.
    weakref.finalize(engine, engine.pool.dispose)
    return engine


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


#: pg_advisory_xact_lock key that serialises migrations ("runner" in ASCII)
MIGRATION_LOCK_ID = 0x72756E6E6572


def _lock_for_migration(conn: Connection) -> None:
    """Daemons started together on a fresh database must not all create the tables.

    SQLite's engine already took the write lock at BEGIN; PostgreSQL takes an
    advisory lock, held until the transaction ends.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})


def _refuse_newer(script: ScriptDirectory, current: str | None) -> None:
    if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
        raise RunnerError(
            f"database schema revision {current!r} is newer than this runner knows "
            f"(head {script.get_current_head()!r}); upgrade runner to use this database"
        )


def _at_head(engine: Engine) -> bool:
    """The database is at HEAD_REVISION, read with one plain query (False when the
    version table is missing or says anything else: alembic then decides)."""
    try:
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars()
            return list(versions) == [HEAD_REVISION]
    except OperationalError as exc:
        if "no such table" in str(exc.orig):  # SQLite: a new database
            return False
        raise
    except DBAPIError:  # PostgreSQL: no version table yet (undefined table)
        return False


def migrate(engine: Engine) -> None:
    """Upgrade to head in one locked transaction; refuse a database written by a
    newer runner.  An up-to-date database is only read, so no lock is taken."""
    try:
        if _at_head(engine):
            return
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        script = ScriptDirectory.from_config(alembic_config())
        head = script.get_current_head()
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            conn.rollback()
            if current == head:
                return
            with conn.begin():
                _lock_for_migration(conn)
                current = MigrationContext.configure(conn).get_current_revision()
                if current == head:  # another process migrated while we waited
                    return
                _refuse_newer(script, current)
                log.info("migrating database from %s to %s", current, head)
                cfg = alembic_config()
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
    except OperationalError as exc:
        raise RunnerError(f"cannot open database: {_scrub(str(exc.orig), engine.url)}") from None


def connect(url: str) -> Engine:
    engine = make_engine(url)
    migrate(engine)
    return engine
