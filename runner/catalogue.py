"""Streamed import of the user's catalogue into the jobs table.

The catalogue can hold millions of records, so it is parsed incrementally (ijson)
and written in batches; memory depends on the batch size, not the file size.  The
whole import is one transaction: a file that turns out to be broken half-way
writes nothing.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import ijson
from sqlalchemy import Connection, Engine

from runner.errors import RunnerError
from runner.jobs import Status
from runner.urls import host_of

BATCH_RECORDS = 5_000
MAX_KEY_CHARS = 4_096

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogueFormat:
    key_field: str = "id"
    url_field: str = "url"


@dataclass(frozen=True)
class Record:
    """One catalogue entry; `invalid` holds why its URL cannot be used, if so."""

    key: str
    url: str | None
    meta: dict
    invalid: str | None = None


@dataclass
class ImportCounts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    invalid: int = 0

    def add(self, other: ImportCounts) -> None:
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.invalid += other.invalid


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


def _record(key: str, value: Any, fmt: CatalogueFormat) -> Record:
    if not isinstance(value, dict):
        return Record(
            key=key, url=None, meta={}, invalid=f"record is not an object ({type(value).__name__})"
        )
    raw_url = value.get(fmt.url_field)
    problem = url_problem(raw_url)
    url = raw_url.strip() if isinstance(raw_url, str) else None
    meta = {k: v for k, v in value.items() if k != fmt.url_field}
    if problem is not None:
        problem = f"{problem} (field {fmt.url_field!r})"
    return Record(key=key, url=url, meta=meta, invalid=problem)


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
    return None


@dataclass
class Rejected:
    """Records that cannot be stored at all (no usable key): counted and described."""

    count: int = 0
    first_reason: str | None = None

    def add(self, reason: str) -> None:
        self.count += 1
        self.first_reason = self.first_reason or reason


def iter_records(
    stream: BinaryIO, path: Path, fmt: CatalogueFormat, rejected: Rejected, parser: Any = ijson
) -> Iterator[Record]:
    """`parser`: the ijson module (fastest backend) or `ijson.get_backend("python")`."""
    kind = _top_level_kind(stream, path)
    if kind == "object":
        for key, value in parser.kvitems(stream, "", use_float=True):
            problem = _key_problem(key)
            if problem:
                rejected.add(problem)
                continue
            yield _record(key, value, fmt)
        return
    for index, value in enumerate(parser.items(stream, "item", use_float=True)):
        key = value.get(fmt.key_field) if isinstance(value, dict) else None
        problem = _key_problem(key) if key is not None else f"no {fmt.key_field!r} field"
        if problem:
            rejected.add(f"record #{index}: {problem}")
            continue
        record = _record(str(key), value, fmt)
        meta = {k: v for k, v in record.meta.items() if k != fmt.key_field}
        yield Record(key=record.key, url=record.url, meta=meta, invalid=record.invalid)


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
    try:
        return _import_with(ijson, engine, path, fmt, now=now)
    except _BigIntegers:
        # The C backend stops at any integer beyond 64 bits (a tweet id, say), even
        # in metadata we only carry along; the pure-Python one takes them, slower.
        # The first pass rolled back, so nothing is counted twice.
        log.info("%s holds integers beyond 64 bits: importing with the Python parser", path)
        return _import_with(ijson.get_backend("python"), engine, path, fmt, now=now)


class _BigIntegers(Exception):
    """The fast JSON parser refused an integer beyond 64 bits."""


def _import_with(
    parser: Any, engine: Engine, path: Path, fmt: CatalogueFormat, *, now: float
) -> tuple[ImportCounts, Rejected]:
    counts, rejected = ImportCounts(), Rejected()
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise RunnerError(f"cannot read {path}: {exc.strerror}") from None
    with stream, engine.begin() as conn:
        batch: list[Record] = []
        try:
            for record in iter_records(stream, path, fmt, rejected, parser):
                batch.append(record)
                if len(batch) >= BATCH_RECORDS:
                    counts.add(upsert_records(conn, batch, now=now))
                    batch.clear()
        except ijson.JSONError as exc:
            if "integer overflow" in str(exc) and parser is ijson:
                raise _BigIntegers from None
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RunnerError(
                f"{path}: invalid JSON at {_json_error_position(path)}: {reason}; "
                "nothing was imported"
            ) from None
        except UnicodeDecodeError as exc:
            raise RunnerError(
                f"{path}: not UTF-8 text ({exc.reason}); nothing was imported"
            ) from None
        counts.add(upsert_records(conn, batch, now=now))
    counts.invalid += rejected.count
    return counts, rejected


# --- writing a batch ---------------------------------------------------------------
#
# The import's hot path: plain SQL on the DB-API cursor, one read of the batch's
# existing rows, then one INSERT and one UPDATE for the whole batch.  What a record
# may change is decided again inside each statement (ON CONFLICT, the UPDATE's
# WHERE and CASEs), so a row a daemon or another import changes between the read
# and the write is still handled by the rules, not by what the read saw.

_INSERT = (
    "INSERT INTO jobs (key, url, host, meta, status, attempts, error, error_class, created_at,"
    " finished_at) VALUES (:key, :url, :host, :meta, :status, 0, :error, :error_class, :now,"
    " :finished_at) ON CONFLICT (key) DO NOTHING"
)

#: rows whose URL an import may replace; a done job keeps its URL and its vector
_URL_REPLACEABLE = (Status.PENDING.value, Status.FAILED.value, Status.RUNNING.value)

# A job that is not done and whose URL changed takes the new URL (and its host).  A
# usable URL puts it in pending, an unusable one fails it.  A failed job starts
# again with no attempts spent.  So does a running one: its attempt fetches the old
# URL, so the job is taken from its worker (lease and worker cleared; `claims` is
# left alone, so the stale attempt's writes are refused at store time).  Done rows,
# and rows whose URL already is the new one (a concurrent import), are not matched.
# (CAST: PostgreSQL cannot infer a parameter's type from `IS NOT NULL` alone.)
_UPDATE_URL_SQL = (
    "UPDATE jobs SET url = :url, host = :host, meta = :meta,"
    " status = CASE WHEN CAST(:invalid AS TEXT) IS NOT NULL THEN 'failed' ELSE 'pending' END,"
    " attempts = CASE WHEN status IN ('failed', 'running') THEN 0 ELSE attempts END,"
    " worker_id = CASE WHEN status = 'running' THEN NULL ELSE worker_id END,"
    " claimed_at = CASE WHEN status = 'running' THEN NULL ELSE claimed_at END,"
    " lease_expires_at = CASE WHEN status = 'running' THEN NULL ELSE lease_expires_at END,"
    " started_at = CASE WHEN status = 'running' THEN NULL ELSE started_at END,"
    " error = :error, error_class = :error_class, http_status = NULL,"
    " finished_at = CASE WHEN CAST(:invalid AS TEXT) IS NOT NULL THEN :now ELSE finished_at END,"
    " not_before = NULL"
    " WHERE key = :key AND status IN ('pending', 'failed', 'running') AND url {distinct} :url"
)
_UPDATE_URL = {
    "postgresql": _UPDATE_URL_SQL.format(distinct="IS DISTINCT FROM"),
    "sqlite": _UPDATE_URL_SQL.format(distinct="IS NOT"),
}

_EXISTING = {
    "postgresql": "SELECT key, url, status FROM jobs WHERE key = ANY(:keys)",
    "sqlite": "SELECT key, url, status FROM jobs WHERE key IN (SELECT value FROM json_each(:keys))",
}

# PostgreSQL: the whole batch as one statement over column arrays; an executemany
# of single-row INSERTs costs a round trip per row (3x slower than SQLite's).
_INSERT_ARRAYS = (
    "INSERT INTO jobs (key, url, host, meta, status, attempts, error, error_class, created_at,"
    " finished_at) SELECT k, u, h, m, s, 0, e, c, :now, f FROM unnest(CAST(:key AS TEXT[]),"
    " CAST(:url AS TEXT[]), CAST(:host AS TEXT[]), CAST(:meta AS TEXT[]),"
    " CAST(:status AS TEXT[]), CAST(:error AS TEXT[]), CAST(:error_class AS TEXT[]),"
    " CAST(:finished_at AS FLOAT8[])) AS t(k, u, h, m, s, e, c, f) ON CONFLICT (key) DO NOTHING"
)
_ARRAY_COLUMNS = ("key", "url", "host", "meta", "status", "error", "error_class", "finished_at")

#: A host that needs no urlsplit: only ASCII letters, digits, dots and hyphens, right
#: after the scheme and up to the path, query, fragment or end.  With no userinfo,
#: port, brackets, whitespace or non-ASCII in it, `host_of` returns exactly it,
#: lower-cased; anything else goes to `host_of` (tests/test_catalogue.py checks both
#: agree).  urlsplit is about 3 us a URL, a fifth of a plain import's time.
_SIMPLE_HOST = re.compile(r"https?://([A-Za-z0-9.-]+)(?=[/?#]|\Z)", re.IGNORECASE)


def _host(url: str | None) -> str | None:
    """The `host` column for `url`: what migration 0003 stores (NULL without a URL)."""
    if url is None:
        return None
    simple = _SIMPLE_HOST.match(url)
    return simple.group(1).lower() if simple else host_of(url)


def _insert_new_records(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if conn.dialect.name != "postgresql":
        _driver(conn, _INSERT, rows)
        return
    arrays: dict[str, Any] = {name: [row[name] for row in rows] for name in _ARRAY_COLUMNS}
    _driver(conn, _INSERT_ARRAYS, {**arrays, "now": rows[0]["now"]})


_encode_meta = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _driver(conn: Connection, sql: str, params: Any) -> Any:
    """Run SQL straight on the DB-API cursor: the import's hot path cannot afford
    SQLAlchemy's per-row parameter processing (it doubled the import time)."""
    if conn.dialect.paramstyle == "pyformat":
        sql = re.sub(r"(?<!:):(\w+)", r"%(\1)s", sql)
    return conn.exec_driver_sql(sql, params)


