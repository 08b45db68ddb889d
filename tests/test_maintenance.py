"""Leases, the reaper, the heartbeat, the retry policy and `runner retry`, all at a
fixed `now`: nothing here sleeps."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import pytest
import sqlalchemy.exc
from sqlalchemy import Engine, select

from runner import jobs, maintenance, queries
from runner.db import connect
from runner.dbthread import DbThread
from runner.models import jobs as jobs_table
from runner.retry import RetryPolicy, parse_retry_after
from tests.conftest import Cli, write_catalogue

NOW = 1_000_000.0
LEASE_S = 60.0
#: a worker on another machine: only its lease can tell that it is gone
REMOTE = "elsewhere:4242:cafe0000"


@pytest.fixture
def engine(cli: Cli, tmp_path: Path) -> Iterator[Engine]:
    records = {f"k{i}": {"url": f"http://example.invalid/{i}.mp4"} for i in range(4)}
    cli("import", str(write_catalogue(tmp_path / "all_videos.json", records)))
    engine = connect(cli.db_url)
    yield engine
    engine.dispose()


def rows(engine: Engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r.key: r._asdict() for r in conn.execute(select(jobs_table))}


def claim_all(engine: Engine, worker_id: str, now: float = NOW) -> list[jobs.Job]:
    """Claimed and started: each try charged, as a daemon's download start does."""
    claimed = jobs.claim(engine, worker_id=worker_id, now=now, limit=100, lease_s=LEASE_S)
    return [jobs.start(engine, job, now=now) for job in claimed]


def statuses(engine: Engine) -> dict[str, str]:
    return {key: row["status"] for key, row in rows(engine).items()}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- leases and the reaper ---------------------------------------------------------


def test_expired_lease_is_reaped_back_to_pending(engine: Engine) -> None:
    claim_all(engine, REMOTE)
    assert maintenance.reap(engine, now=NOW + LEASE_S - 1, max_attempts=5) == (0, 0)
    assert set(statuses(engine).values()) == {"running"}

    assert maintenance.reap(engine, now=NOW + LEASE_S + 1, max_attempts=5) == (4, 0)
    for row in rows(engine).values():
        assert row["status"] == "pending"
        assert row["worker_id"] is None and row["lease_expires_at"] is None
        assert row["attempts"] == 1  # the lost attempt still counts
    assert len(claim_all(engine, "next:1:x", now=NOW + LEASE_S + 2)) == 4


def test_out_of_attempts_is_failed_with_gave_up(engine: Engine) -> None:
    for attempt in range(3):
        now = NOW + attempt * 1000
        claim_all(engine, REMOTE, now=now)
        requeued, failed = maintenance.reap(engine, now=now + LEASE_S + 1, max_attempts=3)
        assert (requeued, failed) == ((4, 0) if attempt < 2 else (0, 4))
    for row in rows(engine).values():
        assert row["status"] == "failed"
        assert row["attempts"] == 3
        assert row["error"].startswith("gave up after 3 attempts")
        assert row["error_class"] == "lost"
        assert row["finished_at"] == NOW + 2000 + LEASE_S + 1


def test_gave_up_keeps_the_previous_error(engine: Engine) -> None:
    [job, *_] = claim_all(engine, REMOTE)
    failure = jobs.Failure("HTTP 503 Service Unavailable", "download", http_status=503)
    with engine.begin() as conn:
        jobs.retry_later(conn, job, failure, delay_s=0, now=NOW)
    claim_all(engine, REMOTE, now=NOW + 1)
    maintenance.reap(engine, now=NOW + 1000, max_attempts=2)
    row = rows(engine)[job.key]
    assert row["status"] == "failed"
    assert row["error"] == (
        "gave up after 2 attempts; the worker stopped (killed or crashed) during the last;"
        " previous error: HTTP 503 Service Unavailable"
    )
    assert (row["error_class"], row["http_status"]) == ("download", 503)


