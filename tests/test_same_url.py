"""Issue 14: keys whose URLs are the same video are fetched once.

Equal URLs (up to scheme and host case, default port and fragment) share one
download, decode and embedding; every key gets the same vector and process record
(or the same failure), and its own row stays queryable.  Two daemons never fetch
one URL at the same time: a partial unique index lets only one key of a URL run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from runner import jobs
from runner.catalogue_write import Record, upsert_records
from runner.db import make_engine, migrate
from runner.jobs import Failure, Outcome, Result
from runner.urls import same_fetch_url, url_hash
from tests.argv import runner_process
from tests.conftest import Cli, write_catalogue
from tests.hitserver import killed_at_exit, make_corpus, serving
from tests.test_crash import start_daemon, wait_for


def test_spellings_of_one_url_are_one_url() -> None:
    same = [
        "http://Example.COM/v/a.mp4?x=1",
        "HTTP://example.com:80/v/a.mp4?x=1#t=10",
        "  http://example.com/v/a.mp4?x=1  ",
    ]
    assert {same_fetch_url(u) for u in same} == {"http://example.com/v/a.mp4?x=1"}
    assert len({url_hash(u) for u in same}) == 1
    assert same_fetch_url("https://example.com:443") == "https://example.com/"
    different = [
        "http://example.com/v/a.mp4?x=1",
        "http://example.com/v/A.mp4?x=1",  # paths are case-sensitive
        "http://example.com/v/a.mp4?x=2",
        "https://example.com/v/a.mp4?x=1",
        "http://example.com:8080/v/a.mp4?x=1",
        "http://user@example.com/v/a.mp4?x=1",
    ]
    assert len({url_hash(u) for u in different}) == len(different)
    assert url_hash(None) is None and url_hash("") is None
    # what the fast path and urlsplit make of one URL agree
    assert same_fetch_url("http://EXAMPLE.com:0080/p") == "http://example.com/p"
    assert same_fetch_url("http://[::1]:80/p") == "http://[::1]/p"


def _engine(db_url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(db_url)
    migrate(engine)
    return engine


def _import(engine, records: dict[str, str], *, now: float = 1000.0) -> None:  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        upsert_records(conn, [Record(key, url, {}) for key, url in records.items()], now=now)


def _rows(engine, columns: str = "key, status") -> dict[str, tuple]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT {columns} FROM jobs ORDER BY key")).all()
    return {row[0]: tuple(row[1:]) for row in rows}


def _result(value: float) -> Result:
    return Result(
        vector=np.full(4, value, dtype=np.float32),
        video_duration_s=2.0,
        channels_count=1,
        processing_audio_time_s=0.5,
        model_id="m",
        embed_spec="spec1",
    )


NINE = {
    "a1": "http://media.test/v/a.mp4",
    "a2": "HTTP://Media.Test:80/v/a.mp4#start",
    "a3": "http://media.test/v/a.mp4#other",
    "b1": "http://media.test/v/b.mp4",
    "b2": "http://MEDIA.test/v/b.mp4",
    "b3": "http://media.test:80/v/b.mp4",
    "c1": "https://media.test/v/c.mp4",
    "c2": "https://media.test:443/v/c.mp4",
    "c3": "HTTPS://media.test/v/c.mp4#x",
}


def test_one_claim_per_url_and_its_end_is_shared(any_db_url: str) -> None:
    engine = _engine(any_db_url)
    _import(engine, NINE)
    claimed = jobs.claim(engine, worker_id="w", limit=10, lease_s=60)
    assert [job.key for job in claimed] == ["a1", "b1", "c1"]
    # nothing more while they run, whoever asks
    assert jobs.claim(engine, worker_id="other", limit=10, lease_s=60) == []
    a, b, c = (jobs.start(engine, job) for job in claimed)
    lost = jobs.store_outcomes(
        engine,
        [
            Outcome(a, result=_result(0.5)),
            Outcome(b, failure=Failure("HTTP 404", "http", 404)),
            Outcome(c, failure=Failure("timed out", "timeout"), retry_after_s=300),
        ],
        now=2000.0,
    )
    assert lost == []
    rows = _rows(
        engine,
        "key, status, vector, vector_dim, model_id, embed_spec, error_class,"
        " http_status, attempts, not_before, video_duration_s",
    )
    vector = np.full(4, 0.5, dtype="<f4").tobytes()
    for key in ("a1", "a2", "a3"):
        assert rows[key][:6] == ("done", vector, 4, "m", "spec1", None), key
        assert rows[key][9] == 2.0
    assert rows["a1"][7] == 1 and rows["a2"][7] == 0  # only the fetched key spent a try
    for key in ("b1", "b2", "b3"):
        assert rows[key][0] == "failed" and rows[key][5:7] == ("http", 404), key
    for key in ("c1", "c2", "c3"):  # the siblings wait as long as the failed fetch
        assert rows[key][0] == "pending" and rows[key][8] == pytest.approx(2300.0), key
    assert jobs.claim(engine, worker_id="w", limit=10, lease_s=60, now=2100.0) == []
    again = jobs.claim(engine, worker_id="w", limit=10, lease_s=60, now=2400.0)
    assert [job.key for job in again] == ["c1"]


def test_a_key_added_after_its_url_is_done_takes_the_vector_unfetched(any_db_url: str) -> None:
    engine = _engine(any_db_url)
    _import(engine, {"first": "http://media.test/v/a.mp4"})
    (job,) = jobs.claim(engine, worker_id="w", limit=4, lease_s=60)
    jobs.store_outcomes(engine, [Outcome(jobs.start(engine, job), result=_result(0.25))])
    _import(engine, {"later": "HTTP://media.test/v/a.mp4#again", "other": "http://media.test/v/b"})
    claimed = jobs.claim(engine, worker_id="w", limit=4, lease_s=60)
    assert [j.key for j in claimed] == ["other"]
    rows = _rows(engine, "key, status, vector, attempts, worker_id, claimed_at")
    # served, not fetched: no try spent, no worker credited
    assert rows["later"] == ("done", np.full(4, 0.25, dtype="<f4").tobytes(), 0, None, None)


def test_api_queued_keys_share_only_with_api_queued_keys(any_db_url: str) -> None:
    """A URL an API caller queued is fetched guarded: an unguarded fetch's vector
    (or a guarded fetch's refusal) must not cross between the two."""
    engine = _engine(any_db_url)
    _import(
        engine, {"mine": "http://intranet.test/v/a.mp4", "theirs": "http://intranet.test/v/a.mp4"}
    )
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET origin = 'api' WHERE key = 'theirs'"))
    (job,) = jobs.claim(engine, worker_id="w", limit=4, lease_s=60)
    assert job.key == "mine"
    jobs.store_outcomes(engine, [Outcome(jobs.start(engine, job), result=_result(1.0))])
    (theirs,) = jobs.claim(engine, worker_id="w", limit=4, lease_s=60)
    assert theirs.key == "theirs"  # fetched on its own, guarded
    jobs.store_outcomes(
        engine, [Outcome(jobs.start(engine, theirs), failure=Failure("refused", "guarded"))]
    )
    assert _rows(engine) == {"mine": ("done",), "theirs": ("failed",)}


def test_a_reaped_last_try_fails_its_siblings_too(any_db_url: str) -> None:
    """A URL that kills its daemon every time fails once for all its keys, instead of
    killing a daemon max_attempts times per key."""
    engine = _engine(any_db_url)
    _import(engine, {"k1": "http://media.test/v/killer", "k2": "http://media.test/v/killer#2"})
    (job,) = jobs.claim(engine, worker_id="dead", limit=4, lease_s=60, now=1000.0)
    jobs.start(engine, job, now=1000.0)
    assert jobs.requeue_abandoned(engine, max_attempts=1, now=5000.0) == (0, 1)
    rows = _rows(engine, "key, status, error_class, attempts")
    assert rows == {"k1": ("failed", "lost", 1), "k2": ("failed", "lost", 0)}


def test_a_changed_url_joins_its_new_siblings(any_db_url: str) -> None:
    engine = _engine(any_db_url)
    _import(engine, {"x": "http://media.test/v/old", "y": "http://media.test/v/new"})
    _import(engine, {"x": "http://MEDIA.test/v/new"})
    assert [j.key for j in jobs.claim(engine, worker_id="w", limit=4, lease_s=60)] == ["x"]


def _in_threads(workers: int, work: Callable[[str], None]) -> None:
    """`work(name)` in `workers` threads released together; none may raise."""
    errors: list[BaseException] = []
    go = threading.Barrier(workers)

    def run(name: str) -> None:
        try:
            go.wait()
            work(name)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"w{i}",)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


