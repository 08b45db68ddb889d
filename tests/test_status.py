"""`runner status`: counts, rates, ETA, oldest running job and failure reasons at a
fixed `now`, so nothing sleeps."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine

from runner.adopt import import_results
from runner.db import connect
from runner.status import format_duration, format_status, read_status, show_status
from tests.conftest import Cli, write_catalogue
from tests.test_export_formats import add_jobs, finish

NOW = 1_000_000.0
VEC = np.ones(4, dtype=np.float32)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = connect(db_url)
    yield engine
    engine.dispose()


def progress(engine: Engine) -> None:
    """20 jobs: 6 done and 2 failed at known times, 1 running, 11 pending."""
    add_jobs(engine, [f"k{i:02d}" for i in range(20)], now=NOW - 10_000)
    finish(engine, {"k00": VEC}, now=NOW - 5_000)  # outside both windows
    finish(engine, {"k01": VEC, "k02": VEC}, {"k03": "HTTP 404"}, now=NOW - 1_800)  # 60m
    finish(engine, {"k04": VEC}, {"k05": "HTTP 404"}, now=NOW - 240)  # 5m and 60m
    finish(engine, {"k06": VEC}, now=NOW - 30, claimed_at=NOW - 100)
    finish(engine, {}, now=NOW - 700, keep_running=("k07",))  # claimed 700 s ago
    finish(engine, {"k08": VEC}, now=NOW + 60)  # after `now`: not yet, as of `now`


def test_status_at_a_fixed_now(engine: Engine) -> None:
    progress(engine)
    report = read_status(engine, now=NOW)
    assert report["total"] == 20
    assert report["counts"] == {"pending": 11, "running": 1, "done": 6, "failed": 2}
    five, sixty = report["rates"]["5m"], report["rates"]["60m"]
    assert (five["finished"], sixty["finished"]) == (3, 6)
    assert five["per_min"] == pytest.approx(3 / 5)
    assert five["per_s"] == pytest.approx(3 / 300)
    assert sixty["per_min"] == pytest.approx(6 / 60)
    assert report["remaining"] == 12
    assert report["eta_basis"] == "5m"
    assert report["eta_s"] == pytest.approx(12 / (3 / 300))  # 1200 s
    assert report["oldest_running"] == {
        "key": "k07",
        "worker_id": "test-worker",
        "claimed_at": NOW - 700,
        "age_s": 700.0,
    }
    assert report["top_failures"] == [{"error_class": "download", "error": "HTTP 404", "count": 2}]
    json.dumps(report)  # JSON-ready as it is

    assert format_status(report).splitlines() == [
        "total 20: pending 11, running 1, done 6, failed 2",
        "finished: 3 in the last 5m (0.60/min, 0.010/s); 6 in the last 60m (0.10/min, 0.002/s)",
        "eta: 20m 00s for 12 left (at the last 5m rate)",
        "oldest running: k07 for 11m 40s (worker test-worker)",
        "top failure reasons:",
        "         2  [download] HTTP 404",
    ]


def test_eta_falls_back_to_the_hour_then_to_unknown(engine: Engine) -> None:
    progress(engine)
    later = read_status(engine, now=NOW + 200)  # k06 and k08 in the last 5m
    assert later["rates"]["5m"]["finished"] == 2 and later["eta_basis"] == "5m"
    much_later = read_status(engine, now=NOW + 2_000)
    assert much_later["rates"]["5m"]["finished"] == 0
    assert much_later["rates"]["60m"]["finished"] == 4  # k04, k05, k06, k08
    assert much_later["eta_basis"] == "60m"
    assert much_later["eta_s"] == pytest.approx(12 / (4 / 3600))
    idle = read_status(engine, now=NOW + 100_000)
    assert idle["eta_s"] is None
    assert "eta: unknown (12 left, nothing finished in the last hour)" in format_status(idle)


def test_empty_database(engine: Engine) -> None:
    report = read_status(engine, now=NOW)
    assert report["counts"] == {"pending": 0, "running": 0, "done": 0, "failed": 0}
    assert report["eta_s"] == 0.0 and report["oldest_running"] is None
    assert "eta: nothing left to do" in format_status(report)


def test_adopted_and_rejected_rows_do_not_count_as_speed(engine: Engine, tmp_path: Path) -> None:
    """A burst of adopted results or invalid catalogue records is no measure of the
    daemon's speed, even when their finished_at falls in the window."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "audio_vectors.json").write_text(json.dumps({f"a{i}": [[1.0, 2.0]] for i in range(50)}))
    os.utime(old / "audio_vectors.json", (NOW - 10, NOW - 10))
    import_results(engine, old, now=NOW)
    with engine.begin() as conn:
        from runner import catalogue

        catalogue.upsert_records(
            conn, [catalogue.Record(key="bad", url=None, meta={}, invalid="no url")], now=NOW - 5
        )
    report = read_status(engine, now=NOW)
    assert report["counts"]["done"] == 50 and report["counts"]["failed"] == 1
    assert report["rates"]["5m"]["finished"] == 0 and report["rates"]["60m"]["finished"] == 0


