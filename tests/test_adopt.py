"""`runner import-results`: the old script's files, mixing zero vectors, good vectors
and failures, against a database that already knows some of the keys."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, select

from runner.db import connect
from runner.models import jobs
from tests.argv import daemon_args
from tests.conftest import TINY_HIDDEN, Cli, MediaServer, write_catalogue
from tests.test_cli import one_line_error
from tests.test_export_formats import add_jobs, finish

WRITTEN_AT = 1_700_000_000.0  # mtime of the old files
GOOD = [0.25, -0.5, 1.0, 2.0]
# what the old script's PCA-then-mean produced: zero up to rounding
ZERO = [1.1e-16, -2.2e-17, 0.0, 5.5e-17]


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = connect(db_url)
    yield engine
    engine.dispose()


def write_old(
    directory: Path, vectors: dict | None, process: dict | None, fail: dict | None
) -> Path:
    directory.mkdir(exist_ok=True)
    for name, content in (
        ("audio_vectors.json", vectors),
        ("audio_process.json", process),
        ("audio_fail.json", fail),
    ):
        if content is not None:
            (directory / name).write_text(json.dumps(content), encoding="utf-8")
            os.utime(directory / name, (WRITTEN_AT, WRITTEN_AT))
    return directory


def rows(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {r.key: r for r in conn.execute(select(jobs))}


def vector(row: Any) -> np.ndarray:
    return np.frombuffer(row.vector, dtype="<f4", count=row.vector_dim)


def facts(key: str, seconds: float = 3.0) -> dict:
    return {"processing_audio_time": 1.5, "video_duration": seconds, "channels_count": 2}


@pytest.fixture
def old_dir(engine: Engine, tmp_path: Path) -> Path:
    """Known to the database: pending 'good-pending', 'zero-pending', 'fail-pending';
    'good-failed' failed by this runner; 'good-done', 'fail-done' done;
    'good-running' running; 'fail-tried' pending after a transient error."""
    from runner import jobs as jobs_module

    # fail-tried: claimed once and requeued with its attempt counted (as after a crash)
    add_jobs(engine, ["fail-tried"])
    for job in jobs_module.claim(engine, worker_id="w2", now=50.0, limit=1, lease_s=1):
        jobs_module.start(engine, job, now=50.0)
    assert jobs_module.requeue_abandoned(engine, now=60.0, max_attempts=5) == (1, 0)
    keys = [
        "good-pending",
        "zero-pending",
        "fail-pending",
        "good-failed",
        "good-done",
        "fail-done",
        "good-running",
        "zero-failed",
    ]
    add_jobs(engine, keys)
    mine = np.full(4, 7.0, dtype=np.float32)
    finish(
        engine,
        {"good-done": mine, "fail-done": mine},
        {"good-failed": "HTTP 500", "zero-failed": "HTTP 404"},
        now=100.0,
        keep_running=("good-running",),
    )
    assert rows(engine)["fail-tried"].attempts == 1
    vectors = {
        "good-pending": [GOOD],
        "good-new": [GOOD],
        "good-failed": [GOOD],
        "good-done": [GOOD],
        "good-running": [GOOD],
        "good-flat": GOOD,  # a flat list is accepted too
        "good-and-failed": [GOOD],
        "zero-pending": [ZERO],
        "zero-new": [ZERO],
        "zero-failed": [ZERO],
        "zero-exact": [[0, 0, 0, 0]],
        "two-rows": [GOOD, GOOD],
        "not-numbers": [["a", "b"]],
    }
    process = {k: facts(k) for k in vectors} | {"no-such-key": facts("x")}
    fail = {
        "fail-new": {"url": "http://old.test/fail-new", "error": "404 Client Error"},
        "fail-pending": {"url": "http://old.test/other", "error": "timeout", "http_status": 504},
        "fail-done": {"url": "http://old.test/x", "error": "should not win"},
        "fail-tried": {"url": "http://old.test/y", "error": "old verdict"},
        "good-and-failed": {"url": "http://old.test/gaf", "error": "failed once"},
        "fail-odd": "just a string",
    }
    return write_old(tmp_path / "old", vectors, process, fail)


def test_import_results(cli: Cli, engine: Engine, old_dir: Path) -> None:
    before = rows(engine)
    line = cli("import-results", str(old_dir)).stdout.strip()
    assert line == (
        "adopted 5, queued 1 for recomputation, failed 9 (4 without a url), "
        "skipped 4 (done, running or already tried); process facts for 5"
    )
    after = rows(engine)

    # good vectors: done, float32, 'adopted', facts from audio_process.json,
    # finished when the old file was written
    for key in ("good-pending", "good-new", "good-failed", "good-flat", "good-and-failed"):
        row = after[key]
        assert row.status == "done", key
        np.testing.assert_array_equal(vector(row), np.array(GOOD, np.float32))
        assert row.model_id == "adopted" and row.finished_at == WRITTEN_AT
        assert (row.processing_audio_time_s, row.video_duration_s, row.channels_count) == (
            1.5,
            3.0,
            2,
        )
        assert row.error is None and "adopted from" in row.note
    assert after["good-new"].url is None
    assert after["good-and-failed"].url == "http://old.test/gaf"  # from the fail file
    assert after["good-failed"].url == "http://media.test/good-failed"

    # never overwrite a done job, never touch a running one
    for key in ("good-done", "fail-done", "good-running"):
        assert after[key] == before[key], key

    # zero vectors: not adopted
    assert after["zero-pending"].status == "pending" and after["zero-pending"].vector is None
    assert "old vector is zero" in after["zero-pending"].note
    assert "to be computed again" in after["zero-pending"].note
    for key in ("zero-new", "zero-exact", "two-rows", "not-numbers"):
        row = after[key]
        assert (row.status, row.error, row.error_class, row.url) == (
            "failed",
            "no url",
            "invalid",
            None,
        ), key
    assert "has shape (2, 4)" in after["two-rows"].note
    assert "not a list of numbers" in after["not-numbers"].note
    assert after["zero-failed"].status == "failed" and after["zero-failed"].error == "HTTP 404"
    assert "old vector is zero" in after["zero-failed"].note

    # failures: failed 'adopted', unless this runner tried the key already
    new = after["fail-new"]
    assert (new.status, new.error, new.error_class, new.url, new.finished_at) == (
        "failed",
        "404 Client Error",
        "adopted",
        "http://old.test/fail-new",
        WRITTEN_AT,
    )
    assert new.host == "old.test"  # stored beside the URL, as the catalogue import does
    pending = after["fail-pending"]
    assert (pending.status, pending.error, pending.http_status, pending.url) == (
        "failed",
        "timeout",
        504,
        "http://media.test/fail-pending",
    )
    assert after["fail-tried"] == before["fail-tried"]
    assert after["fail-odd"].error == "just a string" and after["fail-odd"].url is None
    assert after["fail-odd"].host is None
    assert "no-such-key" not in after

    # retry --failed puts back the adopted failures that have a URL
    cli("retry", "--error-class", "adopted")
    retried = rows(engine)
    assert retried["fail-new"].status == "pending"
    assert retried["fail-pending"].status == "pending"
    assert retried["fail-odd"].status == "failed"  # no URL: nothing to retry

    # a second run changes nothing, and does not undo the retry
    again = cli("import-results", str(old_dir)).stdout
    assert again.startswith("adopted 0, queued 1 for recomputation")
    assert rows(engine) == retried


def test_catalogue_after_import_results_gives_zero_keys_their_url(
    cli: Cli, old_dir: Path, tmp_path: Path, engine: Engine
) -> None:
    cli("import-results", str(old_dir))
    cli(
        "import",
        str(
            write_catalogue(
                tmp_path / "c.json",
                {
                    "zero-new": {"url": "http://media.test/zero-new"},
                    "good-new": {"url": "http://media.test/good-new"},
                },
            )
        ),
    )
    after = rows(engine)
    assert after["zero-new"].status == "pending"
    assert after["zero-new"].url == "http://media.test/zero-new"
    assert after["good-new"].status == "done" and after["good-new"].model_id == "adopted"


def test_adopted_results_are_exported(cli: Cli, old_dir: Path, tmp_path: Path) -> None:
    cli("import-results", str(old_dir))
    out = tmp_path / "out"
    cli("export", "--out", str(out))
    vectors = json.loads((out / "audio_vectors.json").read_text())
    process = json.loads((out / "audio_process.json").read_text())
    assert vectors["good-new"] == [GOOD]
    assert vectors["good-done"] == [[7.0] * 4]  # ours, not the old one
    assert process["good-new"] == facts("good-new")
    assert "zero-pending" not in vectors
    fail = json.loads((out / "audio_fail.json").read_text())
    assert fail["fail-new"]["error_class"] == "adopted"
    # adopted rows are as old as their file: not new to a downstream job
    since = out / "since"
    cli("export", "--out", str(since), "--only-done-since", str(WRITTEN_AT + 1))
    assert "good-new" not in json.loads((since / "audio_vectors.json").read_text())


def test_any_file_may_be_missing(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    only_fail = write_old(tmp_path / "f", None, None, {"x": {"url": "http://o/x", "error": "e"}})
    assert cli("import-results", str(only_fail)).stdout.startswith(
        "adopted 0, queued 0 for recomputation, failed 1"
    )
    only_vectors = write_old(tmp_path / "v", {"y": [GOOD]}, None, None)
    cli("import-results", str(only_vectors))
    row = rows(engine)["y"]
    assert row.status == "done" and row.video_duration_s is None


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("audio_vectors.json", '{"a": [[1.0, 2.0]], "b": [[1.0, ', "invalid JSON"),
        ("audio_process.json", '{"a": {"video_duration": 1.0}, "b": nope}', "invalid JSON"),
        ("audio_fail.json", "[1, 2]", "expected a JSON object"),
        ("audio_vectors.json", "", "expected a JSON object"),
    ],
)
def test_bad_json_writes_nothing(
    cli: Cli, engine: Engine, tmp_path: Path, name: str, content: str, fragment: str
) -> None:
    add_jobs(engine, ["a", "b"])
    directory = write_old(
        tmp_path / "old",
        {"a": [GOOD], "c": [ZERO]},
        {"a": facts("a")},
        {"d": {"url": "http://o/d", "error": "e"}},
    )
    (directory / name).write_text(content)
    before = rows(engine)
    result = cli("import-results", str(directory), ok=False)
    line = one_line_error(result)
    assert fragment in line and name in line
    assert rows(engine) == before


def test_missing_directory_or_files(cli: Cli, tmp_path: Path) -> None:
    assert "no such directory" in one_line_error(
        cli("import-results", str(tmp_path / "nope"), ok=False)
    )
    assert "none of audio_vectors.json" in one_line_error(
        cli("import-results", str(tmp_path), ok=False)
    )


def test_many_keys_in_batches(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    """More keys than one batch, half of them known to the catalogue."""
    rng = np.random.default_rng(0)
    n = 1_234
    add_jobs(engine, [f"k{i}" for i in range(0, n, 2)])
    good = {f"k{i}": [rng.normal(size=8).astype(np.float32).tolist()] for i in range(n)}
    zeros = {f"z{i}": [[0.0] * 8] for i in range(300)}
    directory = write_old(tmp_path / "old", good | zeros, {k: facts(k) for k in good}, None)
    line = cli("import-results", str(directory)).stdout
    assert line.startswith(f"adopted {n}, queued 0 for recomputation, failed 300 (300 without")
    assert line.strip().endswith(f"process facts for {n}")
    stored = rows(engine)
    for key in ("k0", "k1", f"k{n - 1}"):
        np.testing.assert_array_equal(vector(stored[key]), np.array(good[key][0], np.float32))


def test_daemon_computes_only_what_was_not_adopted(
    cli: Cli, tmp_path: Path, tiny_model: Path, server: MediaServer
) -> None:
    """End to end: the adopted key is never downloaded, the zero-vector key is."""
    cli(
        "import",
        str(
            write_catalogue(
                tmp_path / "c.json",
                {
                    "adopted": {"url": server.url("media/stereo.mp4?adopted")},
                    "zero": {"url": server.url("media/song.mp3")},
                },
            )
        ),
    )
    cli(
        "import-results",
        str(
            write_old(
                tmp_path / "old",
                {"adopted": [GOOD], "zero": [ZERO]},
                {"adopted": facts("adopted")},
                None,
            )
        ),
    )
    hits_before = server.hits["/media/stereo.mp4"]
    cli(*daemon_args(tiny_model, tmp_path / "work", "--until-done"))
    assert server.hits["/media/stereo.mp4"] == hits_before
    assert server.hits["/media/song.mp3"] >= 1
    out = tmp_path / "out"
    cli("export", "--out", str(out))
    vectors = json.loads((out / "audio_vectors.json").read_text())
    assert vectors["adopted"] == [GOOD]
    assert len(vectors["zero"][0]) == TINY_HIDDEN and np.linalg.norm(vectors["zero"][0]) > 0.1