def test_claims_racing_on_postgresql_never_run_one_url_twice(pg_url: str) -> None:
    """Many claimers at once on keys that share few URLs: the unique index refuses
    a second running key of a URL, the claim retries, and no claim raises."""
    engine = _engine(pg_url)
    _import(engine, {f"k{i:03d}": f"http://media.test/v/{i % 7}" for i in range(140)})
    claimed: list[list[str]] = []

    def claimer(name: str) -> None:
        for _ in range(20):
            batch = jobs.claim(engine, worker_id=name, limit=3, lease_s=60)
            claimed.append([j.key for j in batch])
            with engine.begin() as conn:
                running = conn.execute(
                    text(
                        "SELECT url_hash, count(*) FROM jobs WHERE status = 'running'"
                        " GROUP BY url_hash HAVING count(*) > 1"
                    )
                ).all()
            assert running == []
            jobs.store_outcomes(
                engine, [Outcome(jobs.start(engine, j), result=_result(1.0)) for j in batch]
            )

    _in_threads(4, claimer)
    fetched = [key for batch in claimed for key in batch]
    assert len(fetched) == 7  # one per URL, the rest took its end
    assert set(_rows(engine).values()) == {("done",)}


def _finished(db_url: str) -> bool:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return not conn.execute(
                text("SELECT 1 FROM jobs WHERE status IN ('pending', 'running') LIMIT 1")
            ).first()
    finally:
        engine.dispose()


