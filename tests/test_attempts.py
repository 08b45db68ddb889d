"""Attempts: one claim of one job, fenced by (id, worker, claim number).

A stale attempt (its lease lapsed, the job was claimed again, even by the same
worker) can write nothing; the embed loop never mixes two attempts of one job;
tries are charged at start, not at the claim; leases and backoff run on the
database's clock.  Real databases (SQLite and PostgreSQL), the real tiny model,
`now` passed in: nothing here sleeps for time to pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, select, update

from runner import catalogue, jobs, maintenance
from runner.attempt import Attempt
from runner.config import DaemonConfig
from runner.daemon import Daemon
from runner.db import connect
from runner.dbclock import read_now
from runner.decode import MediaInfo
from runner.download import HostGate
from runner.embed import Embedder, WindowItem, embed_audio
from runner.errors import JobStateError
from runner.metrics import Metrics
from runner.models import jobs as jobs_table
from runner.retry import RetryPolicy
from runner.stages.decoder import Decoded
from runner.stages.embedder import EmbedLoop
from runner.stages.inflight import Inflight
from tests.test_maintenance import dead_pid

NOW = 1_000_000.0
LEASE_S = 60.0
RATE = 16_000
#: a worker on another machine: only its lease can tell that it is gone
W = "elsewhere:4242:cafe0000:w0rker01"
FAILURE = jobs.Failure("HTTP 503 Service Unavailable", "download", http_status=503)


@pytest.fixture
def engine(any_db_url: str) -> Iterator[Engine]:
    engine = connect(any_db_url)
    yield engine
    engine.dispose()


def add_jobs(engine: Engine, urls: dict[str, str], *, now: float = NOW - 100) -> dict[str, int]:
    """Import catalogue records; returns key -> job id."""
    records = [catalogue.Record(key=key, url=url, meta={}) for key, url in urls.items()]
    with engine.begin() as conn:
        catalogue.upsert_records(conn, records, now=now)
    return {key: row["id"] for key, row in rows(engine).items()}


def rows(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {r.key: r._asdict() for r in conn.execute(select(jobs_table))}


def row_of(engine: Engine, job_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).one()._asdict()


def stored_vector(engine: Engine, job_id: int) -> np.ndarray:
    row = row_of(engine, job_id)
    return np.frombuffer(row["vector"], dtype="<f4")


def result(vector: np.ndarray | list[float], model_id: str = "m") -> jobs.Result:
    return jobs.Result(
        vector=np.asarray(vector, dtype=np.float32),
        video_duration_s=3.0,
        channels_count=2,
        processing_audio_time_s=0.5,
        model_id=model_id,
    )


def claim_one(engine: Engine, worker_id: str, now: float | None, **kw: Any) -> jobs.Job:
    [job] = jobs.claim(engine, worker_id=worker_id, now=now, limit=1, lease_s=LEASE_S, **kw)
    return job


def stale_and_fresh(engine: Engine) -> tuple[jobs.Job, jobs.Job]:
    """W claims J and starts it; the reaper takes it back after the lease; W claims
    it again.  Returns (old attempt, new attempt), the new one not started."""
    add_jobs(engine, {"j": "http://media.test/j.mp4"})
    old = jobs.start(engine, claim_one(engine, W, NOW), now=NOW)
    assert maintenance.reap(engine, now=NOW + LEASE_S + 1, max_attempts=5) == (1, 0)
    new = claim_one(engine, W, NOW + LEASE_S + 2)
    assert (new.id, new.worker_id) == (old.id, old.worker_id)
    assert new.claims > old.claims
    return old, new


# --- 1. a stale attempt writes nothing -----------------------------------------------


@pytest.mark.parametrize("via", ["store_outcomes", "complete"])
def test_stale_attempt_of_the_same_worker_writes_nothing(engine: Engine, via: str) -> None:
    old, new = stale_and_fresh(engine)
    later = NOW + LEASE_S + 3

    # before the new attempt starts: the old one can neither start nor give it back
    before = row_of(engine, old.id)
    with pytest.raises(JobStateError):
        jobs.start(engine, old, now=later)
    with pytest.raises(JobStateError), engine.begin() as conn:
        jobs.give_back(conn, old)
    assert jobs.store_outcomes(engine, [jobs.Outcome(old)], now=later) == [jobs.Outcome(old)]
    assert row_of(engine, old.id) == before

    new = jobs.start(engine, new, now=later)
    before = row_of(engine, old.id)
    assert (before["status"], before["attempts"], before["claims"]) == (
        "running",
        2,
        new.claims,
    )

    # the old attempt's every other write is refused too, and writes nothing
    with pytest.raises(JobStateError), engine.begin() as conn:
        jobs.fail(conn, old, FAILURE, now=later)
    with pytest.raises(JobStateError), engine.begin() as conn:
        jobs.retry_later(conn, old, FAILURE, delay_s=30, now=later)
    failed_old = jobs.Outcome(old, failure=FAILURE)
    retry_old = jobs.Outcome(old, failure=FAILURE, retry_after_s=30)
    assert jobs.store_outcomes(engine, [failed_old, retry_old], now=later) == [
        failed_old,
        retry_old,
    ]
    assert jobs.release(engine, [old], worker_id=W) == 0
    assert jobs.renew_leases(engine, worker_id=W, lease_s=999, held=[old], now=later) == set()
    assert row_of(engine, old.id) == before

    old_vector, new_vector = np.full(4, 7.0), np.arange(4.0)
    old_result, new_result = result(old_vector, "old"), result(new_vector, "new")
    done_old, done_new = jobs.Outcome(old, result=old_result), jobs.Outcome(new, result=new_result)
    if via == "store_outcomes":  # one batch: the stale one is reported lost, the rest stored
        assert jobs.store_outcomes(engine, [done_old, done_new], now=later) == [done_old]
    else:
        with pytest.raises(JobStateError), engine.begin() as conn:
            jobs.complete(conn, old, old_result, now=later)
        assert row_of(engine, old.id) == before
        with engine.begin() as conn:
            jobs.complete(conn, new, new_result, now=later)
    after = row_of(engine, new.id)
    assert (after["status"], after["model_id"], after["vector_dim"]) == ("done", "new", 4)
    assert (after["attempts"], after["claims"], after["finished_at"]) == (2, new.claims, later)
    np.testing.assert_array_equal(stored_vector(engine, new.id), new_vector)

    # and once the job is done the stale attempt still cannot touch it
    assert jobs.store_outcomes(engine, [done_old], now=later + 1) == [done_old]
    assert jobs.release(engine, [old], worker_id=W) == 0
    assert row_of(engine, new.id) == after


# --- 2. the embed loop never mixes attempts ----------------------------------------


def sine(freq_hz: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Wait (bounded) for the embed thread to get somewhere; polls, never waits blind."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


OLD_WINDOWS = [sine(440, 2.0), sine(1700, 3.0, amplitude=0.9)]
NEW_WINDOWS = [sine(220, 2.5, amplitude=0.3), sine(3100, 1.5)]
INFO = MediaInfo(duration_s=4.0, channels_count=1)


class GatedEmbedder:
    """The real embedder, whose forward passes wait for `go`: lets a test act while a
    batch is inside the model."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.entered, self.go = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def embed(self, windows: Any) -> Any:
        self.entered.set()
        assert self.go.wait(60), "the test never opened the gate"
        return self.inner.embed(windows)


