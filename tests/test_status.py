"""`runner status`: counts, rates, ETA, oldest running job and failure reasons at a
fixed `now`, so nothing sleeps."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine

from runner.adopt import import_results
from runner.db import connect
from runner.jobs import Status
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
    # each rate is over the time its window covers: work began with the claims of
    # k04/k05 240 s ago (5m) and of k01-k03 1800 s ago (60m)
    assert (five["covered_s"], sixty["covered_s"]) == (240.0, 1800.0)
    assert five["per_min"] == pytest.approx(3 / 4)
    assert five["per_s"] == pytest.approx(3 / 240)
    assert sixty["per_min"] == pytest.approx(6 / 30)
    assert five["audio_s"] == 4.0 and five["audio_h_per_h"] == pytest.approx(4 / 240)
    assert report["remaining"] == 12
    assert report["eta_basis"] == "5m"
    assert report["eta_s"] == pytest.approx(12 / (3 / 240))  # 960 s
    assert report["oldest_running"] == {
        "key": "k07",
        "worker_id": "test-worker",
        "claimed_at": NOW - 700,
        "age_s": 700.0,
    }
    assert report["top_failures"] == [
        {"error_class": "download", "error": "HTTP 404", "count": 2, "examples": ["k05", "k03"]}
    ]
    json.dumps(report)  # JSON-ready as it is

    assert format_status(report).splitlines() == [
        "total 20: pending 11, running 1, done 6, failed 2",
        "finished: 3 in the last 5m (over 4m 00s: 0.75/min, 0.013/s); "
        "6 in the last 60m (over 30m 00s: 0.20/min, 0.003/s)",
        "eta: 16m 00s for 12 left (at the last 5m rate)",
        "oldest running: k07 for 11m 40s (worker test-worker)",
        "top failure reasons:",
        "         2  [download] HTTP 404",
        "            e.g. k05, k03",
    ]


def test_eta_falls_back_to_the_hour_then_to_unknown(engine: Engine) -> None:
    progress(engine)
    later = read_status(engine, now=NOW + 200)  # k06 and k08 in the last 5m
    assert later["rates"]["5m"]["finished"] == 2 and later["eta_basis"] == "5m"
    much_later = read_status(engine, now=NOW + 2_000)
    assert much_later["rates"]["5m"]["finished"] == 0
    assert much_later["rates"]["60m"]["finished"] == 4  # k04, k05, k06, k08
    assert much_later["eta_basis"] == "60m"
    # the hour covers the 2,240 s since k04 and k05 were claimed
    assert much_later["rates"]["60m"]["covered_s"] == 2240.0
    assert much_later["eta_s"] == pytest.approx(12 / (4 / 2240))
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


# --- rates over the time a window covers, one function for every view -------------------


def test_thirty_seconds_into_a_run_every_view_gives_the_same_eta(engine: Engine) -> None:
    """The issue's case: 30 s into a run the bar said 16 s and `runner status` 2 m 23 s,
    because one divided 30 s of work by 5 minutes.  Now the rate is over the 30 s the
    window covers, and the bar, the text, the JSON and the daemon's own rate agree."""
    from runner.headline import read_headline_now
    from runner.progress import SlidingRate, progress_line

    add_jobs(engine, [f"r{i:03d}" for i in range(100)], now=NOW - 1_000)
    finish(engine, {f"r{i:03d}": VEC for i in range(10)}, now=NOW - 5, claimed_at=NOW - 30)
    report = read_status(engine, now=NOW)
    five = report["rates"]["5m"]
    assert five["covered_s"] == 30.0 and five["per_s"] == pytest.approx(10 / 30)
    assert report["rates"]["60m"]["per_s"] == pytest.approx(10 / 30)
    assert report["eta_s"] == pytest.approx(90 / (10 / 30))  # 270 s, not 2,700
    assert "eta: 4m 30s for 90 left" in format_status(report)
    assert "10 in the last 5m (over 30s: 20.00/min, 0.333/s)" in format_status(report)

    headline = read_headline_now(engine, now=NOW)
    assert headline.eta_s == report["eta_s"]
    assert progress_line(headline).endswith("0.33 videos/s, 0.7 audio-h/h | eta 4m 30s")

    own = SlidingRate(started=NOW - 30, window_s=300.0)
    own.add(NOW - 5, 10, 20.0)
    assert own.rate(NOW).per_s == pytest.approx(five["per_s"])


