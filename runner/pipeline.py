"""The daemon: claim → download → decode → embed → store, as stages joined by
bounded queues.

Each stage is a named asyncio task; a slow stage fills its input queue and the
stage before it waits, so memory and disk stay bounded instead of the backlog.
Decoding runs in a thread pool (ffmpeg does the work in its own process) and
streams fixed windows, so a 2-hour video never sits in memory whole.  Exactly one
thread owns the model and embeds batches of windows gathered from many videos.

Every claimed job is tracked in `inflight` until its outcome is stored; on any
stop, whatever is still in flight is released back to pending, so nothing claimed
is ever lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine

from runner import jobs
from runner.decode import AudioStream, MediaInfo
from runner.download import DownloadLimits, download, make_session
from runner.embed import WINDOW_SAMPLES, Embedder, WindowBatcher, WindowEmbedding, WindowItem
from runner.errors import DecodeError, EmbedError, JobError
from runner.workdir import Workdir

log = logging.getLogger(__name__)


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
    decoders: int = max(1, (os.cpu_count() or 2) - 1)
    batch_seconds: float = 120.0
    limits: DownloadLimits = field(default_factory=DownloadLimits)
    poll_s: float = 2.0
    lease_s: float = 3600.0
    store_batch: int = 64


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
    failed: bool = False


@dataclass(frozen=True)
class _Decoded:
    """Marker sent after a job's last window: how many windows it had."""

    job_id: int
    windows: int
    info: MediaInfo | None = None
    error: JobError | None = None