def two_attempts(engine: Engine, embedder: Embedder) -> tuple[Attempt, Attempt, Inflight]:
    """Two attempts of one job (the old one stale), both held; checks the test can fail."""
    old_job, new_job = stale_and_fresh(engine)
    new_job = jobs.start(engine, new_job, now=NOW + LEASE_S + 3)
    # a vector pooled over both attempts' windows is clearly another one
    mixed = embed_audio(embedder, [*OLD_WINDOWS, *NEW_WINDOWS])
    assert np.abs(mixed - embed_audio(embedder, NEW_WINDOWS)).max() > 1e-3
    inflight = Inflight(retry=RetryPolicy(), hosts=HostGate())
    old, new = Attempt(old_job, charged=True), Attempt(new_job, charged=True)
    inflight.add(old)
    inflight.add(new)
    return old, new, inflight


async def run_loop(
    embedder: Any,
    inflight: Inflight,
    script: Callable[[asyncio.Queue[WindowItem | Decoded]], Awaitable[None]],
) -> Attempt:
    """A real EmbedLoop fed by `script`; returns the first attempt it finishes."""
    queue: asyncio.Queue[WindowItem | Decoded] = asyncio.Queue()
    loop = EmbedLoop(embedder, queue, inflight, Metrics(), batch_seconds=30.0)
    task = asyncio.create_task(loop.run())
    try:
        await script(queue)
        return await asyncio.wait_for(inflight.store_q.get(), timeout=60)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        loop.shutdown()


