"""How fast, and how long still: the one place rates and the ETA are computed.

A rate is what finished divided by the time the window actually covers, not by its
nominal length: 30 s into a run, the "last 5 minutes" hold 30 s of work, and
dividing it by 300 s made the ETA ten times too long (while the bar, which divided
by its own age, said something else again).  The progress bar, `runner status`,
`GET /status` and the web page all call `window_rate` and `eta_s`, so on one run
they say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rate:
    """`finished` videos holding `audio_s` seconds of audio, over `covered_s` seconds."""

    finished: int
    audio_s: float
    #: the window's nominal length (5 minutes, an hour, a chart bucket)
    window_s: float
    #: the part of it that work covers: shorter while a run is younger than the window
    covered_s: float

    @property
    def per_s(self) -> float:
        return self.finished / self.covered_s if self.covered_s > 0 else 0.0

    @property
    def per_min(self) -> float:
        return self.per_s * 60.0

    @property
    def audio_h_per_h(self) -> float:
        """Audio-seconds per second is audio-hours per hour: the same ratio."""
        return self.audio_s / self.covered_s if self.covered_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "window_s": self.window_s,
            "covered_s": self.covered_s,
            "finished": self.finished,
            "audio_s": self.audio_s,
            "per_s": self.per_s,
            "per_min": self.per_min,
            "audio_h_per_h": self.audio_h_per_h,
        }


def covered_s(window_s: float, *, now: float, since: float | None) -> float:
    """How much of the window ending at `now` lies after `since`, when work began
    (None: unknown, the whole window).  Never more than the window, never negative."""
    if since is None:
        return window_s
    return max(0.0, min(window_s, now - since))


def window_rate(
    finished: int, audio_s: float, *, window_s: float, now: float, since: float | None
) -> Rate:
    """The rate of `finished` jobs over the part of `window_s` (ending at `now`) that
    follows `since`."""
    return Rate(finished, audio_s, window_s, covered_s(window_s, now=now, since=since))


def eta_s(remaining: int, rate: Rate | None) -> float | None:
    """Seconds until `remaining` jobs are finished at `rate`: 0 with nothing left,
    None (unknown) while nothing finishes."""
    if remaining <= 0:
        return 0.0
    if rate is None or rate.per_s <= 0:
        return None
    return remaining / rate.per_s


def best_rate(rates: dict[str, Rate]) -> tuple[str, Rate] | None:
    """The ETA's basis: the shortest window in which anything finished."""
    for label, rate in rates.items():
        if rate.finished:
            return label, rate
    return None
