"""`runner import`: idempotent, streamed, and all-or-nothing on bad files."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

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
