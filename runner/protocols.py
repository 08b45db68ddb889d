"""What the HTTP API needs of a running daemon, and nothing more.

`runner.api` depends on this protocol, not on the daemon's module, so the two can
be read, tested and changed apart; `runner.cli` composes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import aiohttp
    from sqlalchemy import Engine

    from runner.config import DaemonConfig
    from runner.headline import HeadlineCache
    from runner.jobs import Result
    from runner.metrics import Metrics


class DaemonHandle(Protocol):
    engine: Engine
    config: DaemonConfig
    metrics: Metrics
    #: counts and rates shared by the bar, /metrics and /status (read with a TTL)
    headlines: HeadlineCache
    #: set by the API once it listens (tests and logs read it)
    api_url: str | None

    @property
    def stopping(self) -> bool:
        """Draining or stopped: new ad-hoc work is refused."""

    async def encode_url(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession | None,
        audio_cap: tuple[float, str] | None = None,
    ) -> Result:
        """Run one URL through the daemon's own download → decode → embed stages,
        outside the database, with its own cap on decoded audio (seconds, option).
        Raises the JobError that ended it, or Stopping."""

    def queue_depths(self) -> dict[str, int]:
        """Items waiting in each stage queue, for /metrics."""

    def describe(self) -> dict[str, Any]:
        """What only the process knows (worker id, model, queues, jobs in hand, embed
        busy share, its own rate), for /status and the web page."""

    def abandon_adhoc(self, reason: str) -> None:
        """Answer every ad-hoc request still waiting with Stopping(reason)."""
