"""The catalogue import's writes: records into the jobs table, fast.

`runner.catalogue` parses; this module turns batches of records into rows.  Every
statement keeps the import's rules: new keys are inserted, a changed URL replaces
the old one unless the job is done (a running job goes back to pending, its
attempt then refused by the fence in runner/jobs.py), a done row is never touched.

Speed without cost in memory (benchmarks/bench_import.py): a first import into an
empty table inserts each batch without looking its keys up first (and, on SQLite,
builds the secondary indexes once at the end), rows are plain tuples written on
the DB-API cursor, metadata is encoded with orjson, and PostgreSQL gets a whole
batch as one unnest statement.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from sqlalchemy import Connection
from sqlalchemy.engine.interfaces import DBAPICursor

from runner.jobs import Status
from runner.urls import host_of, url_hash


class Record(NamedTuple):
    """One catalogue entry; `invalid` holds why its URL cannot be used, if so.

    A tuple, so that the import's hot path can build plain tuples (`Row`) for
    the same writer: a frozen dataclass per record cost a second a million records.
    `host` is the URL's host when the parser had it at hand; None leaves it to be
    worked out (`_host`) if the row is written.
    """

    key: str
    url: str | None
    meta: dict
    invalid: str | None = None
    host: str | None = None


#: A Record as the import's parser makes it: a plain tuple, cheaper to build.
Row = tuple[str, str | None, dict, str | None, str | None]


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


#: A host that needs no urlsplit: only ASCII letters, digits, dots and hyphens, right
#: after the scheme and up to the path, query, fragment or end.  With no userinfo,
#: port, brackets, whitespace or non-ASCII in it, `host_of` returns exactly it,
#: lower-cased; anything else goes to `host_of` (tests/test_catalogue.py checks both
#: agree).  urlsplit is about 3 us a URL, a fifth of a plain import's time.  (No
#: re.IGNORECASE: slower, and it lets [A-Za-z] match the Kelvin sign and the long s.)
SIMPLE_HOST = re.compile(r"[hH][tT][tT][pP][sS]?://([A-Za-z0-9.-]+)(?=[/?#]|\Z)")


def host_column(url: str | None) -> str | None:
    """The `host` column for `url`: what migration 0003 stores (NULL without a URL)."""
    if url is None:
        return None
    simple = SIMPLE_HOST.match(url)
    return simple.group(1).lower() if simple else host_of(url)


#: SQLite page cache during an import, in KiB (negative: PRAGMA cache_size's unit).
#: The default 2 MB cannot hold the key index of a large table, so each key that
#: comes in no particular order (hashes, video ids) reads and spills pages: with
#: this a million such keys import a fifth faster (keys in order gain nothing).  It
#: is memory the import may use (bench_import.py shows peak RSS), restored after.
IMPORT_CACHE_KIB = 32 * 1024


@contextlib.contextmanager
def bulk_load(conn: Connection) -> Iterator[bool]:
    """Whether the jobs table is empty; SQLite set up for a bulk load meanwhile.

    Two things, neither of which changes durability (the commit syncs as the engine
    says) or what the import stores.  The page cache is enlarged, for this
    connection only and put back for the pool's next user.  And into an empty
    table the secondary indexes (a claim's and maintenance's, not the key's, which
    ON CONFLICT needs) are dropped and then built again from their own SQL just
    before the commit: one sorted build instead of an index update per row, a tenth
    of a first import's time.  It is all in the import's transaction, so a failed
    import rolls the indexes back with everything else, and other connections see
    the table with its indexes before and after, never without.  (PostgreSQL is
    left alone: DDL there would lock every daemon out of the table.)
    """
    cur = _cursor(conn)
    try:
        cur.execute("SELECT 1 FROM jobs LIMIT 1")
        empty = cur.fetchone() is None
        if conn.dialect.name != "sqlite":
            yield empty
            return
        cur.execute("PRAGMA cache_size")
        before = int(cur.fetchone()[0])  # type: ignore[index]  # a PRAGMA always answers
        cur.execute(f"PRAGMA cache_size = {-IMPORT_CACHE_KIB}")
        try:
            rebuild = _drop_secondary_indexes(cur) if empty else []
            yield empty
        finally:
            cur.execute(f"PRAGMA cache_size = {before}")
        # An index build's sort holds up to a page cache's worth of its own: with the
        # default cache back, the import's peak memory is one large cache, not two.
        for create in rebuild:
            cur.execute(create)
    finally:
        cur.close()


def _drop_secondary_indexes(cur: DBAPICursor) -> list[str]:
    """Drop the jobs table's CREATE INDEX indexes that enforce nothing; their SQL."""
    cur.execute("SELECT name, \"unique\", origin FROM pragma_index_list('jobs')")
    names = [name for name, unique, origin in cur.fetchall() if not unique and origin == "c"]
    creates = []
    for name in names:
        cur.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (name,))
        creates.append(cur.fetchone()[0])  # type: ignore[index]
        cur.execute('DROP INDEX "{}"'.format(name.replace('"', '""')))
    return creates


