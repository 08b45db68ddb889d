"""The database's clock, as unix seconds, inside SQL statements.

Leases, retry backoff and finish times are compared and written with the time the
database server reads while it runs the statement, never a daemon's own clock: with
daemons on many machines, one machine whose clock runs ahead would otherwise see
every other daemon's leases as expired and take live jobs.  Maintenance functions
still take an optional `now` so tests can place a statement at any moment without
sleeping; `clock(None)` is the database's time, `clock(t)` is `t`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, Float, literal, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement, FunctionElement


class db_now(FunctionElement[float]):
    """The database's current time as unix seconds (float)."""

    type = Float()
    inherit_cache = True


@compiles(db_now, "sqlite")
def _sqlite_now(element: db_now, compiler: Any, **kw: Any) -> str:
    # julianday('now') has millisecond resolution and is stable within one statement
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(db_now, "postgresql")
def _postgresql_now(element: db_now, compiler: Any, **kw: Any) -> str:
    # clock_timestamp(), not now(): a long transaction must not write a stale time
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


def clock(now: float | None) -> ColumnElement[float]:
    """`now` as a bound value when a test gives one, else the database's clock."""
    return db_now() if now is None else literal(float(now), Float())


def read_now(bind: Engine | Connection) -> float:
    """What the database's clock says now (status pages, tests)."""
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return float(conn.execute(select(db_now())).scalar_one())
    return float(bind.execute(select(db_now())).scalar_one())
