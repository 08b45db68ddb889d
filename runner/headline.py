"""The figures every view leads with, and reading them cheaply at a million jobs.

Counts per state, the recent rates and the ETA: the progress bar, `/metrics`,
`runner status`, `GET /status` and the web page all show them.  Counting a state
is a GROUP BY over the whole table (about 50 ms for a million jobs on SQLite), so a
daemon that did it every second for its bar spent 5 % of a core doing nothing.
`HeadlineCache` is shared by the bar, `/metrics` and `/status` of one daemon: it
re-reads only once the figures are older than a time-to-live that grows with what
a read costs (`COUNT_BUDGET`: reading takes at most a quarter of a percent of one
core), so a cheap read (a small database) is made afresh every time and a million
jobs every 25 seconds or so (never less often than every `MAX_TTL_S`).  The cost
decides, not the number of jobs: the same table reads ten times slower on a cold
cache, a busy machine or SQLite without statistics.

`now` is the database's clock, read inside the same transaction: `finished_at`
and `claimed_at` are stamped by the database (runner/dbclock.py), so a rate taken
against the reading host's clock would change with that host's skew.

The windowed queries (`worked_on`) must walk `ix_jobs_finished_at`, the only index
that reads just the window's rows.  SQLite without statistics (runner never runs
ANALYZE) prefers an equality on `ix_jobs_status_id` to a range, and then reads
every done and failed job of the table; on SQLite the status test is written so
that it cannot use an index (`unindexed`), whatever the statistics say.

The counts come from runner/counts.py: kept by triggers on PostgreSQL (a sum over a
small table, never one counter row that every daemon's claims would queue on), a
GROUP BY of the jobs table on SQLite.  The time-to-live follows whichever it is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Connection, Engine, String, case, func, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from runner.counts import count_by_status
from runner.dbclock import read_now
from runner.jobs import Status
from runner.models import ADOPTED, jobs
from runner.queries import reading
from runner.rates import Rate, best_rate, eta_s, window_rate

#: rate windows, label -> seconds; the ETA uses the first with any finished job
WINDOWS = {"5m": 300.0, "60m": 3600.0}
#: the share of one core that re-reading the headline may take, at most (a quarter
#: of a percent: an idle daemon's other work, its claim polls, needs the rest of 2 %)
COUNT_BUDGET = 0.0025
#: a time-to-live under this is none at all: a read that cheap (a quarter of a
#: percent of the 1 s between the bar's refreshes) is made afresh for every caller,
#: so small figures are as fresh as they can be
MIN_TTL_S = 1.0
#: at most a minute for a huge or slow table
MAX_TTL_S = 60.0


def ttl_for(
    costs: tuple[float, ...], *, budget: float, min_ttl_s: float, max_ttl_s: float
) -> float:
    """How long figures that took `costs` seconds to read (the last two reads) stay
    good, so that reading takes at most `budget` of a core.  The cheaper of the two
    counts: one slow read (a cold cache, a busy moment) must not make cheap
    figures stale, and a first read, which may well be cold, sets none.  Under
    `min_ttl_s`: 0, read afresh."""
    if len(costs) < 2:
        return 0.0
    ttl = min(max_ttl_s, min(costs) / budget)
    return ttl if ttl >= min_ttl_s else 0.0


class unindexed(FunctionElement[Any]):
    """A text column the query planner must not look rows up by: `+column` on SQLite
    (a unary plus takes the term out of index selection), the column elsewhere."""

    type = String()
    inherit_cache = True


@compiles(unindexed)
def _unindexed(element: unindexed, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(unindexed, "sqlite")
def _unindexed_sqlite(element: unindexed, compiler: Any, **kw: Any) -> str:
    return "+" + str(compiler.process(element.clauses, **kw))


def finished_status() -> ColumnElement[bool]:
    """Done or failed, as a term that leaves the index choice to `finished_at`."""
    return unindexed(jobs.c.status).in_([Status.DONE.value, Status.FAILED.value])


def worked_on(now: float, since: float) -> tuple[Any, ...]:
    """WHERE terms for jobs a daemon finished in [since, now]: adopted results and
    rejected catalogue records get a `finished_at` too, and a million of them imported
    at once would otherwise look like a burst of speed.  They read the window through
    `ix_jobs_finished_at` on either database (see the module's doc)."""
    return (
        jobs.c.finished_at >= since,
        jobs.c.finished_at <= now,
        finished_status(),
        jobs.c.claimed_at.is_not(None),
        or_(jobs.c.model_id.is_(None), jobs.c.model_id != ADOPTED),
    )


@dataclass(frozen=True)
class Headline:
    """Counts per state and the rates of the last `WINDOWS`, as of `now` (the
    database's clock, as `finished_at` is)."""

    now: float
    counts: dict[Status, int]
    rates: dict[str, Rate]
    #: when this host read them, by its own clock (what a cache ages them by, and what
    #: a daemon compares its own finish times with); `now` unless a cache sets it
    read_at: float | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def remaining(self) -> int:
        return self.counts[Status.PENDING] + self.counts[Status.RUNNING]

    @property
    def finished(self) -> int:
        return self.counts[Status.DONE] + self.counts[Status.FAILED]

    @property
    def basis(self) -> str | None:
        """The window the ETA is taken over; None with nothing left or nothing recent."""
        best = best_rate(self.rates)
        return best[0] if best and self.remaining else None

    @property
    def eta_s(self) -> float | None:
        best = best_rate(self.rates)
        return eta_s(self.remaining, best[1] if best else None)


def read_headline(conn: Connection, *, now: float | None = None) -> Headline:
    """Counts and rates in one read transaction, as of `now` (by default the
    database's clock, read in it).  A window's rate is over the time it covers: from
    the earliest claim among the jobs that finished in it (when the work began), if
    that is later than the window's start."""
    if now is None:
        now = read_now(conn)
    longest = max(WINDOWS.values())
    columns = []
    for seconds in WINDOWS.values():
        inside = jobs.c.finished_at >= now - seconds
        columns += [
            func.coalesce(func.sum(case((inside, 1), else_=0)), 0),
            func.coalesce(
                func.sum(
                    case(
                        (inside & (jobs.c.status == Status.DONE.value), jobs.c.video_duration_s),
                        else_=0.0,
                    )
                ),
                0.0,
            ),
            func.min(case((inside, jobs.c.claimed_at), else_=None)),
        ]
    recent = select(*columns).where(*worked_on(now, now - longest))
    counts = count_by_status(conn)
    row = conn.execute(recent).one()
    rates = {}
    for i, (label, seconds) in enumerate(WINDOWS.items()):
        finished, audio_s, since = row[3 * i : 3 * i + 3]
        rates[label] = window_rate(
            int(finished),
            float(audio_s or 0.0),
            window_s=seconds,
            now=now,
            since=None if since is None else float(since),
        )
    return Headline(now=now, counts=counts, rates=rates)


def read_headline_now(engine: Engine, *, now: float | None = None) -> Headline:
    """`read_headline` on a connection of its own; `now`: the database's clock unless
    a test gives one."""
    with reading(engine) as conn, conn.begin():
        return read_headline(conn, now=now)


class HeadlineCache:
    """The last `Headline` read, re-read once older than its time-to-live.

    Thread-safe: the daemon's database thread (the bar) and the API's executor
    threads (`/metrics`, `/status`) share one.  One thread reads at a time, without
    holding the lock: callers that need new figures meanwhile wait for its (rather
    than counting too), callers content with the kept ones get them at once.
    `clock` ages the figures (this host's); `now`, if given, is the read's `now`
    instead of the database's clock (tests).
    """

    def __init__(
        self,
        *,
        budget: float = COUNT_BUDGET,
        min_ttl_s: float = MIN_TTL_S,
        max_ttl_s: float = MAX_TTL_S,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
        now: Callable[[], float] | None = None,
    ) -> None:
        self.budget, self.min_ttl_s, self.max_ttl_s = budget, min_ttl_s, max_ttl_s
        self._clock, self._timer, self._now = clock, timer, now
        self._cond = threading.Condition()
        self._reading = False
        self._last: Headline | None = None
        self._expires_at = float("-inf")
        #: seconds the last reads took (the cheapest sets the TTL), and that TTL
        self._costs: tuple[float, ...] = ()
        self.read_cost_s = 0.0
        self.ttl_s = 0.0
        self.reads = 0

    def _usable(self, at: float, max_age_s: float | None) -> Headline | None:
        last = self._last
        if last is None or at >= self._expires_at:
            return None
        if max_age_s is not None and at - (last.read_at or last.now) > max_age_s:
            return None
        return last

    def get(self, engine: Engine, *, max_age_s: float | None = None) -> Headline:
        """The kept figures, or new ones if they are older than the time-to-live
        (or than `max_age_s`: 0 forces a read, as the daemon's last line does)."""
        with self._cond:
            asked_at = self._clock()
            while True:
                kept = self._usable(self._clock(), max_age_s)
                if kept is not None:
                    return kept
                if not self._reading:
                    break
                reads = self.reads
                self._cond.wait_for(lambda: not self._reading)
                if self.reads != reads and self._last is not None:
                    last = self._last  # read for someone else after we asked: fresh enough
                    if (last.read_at or 0.0) >= asked_at:
                        return last
            self._reading = True
        try:
            started_at, started = self._clock(), self._timer()
            headline = read_headline_now(engine, now=None if self._now is None else self._now())
            cost = self._timer() - started
            headline = replace(headline, read_at=started_at)
        except BaseException:
            with self._cond:
                self._reading = False
                self._cond.notify_all()
            raise
        with self._cond:
            self._costs = (*self._costs[-1:], cost)
            self.read_cost_s = cost
            self.ttl_s = ttl_for(
                self._costs,
                budget=self.budget,
                min_ttl_s=self.min_ttl_s,
                max_ttl_s=self.max_ttl_s,
            )
            self._last, self._expires_at = headline, started_at + self.ttl_s
            self.reads += 1
            self._reading = False
            self._cond.notify_all()
        return headline
