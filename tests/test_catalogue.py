"""`runner import`: idempotent, streamed, and all-or-nothing on bad files."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text

from runner import catalogue, catalogue_write
from runner.catalogue import CatalogueFormat, import_catalogue
from runner.db import connect
from runner.models import jobs
from runner.urls import host_of
from tests.conftest import Cli, write_catalogue


def rows(db_url: str) -> dict[str, tuple]:
    path = db_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        return {
            r[0]: r[1:]
            for r in conn.execute("SELECT key, url, status, error, meta, attempts FROM jobs")
        }


def test_import_object_counts_and_metadata(cli: Cli, db_url: str, tmp_path: Path) -> None:
    catalogue = write_catalogue(
        tmp_path / "all_videos.json",
        {
            "a": {"url": "http://x/a.mp4", "title": "A", "tags": [1, 2]},
            "b": {"url": "https://x/b.mp4"},
            "c": {"title": "no url"},
            "d": {"url": "ftp://x/d.mp4"},
            "e": "not an object",
        },
    )
    result = cli("import", str(catalogue))
    assert result.stdout.strip() == "inserted 2, updated 0, unchanged 0, invalid 3"
    stored = rows(db_url)
    assert stored["a"][:2] == ("http://x/a.mp4", "pending")
    assert json.loads(stored["a"][3]) == {"title": "A", "tags": [1, 2]}
    assert stored["c"][1] == "failed" and "no url" in stored["c"][2]
    assert stored["d"][1] == "failed" and "scheme 'ftp'" in stored["d"][2]
    assert stored["e"][1] == "failed" and "not an object" in stored["e"][2]


def test_reimport_is_idempotent_and_updates_urls(cli: Cli, db_url: str, tmp_path: Path) -> None:
    first = {"a": {"url": "http://x/a"}, "b": {"url": "http://x/b"}, "c": {}}
    cli("import", str(write_catalogue(tmp_path / "1.json", first)))
    again = cli("import", str(write_catalogue(tmp_path / "1.json", first)))
    assert again.stdout.strip() == "inserted 0, updated 0, unchanged 2, invalid 1"

    path = db_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:  # pretend b finished
        conn.execute("UPDATE jobs SET status='done' WHERE key='b'")
    second = {
        "a": {"url": "http://x/a2"},
        "b": {"url": "http://x/b2"},
        "c": {"url": "http://x/c"},
        "new": {"url": "http://x/new"},
    }
    result = cli("import", str(write_catalogue(tmp_path / "2.json", second)))
    assert result.stdout.strip() == "inserted 1, updated 2, unchanged 1, invalid 0"
    stored = rows(db_url)
    assert stored["a"][:2] == ("http://x/a2", "pending")
    assert stored["b"][:2] == ("http://x/b", "done")  # done results are never touched
    assert stored["c"][:3] == ("http://x/c", "pending", None)  # fixed URL: back to pending
    assert stored["new"][1] == "pending"


def test_import_array_with_key_field(cli: Cli, db_url: str, tmp_path: Path) -> None:
    catalogue = tmp_path / "list.json"
    catalogue.write_text(
        json.dumps(
            [
                {"vid": 1, "link": "http://x/1", "n": 1.5},
                {"vid": "two", "link": "http://x/2"},
                {"link": "http://x/nokey"},
                7,
            ]
        )
    )
    result = cli("import", str(catalogue), "--key-field", "vid", "--url-field", "link")
    assert result.stdout.strip() == "inserted 2, updated 0, unchanged 0, invalid 2"
    assert "without a usable key" in result.stderr
    stored = rows(db_url)
    assert stored["1"][0] == "http://x/1" and json.loads(stored["1"][3]) == {"n": 1.5}
    assert stored["two"][1] == "pending"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"a": {"url": "http://x/a"},\n "b": {x}}', "invalid JSON at line 2 column"),
        ('{"a": {"url": "http://x/a"}', "invalid JSON at line 1"),
        ("42", "top-level JSON value must be an object"),
        ('"text"', "top-level JSON value must be an object"),
        ("", "empty file"),
        ("\xff\xfe garbage", "top-level JSON value must be"),
        ('{"a": {"url": "http://x/\xff"}}', "bad.json"),
    ],
)
def test_bad_manifest_is_one_line_and_writes_nothing(
    cli: Cli, db_url: str, tmp_path: Path, content: str, expected: str
) -> None:
    cli("import", str(write_catalogue(tmp_path / "ok.json", {"keep": {"url": "http://x/k"}})))
    bad = tmp_path / "bad.json"
    bad.write_bytes(content.encode("latin-1"))
    result = cli("import", str(bad), ok=False)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("runner: error: "), result.stderr
    assert expected in lines[0]
    assert set(rows(db_url)) == {"keep"}


def test_invalid_json_reports_line_and_column(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": {"url": "http://x/a"},\n  "b": {"url": nope}\n}\n')
    result = cli("import", str(bad), ok=False)
    assert "line 3 column 16" in result.stderr, result.stderr


def test_half_valid_file_imports_nothing(cli: Cli, db_url: str, tmp_path: Path) -> None:
    from runner import catalogue

    records = {f"k{i}": {"url": f"http://x/{i}"} for i in range(catalogue.BATCH_RECORDS + 10)}
    text = json.dumps(records)[:-1] + ', "broken": }'
    bad = tmp_path / "big.json"
    bad.write_text(text)
    result = cli("import", str(bad), ok=False)
    assert "invalid JSON" in result.stderr
    assert rows(db_url) == {}


def test_missing_file(cli: Cli, tmp_path: Path) -> None:
    result = cli("import", str(tmp_path / "nope.json"), ok=False)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"runner: error: {tmp_path / 'nope.json'}: no such file"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://[x", "url is malformed"),
        ("http://[zz/x", "url is malformed"),
        ("http://a]b/", "url is malformed"),
        ("http://h:99999/", "url is malformed"),
        ("http:///x", "url has no host"),
        ("file:///etc/passwd", "unsupported url scheme 'file'"),
    ],
)
def test_malformed_urls_are_failed_records_not_a_crash(
    cli: Cli, db_url: str, tmp_path: Path, url: str, problem: str
) -> None:
    records = {"bad": {"url": url}, "good": {"url": "http://[::1]:8080/v.mp4"}}
    out = cli("import", str(write_catalogue(tmp_path / "c.json", records))).output
    assert "inserted 1, updated 0, unchanged 0, invalid 1" in out
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
        rows = dict(conn.execute("SELECT key, status || ':' || coalesce(error, '') FROM jobs"))
    assert rows["good"] == "pending:"
    assert rows["bad"].startswith(f"failed:{problem}")


# --- hosts, and URLs that change under a running job ------------------------------


@pytest.fixture
def any_engine(any_db_url: str) -> Iterator[Engine]:
    engine = connect(any_db_url)
    yield engine
    engine.dispose()


def import_file(engine: Engine, path: Path, records: dict, *, now: float) -> str:
    counts, _ = import_catalogue(engine, write_catalogue(path, records), CatalogueFormat(), now=now)
    return (
        f"inserted {counts.inserted}, updated {counts.updated}, "
        f"unchanged {counts.unchanged}, invalid {counts.invalid}"
    )


def table(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {r.key: r for r in conn.execute(select(jobs))}


def test_host_is_stored_on_insert_and_on_url_change(any_engine: Engine, tmp_path: Path) -> None:
    first = {
        "a": {"url": "https://CDN.Example.com/a.mp4"},
        "b": {"url": "http://user:pw@[::1]:8080/b"},
        "c": {"url": "ftp://files.test/c"},  # unusable, but its host is still known
        "d": {},
    }
    assert import_file(any_engine, tmp_path / "1.json", first, now=1.0) == (
        "inserted 2, updated 0, unchanged 0, invalid 2"
    )
    hosts = {k: r.host for k, r in table(any_engine).items()}
    assert hosts == {"a": "cdn.example.com", "b": "::1", "c": "files.test", "d": None}

    second = {
        "a": {"url": "https://mirror.test:8443/a.mp4"},
        "b": {"url": "http://Other.Test/b"},
        "c": {"url": "http://files.test/c"},
        "d": {"url": "http://d.test/d"},
    }
    assert import_file(any_engine, tmp_path / "2.json", second, now=2.0) == (
        "inserted 0, updated 4, unchanged 0, invalid 0"
    )
    hosts = {k: r.host for k, r in table(any_engine).items()}
    assert hosts == {"a": "mirror.test", "b": "other.test", "c": "files.test", "d": "d.test"}


def test_changed_url_takes_a_running_job_back_but_never_a_done_one(
    any_engine: Engine, tmp_path: Path
) -> None:
    """A running job fetches a URL the catalogue no longer has: it goes back to
    pending with the new URL, a fresh set of attempts and no worker; a done job
    keeps its URL (and its vector)."""
    first = {
        "run": {"url": "http://old.test/run"},
        "done": {"url": "http://old.test/done"},
        "same": {"url": "http://old.test/same"},
    }
    import_file(any_engine, tmp_path / "1.json", first, now=1.0)
    with any_engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET status = 'running', worker_id = 'w', attempts = 1, claims = 1,"
                " claimed_at = 5, lease_expires_at = 50, started_at = 6, not_before = 4,"
                " error = 'HTTP 503', error_class = 'download', http_status = 503"
                " WHERE key IN ('run', 'same')"
            )
        )
        conn.execute(text("UPDATE jobs SET status = 'done', finished_at = 7 WHERE key = 'done'"))
    before = table(any_engine)

    second = {
        "run": {"url": "http://New.Test/run"},
        "done": {"url": "http://new.test/done"},
        "same": {"url": "http://old.test/same"},
    }
    assert import_file(any_engine, tmp_path / "2.json", second, now=10.0) == (
        "inserted 0, updated 1, unchanged 2, invalid 0"
    )
    after = table(any_engine)
    run = after["run"]
    assert (run.url, run.host, run.status, run.attempts) == (
        "http://New.Test/run",
        "new.test",
        "pending",
        0,
    )
    assert (run.worker_id, run.claimed_at, run.lease_expires_at, run.started_at) == (None,) * 4
    assert (run.not_before, run.error, run.error_class, run.http_status) == (None,) * 4
    assert run.claims == 1  # the stale attempt's fence: its writes will be refused
    assert after["done"] == before["done"]
    assert after["same"] == before["same"]  # URL unchanged: its attempt carries on


def test_unusable_url_fails_a_running_job(any_engine: Engine, tmp_path: Path) -> None:
    import_file(any_engine, tmp_path / "1.json", {"k": {"url": "http://x.test/k"}}, now=1.0)
    with any_engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'running', worker_id = 'w', attempts = 2"))
    line = import_file(any_engine, tmp_path / "2.json", {"k": {"url": "ftp://x.test/k"}}, now=3.0)
    assert line == "inserted 0, updated 0, unchanged 0, invalid 1"
    row = table(any_engine)["k"]
    assert (row.status, row.url, row.host, row.worker_id, row.attempts, row.finished_at) == (
        "failed",
        "ftp://x.test/k",
        "x.test",
        None,
        0,
        3.0,
    )
    assert row.error_class == "invalid" and "scheme 'ftp'" in row.error


@pytest.mark.parametrize(
    ("now_status", "now_url", "expected_status", "expected_url"),
    [
        ("done", "http://old.test/k", "done", "http://old.test/k"),  # finished meanwhile
        ("running", "http://old.test/k", "pending", "http://new.test/k"),  # claimed meanwhile
        ("running", "http://new.test/k", "running", "http://new.test/k"),  # imported meanwhile
    ],
)
def test_the_statement_decides_by_the_row_at_the_write(
    any_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    now_status: str,
    now_url: str,
    expected_status: str,
    expected_url: str,
) -> None:
    """The batch read saw a pending job with the old URL; by the write the row has
    moved on.  The UPDATE's own WHERE and CASEs apply the rules to the row as it is."""
    with any_engine.begin() as conn:
        catalogue.upsert_records(
            conn, [catalogue.Record(key="k", url="http://old.test/k", meta={})], now=1.0
        )
        conn.execute(
            text("UPDATE jobs SET status = :s, url = :u, worker_id = 'w', attempts = 1"),
            {"s": now_status, "u": now_url},
        )
    stale = {"k": ("k", "http://old.test/k", "pending")}
    monkeypatch.setattr(catalogue_write, "_existing", lambda conn, keys: stale)
    with any_engine.begin() as conn:
        catalogue.upsert_records(
            conn, [catalogue.Record(key="k", url="http://new.test/k", meta={})], now=2.0
        )
    row = table(any_engine)["k"]
    assert (row.status, row.url) == (expected_status, expected_url)
    assert row.worker_id == (None if expected_status == "pending" else "w")


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/v.mp4",
        "HTTPS://CDN.Example.COM?x=1",
        "http://a-b.c-d.e#frag",
        "http://example.com.",
        "https://host",
        "http://user@host/x",
        "http://user:pw@Host:80/x",
        "http://host:8080/x",
        "http://[::1]/x",
        "http://[::1",
        "http://a]b/",
        "http://h:99999/",
        "http:///x",
        "http://ho\tst/x",
        " http://spaced.test/x ",
        "http://bücher.de/x",
        "http://%41.test/x",
        "ftp://files.test/x",
        "//no-scheme.test/x",
        "no url at all",
        "",
    ],
)
def test_host_fast_path_agrees_with_host_of(url: str) -> None:
    """The import skips urlsplit for plain hosts; it must store what `host_of` says
    (the downloader's HostGate uses `host_of`, and migration 0003 backfilled with it)."""
    assert catalogue_write.host_column(url) == host_of(url)


