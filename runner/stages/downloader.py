"""Streams each attempt's URL to a temp file, then hands it to the decoders."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from runner import jobs
from runner.attempt import Attempt
from runner.dbthread import DbThread
from runner.download import DownloadLimits, HostGate, download
from runner.errors import JobError, JobStateError, LocalError
from runner.metrics import Metrics
from runner.stages.inflight import Inflight
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
    ) -> None:
        self.db, self.inflight, self.hosts = db, inflight, hosts
        self.session, self.limits, self.workdir, self.prefetch = session, limits, workdir, prefetch
        self.queue_in, self.out, self.metrics = queue_in, out, metrics

    async def run(self) -> None:
        while True:
            attempt = await self.queue_in.get()
            if not attempt.live:
                continue
            if self.hosts.blocked_until(attempt.job.url, now=time.time()) is not None:
                self.inflight.give_back(attempt)
                continue
            if attempt.adhoc or await self._charge(attempt):
                await self._download(attempt)

    async def _charge(self, attempt: Attempt) -> bool:
        """Count the try now that work really starts; False if the job is no longer ours."""
        try:
            attempt.charge(await self.db.call(jobs.start, attempt.job))
        except JobStateError:
            self.inflight.drop_lost(attempt, "no longer ours when its download was to start")
            return False
        return True

    async def _download(self, attempt: Attempt) -> None:
        dest = self.workdir.temp_path(attempt.job.id)
        started = time.monotonic()
        try:
            got = await download(
                attempt.session or self.session, attempt.job.url, dest, self.limits
            )
        except JobError as exc:
            self.workdir.remove(dest)
            self.inflight.error(attempt, exc)
            return
        except OSError as exc:  # our disk, not the server: this attempt, not the daemon
            self.workdir.remove(dest)
            self.inflight.error(attempt, LocalError(f"writing the download failed: {exc}"))
            return
        except BaseException:
            self.workdir.remove(dest)
            raise
        self.metrics.downloaded(got.size_bytes, time.monotonic() - started)
        if not attempt.live:  # lost its lease, or an ad-hoc caller gave up meanwhile
            self.workdir.remove(dest)
            return
        await self.prefetch.acquire(got.size_bytes)
        await self.out.put(Downloaded(attempt, dest, got.size_bytes))
