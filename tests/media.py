"""Test media made on the spot with the ffmpeg that ships with imageio-ffmpeg.

Generating media instead of committing fixtures keeps the repository small and lets each
test ask for exactly the duration, rate and channel layout it is about.  Everything is
synthetic (lavfi sources) so the files are deterministic and need no network.  Sizes
are kept tiny (64x64 video at 10 fps, ultrafast presets) because tests pay for every
second spent encoding.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import imageio_ffmpeg

FFMPEG_EXE = imageio_ffmpeg.get_ffmpeg_exe()

#: ffmpeg layout names, so `channels=6` produces a file that reports "5.1".
_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}
_VIDEO_FPS = 10  # 0.1 s frames: durations like 2.5 s end on a frame boundary
_VIDEO_SIZE = "64x64"
_FAST_X264 = ("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p")
_FAST_VP9 = ("-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "50k")


def _run_ffmpeg(*args: str) -> None:
    """Fails loudly with ffmpeg's own message: a broken fixture should not look like a bug."""
    cmd = [FFMPEG_EXE, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({done.returncode}): {done.stderr.strip()}")


def _audio_input(
    duration_s: float, freq_hz: float, sample_rate_hz: int, noise_seed: int | None
) -> list[str]:
    """A sine by default (its frequency survives resampling, so tests can check it);
    noise on request, for content that no two seeds share."""
    if noise_seed is not None:
        src = (
            f"anoisesrc=color=white:amplitude=0.3:seed={noise_seed}"
            f":duration={duration_s}:sample_rate={sample_rate_hz}"
        )
    else:
        src = f"sine=frequency={freq_hz}:duration={duration_s}:sample_rate={sample_rate_hz}"
    return ["-f", "lavfi", "-i", src]


def _video_input(duration_s: float) -> list[str]:
    return ["-f", "lavfi", "-i", f"color=c=gray:s={_VIDEO_SIZE}:r={_VIDEO_FPS}:d={duration_s}"]


def _layout_args(channels: int) -> list[str]:
    """Upmixes the mono source so the container really declares the requested layout."""
    if channels not in _LAYOUTS:
        raise ValueError(f"channels must be one of {sorted(_LAYOUTS)}, got {channels}")
    return ["-ac", str(channels), "-channel_layout", _LAYOUTS[channels]]


def make_mp4(
    path: Path,
    duration_s: float = 3.0,
    freq_hz: float = 440,
    sample_rate_hz: int = 44100,
    channels: int = 2,
    noise_seed: int | None = None,
) -> Path:
    """h264 + AAC: the most common thing the runner will be fed."""
    _run_ffmpeg(
        *_video_input(duration_s),
        *_audio_input(duration_s, freq_hz, sample_rate_hz, noise_seed),
        "-map",
        "0:v",
        "-map",
        "1:a",
        *_FAST_X264,
        *_layout_args(channels),
        "-c:a",
        "aac",
        "-t",
        str(duration_s),
        str(path),
    )
    return Path(path)


def make_mp3(
    path: Path,
    duration_s: float = 3.0,
    freq_hz: float = 440,
    sample_rate_hz: int = 44100,
    channels: int = 2,
    noise_seed: int | None = None,
) -> Path:
    _run_ffmpeg(
        *_audio_input(duration_s, freq_hz, sample_rate_hz, noise_seed),
        *_layout_args(channels),
        "-c:a",
        "libmp3lame",
        "-b:a",
        "64k",
        str(path),
    )
    return Path(path)


def make_webm(
    path: Path,
    duration_s: float = 3.0,
    freq_hz: float = 440,
    sample_rate_hz: int = 48000,
    channels: int = 2,
    noise_seed: int | None = None,
) -> Path:
    """VP9 + Opus, the usual pairing from web sources."""
    _run_ffmpeg(
        *_video_input(duration_s),
        *_audio_input(duration_s, freq_hz, sample_rate_hz, noise_seed),
        "-map",
        "0:v",
        "-map",
        "1:a",
        *_FAST_VP9,
        *_layout_args(channels),
        "-c:a",
        "libopus",
        "-t",
        str(duration_s),
        str(path),
    )
    return Path(path)


def make_m4a(
    path: Path,
    duration_s: float = 3.0,
    freq_hz: float = 440,
    sample_rate_hz: int = 44100,
    channels: int = 2,
    noise_seed: int | None = None,
) -> Path:
    _run_ffmpeg(
        *_audio_input(duration_s, freq_hz, sample_rate_hz, noise_seed),
        *_layout_args(channels),
        "-c:a",
        "aac",
        "-f",
        "ipod",
        str(path),
    )
    return Path(path)


def make_opus(
    path: Path,
    duration_s: float = 3.0,
    freq_hz: float = 440,
    sample_rate_hz: int = 48000,
    channels: int = 2,
    noise_seed: int | None = None,
) -> Path:
    """Opus in Ogg; libopus resamples to 48 kHz itself, whatever the source rate."""
    _run_ffmpeg(
        *_audio_input(duration_s, freq_hz, sample_rate_hz, noise_seed),
        *_layout_args(channels),
        "-c:a",
        "libopus",
        "-f",
        "ogg",
        str(path),
    )
    return Path(path)


def make_video_without_audio(path: Path, duration_s: float = 1.0) -> Path:
    _run_ffmpeg(*_video_input(duration_s), *_FAST_X264, "-t", str(duration_s), str(path))
    return Path(path)


def make_wav_without_samples(path: Path) -> Path:
    """A valid header announcing audio that never comes: the file opens, nothing decodes."""
    _run_ffmpeg(
        *_audio_input(1.0, 440, 16000, None),
        "-af",
        "atrim=end_sample=0",
        "-c:a",
        "pcm_s16le",
        "-f",
        "wav",
        str(path),
    )
    return Path(path)


def make_random_bytes(path: Path, n_bytes: int = 50_000, seed: int = 0) -> Path:
    """Noise that no demuxer accepts, standing in for an HTML error page or a truncated blob."""
    Path(path).write_bytes(random.Random(seed).randbytes(n_bytes))
    return Path(path)


def make_empty(path: Path) -> Path:
    Path(path).write_bytes(b"")
    return Path(path)


def make_long_sine(
    path: Path,
    duration_s: float = 7200.0,
    freq_hz: float = 440,
    sample_rate_hz: int = 8000,
    codec: str = "flac",
) -> Path:
    """Hour-scale audio that is cheap to make: 8 kHz mono FLAC of a sine encodes 2 h in
    about 2 s (24 MB); `codec="mp3"` gives a 4x smaller file (7 MB) for about 5x the time.
    The suffix of `path` should match the codec (.flac / .mp3)."""
    codec_args = {
        "flac": ["-c:a", "flac", "-sample_fmt", "s16"],
        "mp3": ["-c:a", "libmp3lame", "-b:a", "8k"],
    }
    if codec not in codec_args:
        raise ValueError(f"codec must be one of {sorted(codec_args)}, got {codec!r}")
    _run_ffmpeg(
        *_audio_input(duration_s, freq_hz, sample_rate_hz, None),
        "-ac",
        "1",
        *codec_args[codec],
        str(path),
    )
    return Path(path)
