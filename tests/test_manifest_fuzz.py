"""Manifest fuzz (issue 5, proof 4): `runner import` fed arbitrary JSON and odd keys
never dies with a traceback.  A JSON object or array imports every record with a
usable key (a record whose URL is unusable is stored failed, with the reason) and
counts the rest; anything else is one line on stderr and exit 1, importing nothing.
"""

from __future__ import annotations

import json
import re
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.catalogue import MAX_KEY_CHARS, url_problem
from tests.conftest import Cli

ODD_KEYS = [
    "",
    " ",
    "../../x",
    "..",
    "/etc/passwd",
    "C:\\Windows\\x",
    "a\x00b",
    "ключ",
    "🎵 song",
    "\u202e\u0301",
    "x" * MAX_KEY_CHARS,
    "x" * (MAX_KEY_CHARS + 1),
    "'; DROP TABLE jobs; --",
    "%s %(key)s :key ?",
]
ODD_URLS = [
    "http://host.test/v.mp4",
    "HTTPS://HOST.TEST/a b?c=d#e",
    "  http://host.test/padded  ",
    "ftp://host.test/x",
    "file:///etc/passwd",
    "http://",
    "http:///nohost",
    "javascript:alert(1)",
    "",
    "//host.test/x",
]

#: what the C JSON parser takes; beyond it, see test_integers_beyond_64_bits_in_meta
int64 = st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)  # yajl: not -2**63 either
scalars = (
    st.none()
    | st.booleans()
    | int64
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
keys = st.sampled_from(ODD_KEYS) | st.text(max_size=20)
urls = st.sampled_from(ODD_URLS) | st.text(max_size=20) | json_values
records = st.fixed_dictionaries({"url": urls}, optional={"title": json_values}) | json_values
as_object = st.dictionaries(keys, records, max_size=6)
array_ids = keys | int64 | json_values
as_array = st.lists(
    st.fixed_dictionaries({"id": array_ids}, optional={"url": urls, "n": json_values})
    | json_values,
    max_size=6,
)
documents = as_object | as_array | json_values


def usable_key(key: Any) -> str | None:
    """The key a record is stored under, or None when it cannot be stored."""
    if isinstance(key, bool) or not isinstance(key, str | int):
        return None
    text = str(key)
    if "\x00" in text:  # PostgreSQL cannot store NUL: such a key is refused everywhere
        return None
    return text if 0 < len(text) <= MAX_KEY_CHARS else None


def usable_url(url: Any) -> bool:
    return url_problem(url) is None and "\x00" not in url


def expected(document: Any) -> dict[str, Any] | None:
    """key -> the record's url field for every storable record (the last of a
    repeated key), or None when the document is not an object or an array."""
    if isinstance(document, dict):
        pairs = [(usable_key(k), v) for k, v in document.items()]
    elif isinstance(document, list):
        pairs = [
            (usable_key(item["id"]) if isinstance(item, dict) and "id" in item else None, item)
            for item in document
        ]
    else:
        return None
    return {k: (v.get("url") if isinstance(v, dict) else None) for k, v in pairs if k is not None}


def stored(db: Path) -> dict[str, tuple[str, str | None]]:
    with sqlite3.connect(db) as conn:
        return {k: (s, c) for k, s, c in conn.execute("SELECT key, status, error_class FROM jobs")}


def check_import(document: Any, raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, db = Path(tmp) / "all_videos.json", Path(tmp) / "runner.db"
        path.write_bytes(raw)
        result = Cli(f"sqlite:///{db}")("import", str(path), ok=False)
        assert "Traceback" not in result.output + result.stderr
        want = expected(document)
        if want is None:  # not an object or array: refused in one line, nothing written
            assert result.exit_code == 1, result.output
            assert re.fullmatch(r"runner: error: [^\n]+\n", result.stderr), result.stderr
            assert not db.exists() or stored(db) == {}
            return
        assert result.exit_code == 0, result.stderr
        got = stored(db)
        assert set(got) == set(want)
        for key, url in want.items():
            usable = usable_url(url)
            assert got[key] == (("pending", None) if usable else ("failed", "invalid")), (key, url)
        unusable = sum(not usable_url(url) for url in want.values())
        rejected = (len(document) if isinstance(document, dict | list) else 0) - sum(
            1 for _ in _storable(document)
        )
        counts = dict(re.findall(r"(inserted|updated|unchanged|invalid) (\d+)", result.output))
        assert int(counts["inserted"]) == len(want) - unusable
        assert int(counts["invalid"]) == unusable + rejected
        said = [line for line in result.stderr.splitlines() if line.startswith("runner:")]
        if rejected:
            assert len(said) == 1 and re.fullmatch(
                r"runner: \d+ record\(s\) without a usable key.*", said[0]
            )
        else:
            assert said == []


def _storable(document: Any) -> list[str]:
    if isinstance(document, dict):
        candidates = list(document)
    else:
        candidates = [item.get("id") if isinstance(item, dict) else None for item in document]
    return [k for k in map(usable_key, candidates) if k is not None]


@settings(
    max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(documents)
def test_import_never_dies_and_keeps_what_is_valid(document: Any) -> None:
    check_import(document, json.dumps(document).encode())


@settings(max_examples=50, deadline=None, database=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_import_of_garbage_is_one_line_and_exit_1(raw: bytes) -> None:
    try:
        document = json.loads(raw)
    except ValueError:
        document = None  # not JSON at all
    with tempfile.TemporaryDirectory() as tmp:
        path, db = Path(tmp) / "all_videos.json", Path(tmp) / "runner.db"
        path.write_bytes(raw)
        result = Cli(f"sqlite:///{db}")("import", str(path), ok=False)
    if isinstance(document, dict | list):
        assert result.exit_code == 0, result.stderr
    else:
        assert result.exit_code == 1, result.output
        assert re.fullmatch(r"runner: error: [^\n]+\n", result.stderr), result.stderr


def test_lone_surrogate_escapes_are_refused_in_one_line(tmp_path: Path) -> None:
    """JSON may escape a lone surrogate ("\\ud800"): valid JSON grammar, but no
    text a database can store.  The parser refuses the file: one line, exit 1,
    nothing imported (a clean refusal, not a traceback)."""
    document = {"\ud800": {"url": "http://host.test/a"}, "fine": {"url": "http://host.test/b"}}
    path, db = tmp_path / "all.json", tmp_path / "runner.db"
    path.write_bytes(json.dumps(document).encode())
    result = Cli(f"sqlite:///{db}")("import", str(path), ok=False)
    assert "Traceback" not in result.output + result.stderr
    if result.exit_code == 0:  # a parser that keeps going must still keep the good record
        assert stored(db)["fine"] == ("pending", None)
    else:
        assert result.exit_code == 1
        assert re.fullmatch(r"runner: error: [^\n]+nothing was imported\n", result.stderr)
        assert stored(db) == {}


def test_integers_beyond_64_bits_in_meta_do_not_sink_the_import() -> None:
    check_import(
        {
            "big": {"url": "http://host.test/a", "tweet_id": 2**64},
            "ok": {"url": "http://host.test/b"},
        },
        json.dumps(
            {
                "big": {"url": "http://host.test/a", "tweet_id": 2**64},
                "ok": {"url": "http://host.test/b"},
            }
        ).encode(),
    )