def test_heartbeat_keeps_a_long_job_from_being_reaped(engine: Engine) -> None:
    me = maintenance.new_worker_id()
    claim_all(engine, me)
    # a 3-hour video: the heartbeat renews every quarter lease, the reaper never takes it
    for tick in range(1, 3 * 3600 // int(LEASE_S / 4)):
        now = NOW + tick * LEASE_S / 4
        assert len(maintenance.heartbeat(engine, worker_id=me, now=now, lease_s=LEASE_S)) == 4
        assert maintenance.reap(engine, now=now + 1, max_attempts=5) == (0, 0)
    assert set(statuses(engine).values()) == {"running"}
    # the heartbeat stops (the daemon hangs or its host died): one lease later it is reaped
    assert maintenance.reap(engine, now=now + LEASE_S + 1, max_attempts=5) == (4, 0)


def test_heartbeat_renews_only_its_own_jobs(engine: Engine) -> None:
    claim_all(engine, REMOTE)
    assert maintenance.heartbeat(engine, worker_id="other:1:x", now=NOW + 50, lease_s=60) == set()
    assert maintenance.reap(engine, now=NOW + LEASE_S + 1, max_attempts=5) == (4, 0)


def test_heartbeat_of_the_jobs_in_hand_lets_a_lost_claim_expire(engine: Engine) -> None:
    """A claim whose reply the daemon never got (a database error after the commit)
    is held by a live worker that does not know it: it must expire, not be renewed."""
    me = maintenance.new_worker_id()
    claimed = claim_all(engine, me)
    in_hand = claimed[:3]
    now = NOW + LEASE_S / 2
    renewed = maintenance.heartbeat(engine, worker_id=me, now=now, lease_s=LEASE_S, held=in_hand)
    assert renewed == {job.id for job in in_hand}
    assert maintenance.heartbeat(engine, worker_id=me, now=now, lease_s=LEASE_S, held=[]) == set()
    assert maintenance.reap(engine, now=NOW + LEASE_S + 1, max_attempts=5) == (1, 0)
    assert sorted(statuses(engine).values()) == ["pending", "running", "running", "running"]


def test_daemon_rides_out_a_database_that_is_briefly_gone(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OperationalError (failover, dropped connection) is retried with backoff, then
    raised if it lasts; the retried call runs against the real database."""
    db = DbThread(engine, retry_delays_s=(0.01, 0.01))
    failures = iter([True, True])

    def count_pending_after_outage(engine: Engine) -> int:
        if next(failures, False):
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed"))
        return queries.count_pending(engine)

    assert asyncio.run(db.call(count_pending_after_outage)) == 4
    failures = iter([True, True, True])
    with pytest.raises(sqlalchemy.exc.OperationalError):
        asyncio.run(db.call(count_pending_after_outage))
    db.close()


def test_dead_local_worker_is_reaped_before_its_lease_ends(engine: Engine) -> None:
    dead = maintenance.worker_id_for(dead_pid(), "0badc0de")
    alive = maintenance.new_worker_id()  # this very process
    with engine.begin() as conn:
        ids = [r.id for r in conn.execute(select(jobs_table.c.id).order_by(jobs_table.c.id))]
    jobs.claim(engine, worker_id=dead, now=NOW, limit=2, lease_s=LEASE_S)
    jobs.claim(engine, worker_id=alive, now=NOW, limit=1, lease_s=LEASE_S)
    jobs.claim(engine, worker_id=REMOTE, now=NOW, limit=1, lease_s=LEASE_S)
    assert maintenance.reap(engine, now=NOW + 1, max_attempts=5) == (2, 0)
    by_id = {row["id"]: row for row in rows(engine).values()}
    assert [by_id[i]["status"] for i in ids] == ["pending", "pending", "running", "running"]


def test_dead_worker_ids_are_parsed_safely() -> None:
    ours = maintenance.worker_id_for
    host, space = maintenance.HOST, maintenance.PID_SPACE
    ids = [
        ours(12, "a"),
        ours(13, "b"),  # alive
        f"other:12:{space}:c",  # another machine
        f"{host}:12:0000ffff:d",  # same hostname, another machine or container
        f"{host}:12:e",  # an id of the older host:pid:nonce format
        "garbage",
        f"{host}:x:{space}:y",
        "",
    ]
    assert maintenance.dead_local_workers(ids, alive=lambda pid: pid == 13) == [ours(12, "a")]
    assert maintenance.pid_alive(dead_pid()) is False
    assert maintenance.new_worker_id().startswith(f"{host}:")


def test_a_same_named_host_elsewhere_is_left_to_its_lease(engine: Engine) -> None:
    """Two machines both called like this one share the database: the other's pid
    means nothing here, so its jobs wait for their lease instead of being taken."""
    twin = f"{maintenance.HOST}:{dead_pid()}:0000ffff:0badc0de"
    claim_all(engine, twin)
    assert maintenance.reap(engine, now=NOW + 1, max_attempts=5) == (0, 0)
    assert maintenance.reap(engine, now=NOW + LEASE_S + 1, max_attempts=5) == (4, 0)


def test_worker_ids_fit_their_column() -> None:
    longest = maintenance.worker_id_for(4_194_304, "f" * 8)  # pid_max on Linux
    assert len(longest) <= len(maintenance.HOST) + 28 <= 64


def test_release_gives_back_all_a_worker_holds_and_nothing_else(engine: Engine) -> None:
    """A stopping daemon releases by worker id, so even a claim whose result it never
    saw (its task was cancelled while the statement committed) goes back."""
    me = maintenance.new_worker_id()
    for job in jobs.claim(engine, worker_id=me, now=NOW, limit=3, lease_s=LEASE_S):
        jobs.start(engine, job, now=NOW)
    for job in jobs.claim(engine, worker_id=REMOTE, now=NOW, limit=1, lease_s=LEASE_S):
        jobs.start(engine, job, now=NOW)
    assert jobs.release(engine, [], worker_id=me) == 0
    assert jobs.release(engine, None, worker_id=me) == 3
    after = rows(engine)
    assert sorted((r["status"], r["attempts"]) for r in after.values()) == [
        ("pending", 0),
        ("pending", 0),
        ("pending", 0),
        ("running", 1),
    ]
    assert jobs.release(engine, None, worker_id=me) == 0


# --- retry policy ------------------------------------------------------------------


def test_retry_delays_double_and_are_capped() -> None:
    policy = RetryPolicy(base_delay_s=30, max_delay_s=200, jitter=0)
    assert [policy.delay_s(n) for n in range(1, 6)] == [30, 60, 120, 200, 200]
    assert policy.delay_s(0) == 30
    assert policy.delay_s(10_000) == 200  # no overflow on a huge attempt count


def test_retry_jitter_stays_within_its_bounds_and_spreads() -> None:
    policy = RetryPolicy(base_delay_s=100, max_delay_s=10_000, jitter=0.25)
    rng = random.Random(1)
    delays = [policy.delay_s(2, rng=rng) for _ in range(2000)]
    assert all(150 <= d <= 250 for d in delays)
    assert min(delays) < 160 and max(delays) > 240  # spread, not one value
    assert policy.delay_s(2, rng=random.Random(5)) == policy.delay_s(2, rng=random.Random(5))


def test_retry_after_is_a_floor_capped_at_the_max() -> None:
    policy = RetryPolicy(base_delay_s=1, max_delay_s=600, jitter=0.25)
    rng = random.Random(0)
    assert all(policy.delay_s(1, retry_after_s=90, rng=rng) >= 90 for _ in range(100))
    assert policy.delay_s(1, retry_after_s=0, rng=rng) <= 1.25  # never shortened either
    assert policy.delay_s(1, retry_after_s=10**9, rng=rng) == 600


def test_gives_up_at_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.gives_up(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


def test_parse_retry_after() -> None:
    assert parse_retry_after("120", now=NOW) == 120
    assert parse_retry_after(" 7 ", now=NOW) == 7
    assert parse_retry_after(formatdate(NOW + 30, usegmt=True), now=NOW) == pytest.approx(30)
    assert parse_retry_after(formatdate(NOW - 30, usegmt=True), now=NOW) == 0
    hostile = ("1 Jan 2020 0:0:0 +99999999999999999999", "\u00b2", "Mon, 1 Jan 99999 0:0:0 GMT")
    for junk in (None, "", "soon", "-5", "1.5e3", "Mon, 99 Foo 2020", *hostile):
        assert parse_retry_after(junk, now=NOW) is None


# --- runner retry ------------------------------------------------------------------


def fail_some(engine: Engine) -> None:
    """k0: HTTP 404 (download), k1: undecodable (decode), k2: HTTP 503 given up; k3 pending."""
    claimed = {
        job.key: job
        for job in jobs.claim(engine, worker_id=REMOTE, now=NOW, limit=3, lease_s=LEASE_S)
    }
    failures = {
        "k0": jobs.Failure("HTTP 404 Not Found", "download", 404),
        "k1": jobs.Failure("no audio stream", "decode"),
        "k2": jobs.Failure("gave up after 5 attempts: HTTP 503", "download", 503),
    }
    with engine.begin() as conn:
        for key, failure in failures.items():
            jobs.fail(conn, claimed[key], failure, now=NOW)


def test_retry_needs_a_selection(cli: Cli, engine: Engine) -> None:
    fail_some(engine)
    result = cli("retry", ok=False)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "runner: error: nothing selected: give KEYs, --failed or --error-class"
    ]


def test_retry_by_key_class_and_all(cli: Cli, engine: Engine) -> None:
    fail_some(engine)
    assert cli("retry", "k0", "k3", "nope").output.strip() == "requeued 1"  # k3 is not failed
    assert statuses(engine) == {"k0": "pending", "k1": "failed", "k2": "failed", "k3": "pending"}
    assert rows(engine)["k0"]["attempts"] == 0  # a fresh set of attempts
    assert rows(engine)["k0"]["finished_at"] is None

    assert cli("retry", "--error-class", "embed").output.strip() == "requeued 0"
    assert cli("retry", "--error-class", "decode").output.strip() == "requeued 1"
    assert statuses(engine)["k1"] == "pending"

    assert cli("retry", "--failed").output.strip() == "requeued 1"
    assert set(statuses(engine).values()) == {"pending"}
    assert len(claim_all(engine, "again:1:x", now=NOW + 1)) == 4  # all claimable at once
