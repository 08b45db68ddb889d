"""Streams each attempt's URL to a temp file, then hands it to the decoders."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from runner import jobs
from runner.attempt import Attempt
from runner.dbthread import DbThread
from runner.download import DownloadLimits, HostGate, download
from runner.errors import DownloadError, JobError, JobStateError, LocalError
from runner.metrics import Metrics
from runner.stages.inflight import Inflight
from runner.urls import host_of
from runner.workdir import Workdir

log = logging.getLogger(__name__)


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


class HostSlots:
    """At most `per_host` transfers to one host at once, held before the try is
    charged.  aiohttp's own per-host limit queues requests inside the connector,
    past our backoff check: when a host answers 429, every request already queued
    there would still go out and be charged.  Waiting here instead, the gate is
    checked again once a slot is ours."""

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._busy: dict[str, int] = {}
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, host: str) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self._busy.get(host, 0) < self.per_host)
            self._busy[host] = self._busy.get(host, 0) + 1
        try:
            yield
        finally:
            left = self._busy[host] - 1
            if left:
                self._busy[host] = left
            else:
                del self._busy[host]
            async with self._changed:
                self._changed.notify_all()


@dataclass(frozen=True)
class Downloaded:
    """A finished download waiting for a decoder; its bytes count against the budget."""

    attempt: Attempt
    path: Path
    size_bytes: int


class Downloader:
    """Several `run()` tasks share one instance, one per download slot."""

    def __init__(
        self,
        db: DbThread,
        inflight: Inflight,
        hosts: HostGate,
        session: aiohttp.ClientSession,
        limits: DownloadLimits,
        workdir: Workdir,
        prefetch: ByteBudget,
        queue_in: asyncio.Queue[Attempt],
        out: asyncio.Queue[Downloaded],
        metrics: Metrics,
        *,
        per_host: int,
        guarded_session: aiohttp.ClientSession | None = None,
        guard_catalogue: bool = False,
    ) -> None:
        self.db, self.inflight, self.hosts = db, inflight, hosts
        self.session, self.limits, self.workdir, self.prefetch = session, limits, workdir, prefetch
        self.queue_in, self.out, self.metrics = queue_in, out, metrics
        self.slots = HostSlots(per_host)
        #: for URLs a caller gave (jobs queued with POST /jobs), or every URL
        self.guarded_session, self.guard_catalogue = guarded_session, guard_catalogue

    async def run(self) -> None:
        while True:
            attempt = await self.queue_in.get()
            if not attempt.live:
                continue
            async with self.slots.hold(host_of(attempt.job.url)):
                got = await self._fetch(attempt)
            if got is not None:  # the host's slot is free while this waits for a decoder
                await self.prefetch.acquire(got.size_bytes)
                await self.out.put(got)

    async def _fetch(self, attempt: Attempt) -> Downloaded | None:
        if not attempt.live:
            return None
        if self.hosts.blocked_until(attempt.job.url, now=time.time()) is not None:
            self.inflight.give_back(attempt)
            return None
        if attempt.adhoc or await self._charge(attempt):
            return await self._download(attempt)
        return None

    async def _charge(self, attempt: Attempt) -> bool:
        """Count the try now that work really starts; False if the job is no longer ours."""
        try:
            attempt.charge(await self.db.call(jobs.start, attempt.job))
        except JobStateError:
            self.inflight.drop_lost(attempt, "no longer ours when its download was to start")
            return False
        return True

    def _session_for(self, job: jobs.Job) -> aiohttp.ClientSession:
        """The guarded session for a URL from an API caller (however it was checked
        when queued: DNS answers and redirects are decided now), or for every URL
        with --guard-catalogue-urls; the daemon's own otherwise."""
        guarded = job.origin == "api" or self.guard_catalogue
        if guarded and self.guarded_session is not None:
            return self.guarded_session
        return self.session

    def _ends_attempt(self, attempt: Attempt, exc: BaseException) -> bool:
        """Whether a failed transfer ends only its attempt (recorded here), not the stage."""
        if isinstance(exc, asyncio.CancelledError):
            current = asyncio.current_task()
            stopping = current is not None and current.cancelling() > 0
            # dropped (lease lost, caller gone): the slot is free; else the stage stops
            return not stopping and not attempt.live
        if isinstance(exc, JobError):
            self.inflight.error(attempt, exc)
            return True
        if isinstance(exc, OSError):  # our disk, not the server: this attempt, not the daemon
            self.inflight.error(attempt, LocalError(f"writing the download failed: {exc}"))
            return True
        if isinstance(exc, Exception):  # what a server sent tripped something unforeseen:
            # that URL fails, the daemon does not stop (and restart into it again)
            log.exception("job %s: unexpected error while downloading", attempt.job.key)
            error = DownloadError(f"unexpected error while downloading: {type(exc).__name__}")
            self.inflight.error(attempt, error)
            return True
        return False

    async def _download(self, attempt: Attempt) -> Downloaded | None:
        dest = self.workdir.temp_path(attempt.job.id)
        started = time.monotonic()
        session = attempt.session or self._session_for(attempt.job)
        attempt.transfer = asyncio.ensure_future(
            download(session, attempt.job.url, dest, self.limits)
        )
        try:
            got = await attempt.transfer
        except BaseException as exc:
            self.workdir.remove(dest)
            if not self._ends_attempt(attempt, exc):
                raise
            return None
        finally:
            attempt.transfer = None
        self.metrics.downloaded(got.size_bytes, time.monotonic() - started)
        if not attempt.live:  # lost its lease, or an ad-hoc caller gave up meanwhile
            self.workdir.remove(dest)
            return None
        return Downloaded(attempt, dest, got.size_bytes)
