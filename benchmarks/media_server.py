"""A local media server that behaves like a remote CDN: a delay before the first byte
and a bandwidth cap per connection.

Serving from 127.0.0.1 without either would hide exactly what the daemon's concurrent
downloads are for, and would flatter a one-at-a-time loop.  It runs in its own
process, so its CPU time and GIL never mix with the process being measured.

    python benchmarks/media_server.py ROOT [--latency-ms 100] [--bandwidth-mbs 20]

prints its base URL on the first line of stdout and serves ROOT/NAME at /media/NAME.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web

CHUNK_BYTES = 64 * 1024


def media_app(root: Path, latency_s: float, bandwidth_bytes_s: float) -> web.Application:
    async def media_file(request: web.Request) -> web.StreamResponse:
        path = root / request.match_info["name"]
        if not path.is_file():
            raise web.HTTPNotFound()
        await asyncio.sleep(latency_s)
        response = web.StreamResponse(
            headers={"Content-Type": "video/mp4", "Content-Length": str(path.stat().st_size)}
        )
        await response.prepare(request)
        await _send_paced(response, path, bandwidth_bytes_s)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/media/{name}", media_file)
    return app


async def _send_paced(response: web.StreamResponse, path: Path, bandwidth_bytes_s: float) -> None:
    """Sleeps whenever the connection got ahead of its byte budget (0: no cap)."""
    loop = asyncio.get_running_loop()
    start_s, sent_bytes = loop.time(), 0
    with path.open("rb") as body:
        while chunk := body.read(CHUNK_BYTES):
            await response.write(chunk)
            sent_bytes += len(chunk)
            if bandwidth_bytes_s > 0:
                ahead_s = sent_bytes / bandwidth_bytes_s - (loop.time() - start_s)
                if ahead_s > 0:
                    await asyncio.sleep(ahead_s)


async def _serve(root: Path, latency_s: float, bandwidth_bytes_s: float) -> None:
    runner = web.AppRunner(media_app(root, latency_s, bandwidth_bytes_s), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(f"http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()  # until killed


@contextlib.contextmanager
def running_server(root: Path, latency_ms: float, bandwidth_mbs: float) -> Iterator[str]:
    """The server in a child process; yields its base URL, kills it on exit."""
    argv = [
        sys.executable,
        __file__,
        str(root),
        f"--latency-ms={latency_ms}",
        f"--bandwidth-mbs={bandwidth_mbs}",
    ]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            base_url = proc.stdout.readline().strip()
            if not base_url.startswith("http://"):
                raise RuntimeError("media server did not start")
            yield base_url
        finally:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--bandwidth-mbs", type=float, default=20.0, help="0: no cap")
    args = parser.parse_args()
    asyncio.run(_serve(args.root, args.latency_ms / 1000, args.bandwidth_mbs * 1e6))


if __name__ == "__main__":
    main()
