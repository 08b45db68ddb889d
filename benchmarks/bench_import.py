"""Import benchmark: `runner import` of a large catalogue against the plain loader.

    python benchmarks/bench_import.py [--records 1000000] [--pg-url URL | --no-pg]

Generates a catalogue (url plus a little metadata per record, ~110 bytes each),
then times, each in its own process so peak RSS is its own:
  baseline  the plain way: json.load of the whole file, one executemany, one commit
  import    `runner import` into a fresh database
  reimport  `runner import` of the same file again (all unchanged)
and prints wall seconds, peak RSS, and each run's ratio to the baseline of the
same run.  All of it once on SQLite, then once on PostgreSQL: the server of
--pg-url (a scratch database is created there and dropped), or else a throwaway
local one started as tests/postgres.py does, where its binaries are installed.
Figures only: nothing here is enforced (the issue's targets are import and
re-import within 1.5x of the baseline, peak RSS within 150 MB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `runner`, and tests/postgres.py for a local server

BASELINE_SQLITE = """
import json, sqlite3, sys
records = json.load(open(sys.argv[1]))
conn = sqlite3.connect(sys.argv[2])
conn.execute("CREATE TABLE jobs (key TEXT PRIMARY KEY, url TEXT, meta TEXT)")
conn.executemany("INSERT INTO jobs VALUES (?, ?, ?)",
                 ((k, v.get("url"), json.dumps(v)) for k, v in records.items()))
conn.commit()
"""

BASELINE_POSTGRES = """
import json, psycopg, sys
records = json.load(open(sys.argv[1]))
with psycopg.connect(sys.argv[2]) as conn:
    conn.execute("CREATE TABLE plain_jobs (key TEXT PRIMARY KEY, url TEXT, meta TEXT)")
    conn.cursor().executemany("INSERT INTO plain_jobs VALUES (%s, %s, %s)",
                              ((k, v.get("url"), json.dumps(v)) for k, v in records.items()))
"""

Row = tuple[str, float, float, str]


def write_catalogue(path: Path, records: int) -> None:
    rng = random.Random(1)
    with path.open("w") as out:
        out.write("{")
        for i in range(records):
            sep = "," if i else ""
            record = {
                "url": f"https://cdn.example.com/videos/{i:08d}.mp4",
                "title": f"video {i}",
                "duration": rng.randint(5, 7200),
            }
            out.write(f'{sep}\n"vid{i:08d}": {json.dumps(record)}')
        out.write("\n}\n")


def measure(argv: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MB and stdout of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} failed")
    return wall, usage.ru_maxrss / 1024, stdout.strip()


def runs(name: str, baseline: list[str], db_url: str, catalogue: Path) -> list[Row]:
    runner = [sys.executable, "-m", "runner.cli", "--db", db_url, "import", str(catalogue)]
    return [
        (f"{name}: baseline (json.load + executemany)", *measure(baseline)),
        (f"{name}: runner import", *measure(runner)),
        (f"{name}: runner import (again)", *measure(runner)),
    ]


def report(rows: list[Row]) -> None:
    base_wall = rows[0][1]
    print(f"{'run':<48}{'wall s':>8}{'peak RSS MB':>13}{'wall/base':>11}  output")
    for name, wall, rss, out in rows:
        print(f"{name:<48}{wall:>8.1f}{rss:>13.0f}{wall / base_wall:>11.2f}  {out}")
    (_, first, first_rss, _), (_, again, again_rss, _) = rows[1], rows[2]
    print(
        f"  -> first import {first / base_wall:.2f}x, re-import {again / base_wall:.2f}x the "
        f"baseline's time; peak RSS {max(first_rss, again_rss):.0f} MB "
        f"(targets: 1.5x, 150 MB)\n"
    )


def start_local_server(root: Path) -> tuple[Any, str]:
    """A throwaway server from tests/postgres.py, or None and why not."""
    try:
        import pytest

        from tests.postgres import PostgresServer, _as_postgres_user, find_bindir, free_port
    except ImportError as exc:
        return None, f"cannot use tests/postgres.py ({exc}): pass --pg-url"
    bindir = find_bindir()
    if bindir is None:
        return None, "no PostgreSQL server binaries here: pass --pg-url"
    try:
        server = PostgresServer(bindir, root, free_port(), _as_postgres_user(root))
        server.start()
    except (Exception, pytest.skip.Exception) as exc:  # pytest.skip: no user to run it as
        detail = getattr(exc, "stderr", None) or exc
        return None, f"the local server did not start: {str(detail).strip()}"
    return server, ""


@contextlib.contextmanager
def postgres_database(pg_url: str | None, root: Path) -> Iterator[str | None]:
    """A scratch database's SQLAlchemy URL, dropped after; None (why is printed) if
    there is no server to make one on."""
    import psycopg
    from sqlalchemy.engine import make_url

    server = None
    if pg_url is None:
        server, why = start_local_server(root)
        if server is None:
            print(f"postgresql: skipped, {why}")
            yield None
            return
        pg_url = server.url("postgres")
    url = make_url(pg_url).set(drivername="postgresql")
    admin = url.render_as_string(hide_password=False)
    name = f"runner_bench_{os.getpid()}"
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        try:
            scratch = url.set(drivername="postgresql+psycopg", database=name)
            yield scratch.render_as_string(hide_password=False)
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        if server is not None:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--pg-url", help="a PostgreSQL server to create a scratch database on")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        catalogue = root / "all_videos.json"
        write_catalogue(catalogue, args.records)
        print(f"catalogue: {args.records:,} records, {catalogue.stat().st_size / 1e6:.0f} MB\n")
        plain_sqlite = [sys.executable, "-c", BASELINE_SQLITE, str(catalogue), str(root / "b.db")]
        report(runs("sqlite", plain_sqlite, f"sqlite:///{root / 'r.db'}", catalogue))
        if args.no_pg:
            return
        # not under `root`: as root, the server runs as `postgres`, who must own its dir
        pg_root = Path(tempfile.mkdtemp(prefix="runner-bench-pg-"))
        try:
            with postgres_database(args.pg_url, pg_root) as db_url:
                if db_url is not None:
                    plain = db_url.replace("postgresql+psycopg", "postgresql")
                    plain_pg = [sys.executable, "-c", BASELINE_POSTGRES, str(catalogue), plain]
                    report(runs("postgresql", plain_pg, db_url, catalogue))
        finally:
            shutil.rmtree(pg_root, ignore_errors=True)


if __name__ == "__main__":
    main()
