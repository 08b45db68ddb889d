"""The figures every view leads with, and reading them cheaply at a million jobs.

Counts per state, the recent rates and the ETA: the progress bar, `/metrics`,
`runner status`, `GET /status` and the web page all show them.  Counting a state
is a GROUP BY over the whole table (about 50 ms for a million jobs on SQLite), so a
daemon that did it every second for its bar spent 5 % of a core doing nothing.
`HeadlineCache` is shared by the bar, `/metrics` and `/status` of one daemon: it
re-reads only once the figures are older than a time-to-live that grows with what
a read costs (`COUNT_BUDGET`: reading takes at most a quarter of a percent of one
core), so a small database is read afresh every time and a million jobs every 25
seconds or so (never less often than every `MAX_TTL_S`).

Nothing is kept in the database for it (no counter rows): with many daemons on
PostgreSQL, one counter row that every claim and every finish updates would
serialise all of them on its lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, case, func, or_, select

from runner.jobs import Status
from runner.models import ADOPTED, jobs
from runner.queries import count_by_status, reading
from runner.rates import Rate, best_rate, eta_s, window_rate

#: rate windows, label -> seconds; the ETA uses the first with any finished job
WINDOWS = {"5m": 300.0, "60m": 3600.0}
#: the share of one core that re-reading the headline may take, at most (a quarter
#: of a percent: an idle daemon's other work, its claim polls, needs the rest of 2 %)
COUNT_BUDGET = 0.0025
#: bounds of the cache's time-to-live, seconds: none at all for a small database
#: (figures as fresh as before), at most a minute for a huge or slow one
MIN_TTL_S = 0.0
MAX_TTL_S = 60.0
#: tables smaller than this are read afresh every time (a few milliseconds), so a
#: slow first read (a cold cache, a busy machine) never makes small figures stale
FRESH_BELOW_JOBS = 100_000


def worked_on(now: float, since: float) -> tuple[Any, ...]:
    """WHERE terms for jobs a daemon finished in [since, now]: adopted results and
    rejected catalogue records get a `finished_at` too, and a million of them imported
    at once would otherwise look like a burst of speed."""
    return (
        jobs.c.finished_at >= since,
        jobs.c.finished_at <= now,
        jobs.c.status.in_([Status.DONE.value, Status.FAILED.value]),
        jobs.c.claimed_at.is_not(None),
        or_(jobs.c.model_id.is_(None), jobs.c.model_id != ADOPTED),
    )


@dataclass(frozen=True)
class Headline:
    """Counts per state and the rates of the last `WINDOWS`, as of `now`."""

    now: float
    counts: dict[Status, int]
    rates: dict[str, Rate]

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


def read_headline(conn: Connection, *, now: float) -> Headline:
    """Counts and rates in one read transaction.  A window's rate is over the time it
    covers: from the earliest claim among the jobs that finished in it (when the
    work began), if that is later than the window's start."""
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


def read_headline_now(engine: Engine, *, now: float) -> Headline:
    with reading(engine) as conn, conn.begin():
        return read_headline(conn, now=now)


class HeadlineCache:
    """The last `Headline` read, re-read once older than its time-to-live.

    Thread-safe: the daemon's database thread (the bar) and the API's executor
    threads (`/metrics`, `/status`) share one; while one thread reads, the others
    wait for its figures rather than counting too.
    """

    def __init__(
        self,
        *,
        budget: float = COUNT_BUDGET,
        min_ttl_s: float = MIN_TTL_S,
        max_ttl_s: float = MAX_TTL_S,
        fresh_below_jobs: int = FRESH_BELOW_JOBS,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.budget, self.min_ttl_s, self.max_ttl_s = budget, min_ttl_s, max_ttl_s
        self.fresh_below_jobs = fresh_below_jobs
        self._clock, self._timer = clock, timer
        self._lock = threading.Lock()
        self._last: Headline | None = None
        self._expires_at = float("-inf")
        #: seconds the last read took, and the time-to-live that followed from it
        self.read_cost_s = 0.0
        self.ttl_s = min_ttl_s
        self.reads = 0

    def get(self, engine: Engine, *, max_age_s: float | None = None) -> Headline:
        """The cached figures, or new ones if they are older than the time-to-live
        (or than `max_age_s`: 0 forces a read, as the daemon's last line does)."""
        with self._lock:
            now = self._clock()
            last = self._last
            fresh = last is not None and now < self._expires_at
            if fresh and max_age_s is not None and last is not None:
                fresh = now - last.now <= max_age_s
            if fresh and last is not None:
                return last
            started = self._timer()
            headline = read_headline_now(engine, now=now)
            self.read_cost_s = self._timer() - started
            self.ttl_s = min(self.max_ttl_s, max(self.min_ttl_s, self.read_cost_s / self.budget))
            if headline.total < self.fresh_below_jobs:
                self.ttl_s = 0.0
            self._last, self._expires_at = headline, now + self.ttl_s
            self.reads += 1
            return headline
