"""One claim of one job, from the claim to its stored outcome.

An `Attempt` is created by the claimer and travels by reference through every
queue (download, decode, windows, store).  Everything that belongs to that one try
lives on it: the frozen `Job` record that fences its database writes (id, worker,
claim number), the windows sent and embedded, the running frame sums, the decoded
media facts.  Nothing is kept in dicts keyed by job id, so if a lease lapses and
the same job is claimed again, a late window of the old attempt can only reach the
old object, which is already marked lost and whose writes the database refuses.

An ad-hoc attempt (HTTP ``/encode_audio``) has no database row: `reply` is set and
its outcome resolves that future instead of being stored.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from runner import jobs
from runner.decode import MediaInfo
from runner.embed import WindowEmbedding, pooled


@dataclass(eq=False)  # identity, not value: two attempts of one job are never equal
class Attempt:
    job: jobs.Job
    #: ad-hoc: the outcome answers this instead of being stored
    reply: asyncio.Future | None = None
    #: monotonic time the work started (download start), for processing_audio_time
    started_s: float = field(default_factory=time.monotonic)
    #: its download started and the try was charged (`job.attempts` counts it)
    charged: bool = False
    #: its outcome is decided (queued for the store, or answered)
    ended: bool = False
    #: the database no longer holds it for us (lease lost, claimed again): drop it
    lost: bool = False
    frame_sum: np.ndarray | None = None
    #: mean-std pooling: the running sum of the squared frame vectors
    frame_sq_sum: np.ndarray | None = None
    frames: int = 0
    windows_done: int = 0
    #: known once decoding ended
    windows_sent: int | None = None
    info: MediaInfo | None = None
    #: how it ended, once `ended`: what the store stage writes
    outcome: jobs.Outcome | None = None
    #: ad-hoc: the session to fetch with (the API's, guarded against private
    #: addresses); None: the daemon's own
    session: aiohttp.ClientSession | None = None
    #: its download while one runs, so dropping the attempt frees the slot at once
    transfer: asyncio.Future | None = None
    #: ad-hoc: its own cap on decoded audio (seconds, and the option that sets it);
    #: None: the daemon's --max-audio-s
    audio_cap: tuple[float, str] | None = None

    @property
    def adhoc(self) -> bool:
        return self.reply is not None

    @property
    def live(self) -> bool:
        """Worth more work: not ended, not lost, and (ad-hoc) its caller still waits."""
        if self.ended or self.lost:
            return False
        return self.reply is None or not self.reply.done()

    def stop_work(self) -> None:
        """It is no longer wanted (lease lost, ad-hoc caller gone): cancel its
        download now rather than let it hold a slot to the end."""
        if self.transfer is not None and not self.transfer.done():
            self.transfer.cancel()

    def charge(self, job: jobs.Job) -> None:
        """Its download starts: `job` is the record after the database charged the try."""
        self.job, self.charged, self.started_s = job, True, time.monotonic()

    def add_part(self, part: WindowEmbedding) -> None:
        if self.frame_sum is None:
            self.frame_sum = part.frame_sum.copy()
        else:
            self.frame_sum += part.frame_sum
        if part.frame_sq_sum is not None:
            if self.frame_sq_sum is None:
                self.frame_sq_sum = part.frame_sq_sum.copy()
            else:
                self.frame_sq_sum += part.frame_sq_sum
        self.frames += part.frames
        self.windows_done += 1

    def decoded(self, windows: int, info: MediaInfo | None) -> None:
        self.windows_sent, self.info = windows, info

    @property
    def complete(self) -> bool:
        return self.windows_sent is not None and self.windows_done >= self.windows_sent

    def result(self, model_id: str, embed_spec: str | None = None) -> jobs.Result:
        """The pooled vector and facts; only once `complete`.  `embed_spec`: the id
        of the spec the windows were embedded with (runner/spec.py)."""
        assert self.complete and self.info is not None
        assert self.frame_sum is not None and self.frames > 0
        return jobs.Result(
            vector=pooled(self.frame_sum, self.frame_sq_sum, self.frames),
            video_duration_s=self.info.duration_s,
            channels_count=self.info.channels_count,
            processing_audio_time_s=time.monotonic() - self.started_s,
            model_id=model_id,
            embed_spec=embed_spec,
        )
