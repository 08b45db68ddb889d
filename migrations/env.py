"""Alembic environment: uses the engine runner hands over, else RUNNER_DB."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Engine

from runner.models import metadata

config = context.config


def _engine() -> Engine:
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    from runner.db import make_engine

    return make_engine(os.environ.get("RUNNER_DB", "sqlite:///runner.db"))


def run_migrations_online() -> None:
    with _engine().connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("runner migrations run online only: set RUNNER_DB and use upgrade")
run_migrations_online()
