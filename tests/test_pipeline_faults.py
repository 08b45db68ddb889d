"""Faults around the pipeline's edges: many kills while jobs are claimed ahead, a
host that throttles everything, and a stop while the store cannot write.

1. Ten SIGKILLs, with the default --max-attempts: a claim charges no try, only a
   started download does, so jobs claimed ahead of a kill cost nothing, and every
   job's tries are exactly the kills that caught it started, plus its last run.
2. A host that answers 429 with Retry-After: 3600 ahead of 100,000 jobs does not
   hold up another host's jobs behind them, gets a handful of requests, and its
   rows are left alone (no backoff written row by row).
3. A graceful stop while SQLite's write lock is held elsewhere: results already
   computed are written once the lock is free (done), the rest is given back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from runner.config import DaemonConfig
from runner.daemon import Daemon
from runner.db import connect
from runner.embed import Embedder
from runner.urls import host_of
from tests.hitserver import killed_at_exit, make_corpus, serving
from tests.test_crash import start_daemon, wait_for
from tests.threaded_server import serve_in_thread


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """30 distinct one-second clips, made once for the module."""
    return make_corpus(tmp_path_factory.mktemp("faults-media"), 30)


def insert_jobs(db: Path, urls: dict[str, str]) -> None:
    """Jobs straight into the table (the schema made by `connect`), ids in dict order."""
    connect(f"sqlite:///{db}").dispose()
    now = time.time()
    with sqlite3.connect(db, timeout=60) as conn:
        conn.executemany(
            "INSERT INTO jobs (key, url, host, status, attempts, claims, created_at)"
            " VALUES (?, ?, ?, 'pending', 0, 0, ?)",
            ((key, url, host_of(url), now) for key, url in urls.items()),
        )


def query(db: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(db, timeout=60) as conn:
        return conn.execute(sql, args).fetchall()


def log_tail(tmp_path: Path) -> str:
    return (tmp_path / "daemon.log").read_text()[-3000:]


# --- 1. ten SIGKILLs within a minute ---------------------------------------------

#: capacity = 2 downloads + 8 prefetch + 2 x 1 decoder: 12 claimed at a time
AHEAD = ("--downloads=2", "--prefetch-files=8", "--decoders=1")
DOWNLOADS = 2
CLAIMED_BY = "SELECT 1 FROM jobs WHERE worker_id LIKE ? LIMIT 1"
#: seconds from the daemon's first claim to its SIGKILL: mid-download, with files
#: waiting for the decoder, mid-decode; never two short ones in a row, so the jobs
#: at the head of the queue get done
KILL_AFTER_CLAIM_S = (0.3, 1.4, 0.7, 1.6, 0.4, 1.1, 0.8, 1.5, 0.5, 1.0)
#: more than two slots can download in those 9.3 s at half a second each
KILL_JOBS = 45


def test_ten_sigkills_cost_only_the_tries_really_started(
    tmp_path: Path, tiny_model: Path, clips: dict[str, Path]
) -> None:
    db = tmp_path / "kills.db"
    workdir = tmp_path / "work"
    started_at_kill: collections.Counter[str] = collections.Counter()
    snapshots: list[tuple[int, int]] = []  # (running, of which never started) at each kill
    with serving(clips) as server:
        server.pause_s = 0.5  # each download takes about half a second
        names = sorted(clips)
        urls = {f"k{i:02d}": server.url(names[i % len(names)]) for i in range(KILL_JOBS)}
        insert_jobs(db, urls)
        for after_s in KILL_AFTER_CLAIM_S:
            daemon = start_daemon(f"sqlite:///{db}", tiny_model, workdir, *AHEAD)
            with killed_at_exit(daemon):
                mine = f"%:{daemon.pid}:%"
                wait_for(lambda mine=mine: bool(query(db, CLAIMED_BY, mine)), timeout_s=60)
                time.sleep(after_s)
                assert daemon.poll() is None, log_tail(tmp_path)
                os.kill(daemon.pid, signal.SIGKILL)
                daemon.wait(30)
            rows = query(db, "SELECT key, started_at FROM jobs WHERE status = 'running'")
            started_at_kill.update(key for key, started in rows if started is not None)
            snapshots.append((len(rows), sum(started is None for _, started in rows)))
        assert query(db, "SELECT count(*) FROM jobs WHERE status = 'done'")[0][0] < len(urls)

        final = start_daemon(f"sqlite:///{db}", tiny_model, workdir, *AHEAD, "--until-done")
        with killed_at_exit(final):
            final.wait(120)
    assert final.returncode == 0, log_tail(tmp_path)

    # claims ahead were really held when the kills came: more than the downloads,
    # some of them never started
    assert max(running for running, _ in snapshots) > DOWNLOADS, snapshots
    assert any(unstarted for _, unstarted in snapshots), snapshots
    assert query(db, "SELECT status, count(*) FROM jobs GROUP BY status") == [("done", len(urls))]
    # a try is charged by each start, and by nothing else
    attempts = dict(query(db, "SELECT key, attempts FROM jobs"))
    assert attempts == {key: 1 + started_at_kill[key] for key in urls}, snapshots
    assert max(attempts.values()) < 5  # the default --max-attempts was never in reach
    assert not [p for p in workdir.rglob("*") if p.is_file() and p.name != ".lock"]


# --- 2. a throttled host ahead of 100,000 jobs ---------------------------------------

THROTTLED_JOBS = 100_000
PER_HOST = 4  # the daemon's default --per-host
#: more download slots than one host may use: the throttled host must still get at
#: most PER_HOST requests, not one per slot
THROTTLE_DOWNLOADS = 16
CLAIM_AHEAD = THROTTLE_DOWNLOADS + 4 + 2 * 1  # 4 prefetch files, 1 decoder


@contextlib.contextmanager
def throttling() -> Iterator[tuple[str, collections.Counter[str]]]:
    """A real server answering every request 429, Retry-After: 3600."""
    hits: collections.Counter[str] = collections.Counter()

    async def throttle(request: web.Request) -> web.Response:
        hits[request.path] += 1
        return web.Response(status=429, headers={"Retry-After": "3600"}, text="slow down")

    app = web.Application()
    app.router.add_get("/{tail:.*}", throttle)
    with serve_in_thread(app, name="throttling-server") as base_url:
        yield base_url, hits


def test_throttled_host_does_not_hold_up_another_host(
    tmp_path: Path, tiny_model: Path, clips: dict[str, Path]
) -> None:
    db = tmp_path / "throttled.db"
    b_files = dict(sorted(clips.items())[:10])
    with throttling() as (a_base, a_hits), serving(b_files) as b_server:
        # B is the same server reached by another name: a host of its own
        b_base = b_server.base_url.replace("127.0.0.1", "localhost")
        a_urls = {f"a{i:06d}": f"{a_base}/v/{i}.mp4" for i in range(THROTTLED_JOBS)}
        b_urls = {f"b{i:02d}": f"{b_base}/v/{name}" for i, name in enumerate(b_files)}
        insert_jobs(db, {**a_urls, **b_urls})
        hosts = dict(query(db, "SELECT substr(key, 1, 1), host FROM jobs GROUP BY 1"))
        assert hosts == {"a": "127.0.0.1", "b": "localhost"}
        assert query(db, "SELECT max(id) FROM jobs WHERE host = '127.0.0.1'")[0][0] < min(
            query(db, "SELECT min(id) FROM jobs WHERE host = 'localhost'")[0]
        )

        daemon = start_daemon(
            f"sqlite:///{db}", tiny_model, tmp_path / "work", f"--downloads={THROTTLE_DOWNLOADS}"
        )
        began = time.monotonic()
        with killed_at_exit(daemon):
            b_done = "SELECT count(*) FROM jobs WHERE host = 'localhost' AND status = 'done'"
            wait_for(lambda: query(db, b_done)[0][0] == len(b_urls), timeout_s=60)
            took_s = time.monotonic() - began
            time.sleep(1.0)  # a moment more, for any request to A that would still come
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
        assert daemon.returncode == 0, log_tail(tmp_path)
        a_requests = sum(a_hits.values())
        b_requests = {name: b_server.hits_of(name) for name in b_files}

    assert 1 <= a_requests <= PER_HOST, a_requests
    assert set(b_requests.values()) == {1}, b_requests
    a_rows = "FROM jobs WHERE host = '127.0.0.1'"
    assert query(db, f"SELECT status, count(*) {a_rows} GROUP BY status") == [
        ("pending", THROTTLED_JOBS)
    ]
    # each request charged one try and rescheduled its job an hour out; the few
    # other A jobs claimed were given back untouched, and nothing else was written
    assert query(db, f"SELECT sum(attempts) {a_rows}")[0][0] == a_requests
    assert query(db, f"SELECT count(*) {a_rows} AND not_before IS NOT NULL")[0][0] == a_requests
    touched = query(db, f"SELECT count(*) {a_rows} AND claims > 0")[0][0]
    assert a_requests <= touched <= CLAIM_AHEAD + 2, touched
    assert query(db, "SELECT count(*) FROM jobs WHERE status = 'running'") == [(0,)]
    assert took_s < 60


# --- 3. a graceful stop drains the store stage -----------------------------------------


async def until(predicate: Callable[[], bool], task: asyncio.Task, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert not task.done(), task.result()
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def test_graceful_stop_writes_results_queued_behind_a_locked_database(
    tmp_path: Path, tiny_model: Path, embedder: Embedder, clips: dict[str, Path]
) -> None:
    db = tmp_path / "drain.db"
    workdir = tmp_path / "work"
    hold_s = 1.5
    with serving(dict(sorted(clips.items())[:8])) as server:
        server.pause_s = 0.4
        insert_jobs(db, {f"k{i}": server.url(name) for i, name in enumerate(sorted(server.files))})
        config = DaemonConfig(
            model_id=str(tiny_model),
            workdir=workdir,
            device="cpu",
            downloads=2,
            decoders=1,
            prefetch_files=1,
            batch_seconds=8,
            grace_s=0.3,
        )
        engine = connect(f"sqlite:///{db}")
        blocker = sqlite3.connect(db, timeout=30, isolation_level=None)
        seen: dict[str, Any] = {}

        def computed(daemon: Daemon) -> set[str]:
            """Held attempts whose result is computed: queued for, or in, a store write."""
            return {
                a.job.key
                for a in daemon.inflight
                if a.ended and a.outcome is not None and a.outcome.result is not None
            }

        async def main() -> None:
            daemon = Daemon(engine, config, embedder=embedder)
            task = asyncio.create_task(daemon.run())
            # a download has begun (its try is committed): now take SQLite's write lock
            await until(lambda: any(a.charged for a in daemon.inflight), task)
            blocker.execute("BEGIN IMMEDIATE")
            # a result is computed, and the store cannot write it
            await until(lambda: bool(computed(daemon)), task)
            seen["computed"], seen["depths"] = computed(daemon), daemon.queue_depths()
            asyncio.get_running_loop().call_later(hold_s, blocker.execute, "ROLLBACK")
            signalled = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(task, 60)
            seen["stop_s"] = time.monotonic() - signalled
            seen["draining"] = daemon.lifecycle.draining

        try:
            asyncio.run(main())
        finally:
            blocker.close()
            engine.dispose()

    assert seen["draining"]  # a graceful stop, its grace period cut short by the lock
    assert seen["stop_s"] >= hold_s - 0.1, seen  # it waited for the store's write
    states = {k: (s, a) for k, s, a in query(db, "SELECT key, status, attempts FROM jobs")}
    done = {k for k, (s, _) in states.items() if s == "done"}
    assert seen["computed"] <= done, (seen, states)  # written, not given back
    assert all(states[k][1] == 1 for k in done), states
    rest = {states[k] for k in states.keys() - done}
    assert rest <= {("pending", 0)}, states  # released, interrupted tries given back
    assert not list(workdir.iterdir())