class StageFailed(RuntimeError):
    """A stage task died; the daemon stops rather than run with a hole in the pipe."""


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
        self.worker_id = worker_id or f"{os.uname().nodename}:{os.getpid()}"
        self.stop = asyncio.Event()
        self.inflight: dict[int, _Tracked] = {}
        self._halt = threading.Event()  # tells decode threads to give up
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runner-db")
        self._model = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runner-embed")
        self._decode = concurrent.futures.ThreadPoolExecutor(
            config.decoders, thread_name_prefix="runner-decode"
        )

    # --- helpers -----------------------------------------------------------------

    async def _in_db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, lambda: fn(*args, **kwargs))

    def _finish(self, tracked: _Tracked, outcome: jobs.Outcome) -> None:
        tracked.failed = tracked.failed or outcome.failure is not None
        self.store_q.put_nowait(outcome)

    def _fail_id(self, job_id: int, error: JobError) -> None:
        tracked = self.inflight.get(job_id)
        if tracked is None or tracked.failed:
            return
        failure = jobs.Failure(
            message=str(error), error_class=error.error_class, http_status=error.http_status
        )
        self._finish(tracked, jobs.Outcome(job_id=job_id, failure=failure))

    # --- stages ------------------------------------------------------------------

    async def _claimer(self) -> None:
        cfg = self.config
        capacity = cfg.downloads * 2 + cfg.decoders * 2
        while not self.stop.is_set():
            free = capacity - len(self.inflight)
            claimed: list[jobs.Job] = []
            if free > 0:
                claimed = await self._in_db(
                    jobs.claim,
                    self.engine,
                    worker_id=self.worker_id,
                    now=time.time(),
                    limit=free,
                    lease_s=cfg.lease_s,
                )
            for job in claimed:
                self.inflight[job.id] = _Tracked(job=job, started=time.monotonic())
                await self.download_q.put(job)
            if claimed:
                continue
            if cfg.until_done and not self.inflight:
                log.info("nothing pending and nothing in flight: done")
                self.stop.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.2 if self.inflight else cfg.poll_s)

    async def _downloader(self) -> None:
        while True:
            job = await self.download_q.get()
            self.inflight[job.id].started = time.monotonic()
            dest = self.workdir.temp_path(job.id)
            try:
                await download(self.session, job.url, dest, self.config.limits)
            except JobError as exc:
                self.workdir.remove(dest)
                self._fail_id(job.id, exc)
                continue
            except BaseException:
                self.workdir.remove(dest)
                raise
            await self.decode_q.put((job, dest))

    async def _decoder(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job, path = await self.decode_q.get()
            try:
                marker = await loop.run_in_executor(
                    self._decode, self._decode_file, job, path, loop
                )
            finally:
                self.workdir.remove(path)
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
        batcher = WindowBatcher(self.embedder, self.config.batch_seconds)
        while True:
            if not batcher.pending:
                self._accept(await self.window_q.get(), batcher)
            while not self.window_q.empty() and not batcher.full:
                self._accept(self.window_q.get_nowait(), batcher)
            batch = batcher.next_batch()
            if not batch:
                continue
            try:
                parts = await loop.run_in_executor(
                    self._model, self.embedder.embed, [item.samples for item in batch]
                )
            except Exception as exc:
                log.exception("embedding a batch of %d windows failed", len(batch))
                for item in batch:
                    self._fail_id(item.job_id, EmbedError(f"embedding failed: {exc}"))
                continue
            for item, part in zip(batch, parts, strict=True):
                self._add_part(item.job_id, part)

    def _add_part(self, job_id: int, part: WindowEmbedding) -> None:
        tracked = self.inflight.get(job_id)
        if tracked is None or tracked.failed:
            return
        if tracked.frame_sum is None:
            tracked.frame_sum = part.frame_sum.copy()
        else:
            tracked.frame_sum += part.frame_sum
        tracked.frames += part.frames
        tracked.windows_done += 1
        self._maybe_complete(tracked)

    def _accept(self, item: object, batcher: WindowBatcher) -> None:
        if isinstance(item, WindowItem):
            tracked = self.inflight.get(item.job_id)
            if tracked is not None and not tracked.failed:
                batcher.add(item)
            return
        assert isinstance(item, _Decoded)
        tracked = self.inflight.get(item.job_id)
        if tracked is None:
            return
        if item.error is not None:
            self._fail_id(item.job_id, item.error)
            return
        tracked.windows_sent, tracked.info = item.windows, item.info
        self._maybe_complete(tracked)

    def _maybe_complete(self, tracked: _Tracked) -> None:
        if tracked.failed or tracked.windows_sent is None:
            return
        if tracked.windows_done < tracked.windows_sent:
            return
        assert self.embedder is not None and tracked.info is not None
        assert tracked.frame_sum is not None and tracked.frames > 0
        vector = (tracked.frame_sum / tracked.frames).astype(np.float32)
        result = jobs.Result(
            vector=vector,
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
        lost = await self._in_db(jobs.store_outcomes, self.engine, batch, now=time.time())
        for outcome in batch:
            self.inflight.pop(outcome.job_id, None)
        for job_id in lost:
            log.warning("job %s was no longer ours when its outcome was stored", job_id)
        log.debug("stored %d outcomes", len(batch))

    # --- lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        requeued = await self._in_db(jobs.requeue_running, self.engine)
        if requeued:
            log.info("returned %d jobs left running by a previous daemon to pending", requeued)
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
        self.decode_q: asyncio.Queue = asyncio.Queue(self.config.decoders)
        self.window_q: asyncio.Queue = asyncio.Queue(max(4, self.config.decoders * 2))
        self.store_q: asyncio.Queue = asyncio.Queue()
        with Workdir(self.config.workdir) as self.workdir:
            async with make_session(
                self.config.limits, connections=self.config.downloads, per_host=self.config.per_host
            ) as self.session:
                try:
                    await self._supervise()
                finally:
                    await asyncio.shield(self._shutdown())

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
        died = [
            t for t in done if t is not stopper and not t.cancelled() and t.exception() is not None
        ]
        stopper.cancel()
        if died:
            task = died[0]
            raise StageFailed(
                f"stage {task.get_name()} died: {task.exception()!r}"
            ) from task.exception()

    async def _shutdown(self) -> None:
        """Cancel the stages, keep what is already finished, release the rest."""
        self._halt.set()
        tasks = getattr(self, "tasks", [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._decode.shutdown)
        await loop.run_in_executor(None, self._model.shutdown)
        finished = []
        while not self.store_q.empty():
            finished.append(self.store_q.get_nowait())
        if finished:
            await self._store(finished)
        released = await self._in_db(jobs.release, self.engine, list(self.inflight))
        if released:
            log.info("released %d in-flight jobs back to pending", released)
        self.inflight.clear()
        self._db.shutdown()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s: stopping", sig.name)
        self.stop.set()


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
    asyncio.run(Daemon(engine, config).run())
