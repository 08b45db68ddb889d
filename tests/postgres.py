"""A throwaway PostgreSQL server for the tests, and a fresh database per test.

The server is started once per session from the binaries of Debian's `postgresql`
package (``/usr/lib/postgresql/<version>/bin``), in a temp dir that is removed at
the end.  PostgreSQL refuses to run as root, so as root it runs as the `postgres`
user.  Where no server can be started the PostgreSQL tests skip with the reason,
unless ``RUNNER_REQUIRE_POSTGRES=1`` (set by `.ci/run`), where they fail instead:
CI must never pass by skipping them.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

REQUIRE_ENV = "RUNNER_REQUIRE_POSTGRES"
BIN_GLOB = "/usr/lib/postgresql/*/bin"
#: a test server need not survive a crash: no fsync, which makes CREATE DATABASE fast
SERVER_SETTINGS = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
)


def unavailable(reason: str) -> NoReturn:
    """Skip, or fail where PostgreSQL is required."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"PostgreSQL is required ({REQUIRE_ENV}=1) but {reason}", pytrace=False)
    pytest.skip(f"no PostgreSQL server: {reason}")


def find_bindir() -> Path | None:
    """The newest installed server's bin dir (one holding initdb, pg_ctl and postgres)."""
    candidates = [Path(p) for p in glob.glob(BIN_GLOB)]
    on_path = shutil.which("pg_ctl")
    if on_path:  # e.g. /usr/local/bin/pg_ctl, a symlink into the package's bin dir
        candidates.append(Path(on_path).resolve().parent)
    usable = [d for d in candidates if all((d / name).is_file() for name in ("initdb", "pg_ctl"))]

    def version(path: Path) -> tuple[int, ...]:
        digits = path.parent.name
        return (int(digits),) if digits.isdigit() else (0,)

    return max(usable, key=version) if usable else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    port: int
    as_user: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str) -> None:
        subprocess.run(
            [*self.as_user, *argv], check=True, capture_output=True, text=True, timeout=120
        )

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            "-D",
            str(self.data),
        )
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 {SERVER_SETTINGS}"
        self._run(
            str(self.bindir / "pg_ctl"),
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
        )

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run(str(self.bindir / "pg_ctl"), "stop", "-m", "immediate", "-D", str(self.data))

    def execute(self, sql: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE need that)."""
        import psycopg

        with psycopg.connect(self.url("postgres").replace("+psycopg", ""), autocommit=True) as c:
            c.execute(sql)


def _as_postgres_user(root: Path) -> list[str]:
    """Root runs the server as `postgres`, which must own its temp dir."""
    if os.geteuid() != 0:
        return []
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        unavailable("running as root and there is no 'postgres' user to run the server as")
    runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if runuser is None:
        unavailable("running as root and runuser(1) is missing")
    os.chown(root, user.pw_uid, user.pw_gid)
    return [str(runuser), "-u", "postgres", "--"]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    if bindir is None:
        unavailable(f"no initdb/pg_ctl under {BIN_GLOB} or on PATH (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable('psycopg is not installed (pip install -e ".[postgres]")')
    # not under pytest's basetemp: that is private to the current user
    root = Path(tempfile.mkdtemp(prefix="runner-pg-"))
    try:
        server = PostgresServer(bindir, root, free_port(), _as_postgres_user(root))
        try:
            server.start()
        except subprocess.CalledProcessError as exc:
            log = server.log.read_text()[-2000:] if server.log.exists() else ""
            unavailable(f"the server did not start: {exc.stderr.strip()} {log}".strip())
        yield server
        server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


_numbers = itertools.count()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new, empty database on the session's server, dropped after the test."""
    name = f"runner_test_{os.getpid()}_{next(_numbers)}"
    postgres_server.execute(f"CREATE DATABASE {name}")
    yield postgres_server.url(name)
    postgres_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A test that takes this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runner.db'}"
    return str(request.getfixturevalue("pg_url"))
