"""The daemon: claim → download → decode → embed → store, as stages joined by
bounded queues.

Each stage is a named asyncio task; a slow stage fills its input queue and the
stage before it waits, so memory and disk stay bounded instead of the backlog.
Decoding runs in a thread pool (ffmpeg does the work in its own process) and
streams fixed windows, so a 2-hour video never sits in memory whole.  Exactly one
thread owns the model and embeds batches of windows gathered from many videos.

Every claimed job is tracked in `inflight` until its outcome is stored; on any
stop, whatever is still in flight is released back to pending, so nothing claimed
is ever lost.  If any stage dies, all stop: a pipeline with a hole in it would
only strand jobs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np
import sqlalchemy.exc
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import Engine

from runner import jobs, maintenance
from runner.decode import AudioStream, MediaInfo
from runner.download import DownloadLimits, HostGate, download, make_session
from runner.embed import (
    WINDOW_SAMPLES,
    Embedder,
    WindowBatcher,
    WindowEmbedding,
    WindowItem,
    default_batch_seconds,
)
from runner.errors import DecodeError, DownloadError, EmbedError, JobError, TransientDownloadError
from runner.metrics import Metrics
from runner.progress import Progress, read_counts
from runner.retry import RetryPolicy
from runner.workdir import Workdir

if TYPE_CHECKING:
    from runner.api import ApiConfig

log = logging.getLogger(__name__)

#: waits between tries of a database call that failed with OperationalError
DB_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0)


def _default_decoders() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True)
class DaemonConfig:
    model_id: str
    workdir: Path
    device: str = "auto"
    dtype: str = "auto"
    compile_model: bool = False
    until_done: bool = False
    downloads: int = 8
    per_host: int = 4
    decoders: int = field(default_factory=_default_decoders)
    #: audio-seconds per model batch; None: the device's default (see embed.py)
    batch_seconds: float | None = None
    limits: DownloadLimits = field(default_factory=DownloadLimits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: downloaded-but-undecoded files waiting on disk: at most this many / bytes
    prefetch_files: int = 4
    prefetch_bytes: int = 2 << 30
    poll_s: float = 2.0
    lease_s: float = 120.0
    reap_every_s: float = 30.0
    #: on the first SIGINT/SIGTERM, how long in-flight jobs may take to finish
    grace_s: float = 30.0
    store_batch: int = 64
    #: without a terminal, one progress line in the log this often
    log_every_s: float = 60.0
    #: a live tqdm bar on stderr instead of log lines (the CLI turns it on for a tty)
    progress_bar: bool = False
    #: False for `runner serve`: no jobs from the database, only the HTTP API's
    claim_jobs: bool = True
    #: serve the HTTP API (runner/api.py) beside the stages
    api: ApiConfig | None = None


@dataclass
class _Tracked:
    """Per-job bookkeeping, touched only on the event-loop thread."""

    job: jobs.Job
    started: float
    frame_sum: np.ndarray | None = None
    frames: int = 0
    windows_done: int = 0
    windows_sent: int | None = None  # known once decoding ended
    info: MediaInfo | None = None
    ended: bool = False  # its outcome is queued for storing
    #: an ad-hoc job (encode_url): its outcome resolves this instead of being stored
    reply: asyncio.Future | None = None


@dataclass(frozen=True)
class _Decoded:
    """Marker sent after a job's last window: how many windows it had."""

    job_id: int
    windows: int
    info: MediaInfo | None = None
    error: JobError | None = None


class StageFailed(RuntimeError):
    """A stage task died; the daemon stops rather than run with a hole in the pipe."""


class Stopping(RuntimeError):
    """The daemon is stopping and takes no new ad-hoc work."""


