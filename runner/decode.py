"""Streams a media file's audio as 16 kHz mono float32 windows, one ffmpeg process per file.

Wav2Vec2 wants 16 kHz mono, and catalogue videos can run for hours, so the track is
never held whole: ffmpeg resamples and downmixes, and we read its stdout a window at
a time.  Probing costs a process spawn, which is a large share of the work on short
clips, so there is no separate probe: the header ffmpeg prints while decoding is parsed
once it exits (moviepy's parser for duration and audio presence, our own regex for the
channel count, which moviepy does not report).  That is also why errors surface from
iteration rather than from the constructor.  The one exception is the stated duration,
read from the header as soon as the first window is in, so an over-long source fails
before a single window reaches the model.

ffmpeg is only allowed to open the local file (`-protocol_whitelist file`) with a
demuxer for a real media container (`-format_whitelist`): a downloaded body may be a
DASH manifest, HLS playlist or concat list, whose demuxers would go on to read other
files or URLs named inside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

import numpy as np
from moviepy.config import FFMPEG_BINARY
from moviepy.video.io.ffmpeg_reader import FFmpegInfosParser

from runner.errors import DecodeError, TooLongError, TruncatedError

SAMPLE_RATE_HZ = 16_000
SAMPLE_BYTES = 4  # float32
DEFAULT_WINDOW_SAMPLES = 30 * SAMPLE_RATE_HZ
#: Longer audio fails as `too_long`: 6 hours is past any real catalogue video, and a
#: few hundred kB can claim days of samples (a 1 Hz WAV), each costing model time.
DEFAULT_MAX_AUDIO_S = 6 * 3600.0
#: A decode is `truncated` when it yields less than this share of the stated duration
#: and is also this many seconds short: the margin absorbs encoder priming, Opus preroll
#: and start offsets, which make healthy files a few tens of milliseconds short.
TRUNCATED_RATIO = 0.9
TRUNCATED_MIN_SHORT_S = 2.0

#: A bigger pipe means fewer context switches between ffmpeg and us per window.
_PIPE_BYTES = 1 << 20
#: The input header comes first; errors come last.  Reading only these bounds memory
#: even when a damaged file makes ffmpeg log a line per frame for two hours.
_LOG_HEAD_BYTES = 256 * 1024
_LOG_TAIL_BYTES = 8 * 1024
_MESSAGE_MAX_CHARS = 200

_NAMED_LAYOUT_CHANNELS = {
    "mono": 1,
    "stereo": 2,
    "binaural": 2,
    "downmix": 2,
    "quad": 4,
    "hexagonal": 6,
    "octagonal": 8,
    "cube": 8,
    "hexadecagonal": 16,
}
_AUDIO_LINE_RE = re.compile(r"^\s*Stream #0:\d+\S*: Audio: .*?, \d+ Hz, ([^,]+)", re.MULTILINE)
_NUMERIC_LAYOUT_RE = re.compile(r"^\d+(?:\.\d+)+$")
_COUNTED_LAYOUT_RE = re.compile(r"^(\d+) channels\b")
_AMBISONIC_RE = re.compile(r"^ambisonic (\d+)")
_LOG_PREFIX_RE = re.compile(r"^(?:\[[^\]]*\]\s*)?(?:Error opening input files?: )?")
_STREAM_TYPE_RE = re.compile(r"^(\s*Stream #\S+: )(\w+):", re.MULTILINE)
_NO_AUDIO_MARKERS = ("matches no streams", "does not contain any stream")
_DURATION_RE = re.compile(r"^\s*Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", re.MULTILINE)
_NOT_WHITELISTED_MARKER = "not on whitelist"
#: ffmpeg guessed the duration from the bitrate (VBR mp3 without a Xing header, ADTS
#: aac): often several times off, so neither too_long nor truncated may rely on it
_ESTIMATED_MARKER = "Estimating duration from bitrate"
#: what ffmpeg logs when a file's data ends before its index says it does
_CUT_MARKERS = ("partial file", "ended prematurely", "Invalid data found when processing input")
_VIDEO_STREAM_RE = re.compile(r"^\s*Stream #\d+:\d+.*: Video:", re.MULTILINE)

#: Demuxers for the containers we accept, by ffmpeg's demuxer names (a demuxer matches
#: when any of its comma-separated names is listed).  Left out on purpose: anything that
#: opens other inputs (dash, hls, concat, image2 and other sequence readers, sdp, rtsp),
#: and raw formats that would accept arbitrary bytes.
ACCEPTED_FORMATS = (
    "mov,mp4,m4a,3gp,3g2,mj2",
    "matroska,webm",
    "mp3",
    "ogg",
    "wav",
    "w64",
    "flac",
    "aac",
    "ac3",
    "eac3",
    "aiff",
    "caf",
    "wv",
    "amr",
    "avi",
    "flv",
    "asf",
    "mpegts",
    "mpeg",
    "dv",
    "mxf",
    "rm",
    "au",
)


@dataclass(frozen=True)
class MediaInfo:
    """What the job records about the source, known only once ffmpeg has finished."""

    #: Container duration; decoded samples / 16 kHz when the container states none.
    duration_s: float
    #: Source channel count before the downmix; 0 when ffmpeg names a layout we do not know.
    channels_count: int


#: Before `-i`, because ffmpeg applies options to the next input or output named:
#: `-threads 1` keeps each decode on one core, so several run side by side and per-core
#: throughput is honest; the whitelists keep ffmpeg to the one downloaded file.
_INPUT_ARGS = (
    "-hide_banner",
    "-nostdin",
    "-nostats",
    "-threads",
    "1",
    "-protocol_whitelist",
    "file",
    "-format_whitelist",
    ",".join(ACCEPTED_FORMATS),
)
#: `-map 0:a:0` means video is never decoded; `-flush_packets 0` lets ffmpeg write 32 KB
#: blocks instead of one ~1.5 KB write per audio frame, which cut our CPU time fivefold.
_OUTPUT_ARGS = tuple(
    f"-map 0:a:0 -vn -sn -dn -ac 1 -ar {SAMPLE_RATE_HZ} -flush_packets 0 -f f32le pipe:1".split()
)


def ffmpeg_command(path: str | os.PathLike[str]) -> list[str]:
    """An absolute `file:` URL, so a name such as `concat:x.mp4` is never read as a protocol."""
    url = "file:" + os.path.abspath(os.fspath(path))
    return [FFMPEG_BINARY, *_INPUT_ARGS, "-i", url, *_OUTPUT_ARGS]


def layout_channels_count(layout: str) -> int:
    """Channel count from an ffmpeg layout name such as `5.1(side)` or `6 channels`."""
    name = layout.strip().split("(", 1)[0].strip()
    if name in _NAMED_LAYOUT_CHANNELS:
        return _NAMED_LAYOUT_CHANNELS[name]
    if _NUMERIC_LAYOUT_RE.match(name):
        return sum(int(part) for part in name.split("."))  # 5.1 -> 6, 7.1.4 -> 12
    if counted := _COUNTED_LAYOUT_RE.match(layout.strip()):
        return int(counted.group(1))
    if ambisonic := _AMBISONIC_RE.match(name):
        return (int(ambisonic.group(1)) + 1) ** 2
    if "+" in name:
        return len(name.split("+"))  # a custom layout spelled out: FL+FR+LFE
    return 0


def input_header(log: str) -> str:
    """The `Input #0` block: parsing more would let the `Output #0` block overwrite it."""
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Input #0")), None)
    if start is None:
        return ""
    header = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" "):
            break
        header.append(line)
    return "\n".join(header)


def parse_header(header: str, filename: str) -> dict[str, Any]:
    """moviepy's parser, fed only what it handles without warnings or crashes: stream
    types it does not know (subtitles, attachments) become `Data`, and a container with
    no duration is parsed without one."""
    tamed = _STREAM_TYPE_RE.sub(
        lambda m: m.group(0) if m.group(2) in ("Audio", "Video", "Data") else f"{m.group(1)}Data:",
        header,
    )
    has_duration = re.search(r"Duration: \d+:\d\d:\d\d", tamed) is not None
    parser = FFmpegInfosParser(tamed, filename, check_duration=has_duration)
    result: dict[str, Any] = parser.parse()
    return result


def _last_log_line(log_tail: str) -> str:
    """ffmpeg's last word is usually the reason; the `[demuxer @ 0x...]` prefix is noise."""
    for line in reversed(log_tail.splitlines()):
        text = _LOG_PREFIX_RE.sub("", line).strip()
        if text and not text.startswith(("size=", "To ignore this")):
            return text[:_MESSAGE_MAX_CHARS]
    return "no message from ffmpeg"


