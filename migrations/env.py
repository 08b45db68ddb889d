"""Alembic environment: uses the connection runner hands over, else RUNNER_DB."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, Engine

from runner.models import metadata

config = context.config


def _engine() -> Engine:
    from runner.db import make_engine

    return make_engine(os.environ.get("RUNNER_DB", "sqlite:///runner.db"))


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    # a no-op when runner.db.migrate hands over a connection already in its
    # (locked) transaction; the upgrade then commits or rolls back with it
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    with _engine().connect() as connection:
        _run(connection)


if context.is_offline_mode():
    raise SystemExit("runner migrations run online only: set RUNNER_DB and use upgrade")
run_migrations_online()
