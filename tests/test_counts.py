"""Issue 16: counts per state and failure reasons stay true while kept cheaply.

On PostgreSQL triggers keep `job_counts` (migration 0006); whatever changes the
jobs table (the state machine, the import, the operator's SQL, a TRUNCATE) must
leave the counts equal to counting the table itself, and folding must never
change a sum, even while claims and finishes run beside it.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from runner import jobs
from runner.counts import (
    FOLD,
    count_by_status,
    example_keys,
    fold_counts,
    top_reasons,
    try_fold_counts,
)
from runner.db import make_engine, migrate
from runner.jobs import Failure, Outcome, Status
from runner.maintenance import prune_done
from runner.models import REASON_CHARS
from runner.queries import reading
from tests.argv import daemon_args, runner_process
from tests.test_same_url import _engine, _import, _in_threads, _result

LONG = "x" * REASON_CHARS


def _counted(engine):  # type: ignore[no-untyped-def]
    with reading(engine) as conn, conn.begin():
        counts = count_by_status(conn)
        reasons = {(r.error_class, r.reason): r.count for r in top_reasons(conn, 1000)}
    return counts, reasons


def _truth(engine):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        found = dict(conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all())
        rows = conn.execute(
            text(
                f"SELECT error_class, substr(error, 1, {REASON_CHARS}), count(*) FROM jobs"
                " WHERE status = 'failed' GROUP BY 1, 2"
            )
        ).all()
    return {s: found.get(s.value, 0) for s in Status}, {(c, r): n for c, r, n in rows}


def _assert_true(engine) -> None:  # type: ignore[no-untyped-def]
    assert _counted(engine) == _truth(engine)


def _count_rows(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM job_counts")).scalar_one())


def test_counts_follow_every_kind_of_change(any_db_url: str) -> None:
    engine = _engine(any_db_url)
    _import(engine, {f"k{i}": f"http://media.test/v/{i % 7}" for i in range(30)})
    _import(engine, {"bad": "ftp://nowhere", "empty": ""})  # failed at import
    _assert_true(engine)
    claimed = [
        jobs.start(engine, j) for j in jobs.claim(engine, worker_id="w", limit=7, lease_s=60)
    ]
    _assert_true(engine)
    outcomes = [
        Outcome(claimed[0], result=_result(0.5)),
        Outcome(claimed[1], failure=Failure("HTTP 404", "http", 404)),
        # two messages alike in their first REASON_CHARS characters: one reason
        Outcome(claimed[2], failure=Failure(LONG + " one", "decode")),
        Outcome(claimed[3], failure=Failure(LONG + " two", "decode")),
        Outcome(claimed[4], failure=Failure("slow", "timeout"), retry_after_s=60),
        Outcome(claimed[5]),  # given back
    ]
    jobs.store_outcomes(engine, outcomes, now=2000.0)  # siblings share each end
    _assert_true(engine)
    _, reasons = _counted(engine)
    assert reasons[("decode", LONG)] == len([k for k in range(30) if k % 7 in (2, 3)])
    fold_counts(engine)
    _assert_true(engine)
    # the operator's own SQL: a message rewritten (a reason moves), a row deleted
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET error = 'gone' WHERE error_class = 'http'"))
        conn.execute(text("DELETE FROM jobs WHERE key = 'k0'"))
    _assert_true(engine)
    assert jobs.requeue_failed(engine, error_class="decode") > 0
    assert jobs.release(engine, None, worker_id="w") > 0  # the one left running
    assert prune_done(engine, before=10_000.0, keep_results=False) > 0
    _assert_true(engine)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE jobs"))
        assert _counted(engine) == ({s: 0 for s in Status}, {})
    engine.dispose()


def test_folding_keeps_every_sum_and_leaves_one_row_per_group(pg_url: str) -> None:
    engine = _engine(pg_url)
    _import(engine, {f"k{i}": f"http://media.test/v/{i}" for i in range(40)})
    for round_ in range(4):
        (job,) = jobs.claim(engine, worker_id="w", limit=1, lease_s=60)
        failure = Failure(f"reason {round_ % 2}", "http")
        jobs.store_outcomes(engine, [Outcome(jobs.start(engine, job), failure=failure)])
    before = _counted(engine)
    assert _count_rows(engine) > 4
    highest = fold_counts(engine)
    assert _counted(engine) == before == _truth(engine)
    # pending, failed by two reasons: three groups, one row each
    assert _count_rows(engine) == 3
    # nothing new: the next fold rewrites nothing
    assert fold_counts(engine, above_id=highest) == highest
    with engine.connect() as conn:
        assert conn.execute(text("SELECT max(id) FROM job_counts")).scalar_one() == highest
    engine.dispose()


def test_folds_beside_claims_and_finishes_lose_nothing(pg_url: str) -> None:
    engine = _engine(pg_url)
    _import(engine, {f"k{i}": f"http://media.test/v/{i}" for i in range(300)})
    done = threading.Event()

    def work(name: str) -> None:
        while claimed := jobs.claim(engine, worker_id=name, limit=3, lease_s=60):
            started = [jobs.start(engine, j) for j in claimed]
            jobs.store_outcomes(
                engine,
                [
                    Outcome(j, result=_result(1.0))
                    if j.id % 3
                    else Outcome(j, failure=Failure(f"e{j.id % 2}", "http"))
                    for j in started
                ],
            )

    def fold() -> None:
        above = 0
        while not done.is_set():
            above = fold_counts(engine, above_id=above)

    folder = threading.Thread(target=fold)
    folder.start()
    try:
        _in_threads(4, work)
    finally:
        done.set()
        folder.join()
    _assert_true(engine)
    fold_counts(engine)
    _assert_true(engine)
    engine.dispose()


def test_reasons_and_examples_come_from_the_reasons_index(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SQLite without statistics would read every failed row through the status
    index: the reasons are grouped from ix_jobs_failed_reason, and a reason's
    example keys are found through it too."""
    engine = _engine(f"sqlite:///{tmp_path / 'r.db'}")
    _import(engine, {f"k{i}": f"http://media.test/v/{i}" for i in range(6)})
    for i, job in enumerate(jobs.claim(engine, worker_id="w", limit=6, lease_s=60)):
        message = LONG + str(i) if i < 4 else None
        failure = Failure(message, "decode") if message else Failure("HTTP 500", "http", 500)
        jobs.store_outcomes(engine, [Outcome(jobs.start(engine, job), failure=failure)])
    with engine.connect() as conn:
        (first, second) = top_reasons(conn, 5)
        assert (first.error_class, first.reason, first.count) == ("decode", LONG, 4)
        assert (second.error_class, second.reason, second.count) == ("http", "HTTP 500", 2)
        assert example_keys(conn, first, 2) == ["k3", "k2"]
        assert top_reasons(conn, 0) == []
        plan = conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT key FROM jobs WHERE status = 'failed'"
            f" AND error_class = 'decode' AND substr(error, 1, {REASON_CHARS}) = 'x'"
            " ORDER BY id DESC LIMIT 3"
        ).all()
    assert "ix_jobs_failed_reason" in str(plan)
    engine.dispose()


