"""An aiohttp app served from a thread with its own event loop.

Test code blocks (CliRunner, waiting on daemon processes), so the servers the
daemon talks to cannot share its loop.  Every test server starts and stops this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from aiohttp import web


@contextlib.contextmanager
def serve_in_thread(app: web.Application, *, name: str, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `app` on a free port of `host`; yields the base URL, stops on exit."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    started: dict[str, web.AppRunner] = {}

    async def start() -> None:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, host, 0).start()
        started["runner"] = runner

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        # ready only once run_forever runs: a stop sent earlier, while
        # run_until_complete was finishing, would be swallowed by it and lost
        loop.call_soon(ready.set)
        loop.run_forever()
        loop.run_until_complete(started["runner"].cleanup())
        loop.close()

    thread = threading.Thread(target=serve, name=name, daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError(f"{name} did not start")
    try:
        yield f"http://{host}:{started['runner'].addresses[0][1]}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
