"""What `runner status` reports: progress, speed, ETA, throughput and why things failed.

`read_status` is a pure function of the database and `now`, so tests fix the clock
instead of sleeping; left out, `now` is the database's clock (the one that stamps
`finished_at`), read in the same transaction, so a host whose clock is off changes
no rate.  Everything it says comes from the jobs table, so it shows the
work of every daemon: the headline (counts, rates over the last 5 and 60 minutes,
ETA: `runner.headline`), a throughput chart bucketed in SQL over the last hours from
`finished_at` (its index keeps that cheap at a million jobs: only the chart's hours
are read), failures by error class per bucket, the most common failure messages with
a few example keys, and the daemons holding or recently finishing jobs.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, Integer, case, cast, func, select

from runner.counts import example_keys, top_reasons
from runner.dbclock import read_now
from runner.headline import WINDOWS, Headline, read_headline, unindexed, worked_on
from runner.jobs import Status
from runner.models import jobs, reason_of
from runner.queries import reading
from runner.rates import window_rate
from runner.spec import registered_specs, spec_lines

__all__ = [
    "WINDOWS",
    "finite_or_none",
    "format_duration",
    "format_status",
    "read_status",
    "show_status",
]

#: ANSI: cursor home, clear screen (for --watch on a terminal)
CLEAR = "\x1b[H\x1b[2J"
#: the throughput chart: this many hours, in buckets of this many seconds
CHART_HOURS = 6.0
CHART_BUCKET_S = 900.0
#: example keys shown with each top failure message, found among the latest failures
EXAMPLES = 3
EXAMPLES_SCANNED = 2_000


def read_status(
    engine: Engine,
    *,
    now: float | None = None,
    top: int = 5,
    headline: Headline | None = None,
    chart_hours: float = CHART_HOURS,
    bucket_s: float = CHART_BUCKET_S,
) -> dict[str, Any]:
    """The whole report, JSON-ready, as of `now` (by default the database's clock).
    `headline`: figures already read (the daemon's shared cache), so the counts are
    not taken again; its `now` is when they were (`counts_as_of`).

    The throughput chart, the slowest part (it reads every job finished in its
    hours: about 90 ms at 5 videos/s on SQLite, 50 ms on PostgreSQL), is read beside
    the rest, on a connection of its own; the rest is the headline (a GROUP BY of
    the table on SQLite, about 50 ms at a million jobs; next to nothing where
    triggers keep the counts), the failure reasons and the daemons."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runner-status") as pool:
        with reading(engine) as conn, conn.begin():
            if now is None:
                now = read_now(conn)
            chart = pool.submit(
                _read_throughput, engine, now=now, hours=chart_hours, bucket_s=bucket_s
            )
            if headline is None:
                headline = read_headline(conn, now=now)
            failures = _top_failures(conn, top)
            running = _oldest_running(conn)
            workers = _workers(conn, now=now)
            specs = registered_specs(conn)
        throughput = chart.result()
    assert headline is not None
    return {
        "now": now,
        "counts_as_of": headline.now,
        "total": headline.total,
        "counts": {s.value: n for s, n in headline.counts.items()},
        "rates": {label: rate.as_dict() for label, rate in headline.rates.items()},
        "remaining": headline.remaining,
        "eta_s": headline.eta_s,
        "eta_basis": headline.basis,
        "oldest_running": None
        if running is None
        else {
            "key": running.key,
            "worker_id": running.worker_id,
            "claimed_at": running.claimed_at,
            "age_s": max(0.0, now - running.claimed_at),
        },
        "top_failures": failures,
        "throughput": throughput,
        "workers": workers,
        "specs": specs,
    }


def _oldest_running(conn: Connection) -> Any:
    stmt = (
        select(jobs.c.key, jobs.c.worker_id, jobs.c.claimed_at)
        .where(jobs.c.status == Status.RUNNING.value, jobs.c.claimed_at.is_not(None))
        .order_by(jobs.c.claimed_at, jobs.c.id)
        .limit(1)
    )
    return conn.execute(stmt).first()


def _top_failures(conn: Connection, top: int) -> list[dict[str, Any]]:
    """The `top` most common reasons (error class and the message's first
    REASON_CHARS characters), each with a few keys: the latest failures' (one
    backward walk of the status index), or for a reason none of them has, its
    latest, found through the reasons' index."""
    reasons = top_reasons(conn, top)
    examples: dict[tuple[str | None, str | None], list[str]] = {
        (r.error_class, r.reason): [] for r in reasons
    }
    if reasons:
        latest = (
            select(jobs.c.key, jobs.c.error_class, reason_of(jobs.c.error).label("reason"))
            .where(jobs.c.status == Status.FAILED.value)
            .order_by(jobs.c.id.desc())
            .limit(EXAMPLES_SCANNED)
        )
        for row in conn.execute(latest):  # the reason, not the whole message: it may be long
            keys = examples.get((row.error_class, row.reason))
            if keys is not None and len(keys) < EXAMPLES:
                keys.append(row.key)
    return [
        {
            "error_class": r.error_class,
            "error": r.reason,
            "count": r.count,
            "examples": examples[(r.error_class, r.reason)] or example_keys(conn, r, EXAMPLES),
        }
        for r in reasons
    ]


def _read_throughput(engine: Engine, **kwargs: Any) -> dict[str, Any]:
    with reading(engine) as conn, conn.begin():
        return _throughput(conn, **kwargs)


def _bucket_of(conn: Connection, start: float, bucket_s: float) -> Any:
    """The bucket number of `finished_at` (>= start), computed by the database."""
    offset = (jobs.c.finished_at - start) / bucket_s
    if conn.dialect.name == "sqlite":  # CAST truncates, and the offset is never negative
        return cast(offset, Integer)
    return cast(func.floor(offset), Integer)  # PostgreSQL's CAST rounds


def _throughput(conn: Connection, *, now: float, hours: float, bucket_s: float) -> dict[str, Any]:
    """Finished jobs per bucket of `bucket_s` over the last `hours`, buckets aligned to
    the clock (the last one ends at `now`, so its rate is over the part it covers):
    done and failed videos, audio-seconds, failures by error class, and the models of
    the jobs done in the last hour."""
    n_buckets = max(1, math.ceil(hours * 3600 / bucket_s))
    first = (math.floor(now / bucket_s) - (n_buckets - 1)) * bucket_s
    bucket = _bucket_of(conn, first, bucket_s).label("b")
    done = jobs.c.status == Status.DONE.value
    # two small queries rather than one GROUP BY over every column: the window's
    # rows grouped by bucket and error class (done jobs have none), read once, and
    # the last hour's done jobs by model
    per_bucket = (
        select(
            bucket,
            jobs.c.error_class,
            func.sum(case((done, 1), else_=0)).label("done"),
            func.sum(case((done, 0), else_=1)).label("failed"),
            func.coalesce(func.sum(case((done, jobs.c.video_duration_s), else_=0.0)), 0.0).label(
                "audio_s"
            ),
        )
        .where(*worked_on(now, first))
        .group_by(bucket, jobs.c.error_class)
    )
    recent_models = (
        select(jobs.c.model_id, func.count().label("n"))
        .where(
            *worked_on(now, max(first, now - WINDOWS["60m"])),
            unindexed(jobs.c.status) == Status.DONE.value,
        )
        .group_by(jobs.c.model_id)
    )
    buckets: list[dict[str, Any]] = []
    for i in range(n_buckets):
        start = first + i * bucket_s
        buckets.append(
            {"start": start, "end": min(start + bucket_s, now), "done": 0, "failed": 0}
            | {"audio_s": 0.0, "failed_by_class": {}}
        )
    for row in conn.execute(per_bucket):
        if 0 <= row.b < n_buckets:
            b = buckets[row.b]
            b["done"] += int(row.done)
            b["failed"] += int(row.failed)
            b["audio_s"] += float(row.audio_s)
            if row.failed:
                cls = row.error_class or "unknown"
                b["failed_by_class"][cls] = b["failed_by_class"].get(cls, 0) + int(row.failed)
    models = {
        row.model_id: row.n for row in conn.execute(recent_models) if row.model_id is not None
    }
    for b in buckets:
        rate = window_rate(
            b["done"] + b["failed"], b["audio_s"], window_s=bucket_s, now=b["end"], since=b["start"]
        )
        b["videos_per_min"] = rate.per_min
        b["audio_h_per_h"] = rate.audio_h_per_h
    classes = sorted({c for b in buckets for c in b["failed_by_class"]})
    return {
        "since": first,
        "bucket_s": bucket_s,
        "buckets": buckets,
        "error_classes": classes,
        "models": [{"model_id": m, "done": n} for m, n in sorted(models.items())],
    }


def _workers(conn: Connection, *, now: float) -> list[dict[str, Any]]:
    """Every daemon that holds jobs or finished one in the last hour, as the database
    knows it: the jobs it holds, its oldest claim and earliest-expiring lease, and
    what it finished in the last hour.  Worker ids read host:pid:...; the host is shown."""
    held = (
        select(
            jobs.c.worker_id,
            func.count().label("n"),
            func.min(jobs.c.claimed_at).label("oldest"),
            func.min(jobs.c.lease_expires_at).label("lease"),
        )
        .where(jobs.c.status == Status.RUNNING.value, jobs.c.worker_id.is_not(None))
        .group_by(jobs.c.worker_id)
    )
    hour = WINDOWS["60m"]
    recent = (
        select(
            jobs.c.worker_id,
            func.count().label("n"),
            func.coalesce(func.sum(jobs.c.video_duration_s), 0.0).label("audio_s"),
            func.max(jobs.c.finished_at).label("last"),
        )
        .where(*worked_on(now, now - hour), jobs.c.worker_id.is_not(None))
        .group_by(jobs.c.worker_id)
    )
    workers: dict[str, dict[str, Any]] = {}

    def row_for(worker_id: str) -> dict[str, Any]:
        return workers.setdefault(
            worker_id,
            {
                "worker_id": worker_id,
                "host": worker_id.split(":", 1)[0],
                "running": 0,
                "oldest_claimed_at": None,
                "oldest_claim_age_s": None,
                "lease_expires_at": None,
                "finished_1h": 0,
                "audio_s_1h": 0.0,
                "last_finished_at": None,
            },
        )

    for r in conn.execute(held):
        w = row_for(r.worker_id)
        w["running"], w["oldest_claimed_at"], w["lease_expires_at"] = r.n, r.oldest, r.lease
        if r.oldest is not None:
            w["oldest_claim_age_s"] = max(0.0, now - r.oldest)
    for r in conn.execute(recent):
        w = row_for(r.worker_id)
        w["finished_1h"], w["audio_s_1h"], w["last_finished_at"] = r.n, float(r.audio_s), r.last
    return sorted(workers.values(), key=lambda w: (w["host"], w["worker_id"]))


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (unknown): rates and the
    ETA are estimates, and strict JSON has no NaN or Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def format_duration(seconds: float) -> str:
    """'45s', '3m 12s', '2h 05m', '3d 04h': two units are enough to plan by."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def format_status(report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = [f"total {report['total']}: " + ", ".join(f"{s} {n}" for s, n in counts.items())]
    rates = report.get("rates")
    if rates:
        lines.append("finished: " + "; ".join(_rate_text(label, r) for label, r in rates.items()))
        remaining = report["remaining"]
        if remaining == 0:
            lines.append("eta: nothing left to do")
        elif report["eta_s"] is None:
            lines.append(f"eta: unknown ({remaining} left, nothing finished in the last hour)")
        else:
            lines.append(
                f"eta: {format_duration(report['eta_s'])} for {remaining} left "
                f"(at the last {report['eta_basis']} rate)"
            )
    oldest = report.get("oldest_running")
    if oldest:
        lines.append(
            f"oldest running: {oldest['key']} for {format_duration(oldest['age_s'])}"
            f" (worker {oldest['worker_id']})"
        )
    if report["top_failures"]:
        lines.append("top failure reasons:")
        for f in report["top_failures"]:
            lines.append(f"  {f['count']:>8}  [{f['error_class']}] {f['error']}")
            if f.get("examples"):
                lines.append(f"            e.g. {', '.join(f['examples'])}")
    lines += spec_lines(report.get("specs") or [])
    return "\n".join(lines)


def _rate_text(label: str, rate: dict[str, Any]) -> str:
    """'3 in the last 5m (0.60/min, 0.010/s)'; a window the work covers only part
    of says so: '3 in the last 5m (over 40s: 4.50/min, 0.075/s)'."""
    over = ""
    covered_s = rate.get("covered_s", rate["window_s"])
    if covered_s is not None and covered_s < rate["window_s"]:
        over = f"over {format_duration(covered_s)}: "
    speed = f"{rate['per_min']:.2f}/min, {rate['per_s']:.3f}/s"
    return f"{rate['finished']} in the last {label} ({over}{speed})"


def show_status(
    engine: Engine,
    *,
    as_json: bool,
    top: int,
    echo: Callable[[str], None],
    watch_s: float | None = None,
    count: int | None = None,
    clear: bool = False,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """`runner status`: once, or every `watch_s` seconds until Ctrl-C (or `count` times).

    Watching on a terminal (`clear`) redraws in place; otherwise each report follows
    the last (JSON: one document per line), which suits logs and pipes.  JSON is
    strict (an unknown rate or ETA is null, never NaN or Infinity).  `clock`: the
    reports' `now` (tests); by default the database's clock.  Returns how many
    reports were shown.
    """
    shown = 0
    try:
        while True:
            report = read_status(engine, now=None if clock is None else clock(), top=top)
            if as_json:
                text = json.dumps(
                    finite_or_none(report), indent=None if watch_s else 2, allow_nan=False
                )
            else:
                text = format_status(report)
                if watch_s:
                    moment = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["now"]))
                    text += f"\n(as of {moment}; every {watch_s:g}s, Ctrl-C to stop)"
            if clear:
                text = CLEAR + text
            elif shown and not as_json:
                text = "\n" + text  # a blank line between reports in a log
            echo(text)
            shown += 1
            if not watch_s or (count is not None and shown >= count):
                return shown
            sleep(watch_s)
    except KeyboardInterrupt:
        return shown