def test_headline_cache_rereads_after_a_ttl_that_grows_with_the_cost(engine: Engine) -> None:
    """The read's cost decides, not the number of jobs: a cheap read is made afresh
    every time, a costly one is kept for cost / budget; the cheaper of the last two
    reads counts, so neither a first (cold) read nor one slow read makes figures stale."""
    from runner.headline import HeadlineCache

    add_jobs(engine, ["a", "b"], now=NOW - 100)
    clock = [NOW]
    cost = [0.002]  # each read "takes" this long by the fake timer
    ticks = iter(range(10_000))

    def timer() -> float:
        # two calls per read: before and after; the difference is cost[0]
        return cost[0] * (next(ticks) % 2)

    cache = HeadlineCache(
        budget=0.01,
        min_ttl_s=1.0,
        max_ttl_s=30.0,
        clock=lambda: clock[0],
        timer=timer,
        now=lambda: clock[0],
    )
    first = cache.get(engine)
    assert first.counts[Status.PENDING] == 2 and first.now == NOW
    assert cache.reads == 1 and cache.ttl_s == 0.0  # a first read sets no TTL
    assert cache.get(engine) is not first and cache.ttl_s == 0.0  # 0.2 s: under 1 s, none
    add_jobs(engine, ["c"], now=NOW)
    assert cache.get(engine).counts[Status.PENDING] == 3 and cache.reads == 3
    cost[0] = 0.1  # one slow read (a cold cache) after cheap ones: still no TTL
    cache.get(engine)
    assert cache.ttl_s == 0.0 and cache.reads == 4
    cache.get(engine)  # slow twice: 0.1 s a read -> 10 s between reads at a 1 % budget
    assert cache.ttl_s == pytest.approx(10.0) and cache.reads == 5
    kept = cache.get(engine)
    assert cache.reads == 5
    clock[0] = NOW + 9
    assert cache.get(engine) is kept and cache.reads == 5  # within the TTL
    assert cache.get(engine, max_age_s=0).now == NOW + 9 and cache.reads == 6  # forced
    clock[0] = NOW + 20
    assert cache.get(engine).now == NOW + 20 and cache.reads == 7
    cost[0] = 5.0
    for later in (21, 22):
        clock[0] = NOW + later
        cache.get(engine, max_age_s=0)
    assert cache.ttl_s == 30.0 and cache.reads == 9  # bounded


def test_reads_that_cost_too_much_for_a_fresh_read_every_second_are_kept(engine: Engine) -> None:
    """Below 100,000 jobs the figures were read every second whatever it cost (34 ms
    at 99,000 jobs without statistics: 3.4 % of a core).  Now a read that costs that
    much is kept for cost / budget: the bar's once a second reads it a few times a
    minute, within the budget (a first read and the one after it set the TTL)."""
    from runner.headline import COUNT_BUDGET, HeadlineCache

    add_jobs(engine, [f"b{i:04d}" for i in range(2_000)], now=NOW - 100)
    clock = [NOW]
    cost = 0.034  # what the bar's read cost at 99,000 jobs without statistics
    ticks = iter(range(10_000))
    cache = HeadlineCache(
        clock=lambda: clock[0], timer=lambda: cost * (next(ticks) % 2), now=lambda: clock[0]
    )
    for second in range(60):
        clock[0] = NOW + second
        cache.get(engine)
    assert cache.reads <= 2 + 60 / (cost / COUNT_BUDGET)
    assert (cache.reads - 2) * cost / 60 <= COUNT_BUDGET  # after the first two: in budget
    assert cache.ttl_s == pytest.approx(cost / COUNT_BUDGET)


