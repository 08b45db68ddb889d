"""The metrics exposition, parsed back with prometheus_client's own parser."""

from __future__ import annotations

import sys
import threading

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from runner.metrics import CONTENT_TYPE, STAGE_BUCKETS_S, Metrics


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def parse(text: str) -> dict[str, tuple[str, list[Sample]]]:
    """family name -> (type, samples)"""
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def value(
    families: dict[str, tuple[str, list[Sample]]],
    family: str,
    sample: str | None = None,
    **labels: str,
) -> float:
    matches = [
        s.value for s in families[family][1] if s.name == (sample or family) and s.labels == labels
    ]
    assert len(matches) == 1, (family, sample, labels, families[family][1])
    return matches[0]


def test_render_reports_every_metric_with_its_type_and_values() -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    metrics.job_finished("done")
    metrics.job_finished("done")
    metrics.job_finished("failed", "HTTPError")
    metrics.job_finished("retry", "Timeout")
    metrics.downloaded(1000, 0.3)
    metrics.downloaded(234, 2.0)
    metrics.decoded(0.07)
    metrics.embedded(1.5)
    metrics.embedded(2.5)
    metrics.request_answered("status", 200)
    metrics.request_answered("status", "200")
    metrics.request_answered("jobs", 404)
    clock.now += 40.0

    text = metrics.render(
        jobs_by_state={"pending": 7, "done": 3, "failed": 0},
        queues={"download": 2, "decode": 1, "embed": 0},
    )
    families = parse(text)

    assert families["runner_jobs"][0] == "gauge"
    assert value(families, "runner_jobs", state="pending") == 7
    assert value(families, "runner_jobs", state="done") == 3
    assert value(families, "runner_jobs", state="failed") == 0
    assert len(families["runner_jobs"][1]) == 3

    assert families["runner_queue_depth"][0] == "gauge"
    assert value(families, "runner_queue_depth", queue="download") == 2
    assert value(families, "runner_queue_depth", queue="decode") == 1
    assert value(families, "runner_queue_depth", queue="embed") == 0

    assert families["runner_uptime_seconds"][0] == "gauge"
    assert value(families, "runner_uptime_seconds") == pytest.approx(40.0)
    assert families["runner_embed_busy_ratio"][0] == "gauge"
    assert value(families, "runner_embed_busy_ratio") == pytest.approx(0.1)
    assert metrics.busy_ratio() == pytest.approx(0.1)

    # the text parser names counter families without their _total suffix
    finished = "runner_jobs_finished"
    assert families[finished][0] == "counter"
    total = f"{finished}_total"
    assert value(families, finished, total, outcome="done", error_class="") == 2
    assert value(families, finished, total, outcome="failed", error_class="HTTPError") == 1
    assert value(families, finished, total, outcome="retry", error_class="Timeout") == 1

    assert families["runner_download_bytes"][0] == "counter"
    assert value(families, "runner_download_bytes", "runner_download_bytes_total") == 1234

    assert families["runner_embed_busy_seconds"][0] == "counter"
    busy = value(families, "runner_embed_busy_seconds", "runner_embed_busy_seconds_total")
    assert busy == pytest.approx(4.0)

    requests = "runner_http_requests"
    assert families[requests][0] == "counter"
    assert value(families, requests, f"{requests}_total", route="status", code="200") == 2
    assert value(families, requests, f"{requests}_total", route="jobs", code="404") == 1

    expected_counts = {
        "runner_download_seconds": (2, 2.3),
        "runner_decode_seconds": (1, 0.07),
        "runner_embed_batch_seconds": (2, 4.0),
    }
    for name, (count, total_s) in expected_counts.items():
        assert families[name][0] == "histogram", name
        assert value(families, name, f"{name}_count") == count
        assert value(families, name, f"{name}_sum") == pytest.approx(total_s)
        bounds = [float(s.labels["le"]) for s in families[name][1] if s.name == f"{name}_bucket"]
        assert bounds == [*STAGE_BUCKETS_S, float("inf")], name
        assert value(families, name, f"{name}_bucket", le="+Inf") == count

    # cumulative buckets: 0.3 s is above 0.25 and within 0.5
    assert (
        value(families, "runner_download_seconds", "runner_download_seconds_bucket", le="0.25") == 0
    )
    assert (
        value(families, "runner_download_seconds", "runner_download_seconds_bucket", le="0.5") == 1
    )
    assert (
        value(families, "runner_download_seconds", "runner_download_seconds_bucket", le="2.5") == 2
    )