# --- writing a batch ---------------------------------------------------------------
#
# The import's hot path: plain SQL on the DB-API cursor, one read of the batch's
# existing rows, then one INSERT and one UPDATE for the whole batch.  What a record
# may change is decided again inside each statement (ON CONFLICT, the UPDATE's
# WHERE and CASEs), so a row a daemon or another import changes between the read
# and the write is still handled by the rules, not by what the read saw.

# New rows, as `_new_rows` makes them: a pending row binds only what varies (key,
# url, host, url_hash, meta, now); binding its constant status and four NULLs too made the
# INSERT a third slower.  A failed one (unusable URL) adds the reason.
_INSERT_PENDING = (
    "INSERT INTO jobs (key, url, host, url_hash, meta, created_at, status, attempts)"
    " VALUES (?, ?, ?, ?, ?, ?, 'pending', 0) ON CONFLICT (key) DO NOTHING"
)
_INSERT_FAILED = (
    "INSERT INTO jobs (key, url, host, meta, created_at, error, status, error_class,"
    " finished_at, attempts) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'failed', 'invalid', ?5, 0)"
    " ON CONFLICT (key) DO NOTHING"
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
    "UPDATE jobs SET url = :url, host = :host, url_hash = :url_hash, meta = :meta, origin = NULL,"
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


def _pyformat(sql: str, kind: str = "s") -> str:
    """`:name` parameters as psycopg's `%(name)s` (the hot path skips SQLAlchemy), or
    with `kind` "b" as `%(name)b`, sent in binary."""
    return re.sub(r"(?<!:):(\w+)", rf"%(\1){kind}", sql)


_UPDATE_URL = {
    "postgresql": _pyformat(_UPDATE_URL_SQL.format(distinct="IS DISTINCT FROM")),
    "sqlite": _UPDATE_URL_SQL.format(distinct="IS NOT"),
}

_EXISTING = {
    "postgresql": "SELECT key, url, status FROM jobs WHERE key = ANY(%(keys)b)",
    "sqlite": "SELECT key, url, status FROM jobs WHERE key IN (SELECT value FROM json_each(:keys))",
}

# PostgreSQL: the whole batch as one statement over column arrays; an executemany
# of single-row INSERTs costs a round trip per row (3x slower than SQLite's).  The
# arrays go in binary: psycopg quotes each element of a text-format array with a
# regex, which took over a third of a first import's time.
_INSERT_ARRAYS = _pyformat(
    "INSERT INTO jobs (key, url, host, url_hash, meta, status, attempts, error, error_class,"
    " created_at, finished_at) SELECT k, u, h, uh, m, s, 0, e, c, :now, f FROM unnest("
    " CAST(:key AS TEXT[]), CAST(:url AS TEXT[]), CAST(:host AS TEXT[]),"
    " CAST(:url_hash AS TEXT[]), CAST(:meta AS TEXT[]), CAST(:status AS TEXT[]),"
    " CAST(:error AS TEXT[]), CAST(:error_class AS TEXT[]), CAST(:finished_at AS FLOAT8[]))"
    " AS t(k, u, h, uh, m, s, e, c, f) ON CONFLICT (key) DO NOTHING",
    "b",
)

_encode_meta = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _meta_text(meta: dict) -> str | None:
    """The `meta` column: the record's other fields as compact JSON, NULL if none.

    orjson is ten times json's speed (json was a sixth of a first import); json
    takes what orjson refuses (integers beyond 64 bits, which only the Python
    parser yields, and lone surrogates), so those are stored as they always were.
    """
    if not meta:
        return None
    try:
        return orjson.dumps(meta).decode()
    except orjson.JSONEncodeError:
        return _encode_meta(meta)


def _new_rows(records: Iterable[Row], now: float) -> tuple[list[tuple], list[tuple]]:
    """Parameters for `_INSERT_PENDING` and for `_INSERT_FAILED`.

    Two statements, so a batch's rows with an unusable URL get their ids after its
    usable ones: ids follow the file only batch by batch (failed rows are never
    claimed, so no job runs out of order for it).
    """
    pending: list[tuple] = []
    failed: list[tuple] = []
    for key, url, meta, invalid, host in records:
        if host is None:
            host = host_column(url)
        if invalid is None:
            pending.append((key, url, host, url_hash(url), _meta_text(meta), now))
        else:
            failed.append((key, url, host, _meta_text(meta), now, invalid))
    return pending, failed


def _cursor(conn: Connection) -> DBAPICursor:
    """A DB-API cursor in the connection's transaction: the import's hot path cannot
    afford SQLAlchemy's per-row processing (parameters in, result rows out)."""
    return conn.connection.cursor()


def _insert_new_rows(
    cur: DBAPICursor, dialect: str, pending: list[tuple], failed: list[tuple]
) -> int:
    """Insert the rows from `_new_rows` unless their key exists; how many were."""
    if dialect != "postgresql":
        inserted = 0
        for sql, rows in ((_INSERT_PENDING, pending), (_INSERT_FAILED, failed)):
            if rows:
                cur.executemany(sql, rows)
                inserted += cur.rowcount
        return inserted
    both = pending + failed
    if not both:
        return 0
    now = both[0][-1] if pending else failed[0][4]
    cur.execute(
        _INSERT_ARRAYS,
        {
            "key": [row[0] for row in both],
            "url": [row[1] for row in both],
            "host": [row[2] for row in both],
            "url_hash": [row[3] for row in pending] + [None] * len(failed),
            "meta": [row[4] for row in pending] + [row[3] for row in failed],
            "status": [Status.PENDING.value] * len(pending) + [Status.FAILED.value] * len(failed),
            "error": [None] * len(pending) + [row[5] for row in failed],
            "error_class": [None] * len(pending) + ["invalid"] * len(failed),
            "finished_at": [None] * len(pending) + [now] * len(failed),
            "now": now,
        },
    )
    return int(cur.rowcount)


def _existing(conn: Connection, keys: list[str]) -> dict[str, Any]:
    dialect = conn.dialect.name
    keys_param: Any = keys if dialect == "postgresql" else orjson.dumps(keys).decode()
    cur = _cursor(conn)
    try:
        cur.execute(_EXISTING[dialect], {"keys": keys_param})
        return {row[0]: row for row in cur.fetchall()}
    finally:
        cur.close()


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
    return write_batch(conn, records, now=now, insert_first=False)


def write_batch(
    conn: Connection, records: Sequence[Row], *, now: float, insert_first: bool
) -> ImportCounts:
    """`upsert_records`; with `insert_first`, try the batch as all-new rows first."""
    batch = {r[0]: r for r in records}  # a key repeated in the file: the last wins
    repeated = len(records) - len(batch)
    cur = _cursor(conn)
    try:
        counts = _insert_all(cur, conn.dialect.name, batch.values(), now) if insert_first else None
        if counts is None:
            counts = _upsert(conn, cur, batch, now)
    finally:
        cur.close()
    counts.unchanged += repeated
    return counts


def _insert_all(
    cur: DBAPICursor, dialect: str, records: Iterable[Row], now: float
) -> ImportCounts | None:
    """Insert every record as a new row, or, if any key exists already, nothing.

    A savepoint undoes the batch when some key was there (ON CONFLICT skipped it,
    so fewer rows changed than were sent); None then, and the batch goes the
    careful way.  This saves the look-up that finds nothing in a first import.
    """
    pending, failed = _new_rows(records, now)
    cur.execute("SAVEPOINT runner_import_batch")
    if _insert_new_rows(cur, dialect, pending, failed) != len(pending) + len(failed):
        cur.execute("ROLLBACK TO SAVEPOINT runner_import_batch")
        cur.execute("RELEASE SAVEPOINT runner_import_batch")
        return None
    cur.execute("RELEASE SAVEPOINT runner_import_batch")
    return ImportCounts(inserted=len(pending), invalid=len(failed))


def _upsert(conn: Connection, cur: DBAPICursor, batch: dict[str, Row], now: float) -> ImportCounts:
    counts = ImportCounts()
    existing = _existing(conn, list(batch))
    inserts: list[Row] = []
    updates: list[dict[str, Any]] = []
    for record in batch.values():
        key, url, meta, invalid, host = record
        row = existing.get(key)
        if row is None:
            inserts.append(record)
        elif row[2] not in _URL_REPLACEABLE or row[1] == url:
            # A record with an unusable URL is reported as invalid on every import,
            # whether or not it changed anything, so the user sees it each time.
            if invalid:
                counts.invalid += 1
            else:
                counts.unchanged += 1
            continue
        else:  # only rows written pay for the host and the meta's JSON
            updates.append(
                {
                    "key": key,
                    "url": url,
                    "host": host_column(url) if host is None else host,
                    "url_hash": None if invalid else url_hash(url),
                    "now": now,
                    "invalid": invalid,
                    "meta": _meta_text(meta),
                    "error": invalid,
                    "error_class": "invalid" if invalid else None,
                }
            )
        if invalid:
            counts.invalid += 1
        elif row is None:
            counts.inserted += 1
        else:
            counts.updated += 1
    if inserts:
        _insert_new_rows(cur, conn.dialect.name, *_new_rows(inserts, now))
    if updates:
        cur.executemany(_UPDATE_URL[conn.dialect.name], updates)
    return counts