def test_0006_counts_the_rows_already_there(any_db_url: str) -> None:
    from alembic import command

    from runner.db import alembic_config

    engine = make_engine(any_db_url)
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
        conn.execute(
            text(
                "INSERT INTO jobs (key, url, status, error, error_class, created_at)"
                " VALUES ('a', 'u', 'pending', NULL, NULL, 0), ('b', 'u', 'done', NULL, NULL, 0),"
                " ('c', 'u', 'failed', :long, 'decode', 0), ('d', 'u', 'failed', 'no', 'http', 0)"
            ),
            {"long": LONG + "tail"},
        )
    migrate(engine)
    assert _counted(engine) == _truth(engine)
    counts, reasons = _counted(engine)
    assert counts[Status.FAILED] == 2 and reasons == {("decode", LONG): 1, ("http", "no"): 1}
    if engine.dialect.name == "postgresql":
        assert _count_rows(engine) == 4
    engine.dispose()


@pytest.mark.parametrize("top", [1, 2])
def test_top_breaks_ties_the_same_way_on_either_database(any_db_url: str, top: int) -> None:
    engine = _engine(any_db_url)
    _import(engine, {f"k{i}": f"http://media.test/v/{i}" for i in range(2)})
    for job, message in zip(
        jobs.claim(engine, worker_id="w", limit=2, lease_s=60), ("b", "a"), strict=True
    ):
        jobs.store_outcomes(
            engine, [Outcome(jobs.start(engine, job), failure=Failure(message, "x"))]
        )
    with reading(engine) as conn:
        assert [r.reason for r in top_reasons(conn, top)] == ["a", "b"][:top]
    engine.dispose()


