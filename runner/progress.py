"""Live progress for a running daemon: a bar on a terminal, a log line otherwise.

People run the daemon for days, so the useful numbers are "how far" and "how fast,
lately": the same headline figures as `runner status` and the web page (counts,
rates over the time the last 5 minutes actually cover, ETA: `runner.headline`),
for every daemon's work, read through the daemon's shared `HeadlineCache` so that
a million jobs are not re-counted every second.  This daemon's own rate
(`SlidingRate`, fed by the store stage) is what the API reports for it alone.
The clock is always passed in, so tests need no sleeps.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import IO, Any

from runner.headline import Headline
from runner.jobs import Outcome, Status
from runner.rates import Rate, window_rate
from runner.status import format_duration

log = logging.getLogger(__name__)


@dataclass
class SlidingRate:
    """Videos and audio-seconds this daemon finished over the last `window_s`."""

    started: float
    window_s: float = 300.0
    _events: collections.deque[tuple[float, int, float]] = field(default_factory=collections.deque)

    def add(self, now: float, videos: int, audio_s: float) -> None:
        if videos:
            self._events.append((now, videos, audio_s))

    def rate(self, now: float) -> Rate:
        """Over the part of the window since the daemon started (`runner.rates`)."""
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()
        videos = sum(e[1] for e in self._events)
        audio_s = sum(e[2] for e in self._events)
        return window_rate(videos, audio_s, window_s=self.window_s, now=now, since=self.started)

    def finished_since(self, since: float) -> int:
        """Videos finished after `since` (within the window)."""
        return sum(e[1] for e in self._events if e[0] > since)

    def per_s(self, now: float) -> tuple[float, float]:
        """(videos/s, audio-s/s); the window is shorter while the daemon is young."""
        rate = self.rate(now)
        return rate.per_s, rate.audio_h_per_h


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


def progress_line(headline: Headline) -> str:
    """'pending 30, running 4, done 10, failed 2 | 0.50 videos/s, 9.0 audio-h/h | eta 1m 08s'."""
    return " | ".join(_progress_parts(headline))


def _progress_parts(headline: Headline) -> tuple[str, str]:
    """(the counts, the speed and ETA): the bar shows them on either side of itself.
    The speed is the ETA's basis (the last 5 minutes, else the last hour)."""
    states = ", ".join(f"{s.value} {headline.counts.get(s, 0)}" for s in Status)
    basis = headline.basis or next(iter(headline.rates))
    rate = headline.rates[basis]
    eta_s = headline.eta_s
    if headline.remaining == 0:
        eta = "nothing left"
    elif eta_s is not None:
        eta = format_duration(eta_s)
    else:
        eta = "unknown"
    return states, f"{rate.per_s:.2f} videos/s, {rate.audio_h_per_h:.1f} audio-h/h | eta {eta}"


class Progress:
    """Fed by the store stage, shown by a scheduler job: a tqdm bar or a log line."""

    def __init__(
        self, *, started: float, window_s: float = 300.0, bar_file: IO[str] | None = None
    ) -> None:
        self.rate = SlidingRate(started=started, window_s=window_s)
        self._bar: Any = None
        if bar_file is not None:
            from tqdm import tqdm

            # tqdm's own rate and ETA are left out: it would divide the jump from 0 to
            # the database's count by the seconds since start (a million videos/s)
            self._bar = tqdm(
                file=bar_file,
                unit="video",
                dynamic_ncols=True,
                leave=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{postfix}]",
            )

    @property
    def has_bar(self) -> bool:
        return self._bar is not None

    def record(self, outcomes: list[Outcome], *, now: float) -> None:
        self.rate.add(now, *finished_by(outcomes))

    def show(self, headline: Headline) -> str:
        states, speed = _progress_parts(headline)
        line = f"{states} | {speed}"
        if self._bar is None:
            log.info("progress: %s", line)
            return line
        self._bar.total = headline.total
        # between reads of the counts (every ~25 s at a million jobs) the bar still
        # moves with what this daemon finished since they were read (by this host's
        # clock, which times its own finishes; `now` is the database's)
        own = self.rate.finished_since(headline.read_at if headline.read_at else headline.now)
        self._bar.n = min(headline.total, headline.finished + own)
        self._bar.set_postfix_str(speed, refresh=False)
        self._bar.set_description_str(states, refresh=False)
        self._bar.refresh()
        return line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
