"""The daemon: wires the stages with bounded queues, supervises them, stops them.

    claimer ──Attempt──▶ downloaders ──file──▶ decoder pool ──windows──▶ embed loop
       ▲                                                                    │
       └──────── capacity (attempts held) ◀── store ◀──outcome (Attempt)────┘

Each stage is a class in `runner.stages` with `async run()`, run as named tasks;
a slow stage fills its input queue and the stage before it waits, so memory and
disk stay bounded instead of the backlog.  If any stage dies, all stop: a
pipeline with a hole in it would only strand jobs.  On a stop the store stage is
drained before anything is released, so a finished result is never given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import Engine

from runner import jobs, maintenance
from runner.attempt import Attempt
from runner.config import DaemonConfig
from runner.counts import FOLD_EVERY_S, try_fold_counts
from runner.dbthread import DbThread
from runner.download import HostGate, make_session
from runner.embed import Embedder, WindowItem, default_batch_seconds
from runner.errors import StageFailed, Stopping
from runner.headline import HeadlineCache
from runner.metrics import Metrics
from runner.progress import Progress
from runner.spec import check_guard, record_for_serve
from runner.stages.claimer import Claimer
from runner.stages.decoder import Decoded, DecoderPool
from runner.stages.downloader import ByteBudget, Downloaded, Downloader
from runner.stages.embedder import EmbedLoop, model_thread
from runner.stages.inflight import Inflight
from runner.stages.lifecycle import Lifecycle
from runner.stages.store import Store
from runner.workdir import Workdir

log = logging.getLogger(__name__)

#: something that runs beside the stages for as long as they run (the HTTP API)
Service = Callable[["Daemon"], AbstractAsyncContextManager[Any]]


class Daemon:
    def __init__(
        self,
        engine: Engine,
        config: DaemonConfig,
        *,
        embedder: Embedder | None = None,
        worker_id: str | None = None,
        services: Sequence[Service] = (),
    ) -> None:
        self.engine = engine
        self.config = config
        self.embedder = embedder
        self.services = services
        self.worker_id = worker_id or maintenance.new_worker_id()
        self.lifecycle = Lifecycle()
        self.hosts = HostGate()
        self.inflight = Inflight(retry=config.retry, hosts=self.hosts)
        self.metrics = Metrics()
        self.db = DbThread(engine)
        self._model_thread = model_thread()
        self.api_url: str | None = None  # set once the HTTP API listens
        self.tasks: list[asyncio.Task] = []
        #: a stage died: the tries of what is held stay charged (see jobs.release)
        self.crashed = False
        self._adhoc_ids = itertools.count(-1, -1)  # never a database id
        self.started_at = time.time()
        self.progress = Progress(
            started=self.started_at, bar_file=sys.stderr if config.progress_bar else None
        )
        #: counts and rates shared by the bar, /metrics and /status (runner.headline)
        self.headlines = HeadlineCache()
        #: job_counts' highest id after this daemon's last fold (runner/counts.py)
        self._counts_folded_to = 0
        self.download_q: asyncio.Queue[Attempt] = asyncio.Queue(config.downloads)
        self.decode_q: asyncio.Queue[Downloaded] = asyncio.Queue(config.prefetch_files)
        self.window_q: asyncio.Queue[WindowItem | Decoded] = asyncio.Queue(
            max(4, config.decoders * 2)
        )

    @property
    def stop(self) -> asyncio.Event:
        return self.lifecycle.stop

    @property
    def stopping(self) -> bool:
        return self.lifecycle.stopping

    # --- lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        await self._reap()
        await self._fold_counts()  # what an import or a stopped daemon left to fold
        if self.embedder is None:
            self.embedder = await loop.run_in_executor(self._model_thread, self._load_model)
        await self._check_spec(self.embedder)
        scheduler = self._scheduler(loop)
        with Workdir(self.config.workdir) as workdir:
            async with self._session() as session, self._session(guarded=True) as guarded:
                self._build_stages(session, guarded, workdir, self.embedder)
                scheduler.start()
                try:
                    async with contextlib.AsyncExitStack() as services:
                        for service in self.services:
                            await services.enter_async_context(service(self))
                        await self._supervise()
                finally:
                    scheduler.shutdown(wait=False)
                    await asyncio.shield(self._shutdown())

    def _session(self, *, guarded: bool = False) -> aiohttp.ClientSession:
        cfg = self.config
        guard = cfg.url_guard if guarded else None
        return make_session(
            cfg.limits, connections=cfg.downloads, per_host=cfg.per_host, guard=guard
        )

    def _load_model(self) -> Embedder:
        cfg = self.config
        return Embedder(
            cfg.model_id,
            device=cfg.device,
            dtype=cfg.dtype,
            compile_model=cfg.compile_model,
            layer=cfg.layer,
            pooling=cfg.pooling,
        )

    async def _check_spec(self, embedder: Embedder) -> None:
        """A daemon that stores vectors refuses to add them to those of another
        embedding spec (runner/spec.py), before it claims anything."""
        spec = getattr(embedder, "spec", None)  # test doubles may wrap no real model
        if spec is None:
            return
        if not self.config.claim_jobs:  # `runner serve`: stores no vectors, never refused
            warning = await self.db.call(record_for_serve, spec)
            if warning:
                log.warning("%s", warning)
            log.info("embedding spec: %s", spec.describe())
            return
        try:
            await self.db.call(check_guard, spec)
        except BaseException:
            self.db.close()
            raise
        log.info("embedding spec: %s", spec.describe())

    def _build_stages(
        self,
        session: aiohttp.ClientSession,
        guarded: aiohttp.ClientSession,
        workdir: Workdir,
        embedder: Embedder,
    ) -> None:
        cfg = self.config
        prefetch = ByteBudget(cfg.prefetch_bytes)
        self.claimer = Claimer(
            self.db,
            cfg,
            self.inflight,
            self.hosts,
            self.download_q,
            self.lifecycle,
            worker_id=self.worker_id,
        )
        self.downloader = Downloader(
            self.db,
            self.inflight,
            self.hosts,
            session,
            cfg.limits,
            workdir,
            prefetch,
            self.download_q,
            self.decode_q,
            self.metrics,
            per_host=cfg.per_host,
            guarded_session=guarded,
            guard_catalogue=cfg.guard_catalogue,
        )
        self.decoders = DecoderPool(
            cfg.decoders,
            self.decode_q,
            self.window_q,
            prefetch,
            workdir,
            self.metrics,
            min_window_samples=min_window_samples(embedder),
            max_audio_s=cfg.max_audio_s,
        )
        batch_s = cfg.batch_seconds or default_batch_seconds(embedder.device)
        self.embed_loop = EmbedLoop(
            embedder,
            self.window_q,
            self.inflight,
            self.metrics,
            batch_seconds=batch_s,
            thread=self._model_thread,
        )
        self.store = Store(
            self.db, self.inflight, self.metrics, self.progress, batch_size=cfg.store_batch
        )

    async def _supervise(self) -> None:
        stages: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "claim": self.claimer.run,
            "embed": self.embed_loop.run,
            "store": self.store.run,
            **{f"download-{i}": self.downloader.run for i in range(self.config.downloads)},
            **{f"decode-{i}": self.decoders.run for i in range(self.config.decoders)},
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
            self.crashed = True
            raise StageFailed(
                f"stage {task.get_name()} died: {task.exception()!r}"
            ) from task.exception()

    async def _shutdown(self) -> None:
        """Stop the stages, write what is already finished, then release the rest."""
        store_task = next((t for t in self.tasks if t.get_name() == "store"), None)
        others = [t for t in self.tasks if t is not store_task]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        try:
            if self.tasks:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, self.decoders.shutdown)
                await loop.run_in_executor(None, self.embed_loop.shutdown)
                await self._drain_store(store_task)
        finally:  # whatever the store did, what is still held goes back
            self.inflight.abandon_adhoc("the daemon stopped")
            released = await self.db.call(
                jobs.release,
                None,
                worker_id=self.worker_id,
                refund=not self.crashed,
                max_attempts=self.config.retry.max_attempts,
            )
            if released:
                log.info("released %d in-flight job(s) back to pending", released)
            await self._report_progress(max_age_s=0)  # the final counts, not cached ones
            self.progress.close()
            self.db.close()

    async def _drain_store(self, store_task: asyncio.Task | None) -> None:
        if store_task is not None and not store_task.done():
            self.store.drain()
            await asyncio.gather(store_task, return_exceptions=True)
        leftovers = self.store.leftovers()  # the store task had died
        if leftovers:
            await self.store.write(leftovers)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig, loop)

    def _on_signal(self, sig: signal.Signals, loop: asyncio.AbstractEventLoop) -> None:
        """First signal: stop claiming, let in-flight jobs finish within the grace
        period.  Second signal (or no grace): release everything now."""
        if self.lifecycle.draining or self.config.grace_s <= 0:
            log.info("received %s: releasing in-flight jobs now", sig.name)
            self.stop.set()
            return
        log.info(
            "received %s: finishing %d in-flight job(s) within %g s; signal again to stop at once",
            sig.name,
            len(self.inflight),
            self.config.grace_s,
        )
        self.lifecycle.draining = True
        loop.call_later(self.config.grace_s, self.stop.set)

    # --- maintenance -------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Renew the leases of what we hold; an attempt whose lease was lost (reaped,
        claimed again) is dropped at once, its writes already refused by the fence."""
        held = [a for a in self.inflight if not a.adhoc]
        renewed = await self.db.call(
            maintenance.heartbeat,
            worker_id=self.worker_id,
            held=[a.job for a in held],
            lease_s=self.config.lease_s,
        )
        for attempt in held:
            if attempt.job.id not in renewed:
                self.inflight.drop_lost(attempt, "its lease was lost")

    async def _reap(self) -> None:
        await self.db.call(
            maintenance.reap,
            max_attempts=self.config.retry.max_attempts,
            spare=[a.job for a in self.inflight if not a.adhoc],
        )

    async def _fold_counts(self) -> None:
        self._counts_folded_to = await self.db.call(
            try_fold_counts, above_id=self._counts_folded_to
        )

    async def _report_progress(self, *, max_age_s: float | None = None) -> None:
        headline = await self.db.call(self.headlines.get, max_age_s=max_age_s)
        self.progress.show(headline)

    def _scheduler(self, loop: asyncio.AbstractEventLoop) -> AsyncIOScheduler:
        scheduler = AsyncIOScheduler(event_loop=loop)
        every = functools.partial(
            scheduler.add_job, trigger="interval", max_instances=1, coalesce=True
        )
        every(self.heartbeat, id="heartbeat", seconds=max(0.5, self.config.lease_s / 4))
        every(self._reap, id="reaper", seconds=max(0.5, self.config.reap_every_s))
        every(self._fold_counts, id="counts", seconds=FOLD_EVERY_S)
        every(
            self._report_progress,
            id="progress",
            seconds=1.0 if self.progress.has_bar else max(0.1, self.config.log_every_s),
        )
        return scheduler

    # --- ad-hoc jobs (the HTTP API) ----------------------------------------------

    async def encode_url(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        audio_cap: tuple[float, str] | None = None,
    ) -> jobs.Result:
        """One URL through the same download → decode → embed stages, outside the
        database: an attempt with a negative id whose outcome answers a future."""
        if self.stopping:
            raise Stopping("the daemon is stopping")
        job = jobs.Job(
            id=next(self._adhoc_ids), key="", url=url, attempts=0, claims=0, worker_id=""
        )
        reply: asyncio.Future[jobs.Result] = asyncio.get_running_loop().create_future()
        attempt = Attempt(job, reply=reply, session=session, audio_cap=audio_cap)
        self.inflight.add(attempt)
        try:
            await self.download_q.put(attempt)
            return await reply
        finally:  # cancelled (timeout, client gone): the stages drop it
            attempt.ended = True
            attempt.stop_work()
            self.inflight.forget(attempt)

    def abandon_adhoc(self, reason: str) -> None:
        self.inflight.abandon_adhoc(reason)

    def describe(self) -> dict[str, Any]:
        """This daemon as /status shows it beside what the database knows: what only
        the process knows (queues, jobs in hand, busy share, its own rate)."""
        now = time.time()
        rate = self.progress.rate.rate(now)
        return {
            "worker_id": self.worker_id,
            "host": self.worker_id.split(":", 1)[0],
            "model_id": self.config.model_id,
            "claims_jobs": self.config.claim_jobs,
            "started_at": self.started_at,
            "uptime_s": max(0.0, now - self.started_at),
            "in_hand": sum(1 for a in self.inflight if not a.adhoc),
            "queues": self.queue_depths(),
            "embed_busy_ratio": self.metrics.busy_ratio(),
            "rate_5m": rate.as_dict(),
            "stopping": self.stopping,
        }

    def queue_depths(self) -> dict[str, int]:
        return {
            "download": self.download_q.qsize(),
            "decode": self.decode_q.qsize(),
            "window": self.window_q.qsize(),
            "store": self.inflight.store_q.qsize(),
            "inflight": len(self.inflight),
        }


def min_window_samples(embedder: Embedder) -> int:
    """Fewest samples that still give one output frame (the conv receptive field)."""
    low, high = 1, 16_000
    while low < high:
        middle = (low + high) // 2
        if embedder.frames_for(middle) > 0:
            high = middle
        else:
            low = middle + 1
    return low


def run_daemon(engine: Engine, config: DaemonConfig, services: Sequence[Service] = ()) -> None:
    with _logs_around_bar(config.progress_bar):
        asyncio.run(Daemon(engine, config, services=services).run())


def _logs_around_bar(bar: bool) -> contextlib.AbstractContextManager[Any]:
    """Log lines printed over a live bar would tear it; tqdm writes them above it."""
    if not bar:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


__all__ = ["Daemon", "DaemonConfig", "Service", "run_daemon"]