def test_top_failures_are_ranked_and_limited(engine: Engine) -> None:
    add_jobs(engine, [f"f{i}" for i in range(6)])
    finish(engine, {}, {"f0": "a", "f1": "b", "f2": "b", "f3": "c", "f4": "c", "f5": "c"}, now=1)
    report = read_status(engine, now=NOW, top=2)
    assert [(f["error"], f["count"]) for f in report["top_failures"]] == [("c", 3), ("b", 2)]
    assert read_status(engine, now=NOW, top=0)["top_failures"] == []


def test_watch_redraws_until_count_or_ctrl_c(engine: Engine) -> None:
    progress(engine)
    shown: list[str] = []
    slept: list[float] = []
    clock = iter([NOW, NOW + 2, NOW + 4])
    n = show_status(
        engine,
        as_json=False,
        top=5,
        echo=shown.append,
        watch_s=2.0,
        count=3,
        clear=True,
        clock=lambda: next(clock),
        sleep=slept.append,
    )
    assert n == 3 and slept == [2.0, 2.0]
    assert all(s.startswith("\x1b[H\x1b[2Jtotal 20:") for s in shown)
    assert "every 2s, Ctrl-C to stop" in shown[0]

    def interrupted(_: float) -> None:
        raise KeyboardInterrupt

    shown.clear()
    n = show_status(
        engine,
        as_json=True,
        top=5,
        echo=shown.append,
        watch_s=2.0,
        clock=lambda: NOW,
        sleep=interrupted,
    )
    assert n == 1 and json.loads(shown[0])["counts"]["running"] == 1


def test_cli_status(cli: Cli, tmp_path: Path) -> None:
    cli(
        "import",
        str(
            write_catalogue(
                tmp_path / "c.json", {"a": {"url": "http://media.test/a"}, "b": {"title": "no url"}}
            )
        ),
    )
    report = json.loads(cli("status", "--json").stdout)
    assert report["counts"] == {"pending": 1, "running": 0, "done": 0, "failed": 1}
    assert report["rates"]["5m"]["finished"] == 0 and report["eta_s"] is None
    assert report["top_failures"][0]["error_class"] == "invalid"
    text = cli("status").stdout
    assert text.startswith("total 2: pending 1, running 0, done 0, failed 1\n")
    assert "eta: unknown (1 left" in text

    lines = cli("status", "--json", "--watch-count", "3", "--interval", "0.1").stdout
    reports = [json.loads(line) for line in lines.splitlines()]
    assert len(reports) == 3 and all(r["total"] == 2 for r in reports)
    watched = cli("status", "--watch", "--watch-count", "2", "--interval", "0.1").stdout
    assert watched.count("total 2:") == 2 and "\x1b[" not in watched  # not a terminal


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59.4, "59s"),
        (60, "1m 00s"),
        (3599, "59m 59s"),
        (3600, "1h 00m"),
        (86_399, "23h 59m"),
        (90_000, "1d 01h"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
