"""Live progress for a running daemon: a bar on a terminal, a log line otherwise.

People run the daemon for days, so the useful numbers are "how far" (the
database's counts, shared by every daemon) and "how fast, lately" (this daemon's
own finished jobs over a sliding window, so a slow hour shows up and an early
burst does not flatter the ETA forever).  The clock is always passed in, so tests
need no sleeps.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import IO, Any

from sqlalchemy import Engine

from runner.jobs import Outcome, Status
from runner.queries import count_by_status, reading
from runner.status import format_duration

log = logging.getLogger(__name__)


@dataclass
class SlidingRate:
    """Videos and audio-seconds finished per second over the last `window_s`."""

    started: float
    window_s: float = 300.0
    _events: collections.deque[tuple[float, int, float]] = field(default_factory=collections.deque)

    def add(self, now: float, videos: int, audio_s: float) -> None:
        if videos:
            self._events.append((now, videos, audio_s))

    def per_s(self, now: float) -> tuple[float, float]:
        """(videos/s, audio-s/s); the window is shorter while the daemon is young."""
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()
        span_s = min(self.window_s, now - self.started)
        if span_s <= 0:
            return 0.0, 0.0
        videos = sum(e[1] for e in self._events)
        audio_s = sum(e[2] for e in self._events)
        return videos / span_s, audio_s / span_s


def finished_by(outcomes: list[Outcome]) -> tuple[int, float]:
    """How many outcomes finish a job (a retry does not), and their audio-seconds."""
    videos, audio_s = 0, 0.0
    for outcome in outcomes:
        if not outcome.finishes_job:
            continue
        videos += 1
        if outcome.result is not None:
            audio_s += outcome.result.video_duration_s or 0.0
    return videos, audio_s


def progress_line(counts: dict[Status, int], videos_per_s: float, audio_s_per_s: float) -> str:
    """'pending 30, running 4, done 10, failed 2 | 0.50 videos/s, 9.0 audio-h/h | eta 1m 08s'."""
    return " | ".join(_progress_parts(counts, videos_per_s, audio_s_per_s))


def _progress_parts(
    counts: dict[Status, int], videos_per_s: float, audio_s_per_s: float
) -> tuple[str, str]:
    """(the counts, the speed and ETA): the bar shows them on either side of itself."""
    states = ", ".join(f"{s.value} {counts.get(s, 0)}" for s in Status)
    remaining = counts.get(Status.PENDING, 0) + counts.get(Status.RUNNING, 0)
    if remaining == 0:
        eta = "nothing left"
    elif videos_per_s > 0:
        eta = format_duration(remaining / videos_per_s)
    else:
        eta = "unknown"
    # audio-seconds per second is audio-hours per hour: the same ratio, easier to read
    return states, f"{videos_per_s:.2f} videos/s, {audio_s_per_s:.1f} audio-h/h | eta {eta}"


class Progress:
    """Fed by the store stage, shown by a scheduler job: a tqdm bar or a log line."""

    def __init__(
        self, *, started: float, window_s: float = 300.0, bar_file: IO[str] | None = None
    ) -> None:
        self.rate = SlidingRate(started=started, window_s=window_s)
        self._bar: Any = None
        if bar_file is not None:
            from tqdm import tqdm

            self._bar = tqdm(file=bar_file, unit="video", dynamic_ncols=True, leave=True)

    @property
    def has_bar(self) -> bool:
        return self._bar is not None

    def record(self, outcomes: list[Outcome], *, now: float) -> None:
        self.rate.add(now, *finished_by(outcomes))

    def show(self, counts: dict[Status, int], *, now: float) -> str:
        states, speed = _progress_parts(counts, *self.rate.per_s(now))
        line = f"{states} | {speed}"
        if self._bar is None:
            log.info("progress: %s", line)
            return line
        self._bar.total = sum(counts.values())
        self._bar.n = counts.get(Status.DONE, 0) + counts.get(Status.FAILED, 0)
        self._bar.set_postfix_str(speed, refresh=False)
        self._bar.set_description_str(states, refresh=False)
        self._bar.refresh()
        return line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def read_counts(engine: Engine) -> dict[Status, int]:
    """Counts per state from the shared database: every daemon's work, not just ours."""
    with reading(engine) as conn:
        return count_by_status(conn)
