"""Every command on a real PostgreSQL server, and the claim that lets daemons share it.

The server comes from tests/postgres.py (a fresh database per test); see
tests/test_postgres_scale.py for three daemon processes on one database.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, func, insert, select, text

from runner import jobs
from runner.db import connect, make_engine
from runner.models import jobs as jobs_table
from tests.argv import daemon_args
from tests.conftest import Cli, MediaServer, write_catalogue
from tests.postgres import free_port

FILES = ("audio_vectors.json", "audio_process.json", "audio_fail.json")


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    engine = connect(pg_url)
    yield engine
    engine.dispose()


def add_pending(engine: Engine, n: int) -> None:
    rows = [{"key": f"k{i:04d}", "url": f"http://x/{i}", "created_at": 0.0} for i in range(n)]
    with engine.begin() as conn:
        conn.execute(insert(jobs_table), rows)


def test_concurrent_claims_never_share_a_job(engine: Engine, pg_url: str) -> None:
    """Six claimers, each with its own connection pool, drain 300 jobs in small bites:
    every job is claimed exactly once and no claim exceeds its limit."""
    add_pending(engine, 300)

    def drain(worker: int) -> list[int]:
        own = make_engine(pg_url)
        got: list[int] = []
        while batch := jobs.claim(own, worker_id=f"w{worker}", now=1.0, limit=3, lease_s=60):
            assert len(batch) <= 3
            got += [job.id for job in batch]
        own.dispose()
        return got

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        claimed = list(pool.map(drain, range(6)))
    every = [job_id for ids in claimed for job_id in ids]
    assert len(every) == len(set(every)) == 300
    with engine.connect() as conn:
        rows = conn.execute(select(jobs_table.c.worker_id, jobs_table.c.attempts)).all()
    for worker, ids in enumerate(claimed):
        assert sum(1 for r in rows if r.worker_id == f"w{worker}") == len(ids)
    assert {r.attempts for r in rows} == {0}  # claimed, not started: nothing charged


def test_claim_skips_rows_another_transaction_holds(engine: Engine, pg_url: str) -> None:
    """SKIP LOCKED: a claimer neither waits for nor takes a row locked elsewhere."""
    add_pending(engine, 3)
    # were it to wait for the lock, it would fail after 10 s instead of hanging
    impatient = make_engine(pg_url + "?options=-c%20lock_timeout%3D10000")
    with engine.connect() as holder:
        holder.execute(text("SELECT id FROM jobs WHERE key = 'k0000' FOR UPDATE"))
        got = jobs.claim(impatient, worker_id="w", now=1.0, limit=10, lease_s=60)
        impatient.dispose()
        assert [job.key for job in got] == ["k0001", "k0002"]
        holder.rollback()
    assert [
        job.key for job in jobs.claim(engine, worker_id="w", now=1.0, limit=10, lease_s=60)
    ] == ["k0000"]


def test_state_changes(engine: Engine) -> None:
    """The fenced statements of runner.jobs, on PostgreSQL's SQL."""
    add_pending(engine, 4)
    claimed = jobs.claim(engine, worker_id="w", now=1.0, limit=4, lease_s=10)
    ids = [job.id for job in claimed]
    started = [jobs.start(engine, job, now=2.0) for job in claimed[1:]]
    assert jobs.renew_leases(engine, worker_id="w", now=5.0, lease_s=10) == set(ids)
    failure = jobs.Failure("HTTP 503", "download", 503)
    give_back = jobs.Outcome(claimed[0])
    fail = jobs.Outcome(started[0], failure=failure)
    lost = jobs.store_outcomes(
        engine,
        [
            give_back,
            fail,
            jobs.Outcome(started[0], failure=failure),  # no longer running: lost, not raised
            jobs.Outcome(started[1], failure=failure, retry_after_s=100.0),
        ],
        now=6.0,
    )
    assert lost == [jobs.Outcome(started[0], failure=failure)]
    retried = jobs.claim(engine, worker_id="w", now=7.0, limit=4, lease_s=10)
    assert [job.id for job in retried] == [ids[0]]  # ids[2] waits out its backoff
    assert jobs.release(engine, retried, worker_id="w") == 1
    assert jobs.requeue_abandoned(engine, now=16.0, max_attempts=1) == (0, 1)
    with engine.connect() as conn:
        rows = {
            r.id: r
            for r in conn.execute(
                select(
                    jobs_table.c.id,
                    jobs_table.c.status,
                    jobs_table.c.attempts,
                    jobs_table.c.error,
                    jobs_table.c.not_before,
                )
            )
        }
    assert (rows[ids[0]].status, rows[ids[0]].attempts) == ("pending", 0)  # never started
    assert (rows[ids[1]].status, rows[ids[1]].attempts) == ("failed", 1)
    assert (rows[ids[2]].status, rows[ids[2]].attempts, rows[ids[2]].not_before) == (
        "pending",
        1,
        106.0,
    )
    assert rows[ids[3]].status == "failed"
    assert rows[ids[3]].error == (
        "gave up after 1 attempts; the worker stopped (killed or crashed) during the last"
    )
    assert jobs.claim(engine, worker_id="v", now=50.0, limit=9, lease_s=10)[0].id == ids[0]
    assert jobs.requeue_failed(engine, all_failed=True) == 2


