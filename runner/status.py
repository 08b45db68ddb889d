"""What `runner status` reports: progress and why things failed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select

from runner.db import READ_ONLY
from runner.jobs import Status, count_by_status
from runner.models import jobs


def read_status(engine: Engine, *, top: int = 5) -> dict[str, Any]:
    reasons = (
        select(jobs.c.error_class, jobs.c.error, func.count().label("n"))
        .where(jobs.c.status == Status.FAILED.value)
        .group_by(jobs.c.error_class, jobs.c.error)
        .order_by(func.count().desc(), jobs.c.error)
        .limit(top)
    )
    with engine.connect() as conn:
        conn = conn.execution_options(**{READ_ONLY: True})
        with conn.begin():
            counts = count_by_status(conn)
            failures = (
                [
                    {"error_class": r.error_class, "error": r.error, "count": r.n}
                    for r in conn.execute(reasons)
                ]
                if top
                else []
            )
    total = sum(counts.values())
    return {
        "total": total,
        "counts": {s.value: n for s, n in counts.items()},
        "top_failures": failures,
    }


def format_status(report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = [f"total {report['total']}: " + ", ".join(f"{s} {n}" for s, n in counts.items())]
    if report["top_failures"]:
        lines.append("top failure reasons:")
        lines += [
            f"  {f['count']:>8}  [{f['error_class']}] {f['error']}" for f in report["top_failures"]
        ]
    return "\n".join(lines)