def _existing(conn: Connection, keys: list[str]) -> dict[str, Any]:
    dialect = conn.dialect.name
    keys_param: Any = keys if dialect == "postgresql" else json.dumps(keys)
    rows = _driver(conn, _EXISTING[dialect], {"keys": keys_param})
    return {row[0]: row for row in rows}


def upsert_records(conn: Connection, records: Sequence[Record], *, now: float) -> ImportCounts:
    """Apply one batch of catalogue records; idempotent.

    A new key is inserted (failed at once if its URL is unusable).  A known key
    whose URL changed takes the new URL unless its job is done: a done job keeps
    its vector, whatever the catalogue says now.  A failed job goes back to pending
    with a fresh set of attempts.  So does a running one: it is fetching a URL the
    catalogue no longer has, and dropping the change as 'unchanged' would leave the
    job done with the old video.  Its worker loses it (worker, lease and start
    cleared; `claims` kept, so the stale attempt cannot store its result) and it
    counts as `updated`.  The statement itself applies these rules, so a job that
    changed state since this batch read it is handled by its state at the write.
    Every row written gets the URL's host too.
    """
    batch = {r.key: r for r in records}  # a key repeated in the file: the last wins
    counts = ImportCounts(unchanged=len(records) - len(batch))
    existing = _existing(conn, list(batch))
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for record in batch.values():
        row = existing.get(record.key)
        if row is not None and (row[2] not in _URL_REPLACEABLE or row[1] == record.url):
            # A record with an unusable URL is reported as invalid on every import,
            # whether or not it changed anything, so the user sees it each time.
            if record.invalid:
                counts.invalid += 1
            else:
                counts.unchanged += 1
            continue
        # only rows written pay for the host and the meta's JSON
        (inserts if row is None else updates).append(
            {
                "key": record.key,
                "url": record.url,
                "host": _host(record.url),
                "now": now,
                "invalid": record.invalid,
                "meta": _encode_meta(record.meta) if record.meta else None,
                "status": Status.FAILED.value if record.invalid else Status.PENDING.value,
                "error": record.invalid,
                "error_class": "invalid" if record.invalid else None,
                "finished_at": now if record.invalid else None,
            }
        )
        if record.invalid:
            counts.invalid += 1
        elif row is None:
            counts.inserted += 1
        else:
            counts.updated += 1
    if inserts:
        _insert_new_records(conn, inserts)
    if updates:
        _driver(conn, _UPDATE_URL[conn.dialect.name], updates)
    return counts