@settings(max_examples=500, deadline=None)
@given(
    scheme=st.sampled_from(["http://", "HTTPS://", "ftp://", "http:/", ""]),
    rest=st.text(alphabet="aZ09.-_@:[]/?#% \t\nü", max_size=20),
)
def test_host_fast_path_agrees_with_host_of_on_anything(scheme: str, rest: str) -> None:
    assert catalogue_write.host_column(scheme + rest) == host_of(scheme + rest)


# --- text no database can store ------------------------------------------------------


def _import_raw(engine: Engine, path: Path, text: str, fmt: CatalogueFormat) -> str:
    path.write_text(text, encoding="utf-8")
    counts, rejected = import_catalogue(engine, path, fmt, now=1.0)
    return f"inserted {counts.inserted}, invalid {counts.invalid}, rejected {rejected.count}"


def test_nul_in_keys_and_urls_is_invalid_not_a_failed_import(
    any_engine: Engine, tmp_path: Path
) -> None:
    """PostgreSQL refuses NUL in text, SQLite would take it: both count the record
    invalid (a key that cannot be stored is rejected) and import the rest."""
    text = (
        '{"nul\\u0000key": {"url": "http://x.test/a"},'
        ' "nul-url": {"url": "http://x.test/\\u0000", "t": 1},'
        ' "nul-meta": {"url": "http://x.test/m", "t": "a\\u0000b", "\\u0000": 2}}'
    )
    assert _import_raw(any_engine, tmp_path / "o.json", text, CatalogueFormat()) == (
        "inserted 1, invalid 2, rejected 1"
    )
    stored = table(any_engine)
    assert set(stored) == {"nul-url", "nul-meta"}
    assert stored["nul-url"].url is None and stored["nul-url"].status == "failed"
    assert stored["nul-url"].error.startswith(catalogue.UNSTORABLE)
    # NUL in metadata is stored: the meta column is JSON text, where it is an escape
    assert json.loads(stored["nul-meta"].meta) == {"t": "a\x00b", "\x00": 2}

    array = '[{"id": "a\\u0000", "url": "http://x.test/a"}, {"id": 5, "url": "http://x.test/5"}]'
    counts, rejected = import_catalogue(
        any_engine, write_text(tmp_path / "a.json", array), CatalogueFormat(), now=2.0
    )
    assert (counts.inserted, counts.invalid, rejected.count) == (1, 1, 1)
    assert (
        rejected.unstorable == f"record #0: {catalogue.UNSTORABLE}key holds NUL or a lone surrogate"
    )


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_lone_surrogates_are_invalid_with_the_python_parser(
    any_engine: Engine, tmp_path: Path
) -> None:
    """An integer beyond 64 bits sends the file to the pure-Python parser, which keeps
    lone surrogates (not UTF-8: PostgreSQL refuses them) in keys, URLs and metadata."""
    text = (
        '{"big": {"url": "http://x.test/b", "n": 123456789012345678901234567890},'
        ' "sur\\ud800": {"url": "http://x.test/k"},'
        ' "sur-url": {"url": "http://x.test/\\udfff"},'
        ' "sur-meta": {"url": "http://x.test/m", "deep": [{"\\udc80": 1}]},'
        ' "pair": {"url": "http://x.test/\\ud83d\\ude00", "t": "\\ud83d\\ude00"}}'
    )
    low = text.replace('"n": 123456789012345678901234567890', '"n": 1')  # C parser first
    assert _import_raw(any_engine, tmp_path / "low.json", low, CatalogueFormat()) == (
        "inserted 2, invalid 3, rejected 1"
    )
    any_engine.dispose()
    with any_engine.begin() as conn:
        conn.execute(jobs.delete())
    assert _import_raw(any_engine, tmp_path / "s.json", text, CatalogueFormat()) == (
        "inserted 2, invalid 3, rejected 1"
    )
    stored = table(any_engine)
    assert set(stored) == {"big", "sur-url", "sur-meta", "pair"}
    assert stored["sur-url"].url is None
    assert stored["sur-meta"].meta is None and stored["sur-meta"].url == "http://x.test/m"
    assert stored["sur-meta"].error == f"{catalogue.UNSTORABLE}the metadata holds a lone surrogate"
    assert json.loads(stored["pair"].meta) == {"t": "\U0001f600"}


def test_the_c_parser_never_yields_lone_surrogates() -> None:
    """Why the fast path skips the metadata walk (catalogue._meta_unstorable): the C
    parser turns a lone high surrogate into "?" and fails on a low one (the import
    then goes over to the Python parser)."""
    import io

    import ijson

    raw = b'{"a\\ud800": {"b\\ud800": ["\\ud800", "\\ud83d\\ude00"]}}'
    ((key, value),) = ijson.kvitems(io.BytesIO(raw), "")
    for text_ in (key, *value, *value["b?"]):
        text_.encode()  # raises on a lone surrogate
    with pytest.raises(UnicodeDecodeError):
        list(ijson.kvitems(io.BytesIO(b'{"a": "\\udc80"}'), ""))
    assert catalogue._meta_unstorable({"k": ["\ud800"]})
    assert not catalogue._meta_unstorable({"k\x00": ["\x00", "é", 1]})
