"""A real daemon serving the real HTTP API on 127.0.0.1, for tests/test_api*.py.

The daemon runs in its own thread and event loop, with the session's tiny model
and a real SQLite file; tests talk to it over HTTP with the standard library.  A
second small server provides redirects and slow or stalled responses.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from runner.api import ApiConfig, api_service
from runner.config import DaemonConfig
from runner.daemon import Daemon
from runner.db import connect
from runner.download import DownloadLimits, UrlGuard
from runner.retry import RetryPolicy
from tests.threaded_server import serve_in_thread

TOKEN = "test-token-0123456789"
#: the tests' media and redirect servers listen here; every other private address is refused
LOCAL = (ipaddress.ip_network("127.0.0.1/32"),)
MAX_BODY_BYTES = 64 * 1024
READ_TIMEOUT_S = 2.0


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    base_url: str,
    method: str,
    path: str,
    body: bytes | str | dict | list | None = None,
    *,
    token: str | None = TOKEN,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> Reply:
    """One HTTP request; `path` is sent as given (quote it yourself)."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout_s)
    sent = dict(headers or {})
    if token is not None:
        sent.setdefault("Authorization", f"Bearer {token}")
    if isinstance(body, dict | list):
        body = json.dumps(body)
        sent.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


@dataclass
class ApiServer:
    base_url: str
    daemon: Daemon
    db_url: str

    def __call__(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Reply:
        return request(self.base_url, method, path, body, **kwargs)

    def wait_for_job(self, key: str, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self("GET", f"/jobs/{key}")
            assert reply.status == 200, reply
            job = reply.json()
            if job["state"] in ("done", "failed") or time.monotonic() > deadline:
                return job
            time.sleep(0.05)


#: jobs queued through the API are fetched guarded; the test servers are local
LOCAL_GUARD = UrlGuard(exempt=(ipaddress.ip_network("127.0.0.0/8"),))


def daemon_config(tiny_model: Path, workdir: Path, **kwargs: Any) -> DaemonConfig:
    return DaemonConfig(
        model_id=str(tiny_model),
        workdir=workdir,
        device="cpu",
        downloads=2,
        per_host=2,
        decoders=1,
        batch_seconds=40,
        limits=DownloadLimits(read_timeout_s=READ_TIMEOUT_S, connect_timeout_s=1.0),
        retry=RetryPolicy(max_attempts=1),
        poll_s=0.1,
        grace_s=0,
        **{"url_guard": LOCAL_GUARD, **kwargs},
    )


@contextmanager
def run_api_server(
    db_url: str, config: DaemonConfig, embedder: Any, api: ApiConfig
) -> Iterator[ApiServer]:
    """The daemon, its stages and its API in a thread; stopped and checked on exit."""
    engine = connect(db_url)
    daemon = Daemon(engine, config, embedder=embedder, services=[api_service(api)])
    errors: list[BaseException] = []
    loop_box: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        loop_box.append(asyncio.get_running_loop())
        await daemon.run()

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="api-daemon", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while daemon.api_url is None:
        assert not errors, errors
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.02)
    try:
        yield ApiServer(base_url=daemon.api_url, daemon=daemon, db_url=db_url)
    finally:
        if thread.is_alive():  # else it died: `errors` says why
            loop_box[0].call_soon_threadsafe(daemon.stop.set)
        thread.join(30)
        engine.dispose()
    assert not thread.is_alive(), "the daemon did not stop"
    assert not errors, errors


@dataclass
class HelperServer:
    """Redirects, and responses that are slow to start or stall half-way."""

    base_url: str = ""
    hits: dict[str, int] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"


def _helper_app(server: HelperServer) -> web.Application:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "3")))
        return web.Response(body=b"\0" * 16, content_type="video/mp4")

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        response.content_length = 1 << 20
        await response.prepare(request)
        await response.write(b"\0" * 1024)
        await asyncio.sleep(READ_TIMEOUT_S * 2)
        return response

    app = web.Application()
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/slow", slow)
    app.router.add_get("/stall", stall)
    return app


@contextmanager
def run_helper_server() -> Iterator[HelperServer]:
    server = HelperServer()
    with serve_in_thread(_helper_app(server), name="helper-server") as server.base_url:
        yield server


def start_runner_api(
    args: list[str], cwd: Path, env: dict[str, str]
) -> tuple[subprocess.Popen, str, threading.Thread]:
    """Start `runner ARGS`; return it, the API's URL from its log line, and the log reader."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", *args],
        cwd=cwd,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    log: list[str] = []
    found = threading.Event()
    box: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            match = re.search(r"HTTP API listening on (\S+)", line)
            if match:
                box.append(match.group(1))
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not found.wait(120):
        proc.kill()
        pytest.fail("no 'listening' line: " + "".join(log))
    return proc, box[0], reader


def stop_runner_api(proc: subprocess.Popen, reader: threading.Thread) -> None:
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    reader.join(10)
    assert proc.stderr is not None
    proc.stderr.close()
    assert code == 0