def check_only_new_finished(
    engine: Engine, embedder: Embedder, finished: Attempt, old: Attempt, new: Attempt
) -> None:
    reference = embed_audio(embedder, NEW_WINDOWS)
    assert finished is new and new.ended and new.outcome is not None
    assert (old.outcome, old.ended, old.windows_sent) == (None, False, None)
    assert (new.windows_done, new.windows_sent) == (2, 2)
    assert new.frames == sum(embedder.frames_for(len(w)) for w in NEW_WINDOWS)
    outcome_result = new.outcome.result
    assert outcome_result is not None
    np.testing.assert_allclose(outcome_result.vector, reference, atol=1e-5, rtol=0)
    # stored: the new attempt's own vector lands in the row
    assert jobs.store_outcomes(engine, [new.outcome], now=NOW + LEASE_S + 4) == []
    np.testing.assert_allclose(stored_vector(engine, new.job.id), reference, atol=1e-5, rtol=0)


def test_embed_loop_never_mixes_two_attempts_of_one_job(engine: Engine, embedder: Embedder) -> None:
    old, new, inflight = two_attempts(engine, embedder)

    async def script(queue: asyncio.Queue[WindowItem | Decoded]) -> None:
        queue.put_nowait(WindowItem(old, OLD_WINDOWS[0]))
        queue.put_nowait(WindowItem(new, NEW_WINDOWS[0]))
        await until(lambda: old.windows_done == new.windows_done == 1, "the first windows")
        inflight.drop_lost(old, "its lease was lost")  # midway: one window each done
        assert old.lost and not old.live and old not in list(inflight)
        queue.put_nowait(WindowItem(old, OLD_WINDOWS[1]))
        queue.put_nowait(WindowItem(new, NEW_WINDOWS[1]))
        queue.put_nowait(Decoded(old, windows=2, info=INFO))
        queue.put_nowait(Decoded(new, windows=2, info=INFO))

    finished = asyncio.run(run_loop(embedder, inflight, script))
    assert inflight.store_q.empty()  # the lost attempt produced no outcome
    assert old.windows_done == 1  # its window after the loss was never embedded
    check_only_new_finished(engine, embedder, finished, old, new)


def test_an_attempt_lost_during_the_forward_pass_gets_none_of_it(
    engine: Engine, embedder: Embedder
) -> None:
    """Lost while its window and the other attempt's share a batch inside the model:
    the other one keeps its part, the lost one sums nothing."""
    old, new, inflight = two_attempts(engine, embedder)
    gated = GatedEmbedder(embedder)

    async def script(queue: asyncio.Queue[WindowItem | Decoded]) -> None:
        queue.put_nowait(WindowItem(old, OLD_WINDOWS[0]))
        queue.put_nowait(WindowItem(new, NEW_WINDOWS[0]))
        await until(gated.entered.is_set, "the first batch in the model")
        inflight.drop_lost(old, "its lease was lost")
        queue.put_nowait(WindowItem(old, OLD_WINDOWS[1]))
        queue.put_nowait(WindowItem(new, NEW_WINDOWS[1]))
        queue.put_nowait(Decoded(old, windows=2, info=INFO))
        queue.put_nowait(Decoded(new, windows=2, info=INFO))
        gated.go.set()

    finished = asyncio.run(run_loop(gated, inflight, script))
    assert inflight.store_q.empty()
    assert (old.windows_done, old.frames, old.frame_sum) == (0, 0, None)
    check_only_new_finished(engine, embedder, finished, old, new)


# --- 3. a worker never claims a job it holds ---------------------------------------


