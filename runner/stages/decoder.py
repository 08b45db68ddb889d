"""The ffmpeg pool: turns each downloaded file into windows of its attempt."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass

from runner.attempt import Attempt
from runner.decode import DEFAULT_MAX_AUDIO_S, AudioStream, MediaInfo
from runner.embed import WINDOW_SAMPLES, WindowItem
from runner.errors import DecodeError, JobError, LocalError
from runner.metrics import Metrics
from runner.stages.downloader import ByteBudget, Downloaded
from runner.workdir import Workdir


@dataclass(frozen=True)
class Decoded:
    """Sent after an attempt's last window: how many windows it had, or why it failed."""

    attempt: Attempt
    windows: int
    info: MediaInfo | None = None
    error: JobError | None = None


class DecoderPool:
    """`decoders` threads, each running one ffmpeg at a time; `run()` is one slot.

    Decoding streams fixed windows, so a 2-hour video never sits in memory whole,
    and blocks on the bounded window queue, so a slow model holds the decoders back
    instead of filling memory.  `max_audio_s` caps the audio a source may have
    (None: no cap), so a small file claiming days of audio cannot hold a decoder and
    the model for hours; such a source fails as `too_long` before its first window.
    """

    def __init__(
        self,
        decoders: int,
        queue_in: asyncio.Queue[Downloaded],
        out: asyncio.Queue[WindowItem | Decoded],
        prefetch: ByteBudget,
        workdir: Workdir,
        metrics: Metrics,
        *,
        min_window_samples: int,
        max_audio_s: float | None = DEFAULT_MAX_AUDIO_S,
    ) -> None:
        self.queue_in, self.out, self.prefetch = queue_in, out, prefetch
        self.workdir, self.metrics, self.min_window_samples = workdir, metrics, min_window_samples
        self.max_audio_s = max_audio_s
        self.halt = threading.Event()  # tells decode threads to give up
        self._threads = concurrent.futures.ThreadPoolExecutor(
            decoders, thread_name_prefix="runner-decode"
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self.queue_in.get()
            started = time.monotonic()
            try:
                marker = await loop.run_in_executor(self._threads, self._decode, item, loop)
            finally:
                self.workdir.remove(item.path)
                self.prefetch.release(item.size_bytes)
            self.metrics.decoded(time.monotonic() - started)
            await self.out.put(marker)

    def _decode(self, item: Downloaded, loop: asyncio.AbstractEventLoop) -> Decoded:
        """Runs on a decode thread; stops early once its attempt is no longer live."""
        attempt, sent = item.attempt, 0
        if not attempt.live:
            return Decoded(attempt, 0)
        try:
            cap_s, option = attempt.audio_cap or (self.max_audio_s, "--max-audio-s")
            with AudioStream(
                item.path, WINDOW_SAMPLES, max_audio_s=cap_s, cap_option=option
            ) as stream:
                for window in stream:
                    if not attempt.live:
                        return Decoded(attempt, sent)
                    if len(window) < self.min_window_samples:
                        continue  # a tail too short to yield a frame adds nothing
                    self._put_threadsafe(WindowItem(attempt, window), loop)
                    sent += 1
                info = stream.info
            if sent == 0:
                raise DecodeError(f"audio too short to embed ({stream.samples_total} samples)")
        except JobError as exc:
            return Decoded(attempt, sent, error=exc)
        except OSError as exc:  # ffmpeg would not start, no temp space: ours, not the file's
            return Decoded(attempt, sent, error=LocalError(f"decoding failed here: {exc}"))
        return Decoded(attempt, sent, info=info)

    def _put_threadsafe(self, item: WindowItem, loop: asyncio.AbstractEventLoop) -> None:
        future = asyncio.run_coroutine_threadsafe(self.out.put(item), loop)
        while True:
            try:
                future.result(timeout=0.2)
                return
            except concurrent.futures.TimeoutError:
                if self.halt.is_set():
                    future.cancel()
                    raise asyncio.CancelledError("daemon is stopping") from None

    def shutdown(self) -> None:
        """Tell the threads to give up and wait for them (ffmpeg processes end with them)."""
        self.halt.set()
        self._threads.shutdown()
