"""Claims due jobs and turns each into an `Attempt` for the downloaders."""

from __future__ import annotations

import asyncio
import logging
import time

from runner import jobs, queries
from runner.attempt import Attempt
from runner.config import DaemonConfig
from runner.dbthread import DbThread
from runner.download import HostGate
from runner.stages.inflight import Inflight
from runner.stages.lifecycle import Lifecycle

log = logging.getLogger(__name__)

#: hosts in backoff named in one claim (SQLite builds may allow only 999 variables);
#: beyond these a claimed job of a blocked host is given back untouched, uncharged
MAX_SKIPPED_HOSTS = 200


class Claimer:
    """Keeps `config.claim_ahead` attempts in hand.

    The claim itself skips hosts in backoff (their rows are never rewritten one by
    one, so jobs of other hosts go on at full speed) and jobs this daemon already
    holds (a job whose lease lapsed while we still worked on it is not taken back
    beside the stale attempt).  A claim charges no try: that happens when the
    attempt's download starts, so a kill costs only the jobs really being worked on.
    """

    def __init__(
        self,
        db: DbThread,
        config: DaemonConfig,
        inflight: Inflight,
        hosts: HostGate,
        out: asyncio.Queue[Attempt],
        lifecycle: Lifecycle,
        *,
        worker_id: str,
    ) -> None:
        self.db, self.config, self.inflight, self.hosts = db, config, inflight, hosts
        self.out, self.lifecycle, self.worker_id = out, lifecycle, worker_id

    async def run(self) -> None:
        cfg, life = self.config, self.lifecycle
        # after a claim found nothing due, the next waits `poll_s`: a claim scans past
        # every pending job of a host in backoff, so it must not run five times a second
        next_claim_s = 0.0
        while not life.stop.is_set():
            may_claim = cfg.claim_jobs and not life.draining and time.monotonic() >= next_claim_s
            if may_claim and len(self.inflight) < cfg.claim_ahead:
                if await self.claim():
                    continue
                next_claim_s = time.monotonic() + cfg.poll_s
            if not len(self.inflight) and await self._drained():
                life.stop.set()
                return
            await life.sleep(0.2 if len(self.inflight) else cfg.poll_s)

    async def claim(self) -> bool:
        """Claim up to the free capacity; False if nothing was due."""
        free = self.config.claim_ahead - len(self.inflight)
        if free <= 0:
            return False
        claimed = await self.db.call(
            jobs.claim,
            worker_id=self.worker_id,
            limit=free,
            lease_s=self.config.lease_s,
            skip_hosts=self.hosts.blocked_hosts(now=time.time())[:MAX_SKIPPED_HOSTS],
            exclude_ids=self.inflight.held_ids(),
        )
        attempts = [Attempt(job) for job in claimed]
        for attempt in attempts:  # all held before any wait: a stop may come at the put
            self.inflight.add(attempt)
        for attempt in attempts:
            await self.out.put(attempt)
        return bool(claimed)

    async def _drained(self) -> bool:
        """Nothing held: done if draining, or if --until-done and nothing is pending,
        not even a job waiting out its retry backoff."""
        if self.lifecycle.draining:
            log.info("in-flight jobs finished: stopping")
            return True
        if not self.config.until_done:
            return False
        if await self.db.call(queries.count_pending):
            return False
        log.info("nothing pending and nothing in flight: done")
        return True
