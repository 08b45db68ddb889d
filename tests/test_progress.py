"""The daemon's live progress: sliding-window rates, the line, the bar and the log."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest

from runner.headline import Headline
from runner.jobs import Failure, Job, Outcome, Result, Status
from runner.progress import Progress, SlidingRate, finished_by, progress_line
from runner.rates import window_rate
from tests.argv import daemon_args
from tests.conftest import Cli, MediaServer, write_catalogue

COUNTS = {Status.PENDING: 30, Status.RUNNING: 4, Status.DONE: 10, Status.FAILED: 2}


def headline(
    counts: dict[Status, int], finished: int, audio_s: float, covered_s: float
) -> Headline:
    """Figures as `runner.headline` reads them: `finished` in the 5 minutes' first
    `covered_s` seconds, the same in the hour."""
    rates = {
        label: window_rate(finished, audio_s, window_s=w, now=1000.0, since=1000.0 - covered_s)
        for label, w in (("5m", 300.0), ("60m", 3600.0))
    }
    return Headline(now=1000.0, counts={s: counts.get(s, 0) for s in Status}, rates=rates)


def job(job_id: int) -> Job:
    return Job(id=job_id, key=f"k{job_id}", url="http://x/", attempts=1, claims=1, worker_id="w")


def done(job_id: int, duration_s: float) -> Outcome:
    result = Result(np.zeros(4, np.float32), duration_s, 2, 0.1, "m")
    return Outcome(job(job_id), result=result)


def test_rate_is_over_the_window_and_shorter_while_young() -> None:
    rate = SlidingRate(started=1000.0, window_s=60.0)
    rate.add(1010.0, 2, 100.0)
    assert rate.per_s(1020.0) == pytest.approx((2 / 20, 100 / 20))
    rate.add(1050.0, 1, 30.0)
    # at t=1100 the first event (t=1010) has left the 60 s window
    assert rate.per_s(1100.0) == pytest.approx((1 / 60, 30 / 60))
    assert rate.per_s(1200.0) == (0.0, 0.0)


def test_retries_do_not_count_as_finished() -> None:
    failure = Failure("HTTP 503", "download", 503)
    outcomes = [
        done(1, 12.5),
        Outcome(job(2), failure=failure),
        Outcome(job(3), failure=failure, retry_after_s=5.0),
        Outcome(job(4)),  # given back: the job comes back too
    ]
    assert finished_by(outcomes) == (2, 12.5)


def test_line_has_counts_rates_and_eta() -> None:
    line = progress_line(headline(COUNTS, 50, 900.0, 100.0))
    assert line == (
        "pending 30, running 4, done 10, failed 2 | 0.50 videos/s, 9.0 audio-h/h | eta 1m 08s"
    )
    assert progress_line(headline(COUNTS, 0, 0.0, 300.0)).endswith("eta unknown")
    assert progress_line(headline({Status.DONE: 3}, 0, 0.0, 300.0)).endswith("eta nothing left")


def test_bar_shows_finished_out_of_total() -> None:
    out = io.StringIO()
    progress = Progress(started=0.0, window_s=100.0, bar_file=out)
    line = progress.show(headline(COUNTS, 20, 1000.0, 200.0))
    progress.close()
    assert "0.10 videos/s, 5.0 audio-h/h" in line
    text = out.getvalue()
    assert "12/46" in text
    # tqdm's own rate and ETA (the jump from 0 to the count over seconds) are not shown
    assert "video/s" not in text and "<" not in text
    assert "pending 30, running 4, done 10, failed 2" in text


def test_bar_moves_with_own_finishes_between_reads_of_the_counts() -> None:
    out = io.StringIO()
    progress = Progress(started=0.0, window_s=300.0, bar_file=out)
    figures = headline(COUNTS, 20, 1000.0, 200.0)  # read at now=1000
    progress.record([done(1, 60.0)], now=990.0)  # before the read: already counted
    progress.record([done(2, 60.0), done(3, 40.0)], now=1010.0)
    progress.show(figures)
    progress.close()
    assert "14/46" in out.getvalue()


def test_own_rate_feeds_from_outcomes() -> None:
    progress = Progress(started=0.0, window_s=100.0)
    progress.record([done(1, 60.0), done(2, 40.0)], now=10.0)
    assert progress.rate.per_s(20.0) == pytest.approx((2 / 20, 100 / 20))


def test_without_a_bar_it_logs(caplog: pytest.LogCaptureFixture) -> None:
    progress = Progress(started=0.0)
    figures = headline(COUNTS, 0, 0.0, 300.0)
    with caplog.at_level(logging.INFO, logger="runner.progress"):
        progress.show(figures)
    assert caplog.messages == ["progress: " + progress_line(figures)]


def test_daemon_logs_progress_periodically(
    cli: Cli,
    tmp_path: Path,
    tiny_model: Path,
    server: MediaServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    records = {f"v{i}": {"url": server.url("media/stereo.mp4")} for i in range(3)}
    records["gone"] = {"url": server.url("status/404")}
    cli("import", str(write_catalogue(tmp_path / "all.json", records)))
    with caplog.at_level(logging.INFO, logger="runner.progress"):
        cli(
            *daemon_args(
                tiny_model,
                tmp_path / "work",
                "--until-done",
                "--no-progress",
                "--log-every-s",
                "0.1",
            ),
        )
    lines = [m for m in caplog.messages if m.startswith("progress: ")]
    assert lines, "no progress line was logged"
    # the last line is written at shutdown, with the final counts
    assert lines[-1].startswith("progress: pending 0, running 0, done 3, failed 1 |")
    assert lines[-1].endswith("eta nothing left")
