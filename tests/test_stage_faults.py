"""Faults inside the embed and store stages: one bad video, or one bad row, must
fail only itself, and the stage must go on.

The model is never mocked: `FlakyEmbedder` wraps the real tiny Wav2Vec2 and only
raises (a crash on a "poison" window, out of memory on too big a batch) before
handing every other batch to the real model.  The store runs on a real database
(SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import sqlalchemy.exc
import torch
from aiohttp import web
from sqlalchemy import Engine, select

from runner import catalogue, jobs
from runner.attempt import Attempt
from runner.db import connect
from runner.dbthread import DbThread
from runner.decode import MediaInfo
from runner.download import DownloadLimits, HostGate, make_session
from runner.embed import WINDOW_SAMPLES, Embedder, WindowEmbedding, WindowItem, embed_audio
from runner.errors import DownloadError, LocalError
from runner.metrics import Metrics
from runner.models import jobs as jobs_table
from runner.progress import Progress
from runner.retry import RetryPolicy
from runner.stages.decoder import Decoded
from runner.stages.downloader import ByteBudget, Downloader
from runner.stages.embedder import MAX_FAILED_ALONE_IN_A_ROW, EmbedLoop, ModelBroken
from runner.stages.inflight import Inflight
from runner.stages.store import STORE_ERROR_CLASS, Store
from runner.workdir import Workdir
from tests.conftest import MediaServer
from tests.threaded_server import serve_in_thread

WORKER = "test-worker"
#: a window whose first sample is exactly this crashes the model
POISON = np.float32(0.123456)
#: a window whose first sample is exactly this never fits in device memory
TOO_BIG = np.float32(0.654321)
TIMEOUT_S = 60.0


class FlakyEmbedder:
    """The real embedder, with faults injected in front of its `embed`."""

    def __init__(self, real: Embedder, *, max_windows: int | None = None) -> None:
        self.real = real
        self.max_windows = max_windows
        self.device, self.model_id, self.hidden_size = real.device, real.model_id, real.hidden_size
        self.batch_key, self.frames_for = real.batch_key, real.frames_for
        #: windows per call, in order
        self.calls: list[int] = []

    def embed(self, windows: Sequence[np.ndarray]) -> list[WindowEmbedding]:
        self.calls.append(len(windows))
        if any(w[0] == POISON for w in windows):
            raise RuntimeError("boom")
        if any(w[0] == TOO_BIG for w in windows):
            raise torch.OutOfMemoryError("CUDA out of memory")
        if self.max_windows is not None and len(windows) > self.max_windows:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return self.real.embed(windows)


def make_job(n: int, *, attempts: int = 1) -> jobs.Job:
    url = f"http://media.test/v{n}"
    return jobs.Job(id=n, key=f"v{n}", url=url, attempts=attempts, claims=1, worker_id=WORKER)


def windows_for(n: int, count: int, *, first: np.float32 | None = None) -> list[np.ndarray]:
    """`count` windows of a few thousand samples, of different lengths, seeded by `n`."""
    rng = np.random.default_rng(n)
    windows = [
        rng.uniform(-0.5, 0.5, 8_000 + 1_000 * ((n + i) % 4)).astype(np.float32)
        for i in range(count)
    ]
    if first is not None:
        windows[0][0] = first
    return windows


async def run_embed_loop(
    embedder: Any, videos: Sequence[tuple[Attempt, list[np.ndarray]]], *, batch_seconds: float
) -> tuple[EmbedLoop, dict[str, jobs.Outcome]]:
    """Feed every video's windows and its Decoded marker, then run a real EmbedLoop
    until every attempt has an outcome on the store queue."""
    inflight = Inflight(retry=RetryPolicy(), hosts=HostGate())
    queue: asyncio.Queue[WindowItem | Decoded] = asyncio.Queue()
    loop = EmbedLoop(embedder, queue, inflight, Metrics(), batch_seconds=batch_seconds)
    for attempt, windows in videos:
        inflight.add(attempt)
        for window in windows:
            queue.put_nowait(WindowItem(attempt, window))
        info = MediaInfo(duration_s=len(windows) * 0.5, channels_count=1)
        queue.put_nowait(Decoded(attempt, len(windows), info=info))
    task = asyncio.create_task(loop.run())
    outcomes: dict[str, jobs.Outcome] = {}
    try:
        while len(outcomes) < len(videos):
            get = asyncio.ensure_future(inflight.store_q.get())
            done, _ = await asyncio.wait(
                {get, task}, timeout=TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
            if get not in done:
                get.cancel()
                if task in done:
                    task.result()  # raises what killed the loop
                raise AssertionError(f"no outcome within {TIMEOUT_S} s; got {sorted(outcomes)}")
            attempt = get.result()
            assert attempt.ended and attempt.outcome is not None
            assert attempt.job.key not in outcomes, "an attempt ended twice"
            outcomes[attempt.job.key] = attempt.outcome
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        loop.shutdown()
    assert inflight.store_q.empty()
    return loop, outcomes


def assert_embedded(
    embedder: Embedder, outcome: jobs.Outcome, windows: list[np.ndarray], model_id: str
) -> None:
    assert outcome.kind == "done" and outcome.result is not None, outcome
    expected = embed_audio(embedder, windows)
    np.testing.assert_allclose(outcome.result.vector, expected, atol=1e-5, rtol=0)
    assert outcome.result.vector.dtype == np.float32
    assert outcome.result.model_id == model_id


# --- the embed stage ------------------------------------------------------------


def test_a_poisoned_video_fails_alone_and_the_rest_of_its_batch_completes(
    embedder: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakyEmbedder(embedder)
    videos = [
        (Attempt(job=make_job(n)), windows_for(n, 2, first=POISON if n == 2 else None))
        for n in range(5)
    ]
    with caplog.at_level(logging.WARNING, logger="runner.stages.embedder"):
        _, outcomes = asyncio.run(run_embed_loop(flaky, videos, batch_seconds=30.0))

    assert flaky.calls[0] == 10, "all five videos were to share the first batch"
    assert flaky.calls[1:] == [2] * 5, "each video then tried alone, once"
    bad = outcomes["v2"]
    assert bad.kind == "failed" and bad.result is None and bad.failure is not None
    assert bad.failure.error_class == "embed"
    assert bad.retry_after_s is None
    assert "boom" in bad.failure.message
    for attempt, windows in videos:
        if attempt.job.key != "v2":
            assert_embedded(embedder, outcomes[attempt.job.key], windows, embedder.model_id)
    assert "embedding job v2 failed alone: boom" in caplog.text


def test_out_of_memory_shrinks_the_batch_and_every_video_still_completes(
    embedder: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakyEmbedder(embedder, max_windows=2)
    videos = [(Attempt(job=make_job(n)), windows_for(n, 3)) for n in range(5)]
    batch_seconds = 240.0
    with caplog.at_level(logging.WARNING, logger="runner.stages.embedder"):
        loop, outcomes = asyncio.run(run_embed_loop(flaky, videos, batch_seconds=batch_seconds))

    assert flaky.calls[0] == 15
    assert max(flaky.calls) > 2 and min(flaky.calls) <= 2
    for attempt, windows in videos:
        assert_embedded(embedder, outcomes[attempt.job.key], windows, embedder.model_id)
    assert loop.batcher.budget_samples < int(batch_seconds * 16_000)
    assert loop.batcher.budget_samples >= WINDOW_SAMPLES
    assert "out of memory on a batch of 15 windows: batch budget halved" in caplog.text
    assert "failed alone" not in caplog.text


@pytest.mark.parametrize("attempts", [1, RetryPolicy().max_attempts])
def test_a_window_that_never_fits_fails_its_video_as_transient(
    embedder: Embedder, attempts: int
) -> None:
    """Out of memory on one window alone is not the video's fault: retried later,
    unless that was its last try."""
    flaky = FlakyEmbedder(embedder, max_windows=2)
    videos = [
        (Attempt(job=make_job(0, attempts=attempts)), windows_for(0, 3, first=TOO_BIG)),
        (Attempt(job=make_job(1)), windows_for(1, 3)),
    ]
    loop, outcomes = asyncio.run(run_embed_loop(flaky, videos, batch_seconds=30.0))

    assert loop.batcher.budget_samples == WINDOW_SAMPLES  # 30 s cannot shrink further
    bad = outcomes["v0"]
    assert bad.result is None and bad.failure is not None
    assert bad.failure.error_class == "embed"
    assert "out of memory" in bad.failure.message
    if attempts < RetryPolicy().max_attempts:
        assert bad.kind == "retry"
        assert bad.retry_after_s is not None and bad.retry_after_s > 0
    else:
        assert bad.kind == "failed" and bad.retry_after_s is None
        assert bad.failure.message.startswith(f"gave up after {attempts} attempts")
    assert_embedded(embedder, outcomes["v1"], videos[1][1], embedder.model_id)


# --- the store stage ------------------------------------------------------------


@pytest.fixture
def engine(any_db_url: str) -> Iterator[Engine]:
    engine = connect(any_db_url)
    yield engine
    engine.dispose()


def claimed(engine: Engine, n: int) -> list[jobs.Job]:
    records = [
        catalogue.Record(key=f"k{i}", url=f"http://media.test/k{i}", meta={}) for i in range(n)
    ]
    with engine.begin() as conn:
        catalogue.upsert_records(conn, records, now=0.0)
    got = jobs.claim(engine, worker_id=WORKER, limit=n, lease_s=3600)
    assert len(got) == n
    return got


def result(vector: Any) -> jobs.Result:
    return jobs.Result(
        vector=vector,
        video_duration_s=2.0,
        channels_count=1,
        processing_audio_time_s=0.1,
        model_id="tiny",
    )


def good_vector(i: int) -> np.ndarray:
    return np.arange(4, dtype=np.float32) + i


def rows(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {r.key: r for r in conn.execute(select(jobs_table))}


def assert_done(row: Any, vector: np.ndarray) -> None:
    assert row.status == "done", (row.status, row.error)
    assert row.vector_dim == len(vector)
    np.testing.assert_array_equal(np.frombuffer(row.vector, dtype="<f4"), vector)


def assert_store_failed(row: Any) -> None:
    assert row.status == "failed"
    assert row.error_class == STORE_ERROR_CLASS
    assert row.error.startswith("could not store the outcome"), row.error
    assert row.vector is None and row.http_status is None


class StoreRig:
    def __init__(self, engine: Engine, *, batch_size: int = 10) -> None:
        self.db = DbThread(engine, retry_delays_s=())
        self.inflight = Inflight(retry=RetryPolicy(), hosts=HostGate())
        self.metrics = Metrics()
        self.store = Store(
            self.db,
            self.inflight,
            self.metrics,
            Progress(started=0, bar_file=None),
            batch_size=batch_size,
        )

    def attempt(self, job: jobs.Job) -> Attempt:
        attempt = Attempt(job=job, charged=True)
        self.inflight.add(attempt)
        return attempt

    def succeed(self, job: jobs.Job, vector: Any) -> Attempt:
        attempt = self.attempt(job)
        self.inflight.succeed(attempt, result(vector))
        return attempt

    def finished(self, outcome: str, error_class: str = "") -> float:
        labels = {"outcome": outcome, "error_class": error_class}
        return self.metrics.registry.get_sample_value("runner_jobs_finished_total", labels) or 0.0


BAD_VECTORS = {
    "text": np.array(["not a number"]),
    "2-D": np.zeros((2, 4), dtype=np.float32),
    "empty": np.zeros(0, dtype=np.float32),
}


@pytest.mark.parametrize("bad", ["text", "2-D"])
def test_store_writes_row_by_row_when_one_outcome_cannot_be_written(
    engine: Engine, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    first, middle, last = claimed(engine, 3)
    rig = StoreRig(engine)
    attempts = [
        rig.succeed(first, good_vector(0)),
        rig.succeed(middle, BAD_VECTORS[bad]),
        rig.succeed(last, good_vector(2)),
    ]
    assert len(rig.inflight) == 3
    try:
        with caplog.at_level(logging.WARNING, logger="runner.stages.store"):
            asyncio.run(rig.store.write(attempts))
    finally:
        rig.db.close()

    stored = rows(engine)
    assert_done(stored["k0"], good_vector(0))
    assert_done(stored["k2"], good_vector(2))
    assert_store_failed(stored["k1"])
    assert len(rig.inflight) == 0
    assert "writing 3 outcomes failed" in caplog.text


def test_an_unstorable_outcome_is_counted_as_a_store_failure(db_url: str) -> None:
    engine = connect(db_url)
    job, other = claimed(engine, 2)
    rig = StoreRig(engine)
    attempts = [rig.succeed(job, BAD_VECTORS["empty"]), rig.succeed(other, good_vector(1))]
    try:
        asyncio.run(rig.store.write(attempts))
    finally:
        rig.db.close()
        engine.dispose()
    assert rig.finished("done") == 1
    assert rig.finished("failed", STORE_ERROR_CLASS) == 1


def test_a_database_error_on_one_outcome_fails_only_that_job(engine: Engine) -> None:
    """An http_status beyond a 4-byte integer: PostgreSQL refuses the row (DataError,
    not OperationalError), SQLite takes it as it is."""
    good, bad, other = claimed(engine, 3)
    rig = StoreRig(engine)
    refused = rig.attempt(bad)
    rig.inflight.error(refused, DownloadError("gone", http_status=2**40))
    attempts = [rig.succeed(good, good_vector(0)), refused, rig.succeed(other, good_vector(2))]
    try:
        asyncio.run(rig.store.write(attempts))
    finally:
        rig.db.close()

    stored = rows(engine)
    assert_done(stored["k0"], good_vector(0))
    assert_done(stored["k2"], good_vector(2))
    if engine.dialect.name == "postgresql":
        assert_store_failed(stored["k1"])
        assert "out of range" in stored["k1"].error
    else:
        assert stored["k1"].status == "failed"
        assert stored["k1"].error_class == "download"
        assert stored["k1"].http_status == 2**40
    assert len(rig.inflight) == 0


def test_store_stage_keeps_running_after_a_bad_batch(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    jobs_ = claimed(engine, 4)
    rig = StoreRig(engine, batch_size=2)
    rig.succeed(jobs_[0], BAD_VECTORS["text"])  # the first batch: bad, good
    for i, job in enumerate(jobs_[1:], start=1):
        rig.succeed(job, good_vector(i))

    async def run() -> None:
        task = asyncio.create_task(rig.store.run())
        rig.store.drain()
        await asyncio.wait_for(task, TIMEOUT_S)  # returns normally: nothing raised

    try:
        with caplog.at_level(logging.WARNING, logger="runner.stages.store"):
            asyncio.run(run())
    finally:
        rig.db.close()

    stored = rows(engine)
    assert_store_failed(stored["k0"])
    for i in (1, 2, 3):
        assert_done(stored[f"k{i}"], good_vector(i))
    assert "writing 2 outcomes failed" in caplog.text  # the first batch, and only it
    assert caplog.text.count("one by one") == 1
    assert len(rig.inflight) == 0
    assert rig.store.leftovers() == []


def test_a_batch_the_dead_database_did_not_take_is_written_at_shutdown(
    db_url: str, tmp_path: Any
) -> None:
    """The store task dies on a database that is gone for good (OperationalError
    after its retries): the batch it was writing is not lost with it, the shutdown
    finds it in `leftovers()` and writes it once a database answers."""
    engine = connect(db_url)
    first, second = claimed(engine, 2)
    rig = StoreRig(engine)
    rig.succeed(first, good_vector(1))
    rig.succeed(second, good_vector(2))
    attempts = [rig.store.queue.get_nowait() for _ in range(2)]  # as `run` takes them
    gone = connect(f"sqlite:///{tmp_path / 'gone.db'}")
    gone.dispose()
    (tmp_path / "gone.db").unlink()
    (tmp_path / "gone.db").mkdir()  # a directory: SQLite cannot open it
    rig.store.db = DbThread(gone, retry_delays_s=())
    with pytest.raises(sqlalchemy.exc.OperationalError):
        asyncio.run(rig.store.write(attempts))
    leftovers = rig.store.leftovers()
    assert leftovers == attempts
    assert rig.store.leftovers() == []  # handed over once

    rig.store.db = rig.db
    asyncio.run(rig.store.write(leftovers))
    stored = rows(engine)
    assert_done(stored[first.key], good_vector(1))
    assert_done(stored[second.key], good_vector(2))
    assert len(rig.inflight) == 0
    engine.dispose()


def test_a_model_that_fails_every_video_alone_stops_the_embed_stage(
    embedder: Embedder,
) -> None:
    """A broken device (a CUDA error poisons every later call) must not fail the
    whole catalogue one video at a time: after MAX_FAILED_ALONE_IN_A_ROW videos fail
    alone with nothing embedded in between, the stage dies and so the daemon stops."""
    flaky = FlakyEmbedder(embedder)
    count = MAX_FAILED_ALONE_IN_A_ROW + 2
    videos = [(Attempt(job=make_job(n)), windows_for(n, 1, first=POISON)) for n in range(count)]
    with pytest.raises(ModelBroken, match="in a row failed alone"):
        asyncio.run(run_embed_loop(flaky, videos, batch_seconds=30.0))


def make_downloader(
    session: Any, limits: DownloadLimits, workdir: Workdir, tmp_path: Any, *, per_host: int
) -> Downloader:
    """A real download stage with its own queues, for ad-hoc attempts (no database)."""
    return Downloader(
        DbThread(connect(f"sqlite:///{tmp_path / 'unused.db'}")),
        Inflight(retry=RetryPolicy(), hosts=HostGate()),
        HostGate(),
        session,
        limits,
        workdir,
        ByteBudget(1 << 30),
        asyncio.Queue(),
        asyncio.Queue(),
        Metrics(),
        per_host=per_host,
    )


def test_a_local_disk_error_fails_the_attempt_not_the_downloader(
    server: MediaServer, tmp_path: Any
) -> None:
    """Our own disk refusing the download (here: the daemon's temp directory is
    gone) is a transient 'local' error of that attempt; the stage goes on."""

    async def main() -> Any:
        limits = DownloadLimits()
        with Workdir(tmp_path / "work") as workdir:
            shutil.rmtree(workdir.path)
            async with make_session(limits, connections=2, per_host=2) as session:
                downloader = make_downloader(session, limits, workdir, tmp_path, per_host=2)
                inflight, queue_in = downloader.inflight, downloader.queue_in
                task = asyncio.create_task(downloader.run())
                replies = []
                for n in range(2):  # the second one proves the stage survived the first
                    job = make_job(-1 - n, attempts=0)
                    reply = asyncio.get_running_loop().create_future()
                    attempt = Attempt(
                        job=dataclasses.replace(job, url=server.url("media/song.mp3")), reply=reply
                    )
                    inflight.add(attempt)
                    queue_in.put_nowait(attempt)
                    replies.append(reply)
                done = await asyncio.wait_for(
                    asyncio.gather(*replies, return_exceptions=True), TIMEOUT_S
                )
                assert not task.done()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return done

    errors = asyncio.run(main())
    for error in errors:
        assert isinstance(error, LocalError), error
        assert error.transient and error.error_class == "local"
        assert "writing the download failed" in str(error)


def stalling_app() -> web.Application:
    """Headers and a first chunk at once, then nothing for a minute."""

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        response.content_length = 1 << 20
        await response.prepare(request)
        await response.write(b"\0" * 4096)
        await asyncio.sleep(60)
        return response

    app = web.Application()
    app.router.add_get("/stall", stall)
    return app


def test_dropping_an_attempt_cancels_its_download_and_frees_the_slot(
    server: MediaServer, tmp_path: Any
) -> None:
    """An attempt whose lease was lost (or whose caller left) stops downloading at
    once: the one download slot is free for the next attempt within a second, not
    after the read timeout, and no temp file stays behind."""

    async def main(stall_url: str) -> tuple[float, Any]:
        limits = DownloadLimits(read_timeout_s=30)
        with Workdir(tmp_path / "work") as workdir:
            async with make_session(limits, connections=1, per_host=1) as session:
                downloader = make_downloader(session, limits, workdir, tmp_path, per_host=1)
                inflight, queue_in, out = downloader.inflight, downloader.queue_in, downloader.out
                task = asyncio.create_task(downloader.run())  # one slot: one task
                loop = asyncio.get_running_loop()
                stalled, good = (
                    Attempt(
                        job=dataclasses.replace(make_job(-1 - n, attempts=0), url=url),
                        reply=loop.create_future(),
                    )
                    for n, url in enumerate([stall_url, server.url("media/song.mp3")])
                )
                for attempt in (stalled, good):
                    inflight.add(attempt)
                    queue_in.put_nowait(attempt)
                while stalled.transfer is None or not any(workdir.path.glob("*.part")):
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)  # well inside the stalled body
                dropped_at = loop.time()
                inflight.drop_lost(stalled, "its lease was lost")
                got = await asyncio.wait_for(out.get(), TIMEOUT_S)
                took_s = loop.time() - dropped_at
                assert not task.done()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                leftover = [p.name for p in workdir.path.glob("*.part")]
                assert leftover == [got.path.name], leftover  # only the good one's file
                return took_s, got

    with serve_in_thread(stalling_app(), name="stalling-server") as base_url:
        took_s, got = asyncio.run(main(f"{base_url}/stall"))
    assert got.attempt.job.id == -2 and got.size_bytes > 0
    assert took_s < 5, took_s  # not the 30 s read timeout


class OverflowingEmbedder(FlakyEmbedder):
    """The real model's output, with one frame sum overflowed to Inf (as float16 does)."""

    def embed(self, windows: Sequence[np.ndarray]) -> list[WindowEmbedding]:
        parts = self.real.embed(windows)
        for i, window in enumerate(windows):
            if window[0] == POISON:
                overflowed = parts[i].frame_sum.copy()
                overflowed[0] = np.inf
                parts[i] = WindowEmbedding(frame_sum=overflowed, frames=parts[i].frames)
        return parts


