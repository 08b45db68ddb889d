"""Counters and histograms of the daemon, exposed in the Prometheus text format.

Built on prometheus_client so that the exposition format, escaping and thread safety
are somebody else's tested code, and so that the standard process metrics (CPU,
memory, file descriptors) come for free.  Each `Metrics` owns its registry instead of
using the library's global one: tests and the two-daemons-in-one-process setups then
never see each other's values, and registering twice never collides.

Values that live elsewhere (job counts in the database, queue depths) are passed to
`render` at scrape time and reported through a custom collector, never copied into
gauges that would go stale between scrapes.  This module imports no other runner
module so that every other module may import it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

__all__ = ["CONTENT_TYPE", "STAGE_BUCKETS_S", "Metrics"]

#: the Content-Type header that goes with `Metrics.render`'s text
CONTENT_TYPE: str = CONTENT_TYPE_LATEST

#: seconds; downloads and decodes of whole videos, embeds of single batches
STAGE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

_OUTCOMES = frozenset({"done", "failed", "retry"})


@dataclass(frozen=True)
class _Scrape:
    """What the caller of `render` knows at scrape time."""

    jobs_by_state: Mapping[str, int]
    queues: Mapping[str, int]


#: set only for the duration of one `render`; a context variable rather than an
#: attribute so that concurrent renders (threads or tasks) never see each other's values
#: and need no lock
_SCRAPE: ContextVar[_Scrape | None] = ContextVar("runner_metrics_scrape", default=None)


class _ScrapeTimeCollector:
    """Gauges computed when scraped: jobs by state and queue depths (from `render`'s
    arguments) and the busy ratio and uptime (from the clock)."""

    def __init__(self, uptime_s: Callable[[], float], busy_ratio: Callable[[], float]) -> None:
        self._uptime_s = uptime_s
        self._busy_ratio = busy_ratio

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so registering does not read the clock."""
        yield from self._families(None, compute=False)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(_SCRAPE.get(), compute=True)

    def _families(self, scrape: _Scrape | None, *, compute: bool) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "runner_jobs", "Jobs in the database by state (all daemons).", labels=["state"]
        )
        queues = GaugeMetricFamily(
            "runner_queue_depth",
            "Items waiting in each stage queue of this process.",
            labels=["queue"],
        )
        # outside `render` (a direct collect of the registry) these two have no samples
        if scrape is not None:
            for state, n in sorted(scrape.jobs_by_state.items()):
                jobs.add_metric([state], n)
            for name, n in sorted(scrape.queues.items()):
                queues.add_metric([name], n)
        yield jobs
        yield queues
        ratio = GaugeMetricFamily(
            "runner_embed_busy_ratio",
            "Fraction of this process's uptime the model spent embedding.",
        )
        uptime = GaugeMetricFamily("runner_uptime_seconds", "Seconds since this process started.")
        if compute:
            ratio.add_metric([], self._busy_ratio())
            uptime.add_metric([], self._uptime_s())
        yield ratio
        yield uptime


def _counter_total(counter: Counter) -> float:
    """The value of an unlabelled counter, through the public `collect`."""
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                return sample.value
    return 0.0


class Metrics:
    """What one daemon process has done since it started.

    Every update method is cheap and thread-safe (prometheus_client locks each value),
    so the stages may report from the event loop or from worker threads, and `render`
    may run on the same thread between updates.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        #: this instance's own registry, so instances never share values
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(_ScrapeTimeCollector(self._uptime_s, self.busy_ratio))
        # labelled, so no samples until the first job ends (as before the rewrite)
        self._finished = Counter(
            "runner_jobs_finished_total",
            "Job attempts this process ended, by outcome (done, failed, retry) and error class.",
            ["outcome", "error_class"],
            registry=self.registry,
        )
        self._download_bytes = Counter(
            "runner_download_bytes_total",
            "Bytes of media downloaded completely.",
            registry=self.registry,
        )
        self._download_s = self._stage_histogram(
            "runner_download_seconds", "Wall time of each complete download."
        )
        self._decode_s = self._stage_histogram(
            "runner_decode_seconds",
            "Wall time of decoding each file (including waits for the embedder).",
        )
        self._embed_s = self._stage_histogram(
            "runner_embed_batch_seconds", "Model time of each batch."
        )
        self._embed_busy_s = Counter(
            "runner_embed_busy_seconds_total",
            "Seconds the model spent embedding batches.",
            registry=self.registry,
        )
        self._requests = Counter(
            "runner_http_requests_total",
            "HTTP API requests answered, by route and status code.",
            ["route", "code"],
            registry=self.registry,
        )

    def _stage_histogram(self, name: str, help_text: str) -> Histogram:
        return Histogram(name, help_text, buckets=STAGE_BUCKETS_S, registry=self.registry)

    def job_finished(self, outcome: str, error_class: str = "") -> None:
        """One job attempt ended: "done" (with no error class), "failed" for good, or
        "retry" later.  An unknown outcome is a programming error and raises ValueError
        rather than inventing a series no dashboard knows."""
        if outcome not in _OUTCOMES:
            raise ValueError(
                f"unknown job outcome {outcome!r}; expected one of {sorted(_OUTCOMES)}"
            )
        self._finished.labels(outcome=outcome, error_class=error_class).inc()

    def downloaded(self, size_bytes: int, seconds: float) -> None:
        """A download completed: its size feeds the throughput, its time the histogram."""
        self._download_bytes.inc(size_bytes)
        self._download_s.observe(seconds)

    def decoded(self, seconds: float) -> None:
        """A file was decoded completely (the time includes waits for the embedder)."""
        self._decode_s.observe(seconds)

    def embedded(self, seconds: float) -> None:
        """The model embedded one batch in `seconds`; also feeds the busy ratio."""
        self._embed_s.observe(seconds)
        self._embed_busy_s.inc(seconds)

    def request_answered(self, route: str, code: int | str) -> None:
        """The HTTP API answered a request on `route` (a route name, not the raw path,
        to keep the label set small) with status `code`."""
        self._requests.labels(route=route, code=str(code)).inc()

    def _uptime_s(self) -> float:
        """Seconds since this instance was created, by its clock."""
        return self._clock() - self._started

    def busy_ratio(self) -> float:
        """Fraction of the uptime the model spent embedding, in [0, 1]: the one number
        that says whether the GPU or the stages feeding it are the bottleneck."""
        elapsed_s = self._uptime_s()
        if elapsed_s <= 0:
            return 0.0
        return min(1.0, _counter_total(self._embed_busy_s) / elapsed_s)

    def render(self, *, jobs_by_state: Mapping[str, int], queues: Mapping[str, int]) -> str:
        """The whole exposition, to serve with `CONTENT_TYPE`.  `jobs_by_state` comes
        from the database (all daemons), `queues` from the running stages (name -> items
        waiting); both are reported as given and kept nowhere after this call."""
        token = _SCRAPE.set(_Scrape(dict(jobs_by_state), dict(queues)))
        try:
            return generate_latest(self.registry).decode("utf-8")
        finally:
            _SCRAPE.reset(token)
