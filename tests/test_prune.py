"""`runner prune --done-before DATE [--keep-results]` on a real SQLite file."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, select

from runner.adopt import format_bytes, prune
from runner.db import connect
from runner.models import jobs
from tests.conftest import Cli, write_catalogue
from tests.test_cli import one_line_error
from tests.test_export_formats import add_jobs, finish

DIM = 256


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = connect(db_url)
    yield engine
    engine.dispose()


def statuses(engine: Engine) -> dict[str, tuple[str, bool, bool]]:
    """key -> (status, has vector, has meta)"""
    with engine.connect() as conn:
        rows = conn.execute(select(jobs.c.key, jobs.c.status, jobs.c.vector, jobs.c.meta))
        return {r.key: (r.status, r.vector is not None, r.meta is not None) for r in rows}


def history(engine: Engine, per_batch: int = 1) -> None:
    """Done batches 'a*' at t=1000, 'b*' at 2000, 'c*' at 3000; a failure at 1000;
    one job still pending."""
    rng = np.random.default_rng(0)
    for prefix, now in (("a", 1000.0), ("b", 2000.0), ("c", 3000.0)):
        keys = [f"{prefix}{i}" for i in range(per_batch)]
        add_jobs(engine, keys)
        finish(engine, {k: rng.normal(size=DIM).astype(np.float32) for k in keys}, now=now)
    add_jobs(engine, ["failed", "pending"])
    finish(engine, {}, {"failed": "HTTP 404"}, now=1000.0)


def test_prune_deletes_old_done_rows_and_reclaims_space(
    cli: Cli, engine: Engine, db_url: str
) -> None:
    history(engine, per_batch=1500)  # 1500 x 1 KiB vectors per batch
    line = cli("prune", "--done-before", "2500").stdout.strip()
    match = re.fullmatch(
        r"pruned 3000 done job\(s\); database (.+) -> (.+), reclaimed (\S+) (\S+)", line
    )
    assert match, line
    left = statuses(engine)
    assert len(left) == 1500 + 2
    assert left["failed"] == ("failed", False, True)  # failures are never pruned
    assert left["pending"][0] == "pending"
    assert all(key[0] == "c" for key in left if key not in ("failed", "pending"))


def test_space_is_reclaimed(engine: Engine) -> None:
    history(engine, per_batch=1500)
    report = prune(engine, before=2500.0, keep_results=False)
    assert report.rows == 3000
    # 3000 vectors of 1 KiB are gone from the file, not just marked free
    assert report.reclaimed > 2_500_000, report
    database = Path(engine.url.database or "")
    assert database.stat().st_size == report.bytes_after
    again = prune(engine, before=2500.0, keep_results=False)
    assert again.rows == 0


def test_keep_results_keeps_rows_and_vectors(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    history(engine)
    out = tmp_path / "before"
    cli("export", "--out", str(out))
    line = cli("prune", "--done-before", "1970-01-01T00:41:40Z", "--keep-results").stdout
    assert line.startswith("pruned 2 done job(s) (kept their results)")
    assert statuses(engine) == {
        "a0": ("done", True, False),
        "b0": ("done", True, False),
        "c0": ("done", True, True),
        "failed": ("failed", False, True),
        "pending": ("pending", False, True),
    }
    after = tmp_path / "after"
    cli("export", "--out", str(after))
    for name in ("audio_vectors.json", "audio_process.json", "audio_fail.json"):
        assert json.loads((after / name).read_text()) == json.loads((out / name).read_text())
    # the kept rows still stop a re-imported catalogue from queueing them again
    cli("import", str(write_catalogue(tmp_path / "c.json", {"a0": {"url": "http://x/a0"}})))
    assert statuses(engine)["a0"][0] == "done"
    assert cli("prune", "--done-before", "2500", "--keep-results").stdout.startswith("pruned 0")


def test_deleted_keys_come_back_with_the_catalogue(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    """What the help text warns about: deleted rows are unknown keys again."""
    history(engine)
    cli("prune", "--done-before", "1500")
    assert "a0" not in statuses(engine)
    cli("import", str(write_catalogue(tmp_path / "c.json", {"a0": {"url": "http://x/a0"}})))
    assert statuses(engine)["a0"][0] == "pending"


@pytest.mark.parametrize("bad", ["last week", "2024-02-30", "inf"])
def test_bad_date_is_one_line(cli: Cli, bad: str) -> None:
    line = one_line_error(cli("prune", "--done-before", bad, ok=False))
    assert "--done-before" in line


def test_done_before_is_required(cli: Cli) -> None:
    result = cli("prune", ok=False)
    assert result.exit_code == 2 and "--done-before" in result.stderr


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (5 << 20, "5.0 MiB"),
        (-2048, "-2.0 KiB"),
        (3 << 40, "3072.0 GiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text
