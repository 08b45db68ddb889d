"""Writes attempts' outcomes, many per transaction, row by row when a batch fails."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import sqlalchemy.exc

from runner import jobs
from runner.attempt import Attempt
from runner.dbthread import DbThread
from runner.metrics import Metrics
from runner.progress import Progress
from runner.stages.inflight import Inflight

log = logging.getLogger(__name__)

#: error class of a job whose outcome the database would not take
STORE_ERROR_CLASS = "store"


class Store:
    """One task; `drain()` is how a stop ends it, so nothing finished is dropped.

    A batch is one transaction (one commit, not one per job).  If the database
    refuses it for any reason but a lost connection (which `DbThread` rides out),
    each outcome is written alone; the one that still cannot be written fails its
    job with the database's reason, and the daemon goes on.
    """

    _DRAIN = None

    def __init__(
        self,
        db: DbThread,
        inflight: Inflight,
        metrics: Metrics,
        progress: Progress,
        *,
        batch_size: int,
    ) -> None:
        self.db, self.inflight, self.metrics, self.progress = db, inflight, metrics, progress
        self.queue: asyncio.Queue[Attempt | None] = inflight.store_q  # type: ignore[assignment]
        self.batch_size = batch_size
        #: the batch `write` is busy with: if the task dies there, the shutdown retries it
        self._writing: list[Attempt] = []

    async def run(self) -> None:
        while True:
            first = await self.queue.get()
            if first is self._DRAIN:
                return
            batch = [first]
            while not self.queue.empty() and len(batch) < self.batch_size:
                item = self.queue.get_nowait()
                if item is self._DRAIN:
                    await self.write(batch)
                    return
                batch.append(item)
            await self.write(batch)

    def drain(self) -> None:
        """Write everything queued so far, then let `run()` return."""
        self.queue.put_nowait(self._DRAIN)

    def leftovers(self) -> list[Attempt]:
        """What the store task left when it died (the batch it was writing, then the
        queue): the shutdown writes it.  Rewriting what did commit is harmless: the
        fence refuses it."""
        items, self._writing = self._writing, []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not self._DRAIN:
                items.append(item)
        return items

    async def write(self, attempts: Sequence[Attempt]) -> None:
        self._writing = list(attempts)
        outcomes = [a.outcome for a in attempts if a.outcome is not None]
        try:
            lost = await self.db.call(jobs.store_outcomes, outcomes)
            lost_ids = {id(outcome) for outcome in lost}
            written = [o for o in outcomes if id(o) not in lost_ids]
        except sqlalchemy.exc.OperationalError:
            raise  # the database is gone for good: stop, the leases give the jobs back
        except Exception as exc:
            log.warning(
                "writing %d outcomes failed (%s); writing them one by one", len(outcomes), exc
            )
            written = await self._one_by_one(outcomes)
        self._writing = []
        for attempt in attempts:
            self.inflight.forget(attempt)
        stored_jobs = {outcome.job for outcome in written}
        for outcome in outcomes:
            if outcome.job not in stored_jobs:
                log.warning(
                    "job %s was no longer ours when its outcome was stored", outcome.job.key
                )
        for outcome in written:
            self.metrics.job_finished(outcome.kind, outcome.error_class)
        self.progress.record(written, now=time.time())

    async def _one_by_one(self, outcomes: Sequence[jobs.Outcome]) -> list[jobs.Outcome]:
        """Each outcome in its own transaction; returns those written (a failure in
        place of an outcome the database refused)."""
        written: list[jobs.Outcome] = []
        for outcome in outcomes:
            try:
                if not await self.db.call(jobs.store_outcomes, [outcome]):
                    written.append(outcome)
            except sqlalchemy.exc.OperationalError:
                raise
            except Exception as exc:
                written += await self._fail_unstorable(outcome, exc)
        return written

    async def _fail_unstorable(self, outcome: jobs.Outcome, exc: Exception) -> list[jobs.Outcome]:
        reason = " ".join(str(exc).split())[:500] or type(exc).__name__
        log.error("job %s: the database refused its outcome: %s", outcome.job.key, reason)
        failure = jobs.Failure(
            message=f"could not store the outcome: {reason}", error_class=STORE_ERROR_CLASS
        )
        instead = jobs.Outcome(outcome.job, failure=failure)
        try:
            lost = await self.db.call(jobs.store_outcomes, [instead])
        except sqlalchemy.exc.OperationalError:
            raise
        except Exception:  # left running: its lease lapses and the reaper takes it
            log.exception("job %s: could not even record the failure", outcome.job.key)
            return []
        return [] if lost else [instead]
