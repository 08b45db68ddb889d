"""The attempts a daemon holds, and the one place where an attempt's end is decided.

Every stage that finishes an attempt (done, failed, retry later, given back) goes
through `Inflight`, so the retry policy and the host backoff are applied in one
place, and an attempt that is no longer live (lost its lease, its ad-hoc caller
gave up, already ended) can never end twice.  Attempts stay held until the store
stage has written their outcome, so the heartbeat keeps renewing their leases
while a slow database holds the write up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterator

from runner import jobs
from runner.attempt import Attempt
from runner.download import HostGate
from runner.errors import DownloadError, JobError, Stopping, TransientDownloadError
from runner.retry import RetryPolicy

log = logging.getLogger(__name__)


class Inflight:
    def __init__(self, *, retry: RetryPolicy, hosts: HostGate) -> None:
        self.retry = retry
        self.hosts = hosts
        #: outcomes to write; unbounded, so finishing never waits (the claimer's
        #: capacity counts held attempts, which bounds it)
        self.store_q: asyncio.Queue[Attempt] = asyncio.Queue()
        self._held: set[Attempt] = set()

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[Attempt]:
        return iter(list(self._held))

    def add(self, attempt: Attempt) -> None:
        self._held.add(attempt)

    def held_ids(self) -> set[int]:
        return {a.job.id for a in self._held if not a.adhoc}

    def forget(self, attempt: Attempt) -> None:
        """Its outcome is written (or it was lost): nothing of it is ours any more."""
        self._held.discard(attempt)

    # --- ends -------------------------------------------------------------------

    def succeed(self, attempt: Attempt, result: jobs.Result) -> None:
        self._finish(attempt, jobs.Outcome(attempt.job, result=result))

    def error(self, attempt: Attempt, error: JobError) -> None:
        """Retry a transient error later, fail a permanent one (or the last try)."""
        if attempt.adhoc:  # no retries: the caller decides
            self._answer(attempt, error)
            return
        policy, attempts = self.retry, attempt.job.attempts
        failure = jobs.Failure(
            message=str(error), error_class=error.error_class, http_status=error.http_status
        )
        if error.transient and not policy.gives_up(attempts):
            delay_s = policy.delay_s(attempts, retry_after_s=error.retry_after_s)
            if error.backs_off_host:
                self.hosts.back_off(attempt.job.url, until=time.time() + delay_s)
            log.info(
                "job %s: %s; retry %d/%d in %.0f s",
                attempt.job.key,
                error,
                attempts + 1,
                policy.max_attempts,
                delay_s,
            )
            self._finish(attempt, jobs.Outcome(attempt.job, failure=failure, retry_after_s=delay_s))
            return
        if error.transient:
            failure = dataclasses.replace(
                failure, message=f"gave up after {attempts} attempts: {error}"
            )
        self._finish(attempt, jobs.Outcome(attempt.job, failure=failure))

    def give_back(self, attempt: Attempt) -> None:
        """An attempt that never started (its host is backing off): back to pending,
        no try charged, no backoff written; the claim skips the host meanwhile."""
        if attempt.adhoc:
            error = TransientDownloadError(
                "host is backing off after HTTP 429/503", http_status=503
            )
            self._answer(attempt, error)
            return
        assert not attempt.charged
        self._finish(attempt, jobs.Outcome(attempt.job))

    def drop_lost(self, attempt: Attempt, why: str) -> None:
        """The database no longer holds it for us: stop working on it at once."""
        if attempt in self._held and attempt.live:
            log.warning("job %s: %s; dropping its attempt", attempt.job.key, why)
        attempt.lost = True
        attempt.stop_work()
        self.forget(attempt)

    def abandon_adhoc(self, reason: str) -> None:
        for attempt in self:
            if attempt.adhoc:
                self._answer(attempt, Stopping(reason))

    def _finish(self, attempt: Attempt, outcome: jobs.Outcome) -> None:
        if not attempt.live:
            return
        if attempt.adhoc:
            if outcome.result is not None:
                self._answer(attempt, outcome.result)
            else:
                message = outcome.failure.message if outcome.failure else "no result"
                self._answer(attempt, DownloadError(message))
            return
        attempt.ended, attempt.outcome = True, outcome
        self.store_q.put_nowait(attempt)

    def _answer(self, attempt: Attempt, value: jobs.Result | Exception) -> None:
        """End an ad-hoc attempt: its caller gets the result or the error."""
        attempt.ended = True
        self.forget(attempt)
        reply = attempt.reply
        if reply is None or reply.done():
            return
        if isinstance(value, Exception):
            reply.set_exception(value)
        else:
            reply.set_result(value)