def test_claim_skips_excluded_jobs_even_when_pending_and_due(engine: Engine) -> None:
    ids = add_jobs(engine, {"j1": "http://media.test/1", "j2": "http://media.test/2"})
    before = rows(engine)["j1"]
    assert before["status"] == "pending" and before["not_before"] is None
    got = jobs.claim(
        engine, worker_id=W, now=NOW, limit=10, lease_s=LEASE_S, exclude_ids={ids["j1"]}
    )
    assert [job.key for job in got] == ["j2"]
    assert rows(engine)["j1"] == before
    everything = set(ids.values())
    assert (
        jobs.claim(engine, worker_id=W, now=NOW, limit=10, lease_s=LEASE_S, exclude_ids=everything)
        == []
    )
    assert [job.key for job in claim_all(engine, W, NOW)] == ["j1"]


def claim_all(engine: Engine, worker_id: str, now: float | None) -> list[jobs.Job]:
    return jobs.claim(engine, worker_id=worker_id, now=now, limit=100, lease_s=LEASE_S)


# --- 4. tries are charged at start -------------------------------------------------


def dead_worker() -> str:
    return maintenance.worker_id_for(dead_pid(), "0badc0de")


def test_claims_that_never_start_cost_nothing_when_their_worker_dies(engine: Engine) -> None:
    ids = add_jobs(engine, {"j": "http://media.test/j"})
    for i in range(10):
        now = NOW + i * 10  # well within the lease: only the dead worker gives it away
        job = claim_one(engine, dead_worker(), now)
        assert (job.attempts, job.claims) == (0, i + 1)
        assert maintenance.reap(engine, now=now + 1, max_attempts=5) == (1, 0)
        row = row_of(engine, ids["j"])
        assert (row["status"], row["attempts"], row["worker_id"]) == ("pending", 0, None)
    assert row_of(engine, ids["j"])["error"] is None

    # even at its last try (charged by a daemon allowed more, say), a claim that never
    # started is not the video's fault: back to pending, not failed
    for i in range(5):
        started = jobs.start(engine, claim_one(engine, W, NOW + 200 + i), now=NOW + 200 + i)
        with engine.begin() as conn:
            jobs.retry_later(conn, started, FAILURE, delay_s=0, now=NOW + 200 + i)
    assert row_of(engine, ids["j"])["attempts"] == 5
    claim_one(engine, dead_worker(), NOW + 300)
    assert maintenance.reap(engine, now=NOW + 301, max_attempts=5) == (1, 0)
    row = row_of(engine, ids["j"])
    assert (row["status"], row["attempts"]) == ("pending", 5)


def test_a_video_that_kills_its_worker_runs_out_of_tries(engine: Engine) -> None:
    ids = add_jobs(engine, {"j": "http://media.test/j"})
    for i in range(5):
        now = NOW + i * 100
        # claimed ahead and never started, between the crashes: free
        claim_one(engine, dead_worker(), now)
        assert maintenance.reap(engine, now=now + 1, max_attempts=5) == (1, 0)
        assert row_of(engine, ids["j"])["attempts"] == i
        # started: charged, and charged for good when it dies with its worker
        started = jobs.start(engine, claim_one(engine, dead_worker(), now + 2), now=now + 2)
        assert started.attempts == i + 1
        expected = (1, 0) if i < 4 else (0, 1)
        assert maintenance.reap(engine, now=now + 3, max_attempts=5) == expected
    row = row_of(engine, ids["j"])
    assert (row["status"], row["attempts"], row["error_class"]) == ("failed", 5, "lost")
    assert row["error"].startswith("gave up after 5 attempts")
    assert (row["finished_at"], row["lease_expires_at"]) == (NOW + 403, None)
    assert claim_all(engine, W, NOW + 10_000) == []


