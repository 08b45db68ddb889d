"""A million-job database shaped like a long run, for benchmarks/bench_status.py.

    900,000 done     finished over the last 50 hours at 5 videos/s, 64-float vectors
     55,000 failed   in the same 50 hours, five error classes, a few messages each
     44,900 pending  in retry backoff until tomorrow: a daemon has nothing to claim
        100 running  held by two daemons on another machine, leases valid for a day

Written with the driver's bulk paths (executemany on SQLite, COPY on PostgreSQL)
into the schema `runner.db.connect` creates, so every index the daemon uses is
there.  Statistics as a real deployment has them: none on SQLite (runner never
runs ANALYZE, so the query plans must not need it), and on PostgreSQL what
autovacuum's ANALYZE would gather after a bulk load anyway (VACUUM ANALYZE here,
so the figures do not depend on when autovacuum happens to run).  The vectors are
64 floats rather than the real model's 1,024 to keep the file small; the status
queries never read them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

from runner.db import connect

COLUMNS = (
    "key",
    "url",
    "status",
    "attempts",
    "created_at",
    "claimed_at",
    "started_at",
    "lease_expires_at",
    "finished_at",
    "worker_id",
    "vector",
    "vector_dim",
    "video_duration_s",
    "channels_count",
    "processing_audio_time_s",
    "model_id",
    "error",
    "error_class",
    "http_status",
    "not_before",
    "host",
    "claims",
)
FAILURES = (
    ("download", "HTTP 404", 404),
    ("download", "HTTP 403", 403),
    ("download", "connection reset by peer", None),
    ("decode", "no audio stream", None),
    ("decode", "not decodable media", None),
    ("too_long", "audio over 21600 s", None),
    ("http_timeout", "read timed out after 30 s", None),
)
SPAN_S = 50 * 3600.0
MODEL = "jonatasgrosman/wav2vec2-large-xlsr-53-russian"


def rows(total: int, now: float, model_id: str = MODEL, seed: int = 1) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(seed)
    vector = bytes(64 * 4)
    n_done = total * 900 // 1000
    n_failed = total * 55 // 1000
    n_running = min(100, total // 100)
    workers = [f"gpu-{i}:4242:abcdef0{i}:0000000{i}" for i in range(1, 4)]
    for i in range(total):
        key = f"video-{i:07d}"
        url = f"https://media{i % 50}.example/v/{i}.mp4"
        worker = workers[i % 3]
        if i < n_done + n_failed:
            finished = now - SPAN_S + SPAN_S * i / (n_done + n_failed)
            claimed = finished - rng.uniform(5, 60)
            if i % 18 != 0 or i >= n_done + n_failed:
                duration = rng.uniform(5, 600)
                yield (
                    key, url, "done", 1, now - SPAN_S - 60, claimed, claimed, None, finished,
                    worker, vector, 64, duration, 2, duration / 300, model_id, None, None, None,
                    None, f"media{i % 50}.example", 1,
                )  # fmt: skip
            else:
                error_class, error, status = FAILURES[rng.randrange(len(FAILURES))]
                yield (
                    key, url, "failed", 3, now - SPAN_S - 60, claimed, claimed, None, finished,
                    worker, None, None, None, None, None, None, error, error_class, status,
                    None, f"media{i % 50}.example", 3,
                )  # fmt: skip
        elif i < total - n_running:
            yield (
                key, url, "pending", 1, now - SPAN_S - 60, None, None, None, None, None, None,
                None, None, None, None, None, "HTTP 503", "http_5xx", 503, now + 86_400,
                f"media{i % 50}.example", 1,
            )  # fmt: skip
        else:
            claimed = now - rng.uniform(10, 900)
            yield (
                key, url, "running", 1, now - SPAN_S - 60, claimed, claimed, now + 86_400, None,
                workers[1 + i % 2], None, None, None, None, None, None, None, None, None, None,
                f"media{i % 50}.example", 1,
            )  # fmt: skip


def fill(url: str, total: int, now: float | None = None, model_id: str = MODEL) -> float:
    """Create the schema and `total` jobs, done ones by `model_id` (a daemon of another
    model refuses to start); returns the seconds it took."""
    started = time.perf_counter()
    now = time.time() if now is None else now
    engine = connect(url)
    try:
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            if engine.dialect.name == "sqlite":
                marks = ", ".join("?" * len(COLUMNS))
                cursor.execute("BEGIN")
                cursor.executemany(
                    f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({marks})",
                    rows(total, now, model_id),
                )
                cursor.execute("COMMIT")  # and no ANALYZE: runner never runs it
            else:
                with cursor.copy(f"COPY jobs ({', '.join(COLUMNS)}) FROM STDIN") as copy:  # type: ignore[attr-defined]
                    for row in rows(total, now, model_id):
                        copy.write_row(row)
                raw.commit()
                driver = raw.driver_connection  # VACUUM needs autocommit
                driver.autocommit = True  # type: ignore[union-attr]
                driver.execute("VACUUM ANALYZE jobs")  # type: ignore[union-attr]
        finally:
            raw.close()
    finally:
        engine.dispose()
    return time.perf_counter() - started