def test_a_non_finite_embedding_fails_its_video_and_is_never_stored(embedder: Embedder) -> None:
    videos = [
        (Attempt(job=make_job(n)), windows_for(n, 2, first=POISON if n == 1 else None))
        for n in range(3)
    ]
    _, outcomes = asyncio.run(
        run_embed_loop(OverflowingEmbedder(embedder), videos, batch_seconds=30.0)
    )
    bad = outcomes["v1"]
    assert bad.result is None and bad.failure is not None
    assert bad.failure.error_class == "embed" and "not finite" in bad.failure.message
    for attempt, windows in videos:
        if attempt.job.key != "v1":
            assert_embedded(embedder, outcomes[attempt.job.key], windows, embedder.model_id)


def test_a_hostile_retry_after_fails_its_url_not_the_downloader(tmp_path: Any) -> None:
    """A 429 whose Retry-After overflows the date parser used to escape download()
    and kill the stage (and the daemon, at every restart): it is a transient 429."""

    async def throttle(request: web.Request) -> web.Response:
        headers = {"Retry-After": "1 Jan 2020 0:0:0 +99999999999999999999"}
        return web.Response(status=429, headers=headers)

    app = web.Application()
    app.router.add_get("/x", throttle)

    async def main(url: str) -> Any:
        limits = DownloadLimits()
        with Workdir(tmp_path / "work") as workdir:
            async with make_session(limits, connections=1, per_host=1) as session:
                downloader = make_downloader(session, limits, workdir, tmp_path, per_host=1)
                task = asyncio.create_task(downloader.run())
                reply = asyncio.get_running_loop().create_future()
                job = dataclasses.replace(make_job(-1, attempts=0), url=url)
                attempt = Attempt(job=job, reply=reply)
                downloader.inflight.add(attempt)
                downloader.queue_in.put_nowait(attempt)
                error = (await asyncio.wait_for(asyncio.gather(reply, return_exceptions=True), 30))[
                    0
                ]
                assert not task.done()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return error

    with serve_in_thread(app, name="hostile-retry-after") as base_url:
        error = asyncio.run(main(f"{base_url}/x"))
    assert isinstance(error, DownloadError) and error.transient, error
    assert error.http_status == 429 and error.retry_after_s is None