def test_release_at_shutdown_gives_back_a_started_try_only(engine: Engine) -> None:
    ids = add_jobs(engine, {"a": "http://media.test/a", "b": "http://media.test/b"})
    # both tried once before and lost to the reaper: one try each on the record
    for job in claim_all(engine, W, NOW):
        jobs.start(engine, job, now=NOW)
    assert maintenance.reap(engine, now=NOW + LEASE_S + 1, max_attempts=5) == (2, 0)
    me = maintenance.new_worker_id()
    a, b = claim_all(engine, me, NOW + 100)
    assert (a.key, b.key, a.attempts, b.attempts) == ("a", "b", 1, 1)
    assert jobs.start(engine, a, now=NOW + 100).attempts == 2
    assert jobs.release(engine, None, worker_id=me) == 2
    after = rows(engine)
    for key in ("a", "b"):
        row = after[key]
        assert row["id"] == ids[key]
        assert (row["status"], row["worker_id"], row["started_at"]) == ("pending", None, None)
        assert row["lease_expires_at"] is None
    assert after["a"]["attempts"] == 1  # the interrupted try given back
    assert after["b"]["attempts"] == 1  # never started: left at its count, not below


def test_release_after_a_stage_crash_keeps_the_started_try_charged(engine: Engine) -> None:
    """A daemon stopping because a stage died may have been killed by the video it
    held: its try stays charged, so such a video still runs out of tries."""
    add_jobs(engine, {"a": "http://media.test/a", "b": "http://media.test/b"})
    me = maintenance.new_worker_id()
    a, _b = claim_all(engine, me, NOW)
    jobs.start(engine, a, now=NOW)
    assert jobs.release(engine, None, worker_id=me, refund=False) == 2
    after = rows(engine)
    assert (after["a"]["status"], after["a"]["attempts"]) == ("pending", 1)
    assert (after["b"]["status"], after["b"]["attempts"]) == ("pending", 0)


def test_a_video_that_crashes_its_daemon_runs_out_of_tries(engine: Engine) -> None:
    """Each crash keeps the try charged; once the last one is used the crash's own
    release fails the job as the reaper would, instead of a crash loop."""
    add_jobs(engine, {"a": "http://media.test/a"})
    me = maintenance.new_worker_id()
    for crash in range(1, 4):
        [job] = claim_all(engine, me, NOW + crash)
        jobs.start(engine, job, now=NOW + crash)
        jobs.release(engine, None, worker_id=me, refund=False, max_attempts=3)
        row = rows(engine)["a"]
        if crash < 3:
            assert (row["status"], row["attempts"]) == ("pending", crash)
    assert (row["status"], row["attempts"], row["error_class"]) == ("failed", 3, "lost")
    assert row["error"].startswith("gave up after 3 attempts")
    assert claim_all(engine, me, NOW + 10) == []


def test_a_daemons_own_reaper_spares_the_attempts_it_works_on(engine: Engine) -> None:
    """Its heartbeat held up behind a long write (an import's transaction), a daemon
    must not reap its own live jobs; a claim it does not know of (the reply was
    lost) and other workers' expired claims are reaped as usual."""
    add_jobs(engine, {k: f"http://media.test/{k}" for k in "abc"})
    me = maintenance.new_worker_id()
    a, b = jobs.claim(engine, worker_id=me, now=NOW, limit=2, lease_s=LEASE_S)
    other = claim_one(engine, "elsewhere:1:x:y", NOW)
    stale = dataclasses.replace(b, claims=b.claims - 1)  # an older claim of b: no shield
    later = NOW + LEASE_S + 1
    assert maintenance.reap(engine, now=later, max_attempts=5, spare=[a, stale]) == (2, 0)
    after = rows(engine)
    assert (after["a"]["status"], after["a"]["worker_id"]) == ("running", me)
    assert after["b"]["status"] == after[other.key]["status"] == "pending"


# --- 5. the database's clock -------------------------------------------------------