def test_fresh_metrics_have_zeros_and_no_labelled_samples() -> None:
    metrics = Metrics(clock=FakeClock())
    families = parse(metrics.render(jobs_by_state={}, queues={}))

    assert families["runner_jobs_finished"] == ("counter", [])
    assert families["runner_http_requests"] == ("counter", [])
    assert families["runner_jobs"] == ("gauge", [])
    assert families["runner_queue_depth"] == ("gauge", [])
    assert value(families, "runner_download_bytes", "runner_download_bytes_total") == 0
    assert value(families, "runner_embed_busy_seconds", "runner_embed_busy_seconds_total") == 0
    assert value(families, "runner_decode_seconds", "runner_decode_seconds_count") == 0
    # no time has passed: the ratio is defined as 0 rather than dividing by zero
    assert value(families, "runner_uptime_seconds") == 0
    assert value(families, "runner_embed_busy_ratio") == 0
    assert metrics.busy_ratio() == 0.0


def test_busy_ratio_is_capped_at_one() -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    clock.now += 1.0
    metrics.embedded(5.0)
    assert metrics.busy_ratio() == 1.0


def test_scrape_time_values_are_not_kept_between_renders() -> None:
    metrics = Metrics(clock=FakeClock())
    parse(metrics.render(jobs_by_state={"pending": 5}, queues={"embed": 3}))
    families = parse(metrics.render(jobs_by_state={"done": 1}, queues={}))
    assert [s.labels for s in families["runner_jobs"][1]] == [{"state": "done"}]
    assert families["runner_queue_depth"][1] == []


def test_unknown_outcome_is_rejected() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="unknown job outcome"):
        metrics.job_finished("succeeded")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process metrics need /proc")
def test_process_and_platform_metrics_are_included() -> None:
    families = parse(Metrics().render(jobs_by_state={}, queues={}))
    assert families["process_cpu_seconds"][0] == "counter"
    assert families["process_resident_memory_bytes"][0] == "gauge"
    assert value(families, "process_resident_memory_bytes") > 0
    assert "python_info" in families


def test_instances_do_not_share_values() -> None:
    first = Metrics(clock=FakeClock())
    second = Metrics(clock=FakeClock())
    assert first.registry is not second.registry
    first.downloaded(500, 1.0)
    first.job_finished("done")
    first.embedded(1.0)

    families = parse(second.render(jobs_by_state={}, queues={}))
    assert value(families, "runner_download_bytes", "runner_download_bytes_total") == 0
    assert value(families, "runner_download_seconds", "runner_download_seconds_count") == 0
    assert families["runner_jobs_finished"][1] == []
    assert second.busy_ratio() == 0.0


def test_concurrent_updates_and_renders() -> None:
    metrics = Metrics()
    errors: list[BaseException] = []

    def update() -> None:
        try:
            for _ in range(2000):
                metrics.downloaded(1, 0.01)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=update) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(20):
        parse(metrics.render(jobs_by_state={"pending": 1}, queues={}))
    for thread in threads:
        thread.join()
    assert errors == []
    families = parse(metrics.render(jobs_by_state={}, queues={}))
    assert value(families, "runner_download_bytes", "runner_download_bytes_total") == 8000


def test_content_type_is_the_text_format() -> None:
    # the version parameter depends on the prometheus_client release (0.0.4 or 1.0.0)
    assert CONTENT_TYPE == CONTENT_TYPE_LATEST
    assert CONTENT_TYPE.startswith("text/plain; version=")