def _run_daemons(db_url: str, tmp_path: Path, tiny_model: Path, daemons: int) -> None:
    """Six clips, each under three keys spelt three ways; `daemons` daemons at once.

    Every clip is fetched once (the server counts hits per path); each key gets
    its own row, and the three keys of a clip the same vector and process record.
    """
    files = make_corpus(tmp_path / "media", 6)
    names = sorted(files)
    with serving(files) as server:
        server.pause_s = 0.3  # fetches overlap, so a second fetch of a URL would show
        scheme, rest = server.base_url.split("://")
        spellings = [
            f"{scheme}://{rest}/v/{{}}",
            f"HTTP://{rest}/v/{{}}#k",
            f"{scheme}://{rest}/v/{{}}#t=1",
        ]
        records = {
            f"{n}-{i}": {"url": spell.format(n)} for n in names for i, spell in enumerate(spellings)
        }
        catalogue = write_catalogue(tmp_path / "all_videos.json", records)
        done = subprocess.run(
            runner_process(db_url, "import", str(catalogue)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        procs = [
            start_daemon(db_url, tiny_model, tmp_path / f"work{i}", "--prefetch-files=2")
            for i in range(daemons)
        ]
        with killed_at_exit(*procs):

            def finished() -> bool:
                assert all(p.poll() is None for p in procs), "a daemon died"
                return _finished(db_url)

            wait_for(finished, timeout_s=180)
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(60)
        hits = {name: server.hits_of(name) for name in names}
    log_text = (tmp_path / "daemon.log").read_text()
    assert [p.returncode for p in procs] == [0] * daemons, log_text[-3000:]
    assert "Traceback" not in log_text
    assert hits == dict.fromkeys(names, 1), hits
    out = tmp_path / "out"
    Cli(db_url)("export", "--out", str(out))
    vectors = json.loads((out / "audio_vectors.json").read_text())
    process = json.loads((out / "audio_process.json").read_text())
    assert len(vectors) == len(records)
    for name in names:
        keys = [f"{name}-{i}" for i in range(len(spellings))]
        assert all(vectors[k] == vectors[keys[0]] for k in keys)
        assert all(process[k] == process[keys[0]] for k in keys)
    assert len({json.dumps(vectors[f"{n}-0"]) for n in names}) == len(names)


def test_one_daemon_fetches_each_url_once(tmp_path: Path, tiny_model: Path) -> None:
    _run_daemons(f"sqlite:///{tmp_path / 'runner.db'}", tmp_path, tiny_model, daemons=1)


def test_two_daemons_never_fetch_one_url_twice(
    any_db_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    _run_daemons(any_db_url, tmp_path, tiny_model, daemons=2)


def test_claimers_contending_for_few_urls_on_postgresql_never_deadlock(pg_url: str) -> None:
    """Six claimers over keys of 50 URLs interleaved by id, releasing at once so the
    URLs stay contended.  Row locks alone let two claims insert into the unique
    index of running URLs in opposite orders and deadlock (a review measured 21
    in 40 s); a per-URL try-lock makes a claim skip a URL another claim holds."""
    engine = _engine(pg_url)
    _import(engine, {f"k{i:05d}": f"http://media.test/v/{i % 50}" for i in range(5000)})
    claimed = 0
    stop_at = time.monotonic() + 4

    def claimer(name: str) -> None:
        nonlocal claimed
        while time.monotonic() < stop_at:
            batch = jobs.claim(engine, worker_id=name, limit=32, lease_s=600)
            claimed += len(batch)
            jobs.release(engine, batch, worker_id=name)

    _in_threads(6, claimer)
    assert claimed > 0


def test_a_url_under_many_keys_is_shared_in_bounded_transactions(
    any_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key of the URL takes the end, a chunk per transaction, so one write
    never holds the database for a million keys."""
    monkeypatch.setattr(jobs, "SHARE_CHUNK", 3)
    engine = _engine(any_db_url)
    _import(engine, {f"k{i:02d}": f"http://media.test/v/one#{i}" for i in range(11)})
    _import(engine, {"other": "http://media.test/v/two"})
    claimed = jobs.claim(engine, worker_id="w", limit=4, lease_s=60)
    assert [j.key for j in claimed] == ["k00", "other"]
    jobs.store_outcomes(engine, [Outcome(jobs.start(engine, claimed[0]), result=_result(2.0))])
    rows = _rows(engine)
    assert {k: v for k, v in rows.items() if k != "other"} == {
        f"k{i:02d}": ("done",) for i in range(11)
    }
    assert rows["other"] == ("running",)


def test_one_claim_serves_every_new_key_of_a_done_url(any_db_url: str) -> None:
    """Keys added after their URL was done are served by one call to claim (a round
    per key, since one key of a URL is claimed at a time), not one per poll."""
    engine = _engine(any_db_url)
    _import(engine, {"first": "http://media.test/v/a.mp4"})
    (job,) = jobs.claim(engine, worker_id="w", limit=4, lease_s=60)
    jobs.store_outcomes(engine, [Outcome(jobs.start(engine, job), result=_result(0.5))])
    _import(engine, {f"again{i}": f"http://media.test/v/a.mp4#{i}" for i in range(3)})
    assert jobs.claim(engine, worker_id="w", limit=4, lease_s=60) == []
    assert set(_rows(engine).values()) == {("done",)}


def test_a_backlog_of_a_done_url_drains_in_one_claim(
    any_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many pending keys of a done URL (added later, or left by a sharing cut short)
    do not hold up other URLs: the first one served passes the vector on to the
    rest a chunk at a time, so one claim reaches the next URL's key (a key a round,
    12 keys would outlast the claim's 8 rounds)."""
    monkeypatch.setattr(jobs, "SHARE_CHUNK", 2)
    engine = _engine(any_db_url)
    _import(engine, {"first": "http://media.test/v/a.mp4"})
    (job,) = jobs.claim(engine, worker_id="w", limit=1, lease_s=60)
    jobs.store_outcomes(engine, [Outcome(jobs.start(engine, job), result=_result(0.5))])
    _import(engine, {f"k{i:02d}": f"http://media.test/v/a.mp4#{i}" for i in range(12)})
    _import(engine, {"other": "http://media.test/v/b.mp4"})
    claimed = jobs.claim(engine, worker_id="w", limit=1, lease_s=60)
    assert [j.key for j in claimed] == ["other"]
    rows = _rows(engine)
    assert {k: v for k, v in rows.items() if k != "other"} == dict.fromkeys(
        ["first", *(f"k{i:02d}" for i in range(12))], ("done",)
    )
