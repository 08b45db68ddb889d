"""Counters and histograms of the daemon, rendered in Prometheus text format.

Written by hand rather than with prometheus_client: a dozen series do not justify a
dependency, and the format is a few lines of text.  Everything here is updated on
the event-loop thread only (the stages report at their boundaries), so there is no
locking.  Values that live elsewhere (job counts in the database, queue depths) are
passed to `render` at scrape time instead of being copied in here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from runner import jobs

#: seconds; downloads and decodes of whole videos, embeds of single batches
STAGE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

Labels = tuple[tuple[str, str], ...]


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in labels) + "}"


def _header(name: str, kind: str, help_text: str) -> list[str]:
    help_escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    return [f"# HELP {name} {help_escaped}", f"# TYPE {name} {kind}"]


def _key(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted((name, str(value)) for name, value in labels.items()))


@dataclass
class Counter:
    name: str
    help: str
    values: dict[Labels, float] = field(default_factory=dict)
    #: a counter without labels shows 0 before its first increment
    unlabelled: bool = True

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def lines(self) -> list[str]:
        values = self.values or ({(): 0.0} if self.unlabelled else {})
        return _header(self.name, "counter", self.help) + [
            f"{self.name}{_labels(key)} {_number(v)}" for key, v in sorted(values.items())
        ]


@dataclass
class _Series:
    buckets: list[int]
    sum: float = 0.0
    count: int = 0


@dataclass
class Histogram:
    name: str
    help: str
    bounds: Sequence[float] = STAGE_BUCKETS_S
    series: dict[Labels, _Series] = field(default_factory=dict)

    def observe(self, value: float, **labels: str) -> None:
        key = _key(labels)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Series(buckets=[0] * len(self.bounds))
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                series.buckets[index] += 1
        series.sum += value
        series.count += 1

    def lines(self) -> list[str]:
        out = _header(self.name, "histogram", self.help)
        series_by_key = self.series or {(): _Series(buckets=[0] * len(self.bounds))}
        for key, series in sorted(series_by_key.items()):
            for bound, n in [*zip(self.bounds, series.buckets, strict=True), (math.inf, None)]:
                le = (*key, ("le", _number(bound)))
                count = series.count if n is None else n
                out.append(f"{self.name}_bucket{_labels(le)} {count}")
            out.append(f"{self.name}_sum{_labels(key)} {_number(series.sum)}")
            out.append(f"{self.name}_count{_labels(key)} {series.count}")
        return out


def gauge_lines(name: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> list[str]:
    return _header(name, "gauge", help_text) + [
        f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples
    ]


class Metrics:
    """What one daemon process has done since it started."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.finished = Counter(
            "runner_jobs_finished_total",
            "Job attempts this process ended, by outcome (done, failed, retry) and error class.",
            unlabelled=False,
        )
        self.download_bytes = Counter(
            "runner_download_bytes_total", "Bytes of media downloaded completely."
        )
        self.download_s = Histogram(
            "runner_download_seconds", "Wall time of each complete download."
        )
        self.decode_s = Histogram(
            "runner_decode_seconds",
            "Wall time of decoding each file (including waits for the embedder).",
        )
        self.embed_s = Histogram("runner_embed_batch_seconds", "Model time of each batch.")
        self.embed_busy_s = Counter(
            "runner_embed_busy_seconds_total", "Seconds the model spent embedding batches."
        )
        self.requests = Counter(
            "runner_http_requests_total",
            "HTTP API requests answered, by route and status code.",
            unlabelled=False,
        )

    def job_outcome(self, outcome: jobs.Outcome) -> None:
        if outcome.result is not None:
            self.finished.inc(outcome="done", error_class="")
            return
        assert outcome.failure is not None
        kind = "failed" if outcome.retry_at is None else "retry"
        self.finished.inc(outcome=kind, error_class=outcome.failure.error_class)

    def downloaded(self, size_bytes: int, seconds: float) -> None:
        self.download_bytes.inc(size_bytes)
        self.download_s.observe(seconds)

    def embedded(self, seconds: float) -> None:
        self.embed_s.observe(seconds)
        self.embed_busy_s.inc(seconds)

    def busy_ratio(self) -> float:
        elapsed_s = self.clock() - self.started
        return min(1.0, self.embed_busy_s.values.get((), 0.0) / elapsed_s) if elapsed_s > 0 else 0.0

    def render(self, *, jobs_by_state: Mapping[str, int], queues: Mapping[str, int]) -> str:
        """The whole exposition; `jobs_by_state` comes from the database, `queues` from
        the running stages (name -> items waiting)."""
        lines = gauge_lines(
            "runner_jobs",
            "Jobs in the database by state (all daemons).",
            [((("state", state),), n) for state, n in sorted(jobs_by_state.items())],
        )
        lines += gauge_lines(
            "runner_queue_depth",
            "Items waiting in each stage queue of this process.",
            [((("queue", name),), n) for name, n in sorted(queues.items())],
        )
        lines += gauge_lines(
            "runner_embed_busy_ratio",
            "Fraction of this process's uptime the model spent embedding.",
            [((), self.busy_ratio())],
        )
        lines += gauge_lines(
            "runner_uptime_seconds",
            "Seconds since this process started.",
            [((), self.clock() - self.started)],
        )
        for metric in (
            self.finished,
            self.download_bytes,
            self.download_s,
            self.decode_s,
            self.embed_s,
            self.embed_busy_s,
            self.requests,
        ):
            lines += metric.lines()
        return "\n".join(lines) + "\n"
