"""The download rate floor (issue 12, "slow drip"): `sock_read` alone never cuts a
server that sends a byte just inside the read timeout, and the heartbeat would keep
such a job's lease, and its download slot, forever.  These run `download()` against
a real aiohttp server on 127.0.0.1 that drips, stalls, or serves honestly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from runner.download import Downloaded, DownloadLimits, RateFloor, download, make_session
from runner.errors import DownloadTimeoutError
from tests.threaded_server import serve_in_thread

BIG_BYTES = 3 << 20
STEADY_BYTES = 150_000


class SlowServer:
    """Each handler is one way a source can be slow; `closing` lets held handlers end."""

    def __init__(self) -> None:
        self.closing = False

    def _open(self, request: web.Request) -> bool:
        return (
            not self.closing
            and request.transport is not None
            and (not request.transport.is_closing())
        )

    async def _start(self, request: web.Request, length: int) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "video/mp4", "Content-Length": str(length)}
        )
        await response.prepare(request)
        return response

    async def drip(self, request: web.Request) -> web.StreamResponse:
        """`n` single bytes, one every `every` seconds."""
        n = int(request.query.get("n", "100000"))
        every = float(request.query.get("every", "0.2"))
        response = await self._start(request, n)
        for _ in range(n):
            if not self._open(request):
                break
            await asyncio.sleep(every)
            with contextlib.suppress(ConnectionError):
                await response.write(b"\0")
        return response

    async def silence(self, request: web.Request) -> web.StreamResponse:
        """Headers, then nothing at all."""
        response = await self._start(request, 100_000)
        while self._open(request):
            await asyncio.sleep(0.05)
        return response

    async def burst_then_silence(self, request: web.Request) -> web.StreamResponse:
        """A good start, then nothing: the floor covers the whole body, not just its start."""
        response = await self._start(request, 1_000_000)
        await response.write(b"\0" * 200_000)
        while self._open(request):
            await asyncio.sleep(0.05)
        return response

    async def steady(self, request: web.Request) -> web.StreamResponse:
        """STEADY_BYTES at about 50 kB/s: slow, but well above a 10 kB/s floor."""
        response = await self._start(request, STEADY_BYTES)
        for _ in range(STEADY_BYTES // 5000):
            await response.write(b"\0" * 5000)
            await asyncio.sleep(0.1)
        return response

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(body=b"\0" * BIG_BYTES, content_type="video/mp4")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/drip.mp4", self.drip)
        app.router.add_get("/silence.mp4", self.silence)
        app.router.add_get("/burst.mp4", self.burst_then_silence)
        app.router.add_get("/steady.mp4", self.steady)
        app.router.add_get("/big.mp4", self.big)
        return app


@pytest.fixture(scope="module")
def slow_url() -> Iterator[str]:
    server = SlowServer()
    with serve_in_thread(server.app(), name="slow-server") as url:
        try:
            yield url
        finally:
            server.closing = True


def fetch(url: str, dest: Path, limits: DownloadLimits) -> tuple[Downloaded, float]:
    """Runs one download in a fresh loop; returns it and the seconds it took."""

    async def go() -> Downloaded:
        async with make_session(limits, connections=2, per_host=2) as session:
            return await download(session, url, dest, limits)

    started = time.monotonic()
    got = asyncio.run(go())
    return got, time.monotonic() - started


def fetch_fails(url: str, dest: Path, limits: DownloadLimits) -> tuple[DownloadTimeoutError, float]:
    started = time.monotonic()
    with pytest.raises(DownloadTimeoutError) as caught:
        fetch(url, dest, limits)
    return caught.value, time.monotonic() - started


def test_drip_under_the_floor_is_cut_after_one_window(slow_url: str, tmp_path: Path) -> None:
    # one byte every 0.2 s never trips the 5 s read timeout: only the floor can end it
    limits = DownloadLimits(read_timeout_s=5, min_bytes_per_s=100, stall_window_s=1)
    error, took = fetch_fails(f"{slow_url}/drip.mp4?every=0.2", tmp_path / "d", limits)
    assert 0.9 <= took < 2.5, took
    assert error.transient and error.error_class == "download"
    assert error.http_status == 200
    message = str(error)
    assert "bytes/s averaged over the last 1 s" in message, message
    assert "floor of 100 bytes/s" in message, message
    assert "--min-bytes-per-s" in message and "--stall-window-s" in message, message


def test_silence_after_headers_is_cut_by_the_window(slow_url: str, tmp_path: Path) -> None:
    # no chunk ever arrives, so nothing wakes the reader but the floor's own deadline
    limits = DownloadLimits(read_timeout_s=30, min_bytes_per_s=100, stall_window_s=1)
    error, took = fetch_fails(f"{slow_url}/silence.mp4", tmp_path / "s", limits)
    assert took < 2.5, took
    assert "0 bytes/s averaged over the last 1 s" in str(error), str(error)


def test_stall_after_a_good_start_is_cut(slow_url: str, tmp_path: Path) -> None:
    limits = DownloadLimits(read_timeout_s=30, min_bytes_per_s=10 * 1024, stall_window_s=1)
    error, took = fetch_fails(f"{slow_url}/burst.mp4", tmp_path / "b", limits)
    assert took < 3.0, took
    assert "floor of 10240 bytes/s" in str(error), str(error)


def test_fast_file_passes(slow_url: str, tmp_path: Path) -> None:
    limits = DownloadLimits(min_bytes_per_s=10 * 1024, stall_window_s=1)
    got, _ = fetch(f"{slow_url}/big.mp4", tmp_path / "big", limits)
    assert got.size_bytes == BIG_BYTES == got.path.stat().st_size


def test_slow_but_steady_passes(slow_url: str, tmp_path: Path) -> None:
    limits = DownloadLimits(min_bytes_per_s=10 * 1024, stall_window_s=1)
    got, took = fetch(f"{slow_url}/steady.mp4", tmp_path / "steady", limits)
    assert got.size_bytes == STEADY_BYTES == got.path.stat().st_size
    assert took >= 2.5, took  # it really was slow: several windows long


def test_zero_floor_disables_the_check(slow_url: str, tmp_path: Path) -> None:
    # 12 bytes over ~2.4 s at 5 bytes/s: cut after 1 s if the floor were on
    limits = DownloadLimits(read_timeout_s=5, min_bytes_per_s=0, stall_window_s=1)
    got, took = fetch(f"{slow_url}/drip.mp4?n=12&every=0.2", tmp_path / "z", limits)
    assert got.size_bytes == 12
    assert took >= 2.0, took


def test_defaults() -> None:
    limits = DownloadLimits()
    assert limits.min_bytes_per_s == 10 * 1024
    assert limits.stall_window_s == 60.0


def test_floor_keeps_few_samples_however_many_chunks() -> None:
    """Memory stays bounded: a fast transfer of many small chunks keeps ~16 samples a window."""
    floor = RateFloor(1024, 1.0, now=0.0)
    for i in range(100_000):
        floor.add(i * 0.0001, 100)  # 1 MB/s for 10 s in 100-byte chunks
        assert len(floor._samples) <= 20
    assert floor.too_slow(10.0) is None
    # then silence: broken once the window after the last chunk has passed, not before
    deadline = floor.deadline()
    assert deadline is not None and 10.0 < deadline <= 11.0 + 1 / 16
    assert floor.too_slow(deadline - 0.1) is None
    assert floor.too_slow(deadline) is not None


def test_read_timeout_still_cuts_first_when_shorter(slow_url: str, tmp_path: Path) -> None:
    """The floor's wake-ups must not reset aiohttp's sock_read timer."""
    limits = DownloadLimits(read_timeout_s=0.5, min_bytes_per_s=100, stall_window_s=30)
    error, took = fetch_fails(f"{slow_url}/silence.mp4", tmp_path / "r", limits)
    assert took < 2.0, took
    assert str(error).startswith("timed out (connect 30 s, read 0.5 s)"), str(error)
