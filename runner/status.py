"""What `runner status` reports: progress, speed, ETA and why things failed.

`read_status` is a pure function of the database and `now`, so tests fix the clock
instead of sleeping.  Everything it says comes from the jobs table: the rate is the
number of jobs that finished (done or failed) in a window ending at `now`, from
`finished_at`.  Only jobs the daemon worked on count (they were claimed): adopted
results and rejected catalogue records also get a `finished_at`, and a million of
them imported at once would otherwise look like a burst of speed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, case, func, or_, select

from runner.adopt import ADOPTED
from runner.db import READ_ONLY
from runner.jobs import Status
from runner.models import jobs
from runner.queries import count_by_status

#: rate windows, label -> seconds; the ETA uses the first with any finished job
WINDOWS = {"5m": 300.0, "60m": 3600.0}
#: ANSI: cursor home, clear screen (for --watch on a terminal)
CLEAR = "\x1b[H\x1b[2J"


def read_status(engine: Engine, *, now: float, top: int = 5) -> dict[str, Any]:
    """Counts, rates, ETA, the oldest running job and the top failure reasons."""
    longest = max(WINDOWS.values())
    by_daemon = (
        jobs.c.status.in_([Status.DONE.value, Status.FAILED.value]),
        jobs.c.finished_at >= now - longest,
        jobs.c.finished_at <= now,
        jobs.c.claimed_at.is_not(None),
        or_(jobs.c.model_id.is_(None), jobs.c.model_id != ADOPTED),
    )
    recent = select(
        *(
            func.coalesce(func.sum(case((jobs.c.finished_at >= now - s, 1), else_=0)), 0)
            for s in WINDOWS.values()
        )
    ).where(*by_daemon)
    oldest = (
        select(jobs.c.key, jobs.c.worker_id, jobs.c.claimed_at)
        .where(jobs.c.status == Status.RUNNING.value, jobs.c.claimed_at.is_not(None))
        .order_by(jobs.c.claimed_at, jobs.c.id)
        .limit(1)
    )
    reasons = (
        select(jobs.c.error_class, jobs.c.error, func.count().label("n"))
        .where(jobs.c.status == Status.FAILED.value)
        .group_by(jobs.c.error_class, jobs.c.error)
        .order_by(func.count().desc(), jobs.c.error_class, jobs.c.error)
        .limit(top)
    )
    with engine.connect() as conn:
        conn = conn.execution_options(**{READ_ONLY: True})
        with conn.begin():
            counts = count_by_status(conn)
            finished = [int(n) for n in conn.execute(recent).one()]
            running = conn.execute(oldest).first()
            failures = (
                [
                    {"error_class": r.error_class, "error": r.error, "count": r.n}
                    for r in conn.execute(reasons)
                ]
                if top
                else []
            )
    rates = {
        label: {
            "window_s": seconds,
            "finished": n,
            "per_s": n / seconds,
            "per_min": n * 60 / seconds,
        }
        for (label, seconds), n in zip(WINDOWS.items(), finished, strict=True)
    }
    remaining = counts[Status.PENDING] + counts[Status.RUNNING]
    basis = next((label for label, r in rates.items() if r["finished"]), None)
    if remaining == 0:
        eta_s: float | None = 0.0
    elif basis is None:
        eta_s = None
    else:
        eta_s = remaining / rates[basis]["per_s"]
    return {
        "now": now,
        "total": sum(counts.values()),
        "counts": {s.value: n for s, n in counts.items()},
        "rates": rates,
        "remaining": remaining,
        "eta_s": eta_s,
        "eta_basis": basis if remaining else None,
        "oldest_running": None
        if running is None
        else {
            "key": running.key,
            "worker_id": running.worker_id,
            "claimed_at": running.claimed_at,
            "age_s": max(0.0, now - running.claimed_at),
        },
        "top_failures": failures,
    }


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
        lines.append(
            "finished: "
            + "; ".join(
                f"{r['finished']} in the last {label} ({r['per_min']:.2f}/min, {r['per_s']:.3f}/s)"
                for label, r in rates.items()
            )
        )
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
        lines += [
            f"  {f['count']:>8}  [{f['error_class']}] {f['error']}" for f in report["top_failures"]
        ]
    return "\n".join(lines)


def show_status(
    engine: Engine,
    *,
    as_json: bool,
    top: int,
    echo: Callable[[str], None],
    watch_s: float | None = None,
    count: int | None = None,
    clear: bool = False,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """`runner status`: once, or every `watch_s` seconds until Ctrl-C (or `count` times).

    Watching on a terminal (`clear`) redraws in place; otherwise each report follows
    the last (JSON: one document per line), which suits logs and pipes.  Returns how
    many reports were shown.
    """
    shown = 0
    try:
        while True:
            report = read_status(engine, now=clock(), top=top)
            if as_json:
                text = json.dumps(report, indent=None if watch_s else 2)
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
