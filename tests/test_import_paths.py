"""The import's fast paths give what the careful path gives.

A first import into an empty table inserts each batch without looking its keys
up (a savepoint takes the batch back if some key was there after all), SQLite
rebuilds the secondary indexes once at the end, and the parser hands over each
URL's host; re-imports look keys up batch by batch.  Small batches here, so a
few records cross batch boundaries the way millions do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text

from runner import catalogue
from runner.catalogue import CatalogueFormat, import_catalogue, url_problem
from runner.db import connect
from runner.errors import RunnerError
from runner.models import jobs
from runner.urls import host_of


@pytest.fixture
def engine(any_db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setattr(catalogue, "BATCH_RECORDS", 3)
    engine = connect(any_db_url)
    yield engine
    engine.dispose()


def write_pairs(path: Path, pairs: list[tuple[str, Any]]) -> Path:
    """A catalogue object that may name a key twice (a dict cannot)."""
    body = ",\n".join(f"{json.dumps(key)}: {json.dumps(value)}" for key, value in pairs)
    path.write_text("{" + body + "}")
    return path


def run_import(engine: Engine, path: Path, now: float = 1.0) -> tuple[int, int, int, int]:
    counts, _ = import_catalogue(engine, path, CatalogueFormat(), now=now)
    return counts.inserted, counts.updated, counts.unchanged, counts.invalid


def table(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {r.key: r for r in conn.execute(select(jobs))}


def test_first_import_dedupes_repeated_keys_last_wins(engine: Engine, tmp_path: Path) -> None:
    """Batches of 3: `a` comes back in the second batch (its insert-first attempt
    conflicts and the batch goes the careful way), `d` twice within the third."""
    pairs = [
        ("a", {"url": "http://one.test/a", "n": 1}),
        ("b", {"url": "http://one.test/b"}),
        ("c", {"url": "ftp://one.test/c"}),
        ("e", {"url": "http://one.test/e"}),
        ("a", {"url": "http://Two.test/a", "n": 2}),
        ("f", {"url": "http://one.test/f"}),
        ("d", {"url": "http://one.test/d", "n": 1}),
        ("d", {"url": "http://two.test/d", "n": 2}),
    ]
    path = write_pairs(tmp_path / "c.json", pairs)
    # inserted a b e f d; a updated; the first d unchanged (superseded); c invalid
    assert run_import(engine, path) == (5, 1, 1, 1)
    rows = table(engine)
    assert set(rows) == {"a", "b", "c", "d", "e", "f"}
    assert (rows["a"].url, rows["a"].host, json.loads(rows["a"].meta)) == (
        "http://Two.test/a",
        "two.test",
        {"n": 2},
    )
    assert (rows["d"].url, rows["d"].host, json.loads(rows["d"].meta)) == (
        "http://two.test/d",
        "two.test",
        {"n": 2},
    )
    assert (rows["c"].status, rows["c"].error_class, rows["c"].finished_at) == (
        "failed",
        "invalid",
        1.0,
    )
    assert rows["b"].meta is None and rows["b"].status == "pending"
    # Again, into a table no longer empty: each of a's URLs wins once more, as on
    # any re-import of this file; the rest is unchanged.
    assert run_import(engine, path, now=2.0) == (0, 2, 5, 1)
    assert table(engine)["a"].url == "http://Two.test/a"


def test_reimport_after_a_partial_change(engine: Engine, tmp_path: Path) -> None:
    first = {f"k{i}": {"url": f"http://h.test/{i}", "i": i} for i in range(10)}
    first["bad"] = {"url": "nope"}
    path = write_pairs(tmp_path / "1.json", list(first.items()))
    assert run_import(engine, path) == (10, 0, 0, 1)
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'done' WHERE key = 'k1'"))
        conn.execute(text("UPDATE jobs SET status = 'failed', attempts = 3 WHERE key = 'k2'"))

    second = dict(first)
    second["k1"] = {"url": "http://new.test/1"}  # done: kept as it is
    second["k2"] = {"url": "http://new.test/2"}  # failed: back to pending, new URL
    second["k3"] = {"url": "http://new.test/3", "i": 33}
    second["k4"] = {"url": "ftp://new.test/4"}  # now unusable: failed
    second["bad"] = {"url": "http://fixed.test/bad"}  # now usable
    second["new1"] = {"url": "http://new.test/n1"}
    second["new2"] = {}
    path = write_pairs(tmp_path / "2.json", list(second.items()))
    # inserted new1; updated k2 k3 bad; unchanged k0 k1 k5..k9; invalid k4 new2
    assert run_import(engine, path, now=5.0) == (1, 3, 7, 2)
    rows = table(engine)
    assert (rows["k1"].url, rows["k1"].status) == ("http://h.test/1", "done")
    assert (rows["k2"].url, rows["k2"].status, rows["k2"].attempts) == (
        "http://new.test/2",
        "pending",
        0,
    )
    assert json.loads(rows["k3"].meta) == {"i": 33} and rows["k3"].host == "new.test"
    assert (rows["k4"].status, rows["k4"].finished_at) == ("failed", 5.0)
    assert (rows["bad"].status, rows["bad"].error, rows["bad"].host) == (
        "pending",
        None,
        "fixed.test",
    )
    assert rows["new2"].status == "failed" and rows["new2"].host is None
    assert rows["k0"].created_at == 1.0 and rows["new1"].created_at == 5.0


def sqlite_indexes(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        found = conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs'"
        )
        return dict(found.all())


def cache_size(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("PRAGMA cache_size").scalar_one())


def test_sqlite_bulk_load_leaves_indexes_and_cache_as_they_were(tmp_path: Path) -> None:
    engine = connect(f"sqlite:///{tmp_path / 'runner.db'}")
    indexes, cache = sqlite_indexes(engine), cache_size(engine)
    assert "ix_jobs_status_id" in indexes and "ix_jobs_finished_at" in indexes
    records = [(f"k{i}", {"url": f"http://h.test/{i}"}) for i in range(20)]

    broken = tmp_path / "broken.json"
    broken.write_text(write_pairs(tmp_path / "x.json", records).read_text()[:-1] + ', "z": }')
    with pytest.raises(RunnerError, match="invalid JSON"):
        import_catalogue(engine, broken, CatalogueFormat())
    assert table(engine) == {}
    assert sqlite_indexes(engine) == indexes  # the dropped indexes rolled back too

    assert run_import(engine, write_pairs(tmp_path / "ok.json", records)) == (20, 0, 0, 0)
    assert sqlite_indexes(engine) == indexes and cache_size(engine) == cache
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar_one() == "ok"
        plan = conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE status = 'pending' ORDER BY id"
        ).all()
    assert "ix_jobs_status_id" in str(plan)
    engine.dispose()


def test_python_parser_meta_keeps_integers_beyond_64_bits(engine: Engine, tmp_path: Path) -> None:
    """orjson refuses them; the meta falls back to json, exact."""
    path = tmp_path / "big.json"
    path.write_text('{"big": {"url": "http://h.test/b", "id": 123456789012345678901234567890}}')
    assert run_import(engine, path) == (1, 0, 0, 0)
    assert table(engine)["big"].meta == '{"id":123456789012345678901234567890}'


@settings(max_examples=500, deadline=None)
@given(
    scheme=st.sampled_from(["http://", "HTTPS://", "hTtP://", "ftp://", "http:/", " http://", ""]),
    rest=st.text(alphabet="aZ09.-_@:[]/?#% \t\nüKſ", max_size=20),
)
def test_the_parsers_shortcut_agrees_with_the_careful_checks(scheme: str, rest: str) -> None:
    """A record's row: the stripped URL, the meta without it, the reason it is
    unusable exactly as `url_problem` says, and the host (when the parser already
    has it) exactly as `host_of` says."""
    url = scheme + rest
    key, stored_url, meta, invalid, host = catalogue._row("k", {"url": url, "x": 1}, "url")
    assert (key, stored_url, meta) == ("k", url.strip(), {"x": 1})
    problem = url_problem(url)
    assert invalid == (None if problem is None else f"{problem} (field 'url')")
    if host is not None:
        assert invalid is None and host == host_of(stored_url)