def test_leases_and_backoff_use_the_database_clock(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = add_jobs(engine, {"j": "http://media.test/j"})
    t0 = read_now(engine)
    job = claim_one(engine, W, None)
    t1 = read_now(engine)
    row = row_of(engine, ids["j"])
    assert t0 - 2 <= row["claimed_at"] <= t1 + 2
    assert t0 + LEASE_S - 2 <= row["lease_expires_at"] <= t1 + LEASE_S + 2

    # this machine's clock an hour ahead: the reaper still reads the database's
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    assert maintenance.reap(engine, now=None, max_attempts=5) == (0, 0)
    assert jobs.requeue_abandoned(engine, max_attempts=5, now=None) == (0, 0)
    monkeypatch.undo()
    assert row_of(engine, ids["j"])["status"] == "running"
    db_now = read_now(engine)
    assert jobs.requeue_abandoned(engine, max_attempts=5, now=db_now + LEASE_S + 1) == (1, 0)

    # backoff: not_before on the database's clock, and the claim honours it
    job = claim_one(engine, W, None)
    t0 = read_now(engine)
    with engine.begin() as conn:
        jobs.retry_later(conn, job, FAILURE, delay_s=30, now=None)
    db_now = read_now(engine)
    row = row_of(engine, ids["j"])
    assert (row["status"], row["worker_id"], row["error"]) == ("pending", None, FAILURE.message)
    assert t0 + 30 - 2 <= row["not_before"] <= db_now + 30 + 2
    assert claim_all(engine, W, None) == []
    assert claim_all(engine, W, row["not_before"] - 0.5) == []
    assert [j.id for j in claim_all(engine, W, db_now + 31)] == [ids["j"]]


# --- 6. hosts in backoff are skipped by the claim ----------------------------------


def test_claim_skips_hosts_and_leaves_their_rows_untouched(engine: Engine) -> None:
    ids = add_jobs(
        engine,
        {
            "a1": "http://a.test/1.mp4",
            "b1": "http://B.test:80/1.mp4",
            "a2": "http://a.test/2.mp4?x=1",
            "b2": "http://b.test/2.mp4",
        },
    )
    before = rows(engine)
    assert {k: r["host"] for k, r in before.items()} == {
        "a1": "a.test",
        "b1": "b.test",
        "a2": "a.test",
        "b2": "b.test",
    }
    got = jobs.claim(engine, worker_id=W, now=NOW, limit=10, lease_s=LEASE_S, skip_hosts=["a.test"])
    assert [job.id for job in got] == [ids["b1"], ids["b2"]]
    after = rows(engine)
    assert after["a1"] == before["a1"] and after["a2"] == before["a2"]
    assert {after[k]["status"] for k in ("b1", "b2")} == {"running"}
    # the backoff over, the host's jobs are claimed as usual
    assert [job.key for job in claim_all(engine, W, NOW + 1)] == ["a1", "a2"]


# --- 7. the daemon's heartbeat drops an attempt whose lease was lost ---------------


def test_heartbeat_drops_an_attempt_whose_job_was_claimed_again(
    engine: Engine, embedder: Embedder, tmp_path: Path
) -> None:
    ids = add_jobs(engine, {"lost": "http://media.test/l", "kept": "http://media.test/k"})
    daemon = Daemon(engine, DaemonConfig(model_id="unused", workdir=tmp_path), embedder=embedder)
    try:
        lost_job, kept_job = claim_all(engine, daemon.worker_id, None)
        lost, kept = Attempt(lost_job), Attempt(kept_job)
        daemon.inflight.add(lost)
        daemon.inflight.add(kept)
        # behind its back the job goes back to pending and is claimed again, by the
        # same worker id even (a new claim number): the attempt in hand is stale
        with engine.begin() as conn:
            conn.execute(
                update(jobs_table)
                .where(jobs_table.c.id == ids["lost"])
                .values(status="pending", worker_id=None, lease_expires_at=None)
            )
        again = claim_one(engine, daemon.worker_id, None, exclude_ids={ids["kept"]})
        assert (again.id, again.claims) == (ids["lost"], lost_job.claims + 1)
        lease_of_again = row_of(engine, ids["lost"])["lease_expires_at"]
        t0 = read_now(engine)

        asyncio.run(daemon.heartbeat())

        assert lost.lost and not lost.live
        assert list(daemon.inflight) == [kept]
        assert not kept.lost and kept.live
        assert daemon.inflight.held_ids() == {ids["kept"]}
        assert row_of(engine, ids["lost"])["lease_expires_at"] == lease_of_again
        kept_row = row_of(engine, ids["kept"])
        assert kept_row["lease_expires_at"] >= t0 + daemon.config.lease_s - 2
        assert (kept_row["status"], kept_row["worker_id"]) == ("running", daemon.worker_id)
    finally:
        daemon.db.close()
