"""The daemon's one database thread, and riding out a database that is briefly gone.

Every stage sends its statements here, so SQLite sees one writer per daemon and no
ORM object or connection ever crosses an ``await``: callers pass plain values in
and get frozen records out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy.exc
from sqlalchemy import Engine

log = logging.getLogger(__name__)

#: waits between tries of a database call that failed with OperationalError
DB_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0)

T = TypeVar("T")


class DbThread:
    def __init__(self, engine: Engine, *, retry_delays_s: tuple[float, ...] = DB_RETRY_DELAYS_S):
        self.engine = engine
        self.retry_delays_s = retry_delays_s
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runner-db")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(engine, *args, **kwargs)`` on the database thread.

        A PostgreSQL failover or a dropped connection raises OperationalError; the
        call is retried with backoff for about a minute and a half (within the
        default lease) before the error is let through.  Retrying is safe: every
        state change is fenced by its attempt, so a repeat of one that did commit
        matches no row and is reported as no longer ours.
        """
        loop = asyncio.get_running_loop()
        for delay_s in (*self.retry_delays_s, None):
            try:
                return await loop.run_in_executor(
                    self._executor, lambda: fn(self.engine, *args, **kwargs)
                )
            except sqlalchemy.exc.OperationalError as exc:
                if delay_s is None:
                    raise
                reason = str(exc.orig or exc).splitlines()[0]
                name = getattr(fn, "__name__", "database call")
                log.warning("database error in %s: %s; retrying in %g s", name, reason, delay_s)
                await asyncio.sleep(delay_s)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._executor.shutdown()
