"""When to try a failed video again, in one value object.

Transient errors (timeouts, dropped connections, 429/5xx) get exponential backoff
with jitter, so a thousand jobs that failed together do not come back together;
a server's ``Retry-After`` is a floor, never shortened.  A try is charged when its
download starts (`runner.jobs.start`), so `max_attempts` also bounds a video that
kills the daemon, while jobs merely claimed ahead of a kill cost nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay_s: float = 30.0
    max_delay_s: float = 3600.0
    #: each delay is scaled by a random factor in [1 - jitter, 1 + jitter]
    jitter: float = 0.25

    def gives_up(self, attempts: int) -> bool:
        return attempts >= self.max_attempts

    def delay_s(
        self, attempts: int, *, retry_after_s: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Delay after the `attempts`-th attempt failed transiently."""
        exponential = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, attempts - 1))
        scale = 1 + self.jitter * (2 * (rng or random).random() - 1)
        delay = exponential * scale
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_delay_s))
        return delay


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not '²', which isdigit() also takes
        return float(value)
    try:  # a server's header: any nonsense (a year past 9999 overflows) means none
        moment = parsedate_to_datetime(value)
        return max(0.0, moment.timestamp() - now)
    except (TypeError, ValueError, OverflowError, IndexError, AttributeError):
        return None
