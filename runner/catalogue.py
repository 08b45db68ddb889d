"""Streamed import of the user's catalogue into the jobs table.

The catalogue can hold millions of records, so it is parsed incrementally (ijson)
and written in batches; memory depends on the batch size, not the file size.  The
whole import is one transaction: a file that turns out to be broken half-way
writes nothing.

Streaming must not cost much time either (benchmarks/bench_import.py compares it
with json.load plus one executemany): each record is a plain tuple built from the
dict the parser made (no copy), metadata is encoded with orjson, a first import
into an empty table inserts each batch without looking up its keys first (and,
on SQLite, builds the secondary indexes once at the end), and the cyclic garbage
collector waits until the import is done.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import ijson
from sqlalchemy import Engine

from runner.catalogue_write import (
    SIMPLE_HOST,
    ImportCounts,
    Record,
    Row,
    bulk_load,
    upsert_records,
    write_batch,
)
from runner.counts import try_fold_counts
from runner.errors import RunnerError

__all__ = [  # the writes live in runner.catalogue_write; callers import them from here
    "UNSTORABLE",
    "CatalogueFormat",
    "ImportCounts",
    "Record",
    "Rejected",
    "import_catalogue",
    "iter_records",
    "upsert_records",
    "url_problem",
]

BATCH_RECORDS = 5_000
MAX_KEY_CHARS = 4_096
#: how every "text no database can store" reason starts (POST /jobs refuses them with
#: a 400 rather than storing the rest; `runner import` counts them and goes on)
UNSTORABLE = "unstorable text: "

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogueFormat:
    key_field: str = "id"
    url_field: str = "url"


#: The common case, checked without urlsplit's cost: scheme, "//", then a host with
#: no brackets or port (IPv6 literals, ports and stray brackets take the careful path).
_PLAUSIBLE_URL = re.compile(
    r"\s*https?://[^/?#\s@:\[\]][^/?#\s\[\]:]*(?:[/?#]|\s*$)", re.IGNORECASE
)


def url_problem(url: object) -> str | None:
    """Why `url` cannot be downloaded, or None if it can."""
    if isinstance(url, str) and _PLAUSIBLE_URL.match(url):
        return None
    if url is None:
        return "no url"
    if not isinstance(url, str):
        return f"url is not a string ({type(url).__name__})"
    if not url.strip():
        return "url is empty"
    try:
        parts = urlsplit(url.strip())
        host, _ = parts.hostname, parts.port  # both raise on a malformed netloc
    except ValueError as exc:
        return f"url is malformed ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return f"unsupported url scheme {parts.scheme or '(none)'!r}: only http and https"
    if not host:
        return "url has no host"
    return None


def _unstorable(text: str) -> bool:
    """Whether `text` holds what PostgreSQL refuses in text: NUL, which it cannot store
    at all, or a lone surrogate, which is not UTF-8.  (SQLite would take both, so the
    import and the API would differ by database.)  Cheap in the common case: the NUL
    search is a memchr, and `isascii` reads a flag, so only non-ASCII text is encoded.
    """
    if "\x00" in text:
        return True
    if text.isascii():
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _meta_unstorable(value: Any) -> bool:
    """Whether the metadata holds a lone surrogate, in a key or a value at any depth.

    NUL is fine there: the meta column holds JSON text, where it is the escape
    \\u0000.  Only the pure-Python parser (the fallback for integers beyond 64 bits)
    yields lone surrogates; the C parser turns them into "?" (tests/test_catalogue.py
    checks both), so the fast path never walks the metadata.
    """
    if isinstance(value, str):
        return not value.isascii() and _unstorable(value.replace("\x00", ""))
    if isinstance(value, dict):
        return any(_meta_unstorable(k) or _meta_unstorable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_meta_unstorable(v) for v in value)
    return False


def _row(key: str, value: Any, url_field: str) -> Row:
    """The record `value` (what the parser made, ours to change) as a row.

    The URL is popped from the parsed dict and the rest of it is the metadata: no
    copy.  The common URL costs one regex match, which proves it usable (a simple
    host implies `_PLAUSIBLE_URL`) and yields its host; the careful checks are for
    the rest.
    """
    if not isinstance(value, dict):
        return (key, None, {}, f"record is not an object ({type(value).__name__})", None)
    url = value.pop(url_field, None)
    if isinstance(url, str):
        if "\x00" in url or (not url.isascii() and _unstorable(url)):
            return (key, None, {}, f"{UNSTORABLE}{url_field!r} holds NUL or a lone surrogate", None)
        simple = SIMPLE_HOST.match(url)
        if simple:  # no leading blank, and a host ending where the URL does, or at / ? #
            return (key, url.strip(), value, None, simple.group(1).lower())
        problem = url_problem(url)
        url = url.strip()
    else:
        problem, url = url_problem(url), None
    if problem is not None:
        problem = f"{problem} (field {url_field!r})"
    return (key, url, value, problem, None)


def _top_level_kind(stream: BinaryIO, path: Path) -> str:
    head = stream.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    stream.seek(0)
    if head[:1] == b"{":
        return "object"
    if head[:1] == b"[":
        return "array"
    if not head:
        raise RunnerError(f"{path}: empty file, expected a JSON object or array")
    first = re.match(rb"[^\s,:]{1,20}", head)
    shown = first.group(0).decode("utf-8", "replace") if first else repr(head[:1])
    raise RunnerError(
        f"{path}: top-level JSON value must be an object {{key: record}} or an array of "
        f"records, found {shown!r}"
    )


def _key_problem(key: object) -> str | None:
    if not isinstance(key, str | int) or isinstance(key, bool):
        return f"key is not a string ({type(key).__name__})"
    if not str(key):
        return "key is empty"
    if len(str(key)) > MAX_KEY_CHARS:
        return f"key is longer than {MAX_KEY_CHARS} characters"
    if isinstance(key, str) and _unstorable(key):
        return f"{UNSTORABLE}key holds NUL or a lone surrogate"
    return None


def _meta_checked(row: Row) -> Row:
    """`row`, or it as invalid with no metadata if its metadata cannot be stored."""
    if not _meta_unstorable(row[2]):
        return row
    return (row[0], row[1], {}, f"{UNSTORABLE}the metadata holds a lone surrogate", row[4])


@dataclass
class Rejected:
    """Records that cannot be stored at all (no usable key): counted and described."""

    count: int = 0
    first_reason: str | None = None
    #: the first rejection for a key no database can store (POST /jobs refuses those)
    unstorable: str | None = None

    def add(self, reason: str) -> None:
        self.count += 1
        self.first_reason = self.first_reason or reason
        if reason.startswith(UNSTORABLE) or f": {UNSTORABLE}" in reason:
            self.unstorable = self.unstorable or reason


def iter_records(
    stream: BinaryIO, path: Path, fmt: CatalogueFormat, rejected: Rejected, parser: Any = ijson
) -> Iterator[Record]:
    """`parser`: the ijson module (fastest backend) or `ijson.get_backend("python")`."""
    return map(Record._make, _rows(stream, path, fmt, rejected, parser))


def _rows(
    stream: BinaryIO, path: Path, fmt: CatalogueFormat, rejected: Rejected, parser: Any
) -> Iterator[Row]:
    kind = _top_level_kind(stream, path)
    url_field = fmt.url_field
    # only the pure-Python parser yields lone surrogates (see _meta_unstorable)
    check_meta = parser is not ijson
    if kind == "object":
        for key, value in parser.kvitems(stream, "", use_float=True):
            # an object's keys are strings: only empty, too long and unstorable ones
            # are refused
            if not key or len(key) > MAX_KEY_CHARS or _unstorable(key):
                rejected.add(_key_problem(key) or "key is not usable")
                continue
            row = _row(key, value, url_field)
            yield _meta_checked(row) if check_meta else row
        return
    key_field = fmt.key_field
    for index, value in enumerate(parser.items(stream, "item", use_float=True)):
        key = value.get(key_field) if isinstance(value, dict) else None
        problem = _key_problem(key) if key is not None else f"no {key_field!r} field"
        if problem:
            rejected.add(f"record #{index}: {problem}")
            continue
        row = _row(str(key), value, url_field)
        row[2].pop(key_field, None)  # the metadata is the parsed dict, the key not in it
        yield _meta_checked(row) if check_meta else row


def _json_error_position(path: Path) -> str:
    """Line and column of the first syntax error.

    Only the error path pays for this: the pure-Python ijson backend reports the
    character offset that the fast C backend does not, then we count lines up to it.
    """
    backend = ijson.get_backend("python")
    offset = None
    try:
        with path.open("rb") as stream:
            for _ in backend.parse(stream):
                pass
    except Exception as exc:
        found = re.search(r"at (\d+)", str(exc))
        offset = int(found.group(1)) if found else None
    line, column, seen = 1, 1, 0
    with path.open("r", encoding="utf-8", errors="replace") as text_stream:
        while offset is None or seen < offset:
            chunk = text_stream.read(1 << 20)
            if not chunk:
                break
            part = chunk if offset is None else chunk[: offset - seen]
            newlines = part.count("\n")
            if newlines:
                line += newlines
                column = len(part) - part.rfind("\n")
            else:
                column += len(part)
            seen += len(part)
    return f"line {line} column {column}"


def import_catalogue(
    engine: Engine, path: Path, fmt: CatalogueFormat, *, now: float | None = None
) -> tuple[ImportCounts, Rejected]:
    now = time.time() if now is None else now
    with _no_cyclic_gc():
        try:
            imported = _import_with(ijson, engine, path, fmt, now=now)
        except _BigIntegers as exc:
            # The C backend stops at any integer beyond 64 bits (a tweet id, say),
            # even in metadata we only carry along, and at an escaped lone low
            # surrogate ("\udc80", which it turns into bytes that are not UTF-8);
            # the pure-Python one takes both, slower, and the surrogates then make
            # their records invalid, not the file.  The first pass rolled back, so
            # nothing is counted twice.
            log.info("%s holds %s: importing with the Python parser", path, exc)
            imported = _import_with(ijson.get_backend("python"), engine, path, fmt, now=now)
    try_fold_counts(engine)  # a row per batch and state: status reads sum a handful
    return imported


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector paused for the import, then as it was.

    An import makes millions of short-lived objects (parsed dicts, rows), none in a
    cycle, so reference counting frees them all; but the collector, counting them
    as they come, kept walking every object the process holds (SQLAlchemy, Alembic)
    and took a seventh of a large import's time.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _BigIntegers(Exception):
    """The fast JSON parser refused an integer beyond 64 bits, or a lone surrogate."""


def _import_with(
    parser: Any, engine: Engine, path: Path, fmt: CatalogueFormat, *, now: float
) -> tuple[ImportCounts, Rejected]:
    counts, rejected = ImportCounts(), Rejected()
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise RunnerError(f"cannot read {path}: {exc.strerror}") from None
    with stream, engine.begin() as conn, bulk_load(conn) as insert_first:
        # Into a table empty at the start, nearly every record is new: insert first
        # and look keys up only in a batch where some turned out to exist already
        # (a key repeated in the file, or another import's, on PostgreSQL).
        rows = _rows(stream, path, fmt, rejected, parser)
        try:
            while batch := list(itertools.islice(rows, BATCH_RECORDS)):
                counts.add(write_batch(conn, batch, now=now, insert_first=insert_first))
        except ijson.JSONError as exc:
            if "integer overflow" in str(exc) and parser is ijson:
                raise _BigIntegers("integers beyond 64 bits") from None
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RunnerError(
                f"{path}: invalid JSON at {_json_error_position(path)}: {reason}; "
                "nothing was imported"
            ) from None
        except UnicodeDecodeError as exc:
            if parser is ijson:  # perhaps a lone surrogate (see import_catalogue)
                raise _BigIntegers("text that is not UTF-8") from None
            raise RunnerError(
                f"{path}: not UTF-8 text ({exc.reason}); nothing was imported"
            ) from None
    counts.invalid += rejected.count
    return counts, rejected