def _check_file(path: str | os.PathLike[str]) -> None:
    """Cheap checks worth a clear message before paying for a process."""
    try:
        size_bytes = os.stat(path).st_size
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc.strerror}") from exc
    if size_bytes == 0:
        raise DecodeError("empty file")


def _widen_pipe(pipe: IO[bytes]) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)


class AudioStream:
    """Context manager + iterator over float32 mono 16 kHz windows.

    Each yielded array is freshly allocated, so consumers may queue windows while later
    ones are read.  Leaving the context (or dropping the iterator) kills and reaps
    ffmpeg, so an abandoned decode never leaves a zombie or a temp file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        window_samples: int,
        *,
        max_audio_s: float | None = DEFAULT_MAX_AUDIO_S,
        cap_option: str = "--max-audio-s",
    ) -> None:
        """`max_audio_s`: longer audio fails as TooLongError naming `cap_option` (the
        option that sets it); None means no cap."""
        if window_samples <= 0:
            raise ValueError(f"window_samples must be positive, got {window_samples}")
        if max_audio_s is not None and not max_audio_s > 0:
            raise ValueError(f"max_audio_s must be positive or None, got {max_audio_s}")
        self.path = path
        self.window_samples = window_samples
        self.max_audio_s = max_audio_s
        self.cap_option = cap_option
        self.samples_total = 0
        self._info: MediaInfo | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._resources = contextlib.ExitStack()
        self._started = False

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def info(self) -> MediaInfo:
        if self._info is None:
            raise RuntimeError("MediaInfo is known only after the stream was read to the end")
        return self._info

    @property
    def returncode(self) -> int | None:
        """ffmpeg's exit status once reaped; None while it runs or before it started."""
        return None if self._proc is None else self._proc.returncode

    def close(self) -> None:
        """Idempotent: kill and reap ffmpeg, then close its pipe and the stderr file."""
        self._resources.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._started:
            raise RuntimeError("an AudioStream can be iterated only once")
        self._started = True
        _check_file(self.path)
        try:
            yield from self._windows()
        finally:
            self.close()

    def _spawn(self) -> subprocess.Popen[bytes]:
        # An unnamed temp file, not a pipe: ffmpeg can never block on a full stderr pipe,
        # and the file vanishes on close even if we are killed.
        log = tempfile.TemporaryFile(prefix="runner-ffmpeg-")  # noqa: SIM115 - closed by close()
        self._log = self._resources.enter_context(log)
        self._proc = subprocess.Popen(
            ffmpeg_command(self.path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            bufsize=0,
        )
        self._resources.callback(_reap, self._proc)
        assert self._proc.stdout is not None
        _widen_pipe(self._proc.stdout)
        return self._proc

    def _windows(self) -> Iterator[np.ndarray]:
        stdout = cast(io.RawIOBase, self._spawn().stdout)
        first = True
        while True:
            window = np.empty(self.window_samples, dtype="<f4")
            filled_samples = _fill(stdout, window.data.cast("B")) // SAMPLE_BYTES
            if first:
                # Output has begun (or ended), so ffmpeg has logged the input header.
                first = False
                self._check_stated_duration()
            self._check_samples(window[:filled_samples])
            self.samples_total += filled_samples
            self._check_decoded_length()
            if filled_samples < self.window_samples:
                break
            yield window
        self._finish()
        if filled_samples:
            yield window[:filled_samples].copy()  # copy: do not pin a full window's memory

    def _check_stated_duration(self) -> None:
        """Fails before the first window when the container states too long a duration.

        Reads with pread: the log file shares its offset with ffmpeg's stderr, so a seek
        here would move where ffmpeg writes."""
        if self.max_audio_s is None:
            return
        assert self._log is not None
        head = os.pread(self._log.fileno(), _LOG_HEAD_BYTES, 0).decode("utf-8", "replace")
        stated_s = trusted_duration_s(head, input_header(head))
        if stated_s is not None and stated_s > self.max_audio_s:
            raise TooLongError(
                f"audio is {stated_s:.0f} s long per its container, over the limit of "
                f"{self.max_audio_s:g} s ({self.cap_option})"
            )

    def _check_decoded_length(self) -> None:
        """The cap on decoded samples, for containers that state no duration or lie."""
        if self.max_audio_s is not None and self.samples_total > self.max_audio_s * SAMPLE_RATE_HZ:
            raise TooLongError(
                f"decoded more than {self.max_audio_s:g} s of audio, the limit "
                f"({self.cap_option}); stopped there"
            )

    def _check_samples(self, samples: np.ndarray) -> None:
        """NaN or Inf (float sources carry them through ffmpeg untouched) would turn the
        whole mean-pooled vector into NaN, so such a source never reaches the model."""
        finite = np.isfinite(samples)
        if not finite.all():
            at_s = (self.samples_total + int(np.argmin(finite))) / SAMPLE_RATE_HZ
            raise DecodeError(f"non-finite samples (NaN or Inf) in the audio at {at_s:.1f} s")

    def _finish(self) -> None:
        """Runs once stdout hit EOF: now the log is complete and can say what happened."""
        assert self._proc is not None and self._log is not None
        returncode = self._proc.wait()
        head, tail = _read_log(self._log)
        header = input_header(head)
        self._info = _media_info(header, head + tail, self.path, returncode, self.samples_total)


def stated_duration_s(header: str) -> float | None:
    """The container's `Duration:` in seconds; None for `N/A` or no header."""
    match = _DURATION_RE.search(header)
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def trusted_duration_s(log: str, header: str) -> float | None:
    """The stated duration when ffmpeg read it, None when it only guessed it from the
    bitrate (`_ESTIMATED_MARKER`): too_long and truncated must not rest on a guess."""
    return None if _ESTIMATED_MARKER in log else stated_duration_s(header)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill before closing stdout, so ffmpeg dies of SIGKILL rather than of a broken pipe
    mid-write, then wait so no zombie is left behind."""
    if proc.poll() is None:
        proc.kill()
    if proc.stdout is not None:
        proc.stdout.close()
    proc.wait()


def _fill(stdout: io.RawIOBase, buffer: memoryview) -> int:
    """Reads until the buffer is full or EOF; a raw pipe hands over at most its size per read."""
    filled_bytes = 0
    total_bytes = len(buffer)
    while filled_bytes < total_bytes:
        got = stdout.readinto(buffer[filled_bytes:])
        if not got:
            break
        filled_bytes += got
    return filled_bytes


def _read_log(log: IO[bytes]) -> tuple[str, str]:
    size_bytes = log.seek(0, os.SEEK_END)
    log.seek(0)
    head = log.read(_LOG_HEAD_BYTES)
    tail = b""
    if size_bytes > _LOG_HEAD_BYTES:
        log.seek(max(_LOG_HEAD_BYTES, size_bytes - _LOG_TAIL_BYTES))
        tail = log.read()
    return head.decode("utf-8", "replace"), tail.decode("utf-8", "replace")


def _media_info(
    header: str, log: str, path: str | os.PathLike[str], returncode: int, samples_total: int
) -> MediaInfo:
    """Turns the exit status and log into MediaInfo or the most useful DecodeError."""
    if not header:
        if _NOT_WHITELISTED_MARKER in log:
            raise DecodeError("not a media file (a playlist, manifest or unaccepted container)")
        raise DecodeError(f"not a media file ({_last_log_line(log)})")
    parsed = _parse_or_empty(header, os.fspath(path))
    if not parsed.get("audio_found", False) or any(m in log for m in _NO_AUDIO_MARKERS):
        raise DecodeError("no audio stream")
    if returncode != 0:
        raise DecodeError(f"audio stream could not be decoded: {_last_log_line(log)}")
    if samples_total == 0:
        raise DecodeError("no audio samples decoded")
    decoded_s = samples_total / SAMPLE_RATE_HZ
    stated_s = trusted_duration_s(log, header)
    # The stated duration is the longest stream's: a video may well outlast its audio,
    # so with a video stream only a file ffmpeg found cut short counts as truncated.
    cut = not _VIDEO_STREAM_RE.search(header) or any(m in log for m in _CUT_MARKERS)
    if (
        stated_s is not None
        and cut
        and decoded_s < TRUNCATED_RATIO * stated_s
        and stated_s - decoded_s > TRUNCATED_MIN_SHORT_S
    ):
        raise TruncatedError(
            f"truncated: the container states {stated_s:.1f} s but only {decoded_s:.1f} s "
            "of audio could be decoded"
        )
    duration_s = parsed.get("duration") or decoded_s
    layout = _AUDIO_LINE_RE.search(header)
    channels_count = layout_channels_count(layout.group(1)) if layout else 0
    return MediaInfo(duration_s=float(duration_s), channels_count=channels_count)


def _parse_or_empty(header: str, filename: str) -> dict[str, Any]:
    """A parser crash on an odd header must not fail a decode ffmpeg itself managed."""
    try:
        return parse_header(header, filename)
    except Exception:
        return {"audio_found": _AUDIO_LINE_RE.search(header) is not None}


def decode_all(
    path: str | os.PathLike[str],
    window_samples: int = DEFAULT_WINDOW_SAMPLES,
    *,
    max_audio_s: float | None = DEFAULT_MAX_AUDIO_S,
) -> tuple[list[np.ndarray], MediaInfo]:
    """Whole-file convenience for tests and benchmarks; the pipeline streams instead."""
    with AudioStream(path, window_samples, max_audio_s=max_audio_s) as stream:
        windows = list(stream)
        return windows, stream.info
