"""A real headless Chromium driven over the DevTools protocol, for tests/test_web.py.

Debian's `chromium` package, started with a throwaway profile; the protocol is
spoken over aiohttp's own websocket client (no selenium or playwright, nothing
downloaded).  Where no browser is installed the tests skip with the reason, unless
in CI (`CI=true`, or `RUNNER_REQUIRE_CHROMIUM=1` as `.ci/run` sets): there they
fail, so CI never passes by skipping them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import pytest

REQUIRE_ENV = "RUNNER_REQUIRE_CHROMIUM"
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1" or os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> NoReturn:
    if required():
        pytest.fail(f"a headless Chromium is required in CI but {reason}", pytrace=False)
    pytest.skip(f"no headless Chromium: {reason} (apt-get install chromium)")


def find_chromium() -> str | None:
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def browser_argv(binary: str, profile: Path, *extra: str) -> list[str]:
    """The flags every headless run here needs (as root, Chromium refuses its sandbox)."""
    argv = [
        binary,
        "--headless=new",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
    ]
    if os.geteuid() == 0:
        argv.append("--no-sandbox")
    return [*argv, *extra]


class Page:
    """One tab: commands by id, events kept in `events` (method, params)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        await self.ws.send_json({"id": number, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.ws.receive(), 30)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection ended: {message!r}")
            data = json.loads(message.data)
            if data.get("id") == number:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return dict(data.get("result", {}))
            if "method" in data:
                self.events.append((data["method"], data.get("params", {})))

    async def evaluate(self, expression: str) -> Any:
        reply = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 20.0) -> Any:
        """Poll until `expression` is truthy in the page (an error, as while a new
        document loads, counts as not yet); its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = await self.evaluate(expression)
            except RuntimeError:  # mid-navigation: no document yet
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                body = await self.evaluate("document.body && document.body.outerHTML")
                raise AssertionError(f"timed out waiting for {expression!r}; page: {body}")
            await asyncio.sleep(0.05)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)


def _stderr_tail(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return text[-limit:]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """The browser and every process it started (zygotes, GPU and network services:
    its session), so none outlives the test and writes into a removed profile."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
    # the leader is reaped; SIGKILL went to the whole group, so no child is left
    # running in the profile once this returns (they die as the kernel delivers it)


@contextlib.asynccontextmanager
async def open_page(root: Path | None = None) -> AsyncIterator[Page]:
    """A fresh headless browser and its one tab, with Page, Runtime and Network on.

    Its profile and log live in a new folder under `root` (a test's tmp_path), or
    in a temporary one that is removed; the browser runs in a session of its own,
    whose whole process group is killed on the way out."""
    binary = find_chromium()
    if binary is None:
        unavailable(f"none of {', '.join(NAMES)} is on PATH")
    home = Path(tempfile.mkdtemp(prefix="runner-chromium-", dir=root))
    profile = home / "profile"
    profile.mkdir()
    stderr_path = home / "chromium.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            browser_argv(binary, profile, "--remote-debugging-port=0", "about:blank"),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                unavailable(
                    f"{binary} did not start (exit status {proc.poll()}); its stderr ends:\n"
                    + _stderr_tail(stderr_path)
                )
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as reply:
                targets = await reply.json()
            target = next(t for t in targets if t.get("type") == "page")
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                for domain in ("Page", "Runtime", "Network"):
                    await page.send(f"{domain}.enable")
                yield page
    finally:
        _kill_group(proc)
        shutil.rmtree(home, ignore_errors=True)
