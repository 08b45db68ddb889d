"""A corpus of distinct tiny videos, each at its own URL, and a real server that
counts requests per path.

The reliability proofs need one URL per key (so 'downloaded twice' is visible as
two hits on one path) and content that differs per key (so a vector stored under
the wrong key would show).  Shared by tests/test_soak.py, tests/test_two_daemons.py
and benchmarks/soak.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web

from tests import media
from tests.threaded_server import serve_in_thread

#: suffix -> (maker in tests/media.py, content type); cycled through by make_corpus
FORMATS = {
    "mp3": ("make_mp3", "audio/mpeg"),
    "m4a": ("make_m4a", "audio/mp4"),
    "mp4": ("make_mp4", "video/mp4"),
    "opus": ("make_opus", "audio/ogg"),
}
CONTENT_TYPES = {f".{suffix}": content_type for suffix, (_, content_type) in FORMATS.items()}


def make_corpus(root: Path, n: int, *, duration_s: float = 1.0) -> dict[str, Path]:
    """`n` short clips, each a sine of its own frequency: name -> file."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    suffixes = list(FORMATS)
    for i in range(n):
        suffix = suffixes[i % len(suffixes)]
        maker = FORMATS[suffix][0]
        path = root / f"v{i:04d}.{suffix}"
        if not path.exists():
            kwargs: dict[str, float] = {"duration_s": duration_s, "freq_hz": 200 + 37 * i}
            if suffix != "opus":
                kwargs["channels"] = 1
            getattr(media, maker)(path, **kwargs)
        files[path.name] = path
    return files


class HitServer:
    """Serves `files` at /v/NAME on a real socket in a thread of its own.

    `pause_s` stalls every response half-way through its body, so a daemon killed
    at a random moment is often killed mid-download, leaving a partial temp file.
    """

    def __init__(self, files: dict[str, Path], *, host: str = "127.0.0.1") -> None:
        self.files = files
        self.host = host
        self.pause_s = 0.0
        #: while True, every response stalls half-way until it is set False again
        self.hold = False
        self.hits: collections.Counter[str] = collections.Counter()
        self.base_url = ""

    def url(self, name: str) -> str:
        return f"{self.base_url}/v/{name}"

    def hits_of(self, name: str) -> int:
        return self.hits[f"/v/{name}"]

    async def _serve_file(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        path = self.files.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        body = path.read_bytes()
        response = web.StreamResponse(
            headers={
                "Content-Type": CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
                "Content-Length": str(len(body)),
            }
        )
        await response.prepare(request)
        half = len(body) // 2
        with contextlib.suppress(ConnectionError):  # the daemon was killed meanwhile
            await response.write(body[:half])
            if self.pause_s:
                await asyncio.sleep(self.pause_s)
            while self.hold:
                await asyncio.sleep(0.02)
            await response.write(body[half:])
            await response.write_eof()
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v/{name}", self._serve_file)
        return app


@contextlib.contextmanager
def serving(files: dict[str, Path], *, host: str = "127.0.0.1") -> Iterator[HitServer]:
    server = HitServer(files, host=host)
    with serve_in_thread(server.app(), name="hit-server", host=host) as server.base_url:
        yield server


@contextlib.contextmanager
def killed_at_exit(*procs: subprocess.Popen) -> Iterator[None]:
    """A failing test must not leave its daemons running on the machine."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
