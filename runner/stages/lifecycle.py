"""How far along the daemon's life is: running, draining, or stopping."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class Lifecycle:
    #: set: every stage stops now and what is held is released
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    #: first signal: claim nothing more, let what is held finish within the grace period
    draining: bool = False

    @property
    def stopping(self) -> bool:
        return self.draining or self.stop.is_set()

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds`, or less if the daemon is told to stop meanwhile."""
        with contextlib.suppress(TimeoutError):  # asyncio's is the builtin since 3.11
            await asyncio.wait_for(self.stop.wait(), seconds)
