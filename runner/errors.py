"""Exception types, split by who must act on them.

`RunnerError` is for the person at the terminal: the CLI prints it as one line and
exits 1.  `JobError` is for the job: the daemon records it on the job (error class
plus a message a person understands) and moves on to the next video.
"""

from __future__ import annotations


class Stopping(RuntimeError):
    """The daemon is stopping and takes no new ad-hoc work."""


class StageFailed(RuntimeError):
    """A stage task died; the daemon stops rather than run with a hole in the pipe."""


class RunnerError(Exception):
    """A problem with the user's input or environment; shown as one line, exit 1."""


class JobStateError(RuntimeError):
    """A guarded state change matched no row: the job was not in the state we assumed."""


class JobError(Exception):
    """A video could not be processed; the message is stored on the job."""

    error_class = "error"
    #: Transient errors are worth another attempt; permanent ones fail at once.
    transient = False

    def __init__(
        self, message: str, *, http_status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        #: the server asked us to wait this long (Retry-After)
        self.retry_after_s = retry_after_s

    @property
    def backs_off_host(self) -> bool:
        """429 and 503 speak for the whole host, not just this URL."""
        return self.http_status in (429, 503)


class DownloadError(JobError):
    error_class = "download"


class TransientDownloadError(DownloadError):
    transient = True


class DownloadTimeoutError(TransientDownloadError):
    """The source stopped answering (connect or read timeout)."""


class UrlRefusedError(DownloadError):
    """The URL, or a redirect on the way, points somewhere the API may not fetch from
    (a non-http scheme, or a loopback, private or link-local address)."""


class DecodeError(JobError):
    error_class = "decode"


class EmbedError(JobError):
    error_class = "embed"


class LocalError(JobError):
    """This machine failed the attempt (disk full, too many open files, ffmpeg would
    not start): worth another try, and never a reason to stop the whole daemon."""

    error_class = "local"
    transient = True


class EmbedOutOfMemoryError(EmbedError):
    """The device ran out of memory on a batch: not the video's fault, worth a retry."""

    transient = True


class TooLongError(DecodeError):
    """The audio runs past the configured cap: a tiny file can expand to days of
    samples (1 Hz WAV, lying headers), which would tie a decoder and the model up for
    hours.  Permanent: the same file will be just as long next time."""

    error_class = "too_long"


class TruncatedError(DecodeError):
    """The container promises much more audio than the file holds (a cut download, a
    partial upload): a vector of the first part would pass as the whole video.
    Permanent: retrying reads the same bytes."""

    error_class = "truncated"