def test_plain_postgresql_url_uses_psycopg_3(pg_url: str) -> None:
    report = json.loads(Cli(pg_url.replace("+psycopg", ""))("status", "--json").stdout)
    assert report["total"] == 0


def test_unreachable_server_is_one_line_error() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    result = Cli(url)("status", ok=False)
    assert result.exit_code == 1
    assert result.stderr.startswith("runner: error: cannot open database:"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def catalogue(server: MediaServer) -> dict:
    return {
        "stereo": {"url": server.url("media/stereo.mp4"), "title": "two channels"},
        "song": {"url": server.url("media/song.mp3")},
        "opus": {"url": server.url("media/voice.opus")},
        "missing": {"url": server.url("status/404")},
        "garbage": {"url": server.url("media/random.bin")},
        "no-url": {"title": "nothing to fetch"},
    }


def run(cli: Cli, tmp_path: Path, model: Path, records: dict) -> Path:
    """import (twice, the second changing a URL) -> daemon -> export."""
    tmp_path.mkdir(exist_ok=True)
    first = dict(records, song={"url": records["stereo"]["url"]})
    cli("import", str(write_catalogue(tmp_path / "first.json", first)))
    line = cli("import", str(write_catalogue(tmp_path / "all_videos.json", records))).stdout
    assert line.strip() == "inserted 0, updated 1, unchanged 4, invalid 1", line
    cli(
        *daemon_args(model, tmp_path / "work", "--until-done"),
        "--batch-seconds",
        "30",
        "--max-attempts",
        "1",
    )
    out = tmp_path / "out"
    cli("export", "--out", str(out))
    return out


def load(out: Path) -> list[dict]:
    return [json.loads((out / name).read_text()) for name in FILES]


def test_end_to_end_matches_sqlite(
    pg_url: str, tmp_path: Path, tiny_model: Path, server: MediaServer
) -> None:
    """import -> daemon -> export on PostgreSQL gives the files SQLite gives."""
    records = catalogue(server)
    pg_out = run(Cli(pg_url), tmp_path / "pg", tiny_model, records)
    lite_out = run(Cli(f"sqlite:///{tmp_path / 'lite.db'}"), tmp_path / "lite", tiny_model, records)
    vectors, process, fail = load(pg_out)
    lite_vectors, lite_process, lite_fail = load(lite_out)
    assert vectors.keys() == lite_vectors.keys() == {"stereo", "song", "opus"}
    for key, vector in vectors.items():
        np.testing.assert_allclose(vector, lite_vectors[key], rtol=1e-5, atol=1e-6)
        assert process[key]["channels_count"] == lite_process[key]["channels_count"]
        assert process[key]["video_duration"] == lite_process[key]["video_duration"]
    assert fail == lite_fail
    assert fail.keys() == {"missing", "garbage", "no-url"}


def test_maintenance_commands(
    pg_url: str, tmp_path: Path, tiny_model: Path, server: MediaServer
) -> None:
    """status, export --format npz --pca, retry, import-results and prune on PostgreSQL."""
    cli = Cli(pg_url)
    out = run(cli, tmp_path, tiny_model, catalogue(server))
    report = json.loads(cli("status", "--json").stdout)
    assert report["counts"] == {"pending": 0, "running": 0, "done": 3, "failed": 3}, report
    cli("export", "--out", str(tmp_path / "npz"), "--format", "npz", "--pca", "2")
    with np.load(tmp_path / "npz" / "vectors.npz") as npz:
        assert npz["vectors"].shape[0] == 3
    with np.load(tmp_path / "npz" / "pca.npz") as pca:
        assert pca["vectors"].shape == (3, 2)

    assert cli("retry", "missing").stdout.strip() == "requeued 1"
    assert cli("retry", "--failed").stdout.strip() == "requeued 1"  # no-url has nothing to fetch
    assert json.loads(cli("status", "--json").stdout)["counts"]["pending"] == 2

    # the done rows lost, then adopted back from the export (the old script's files)
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE status = 'done'"))
    line = cli("import-results", str(out)).stdout
    assert line.startswith("adopted 3,"), line
    vectors = load(out)[0]
    again = tmp_path / "again"
    cli("export", "--out", str(again))
    assert load(again)[0] == vectors

    line = cli("prune", "--done-before", "2100-01-01").stdout.strip()
    assert line.startswith("pruned 3 done job(s); jobs table "), line
    assert line.endswith("(PostgreSQL reuses the freed space for new rows)"), line
    with engine.connect() as conn:
        left = conn.execute(select(func.count()).select_from(jobs_table)).scalar_one()
    engine.dispose()
    assert left == 3  # the failed and retried jobs stay