def test_rates_use_the_database_clock_not_the_hosts(
    any_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """finished_at and claimed_at are stamped by the database: a reading host whose
    clock runs a minute ahead must not stretch a 30-second run to 90 seconds."""
    from runner.api import _Reports
    from runner.dbclock import read_now
    from runner.headline import HeadlineCache, read_headline_now

    engine = connect(any_db_url)
    try:
        db_now = read_now(engine)
        add_jobs(engine, [f"s{i:03d}" for i in range(100)], now=db_now - 100)
        finish(
            engine, {f"s{i:03d}": VEC for i in range(10)}, now=db_now - 1, claimed_at=db_now - 30
        )

        def five_minutes(report: dict[str, object]) -> tuple[int, float]:
            five = report["rates"]["5m"]  # type: ignore[index]
            return five["finished"], five["covered_s"]

        honest = read_status(engine)
        skewed_time = time.time
        monkeypatch.setattr(time, "time", lambda: skewed_time() + 60.0)
        skewed = read_status(engine)
        for report in (honest, skewed):
            finished, covered = five_minutes(report)
            # 30 s since the claims, plus however long this test has taken so far
            assert finished == 10 and 30.0 <= covered < 30.0 + 20.0, report["rates"]
            assert report["now"] < time.time() - 30.0  # the database's clock, not ours
        headline = read_headline_now(engine)
        assert headline.rates["5m"].covered_s < 50.0
        assert HeadlineCache().get(engine).rates["5m"].covered_s < 50.0
        shown: list[str] = []
        show_status(engine, as_json=True, top=0, echo=shown.append)
        assert 30.0 <= five_minutes(json.loads(shown[0]))[1] < 50.0

        class Daemon:  # what _Reports asks of the daemon
            headlines = HeadlineCache()

        Daemon.engine = engine  # type: ignore[attr-defined]
        report = _Reports().get(Daemon(), 5)  # type: ignore[arg-type]
        assert 30.0 <= five_minutes(report)[1] < 50.0
    finally:
        engine.dispose()


def test_runner_status_json_is_strict_json(engine: Engine, tmp_path: Path) -> None:
    """A stored duration that is not finite makes the audio rate NaN: the JSON says
    null there, as /status does, never NaN (which most parsers refuse)."""
    add_jobs(engine, ["n1", "n2"], now=NOW - 100)
    finish(engine, {"n1": VEC}, now=NOW - 10, claimed_at=NOW - 20)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET video_duration_s = 1e999 WHERE key = 'n1'")
    shown: list[str] = []
    show_status(engine, as_json=True, top=5, echo=shown.append, clock=lambda: NOW)

    def refuse(token: str) -> None:
        raise AssertionError(f"not JSON: {token}")

    report = json.loads(shown[0], parse_constant=refuse)
    assert report["rates"]["5m"]["finished"] == 1
    assert report["rates"]["5m"]["audio_s"] is None


def test_windowed_queries_walk_the_finished_at_index_without_statistics(tmp_path: Path) -> None:
    """runner never runs ANALYZE: without sqlite_stat1, SQLite preferred an equality on
    ix_jobs_status_id to a range on ix_jobs_finished_at, and read every done and failed
    job at a million of them (2.7 s instead of 0.2).  Every query with a finished_at
    window must search that index, with statistics or without."""
    from sqlalchemy import event

    from runner.headline import read_headline_now

    engine = connect(f"sqlite:///{tmp_path / 'plain.db'}")
    try:
        add_jobs(engine, [f"p{i:03d}" for i in range(300)], now=NOW - 10_000)
        finish(engine, {f"p{i:03d}": VEC for i in range(200)}, now=NOW - 100, claimed_at=NOW - 200)
        finish(engine, {}, {f"p{i:03d}": "HTTP 404" for i in range(200, 250)}, now=NOW - 50)
        with engine.connect() as conn:
            stats = conn.exec_driver_sql(
                "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'"
            ).scalar_one()
        assert stats == 0  # as runner builds it

        seen: list[tuple[str, object]] = []

        def capture(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
            if statement.lstrip().upper().startswith("SELECT") and "finished_at >=" in statement:
                seen.append((statement, params))

        for analyzed in (False, True):
            seen.clear()
            event.listen(engine, "before_cursor_execute", capture)
            try:
                read_status(engine, now=NOW, top=10)
                read_headline_now(engine, now=NOW)
            finally:
                event.remove(engine, "before_cursor_execute", capture)
            # the headline's rates (twice), the chart's buckets and models, the workers
            assert len(seen) >= 5, seen
            with engine.connect() as conn:
                for statement, params in seen:
                    plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
                    details = " / ".join(str(row[-1]) for row in plan)
                    why = (analyzed, statement, details)
                    assert "USING INDEX ix_jobs_finished_at" in details, why
                    assert "ix_jobs_status_id" not in details, why
            with engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()


# --- the throughput chart and the daemons, on SQLite and PostgreSQL ----------------------


def test_throughput_buckets_failures_and_workers(any_db_url: str) -> None:
    from runner import jobs as jobs_module
    from runner.db import connect as connect_db

    engine = connect_db(any_db_url)
    try:
        hour = 3600.0
        now = 1_000_000 * hour + 1_000.0  # 1,000 s into a clock hour
        add_jobs(engine, [f"j{i:02d}" for i in range(12)], now=now - 10 * hour)
        # 2 done in the current (partial) bucket, 1 done + 2 failed an hour ago, 1 done
        # seven hours ago (outside the chart), 1 left running
        finish(engine, {"j00": VEC}, now=now - 7 * hour)
        finish(engine, {"j01": VEC}, {"j02": "HTTP 404", "j03": "HTTP 404"}, now=now - hour)
        finish(engine, {"j04": VEC, "j05": VEC}, now=now - 100, claimed_at=now - 400)
        finish(engine, {}, now=now - 50, keep_running=("j06",))
        report = read_status(engine, now=now, chart_hours=2, bucket_s=hour)
        chart = report["throughput"]
        assert chart["bucket_s"] == hour and chart["since"] == now - 1_000 - hour
        first, last = chart["buckets"]
        assert (first["done"], first["failed"]) == (1, 2)
        assert first["failed_by_class"] == {"download": 2}
        assert first["videos_per_min"] == pytest.approx(3 / 60)
        assert (last["done"], last["failed"], last["audio_s"]) == (2, 0, 4.0)
        assert last["end"] == now
        # the current bucket is 1,000 s old: its rate is over those, not an hour
        assert last["videos_per_min"] == pytest.approx(2 / 1_000 * 60)
        assert last["audio_h_per_h"] == pytest.approx(4.0 / 1_000)
        assert chart["error_classes"] == ["download"]
        assert chart["models"] == [{"model_id": "tiny", "done": 3}]
        (worker,) = report["workers"]
        assert worker["worker_id"] == "test-worker" and worker["host"] == "test-worker"
        assert worker["running"] == 1 and worker["oldest_claim_age_s"] == 50.0
        assert worker["lease_expires_at"] is not None
        assert worker["finished_1h"] == 5 and worker["last_finished_at"] == now - 100
        json.dumps(report)
        assert jobs_module.Status.RUNNING.value in report["counts"]
    finally:
        engine.dispose()