def _daemon_until_done(db_url: str, model: Path, workdir: Path) -> str:
    """`runner daemon --until-done` in its own process; its stderr, once it exited 0."""
    daemon = subprocess.run(
        [*runner_process(db_url), *daemon_args(model, workdir), "--until-done"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert daemon.returncode == 0, daemon.stderr[-3000:]
    return daemon.stderr


def _set_for_database(engine, setting: str, value: str) -> None:  # type: ignore[no-untyped-def]
    """ALTER DATABASE ... SET: the setting of every session opened after."""
    with engine.connect() as conn:
        database = conn.execute(text("SELECT current_database()")).scalar_one()
        conn.execute(text(f"ALTER DATABASE \"{database}\" SET {setting} = '{value}'"))
        conn.commit()


def test_a_starting_daemon_folds_the_counts(pg_url: str, tiny_model: Path, tmp_path: Path) -> None:
    engine = _engine(pg_url)
    for i in range(3):  # three imports, three statements: three rows
        _import(engine, {f"bad{i}": "ftp://nowhere"})
    with engine.connect() as conn:
        before = conn.execute(text("SELECT max(id) FROM job_counts")).scalar_one()
    assert _count_rows(engine) == 3
    _daemon_until_done(pg_url, tiny_model, tmp_path / "w")
    with engine.connect() as conn:  # folded before it claimed (and failed) the three
        left = conn.execute(text("SELECT count(*) FROM job_counts WHERE id <= :id"), {"id": before})
        assert left.scalar_one() == 0
    _assert_true(engine)
    engine.dispose()


def test_a_truncate_waits_for_a_fold_and_clears_its_rows(pg_url: str) -> None:
    """A DELETE in the TRUNCATE trigger would skip the rows a fold in progress
    deletes and miss the ones it inserts: the counts would stay at the old sums."""
    engine = _engine(pg_url)
    _import(engine, {f"k{i}": f"http://media.test/v/{i}" for i in range(5)})
    _import(engine, {"other": "http://media.test/v/other"})
    with engine.connect() as folding:
        folding.begin()
        folding.execute(FOLD, {"upto": 1_000_000, "rows": 1000})
        truncate = threading.Thread(target=lambda: _run(engine, "TRUNCATE jobs"))
        truncate.start()
        truncate.join(0.5)
        assert truncate.is_alive()  # waits for the fold
        folding.commit()
    truncate.join(30)
    assert _counted(engine) == ({s: 0 for s in Status}, {})
    engine.dispose()


def _run(engine, sql: str) -> None:  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        conn.execute(text(sql))


def test_triggers_write_to_their_own_schema_whatever_the_search_path(pg_url: str) -> None:
    """pg_restore writes with an empty search_path, and a session's temporary table
    named job_counts would come first in it."""
    engine = _engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TEMP TABLE job_counts (status text, n bigint) ON COMMIT DROP"))
        _import_on(conn, "a")
        conn.execute(text("SET LOCAL search_path = ''"))
        conn.execute(
            text(
                "INSERT INTO public.jobs (key, url, status, created_at)"
                " VALUES ('b', 'http://media.test/b', 'pending', 0)"
            )
        )
    _assert_true(engine)
    assert _counted(engine)[0][Status.PENDING] == 2
    engine.dispose()


def _import_on(conn, key: str) -> None:  # type: ignore[no-untyped-def]
    conn.execute(
        text(
            "INSERT INTO jobs (key, url, status, created_at)"
            " VALUES (:key, 'http://media.test/' || :key, 'pending', 0)"
        ),
        {"key": key},
    )


def test_statements_run_read_committed_whatever_the_server_default(pg_url: str) -> None:
    """Claims, the migration's seed and folds are written for READ COMMITTED: under
    REPEATABLE READ the seed could count from a snapshot older than its triggers."""
    setup = make_engine(pg_url)
    _set_for_database(setup, "default_transaction_isolation", "repeatable read")
    setup.dispose()
    engine = _engine(pg_url)
    with engine.begin() as conn:
        assert conn.execute(text("SHOW transaction_isolation")).scalar_one() == "read committed"
    engine.dispose()


def test_an_adoption_folds_what_its_per_key_updates_left(pg_url: str, tmp_path: Path) -> None:
    from runner.adopt import import_results

    engine = _engine(pg_url)
    _import(engine, {f"k{i}": f"http://media.test/v/{i}" for i in range(6)})
    old = tmp_path / "old"
    old.mkdir()
    failed = {f"k{i}": {"url": f"http://media.test/v/{i}", "error": "HTTP 404"} for i in range(3)}
    (old / "audio_fail.json").write_text(json.dumps(failed))
    (old / "audio_vectors.json").write_text(json.dumps({"k4": [[0.5, 0.25]]}))
    import_results(engine, old, now=5000.0)
    _assert_true(engine)
    assert _count_rows(engine) == 3  # pending, done, and one reason of failure
    engine.dispose()


def test_folding_in_slices_keeps_every_sum(pg_url: str) -> None:
    """A backlog is folded a slice at a time (a statement_timeout must not make
    every fold fail): each slice keeps the sums, a pass ends, and passes merge the
    slices' rows until one row per group is left."""
    engine = _engine(pg_url)
    for i in range(9):  # nine statements: nine rows of counts at least
        _import(engine, {f"k{i}": f"http://media.test/v/{i}"})
    rows = [_count_rows(engine)]
    assert rows[0] >= 9
    while rows[-1] > 1:
        fold_counts(engine, slice_rows=2)
        _assert_true(engine)
        rows.append(_count_rows(engine))
        assert rows[-1] < rows[-2]
    with pytest.raises(ValueError):
        fold_counts(engine, slice_rows=0)
    engine.dispose()


def test_a_pass_ends_with_more_groups_than_a_slice_holds(pg_url: str) -> None:
    """Each slice writes its sums back after the rows it took: a pass that took its
    own output again never ended once the groups outnumbered a slice."""
    engine = _engine(pg_url)
    _import(engine, {f"k{i}": f"http://media.test/v/{i}" for i in range(5)})
    for i, job in enumerate(jobs.claim(engine, worker_id="w", limit=5, lease_s=60)):
        failure = Failure(f"reason {i}", "http")  # five groups of failed jobs
        jobs.store_outcomes(engine, [Outcome(jobs.start(engine, job), failure=failure)])
    done = threading.Event()
    folder = threading.Thread(target=lambda: (fold_counts(engine, slice_rows=2), done.set()))
    folder.start()
    folder.join(30)
    assert done.is_set()
    _assert_true(engine)
    engine.dispose()


def test_a_fold_that_fails_fails_neither_an_import_nor_a_daemon(
    pg_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    """Folding only keeps reads cheap: an import whose rows are committed, or a
    daemon with work to do, goes on when it cannot fold (here a row lock held by
    another session and a lock_timeout), and a later fold catches up."""
    from runner.catalogue import CatalogueFormat, import_catalogue

    engine = _engine(pg_url)
    _import(engine, {"first": "ftp://nowhere"})
    _set_for_database(engine, "lock_timeout", "200ms")
    engine.dispose()
    engine = _engine(pg_url)
    with engine.connect() as holder:
        holder.begin()
        holder.execute(text("SELECT * FROM job_counts FOR UPDATE")).all()
        assert try_fold_counts(engine, above_id=0) == 0  # logged, not raised
        catalogue = tmp_path / "all_videos.json"
        catalogue.write_text(json.dumps({"second": {"url": "ftp://nowhere"}}))
        counts, _ = import_catalogue(engine, catalogue, CatalogueFormat("key", "url"))
        assert counts.invalid == 1  # stored, failed at import: no fetchable URL
        stderr = _daemon_until_done(pg_url, tiny_model, tmp_path / "w")
        assert "job counts not folded" in stderr
        holder.rollback()
    _assert_true(engine)
    assert _counted(engine)[0][Status.FAILED] == 2  # one by the import, one by the daemon
    fold_counts(engine)
    _assert_true(engine)
    engine.dispose()
