"""Streams a media file's audio as 16 kHz mono float32 windows, one ffmpeg process per file.

Wav2Vec2 wants 16 kHz mono, and catalogue videos can run for hours, so the track is
never held whole: ffmpeg resamples and downmixes, and we read its stdout a window at
a time.  Probing costs a process spawn, which is a large share of the work on short
clips, so there is no separate probe: the header ffmpeg prints while decoding is parsed
once it exits (moviepy's parser for duration and audio presence, our own regex for the
channel count, which moviepy does not report).  That is also why errors surface from
iteration rather than from the constructor.
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

from runner.errors import DecodeError

SAMPLE_RATE_HZ = 16_000
SAMPLE_BYTES = 4  # float32
DEFAULT_WINDOW_SAMPLES = 30 * SAMPLE_RATE_HZ

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


@dataclass(frozen=True)
class MediaInfo:
    """What the job records about the source, known only once ffmpeg has finished."""

    #: Container duration; decoded samples / 16 kHz when the container states none.
    duration_s: float
    #: Source channel count before the downmix; 0 when ffmpeg names a layout we do not know.
    channels_count: int


#: Before `-i`: `-threads 1` keeps each decode on one core, so several run side by side
#: and per-core throughput is honest.
_INPUT_ARGS = ("-hide_banner", "-nostdin", "-nostats", "-threads", "1")
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

    def __init__(self, path: str | os.PathLike[str], window_samples: int) -> None:
        if window_samples <= 0:
            raise ValueError(f"window_samples must be positive, got {window_samples}")
        self.path = path
        self.window_samples = window_samples
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
        while True:
            window = np.empty(self.window_samples, dtype="<f4")
            filled_samples = _fill(stdout, window.data.cast("B")) // SAMPLE_BYTES
            self.samples_total += filled_samples
            if filled_samples < self.window_samples:
                break
            yield window
        self._finish()
        if filled_samples:
            yield window[:filled_samples].copy()  # copy: do not pin a full window's memory

    def _finish(self) -> None:
        """Runs once stdout hit EOF: now the log is complete and can say what happened."""
        assert self._proc is not None and self._log is not None
        returncode = self._proc.wait()
        head, tail = _read_log(self._log)
        header = input_header(head)
        self._info = _media_info(header, head + tail, self.path, returncode, self.samples_total)


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
        raise DecodeError(f"not a media file ({_last_log_line(log)})")
    parsed = _parse_or_empty(header, os.fspath(path))
    if not parsed.get("audio_found", False) or any(m in log for m in _NO_AUDIO_MARKERS):
        raise DecodeError("no audio stream")
    if returncode != 0:
        raise DecodeError(f"audio stream could not be decoded: {_last_log_line(log)}")
    if samples_total == 0:
        raise DecodeError("no audio samples decoded")
    duration_s = parsed.get("duration") or samples_total / SAMPLE_RATE_HZ
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
) -> tuple[list[np.ndarray], MediaInfo]:
    """Whole-file convenience for tests and benchmarks; the pipeline streams instead."""
    with AudioStream(path, window_samples) as stream:
        windows = list(stream)
        return windows, stream.info