class ByteBudget:
    """Bytes of downloaded files waiting for a decoder; downloads wait when full.

    A single file larger than the whole budget still goes through, alone.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._changed = asyncio.Event()

    async def acquire(self, n_bytes: int) -> None:
        while self.used_bytes and self.used_bytes + n_bytes > self.limit_bytes:
            self._changed.clear()
            await self._changed.wait()
        self.used_bytes += n_bytes

    def release(self, n_bytes: int) -> None:
        self.used_bytes -= n_bytes
        self._changed.set()


class Daemon:
    def __init__(
        self,
        engine: Engine,
        config: DaemonConfig,
        *,
        embedder: Embedder | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.embedder = embedder
        self.worker_id = worker_id or maintenance.new_worker_id()
        self.stop = asyncio.Event()
        self.draining = False
        self.inflight: dict[int, _Tracked] = {}
        self.hosts = HostGate()
        self.tasks: list[asyncio.Task] = []
        self.metrics = Metrics()
        #: session for ad-hoc (API) downloads, guarded against private addresses
        self.adhoc_session: aiohttp.ClientSession | None = None
        self.api_url: str | None = None  # set once the HTTP API listens
        self._adhoc_ids = itertools.count(-1, -1)  # never a database id
        self._halt = threading.Event()  # tells decode threads to give up
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runner-db")
        self._model = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runner-embed")
        self._decode = concurrent.futures.ThreadPoolExecutor(
            config.decoders, thread_name_prefix="runner-decode"
        )
        self.progress = Progress(
            started=time.time(), bar_file=sys.stderr if config.progress_bar else None
        )

    # --- outcomes ----------------------------------------------------------------

    async def _in_db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn` on the database thread; ride out a database that is briefly gone.

        A PostgreSQL failover or a dropped connection raises OperationalError; the
        daemon retries with backoff for about a minute and a half (within the
        default lease) before it lets the error stop it.  Retrying is safe: every
        state change is guarded, so a repeat of one that did commit matches no row
        and is reported as no longer ours.
        """
        loop = asyncio.get_running_loop()
        for delay_s in DB_RETRY_DELAYS_S:
            try:
                return await loop.run_in_executor(self._db, lambda: fn(*args, **kwargs))
            except sqlalchemy.exc.OperationalError as exc:
                reason = str(exc.orig or exc).splitlines()[0]
                log.warning(
                    "database error in %s: %s; retrying in %g s", fn.__name__, reason, delay_s
                )
                await asyncio.sleep(delay_s)
        return await loop.run_in_executor(self._db, lambda: fn(*args, **kwargs))

    def _finish(self, tracked: _Tracked, outcome: jobs.Outcome) -> None:
        tracked.ended = True
        if tracked.reply is not None:
            message = outcome.failure.message if outcome.failure else "no result"
            error = TransientDownloadError(message, http_status=503)
            self._answer(tracked, outcome.result or error)
            return
        self.store_q.put_nowait(outcome)

    def _answer(self, tracked: _Tracked, value: jobs.Result | JobError) -> None:
        """End an ad-hoc job: its caller gets the result or the error, nothing is stored."""
        tracked.ended = True
        self.inflight.pop(tracked.job.id, None)
        reply = tracked.reply
        if reply is None or reply.done():
            return
        if isinstance(value, JobError):
            reply.set_exception(value)
        else:
            reply.set_result(value)

    def _job_error(self, job_id: int, error: JobError) -> None:
        """Retry a transient error later, fail a permanent one (or the last try)."""
        tracked = self.inflight.get(job_id)
        if tracked is None or tracked.ended:
            return
        if tracked.reply is not None:
            self._answer(tracked, error)  # ad-hoc: no retries, the caller decides
            return
        policy, attempts = self.config.retry, tracked.job.attempts
        failure = jobs.Failure(
            message=str(error), error_class=error.error_class, http_status=error.http_status
        )
        if error.transient and not policy.gives_up(attempts):
            delay_s = policy.delay_s(attempts, retry_after_s=error.retry_after_s)
            if error.backs_off_host:
                self.hosts.back_off(tracked.job.url, until=time.time() + delay_s)
            log.info(
                "job %s: %s; retry %d/%d in %.0f s",
                tracked.job.key,
                error,
                attempts + 1,
                policy.max_attempts,
                delay_s,
            )
            outcome = jobs.Outcome(job_id, failure=failure, retry_at=time.time() + delay_s)
        else:
            if error.transient:
                failure = dataclasses.replace(
                    failure, message=f"gave up after {attempts} attempts: {error}"
                )
            outcome = jobs.Outcome(job_id, failure=failure)
        self._finish(tracked, outcome)

    def _defer(self, tracked: _Tracked, until: float) -> None:
        """Its host is backing off: back to pending, the attempt given back."""
        failure = jobs.Failure(
            message="host is backing off after HTTP 429/503", error_class=DownloadError.error_class
        )
        self._finish(
            tracked, jobs.Outcome(tracked.job.id, failure=failure, retry_at=until, uncounted=True)
        )

    # --- stages ------------------------------------------------------------------

    async def _claimer(self) -> None:
        cfg = self.config
        capacity = cfg.downloads + cfg.prefetch_files + cfg.decoders * 2
        while not self.stop.is_set():
            if not self.draining and self.config.claim_jobs and await self._claim(capacity):
                continue
            if not self.inflight and await self._drained():
                self.stop.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.2 if self.inflight else cfg.poll_s)

    async def _drained(self) -> bool:
        """Nothing in flight: done if draining, or if --until-done and nothing is
        pending, not even a job waiting out its retry backoff."""
        if self.draining:
            log.info("in-flight jobs finished: stopping")
            return True
        if not self.config.until_done:
            return False
        if await self._in_db(jobs.count_pending, self.engine):
            return False
        log.info("nothing pending and nothing in flight: done")
        return True

    async def _claim(self, capacity: int) -> bool:
        free = capacity - len(self.inflight)
        if free <= 0:
            return False
        claimed = await self._in_db(
            jobs.claim,
            self.engine,
            worker_id=self.worker_id,
            now=time.time(),
            limit=free,
            lease_s=self.config.lease_s,
        )
        for job in claimed:  # all tracked before any wait: a stop may come at the put
            self.inflight[job.id] = _Tracked(job=job, started=time.monotonic())
        for job in claimed:
            await self.download_q.put(job)
        return bool(claimed)

    async def _downloader(self) -> None:
        while True:
            job = await self.download_q.get()
            tracked = self.inflight.get(job.id)
            if tracked is None:
                continue
            until = self.hosts.blocked_until(job.url, now=time.time())
            if until is not None:
                self._defer(tracked, until)
                continue
            tracked.started = time.monotonic()
            await self._download(job)

    async def _download(self, job: jobs.Job) -> None:
        dest = self.workdir.temp_path(job.id)
        session = self.adhoc_session if job.id < 0 and self.adhoc_session else self.session
        started = time.monotonic()
        try:
            got = await download(session, job.url, dest, self.config.limits)
        except JobError as exc:
            self.workdir.remove(dest)
            self._job_error(job.id, exc)
            return
        except BaseException:
            self.workdir.remove(dest)
            raise
        self.metrics.downloaded(got.size_bytes, time.monotonic() - started)
        if job.id not in self.inflight:  # an ad-hoc caller gave up meanwhile
            self.workdir.remove(dest)
            return
        await self.prefetch.acquire(got.size_bytes)
        await self.decode_q.put((job, dest, got.size_bytes))

    async def _decoder(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job, path, size_bytes = await self.decode_q.get()
            started = time.monotonic()
            try:
                marker = await loop.run_in_executor(
                    self._decode, self._decode_file, job, path, loop
                )
            finally:
                self.workdir.remove(path)
                self.prefetch.release(size_bytes)
            self.metrics.decode_s.observe(time.monotonic() - started)
            await self.window_q.put(marker)

    def _decode_file(self, job: jobs.Job, path: Path, loop: asyncio.AbstractEventLoop) -> _Decoded:
        """Runs on a decode thread; blocks on the bounded window queue for backpressure."""
        sent = 0
        try:
            with AudioStream(path, WINDOW_SAMPLES) as stream:
                for window in stream:
                    if len(window) < self.min_window_samples:
                        continue  # a tail too short to yield a frame adds nothing
                    self._put_threadsafe(WindowItem(job.id, window), loop)
                    sent += 1
                info = stream.info
            if sent == 0:
                raise DecodeError(f"audio too short to embed ({stream.samples_total} samples)")
        except JobError as exc:
            return _Decoded(job.id, sent, error=exc)
        return _Decoded(job.id, sent, info=info)

    def _put_threadsafe(self, item: object, loop: asyncio.AbstractEventLoop) -> None:
        future = asyncio.run_coroutine_threadsafe(self.window_q.put(item), loop)
        while True:
            try:
                future.result(timeout=0.2)
                return
            except concurrent.futures.TimeoutError:
                if self._halt.is_set():
                    future.cancel()
                    raise asyncio.CancelledError("daemon is stopping") from None

    async def _embedder(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.embedder is not None
        batch_s = self.config.batch_seconds or default_batch_seconds(self.embedder.device)
        batcher = WindowBatcher(self.embedder, batch_s)
        while True:
            if not batcher.pending:
                self._accept(await self.window_q.get(), batcher)
            while not self.window_q.empty() and not batcher.full:
                self._accept(self.window_q.get_nowait(), batcher)
            batch = batcher.next_batch()
            if not batch:
                continue
            started = time.monotonic()
            try:
                parts = await loop.run_in_executor(
                    self._model, self.embedder.embed, [item.samples for item in batch]
                )
            except Exception as exc:  # one bad batch must not stop the daemon
                log.exception("embedding a batch of %d windows failed", len(batch))
                for item in batch:
                    self._job_error(item.job_id, EmbedError(f"embedding failed: {exc}"))
                continue
            finally:
                self.metrics.embedded(time.monotonic() - started)
            for item, part in zip(batch, parts, strict=True):
                self._add_part(item.job_id, part)

    def _accept(self, item: object, batcher: WindowBatcher) -> None:
        if isinstance(item, WindowItem):
            tracked = self.inflight.get(item.job_id)
            if tracked is not None and not tracked.ended:
                batcher.add(item)
            return
        assert isinstance(item, _Decoded)
        tracked = self.inflight.get(item.job_id)
        if tracked is None:
            return
        if item.error is not None:
            self._job_error(item.job_id, item.error)
            return
        tracked.windows_sent, tracked.info = item.windows, item.info
        self._maybe_complete(tracked)

    def _add_part(self, job_id: int, part: WindowEmbedding) -> None:
        tracked = self.inflight.get(job_id)
        if tracked is None or tracked.ended:
            return
        if tracked.frame_sum is None:
            tracked.frame_sum = part.frame_sum.copy()
        else:
            tracked.frame_sum += part.frame_sum
        tracked.frames += part.frames
        tracked.windows_done += 1
        self._maybe_complete(tracked)

    def _maybe_complete(self, tracked: _Tracked) -> None:
        if tracked.ended or tracked.windows_sent is None:
            return
        if tracked.windows_done < tracked.windows_sent:
            return
        assert self.embedder is not None and tracked.info is not None
        assert tracked.frame_sum is not None and tracked.frames > 0
        result = jobs.Result(
            vector=(tracked.frame_sum / tracked.frames).astype(np.float32),
            video_duration_s=tracked.info.duration_s,
            channels_count=tracked.info.channels_count,
            processing_audio_time_s=time.monotonic() - tracked.started,
            model_id=self.embedder.model_id,
        )
        self._finish(tracked, jobs.Outcome(job_id=tracked.job.id, result=result))

    async def _storer(self) -> None:
        while True:
            batch = [await self.store_q.get()]
            while not self.store_q.empty() and len(batch) < self.config.store_batch:
                batch.append(self.store_q.get_nowait())
            await self._store(batch)

    async def _store(self, batch: list[jobs.Outcome]) -> None:
        lost = await self._in_db(
            jobs.store_outcomes, self.engine, batch, worker_id=self.worker_id, now=time.time()
        )
        for outcome in batch:
            self.inflight.pop(outcome.job_id, None)
            if outcome.job_id not in lost:
                self.metrics.job_outcome(outcome)
        self.progress.record(batch, now=time.time())
        for job_id in lost:
            log.warning("job %s was no longer ours when its outcome was stored", job_id)

    # --- maintenance -------------------------------------------------------------

    async def _heartbeat(self) -> None:
        await self._in_db(
            maintenance.heartbeat,
            self.engine,
            worker_id=self.worker_id,
            now=time.time(),
            lease_s=self.config.lease_s,
            job_ids=[job_id for job_id in self.inflight if job_id > 0],
        )

    async def _reap(self) -> None:
        await self._in_db(
            maintenance.reap,
            self.engine,
            now=time.time(),
            max_attempts=self.config.retry.max_attempts,
        )

    def _scheduler(self, loop: asyncio.AbstractEventLoop) -> AsyncIOScheduler:
        scheduler = AsyncIOScheduler(event_loop=loop)
        common = {"trigger": "interval", "max_instances": 1, "coalesce": True}
        scheduler.add_job(
            self._heartbeat,
            id="heartbeat",
            name="renew leases",
            seconds=max(0.5, self.config.lease_s / 4),
            **common,
        )
        scheduler.add_job(
            self._reap,
            id="reaper",
            name="requeue abandoned jobs",
            seconds=max(0.5, self.config.reap_every_s),
            **common,
        )
        scheduler.add_job(
            self._report_progress,
            id="progress",
            name="show progress",
            seconds=1.0 if self.progress.has_bar else max(0.1, self.config.log_every_s),
            **common,
        )
        return scheduler

    async def _report_progress(self) -> None:
        counts = await self._in_db(read_counts, self.engine)
        self.progress.show(counts, now=time.time())

    # --- lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        await self._reap()
        if self.embedder is None:
            cfg = self.config
            self.embedder = await loop.run_in_executor(
                self._model,
                lambda: Embedder(
                    cfg.model_id,
                    device=cfg.device,
                    dtype=cfg.dtype,
                    compile_model=cfg.compile_model,
                ),
            )
        self.min_window_samples = _min_window_samples(self.embedder)
        self.download_q: asyncio.Queue = asyncio.Queue(self.config.downloads)
        self.decode_q: asyncio.Queue = asyncio.Queue(self.config.prefetch_files)
        self.window_q: asyncio.Queue = asyncio.Queue(max(4, self.config.decoders * 2))
        self.store_q: asyncio.Queue = asyncio.Queue()
        self.prefetch = ByteBudget(self.config.prefetch_bytes)
        scheduler = self._scheduler(loop)
        with Workdir(self.config.workdir) as self.workdir:
            async with make_session(
                self.config.limits, connections=self.config.downloads, per_host=self.config.per_host
            ) as self.session:
                scheduler.start()
                try:
                    async with self._serving():
                        await self._supervise()
                finally:
                    scheduler.shutdown(wait=False)
                    await asyncio.shield(self._shutdown())

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        """The HTTP API, when configured, for as long as the stages run."""
        if self.config.api is None:
            yield
            return
        from runner.api import serve_api

        async with serve_api(self, self.config.api):
            yield

    # --- ad-hoc jobs (the HTTP API) ----------------------------------------------

    async def encode_url(self, url: str) -> jobs.Result:
        """Run one URL through the same download → decode → embed stages, outside the
        database: a negative id in `inflight` whose outcome resolves a future instead
        of going to the store.  Raises the JobError that ended it, or Stopping."""
        if self.draining or self.stop.is_set():
            raise Stopping("the daemon is stopping")
        job = jobs.Job(id=next(self._adhoc_ids), key="", url=url, attempts=0)
        reply: asyncio.Future = asyncio.get_running_loop().create_future()
        self.inflight[job.id] = _Tracked(job=job, started=time.monotonic(), reply=reply)
        try:
            await self.download_q.put(job)
            return await reply
        finally:  # cancelled (timeout, client gone): the stages drop it
            tracked = self.inflight.pop(job.id, None)
            if tracked is not None:
                tracked.ended = True

    def abandon_adhoc(self, reason: str) -> None:
        for tracked in [t for t in self.inflight.values() if t.reply is not None]:
            tracked.ended = True
            self.inflight.pop(tracked.job.id, None)
            if tracked.reply is not None and not tracked.reply.done():
                tracked.reply.set_exception(Stopping(reason))

    def queue_depths(self) -> dict[str, int]:
        return {
            "download": self.download_q.qsize(),
            "decode": self.decode_q.qsize(),
            "window": self.window_q.qsize(),
            "store": self.store_q.qsize(),
            "inflight": len(self.inflight),
        }

    async def _supervise(self) -> None:
        stages: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "claim": self._claimer,
            "embed": self._embedder,
            "store": self._storer,
            **{f"download-{i}": self._downloader for i in range(self.config.downloads)},
            **{f"decode-{i}": self._decoder for i in range(self.config.decoders)},
        }
        self.tasks = [asyncio.create_task(make(), name=name) for name, make in stages.items()]
        stopper = asyncio.create_task(self.stop.wait(), name="stop")
        done, _ = await asyncio.wait([*self.tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        died = [
            t for t in done if t is not stopper and not t.cancelled() and t.exception() is not None
        ]
        if died:
            task = died[0]
            raise StageFailed(
                f"stage {task.get_name()} died: {task.exception()!r}"
            ) from task.exception()

    async def _shutdown(self) -> None:
        """Cancel the stages, keep what is already finished, release the rest."""
        self._halt.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._decode.shutdown)
        await loop.run_in_executor(None, self._model.shutdown)
        finished = []
        while not self.store_q.empty():
            finished.append(self.store_q.get_nowait())
        if finished:
            await self._store(finished)
        self.abandon_adhoc("the daemon stopped")
        released = await self._in_db(jobs.release, self.engine, None, worker_id=self.worker_id)
        if released:
            log.info("released %d in-flight job(s) back to pending", released)
        self.inflight.clear()
        await self._report_progress()
        self.progress.close()
        self._db.shutdown()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig, loop)

    def _on_signal(self, sig: signal.Signals, loop: asyncio.AbstractEventLoop) -> None:
        """First signal: stop claiming, let in-flight jobs finish within the grace
        period.  Second signal (or no grace): release everything now."""
        if self.draining or self.config.grace_s <= 0:
            log.info("received %s: releasing in-flight jobs now", sig.name)
            self.stop.set()
            return
        log.info(
            "received %s: finishing %d in-flight job(s) within %g s; signal again to stop at once",
            sig.name,
            len(self.inflight),
            self.config.grace_s,
        )
        self.draining = True
        loop.call_later(self.config.grace_s, self.stop.set)


def _min_window_samples(embedder: Embedder) -> int:
    """Fewest samples that still give one output frame (the conv receptive field)."""
    low, high = 1, 16_000
    while low < high:
        middle = (low + high) // 2
        if embedder.frames_for(middle) > 0:
            high = middle
        else:
            low = middle + 1
    return low


def run_daemon(engine: Engine, config: DaemonConfig) -> None:
    with _logs_around_bar(config.progress_bar):
        asyncio.run(Daemon(engine, config).run())


def _logs_around_bar(bar: bool) -> contextlib.AbstractContextManager[Any]:
    """Log lines printed over a live bar would tear it; tqdm writes them above it."""
    if not bar:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()
