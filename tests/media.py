"""Test media made on the spot with the ffmpeg that ships with imageio-ffmpeg.

Generating media instead of committing fixtures keeps the repository small and lets each
test ask for exactly the duration, rate and channel layout it is about.  Everything is
synthetic (lavfi sources) so the files are deterministic and need no network.  Sizes
are kept tiny (64x64 video at 10 fps, ultrafast presets) because tests pay for every
second spent encoding.
"""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np

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


def _wav_bytes(sample_rate_hz: int, data: bytes, format_tag: int, bits: int) -> bytes:
    """A mono RIFF/WAVE header written by hand, so rates and contents ffmpeg's encoders
    refuse (1 Hz, NaN floats) can still be made."""
    block_align = bits // 8
    fmt = struct.pack(
        "<IHHIIHH",
        16,
        format_tag,
        1,
        sample_rate_hz,
        sample_rate_hz * block_align,
        block_align,
        bits,
    )
    body = b"WAVE" + b"fmt " + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def make_slow_wav(path: Path, n_bytes: int = 200_000, sample_rate_hz: int = 1) -> Path:
    """8-bit silence at 1 Hz: 200 kB that claims 55 hours, i.e. 3.2 billion samples at 16 kHz."""
    Path(path).write_bytes(_wav_bytes(sample_rate_hz, bytes([128]) * n_bytes, 1, 8))
    return Path(path)


def make_float_wav_with_nan(path: Path, duration_s: float = 2.0, nan_at_s: float = 0.5) -> Path:
    """16 kHz float32 sine with a run of NaN: ffmpeg passes such samples through untouched."""
    n_samples = int(duration_s * 16000)
    samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n_samples) / 16000)).astype("<f4")
    start = int(nan_at_s * 16000)
    samples[start : start + 100] = np.nan
    Path(path).write_bytes(_wav_bytes(16000, samples.tobytes(), 3, 32))
    return Path(path)


def make_truncated(path: Path, source: Path, keep_fraction: float = 1 / 3) -> Path:
    """The first part of `source`'s bytes: a download cut short whose header still
    states the full duration."""
    data = Path(source).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep_fraction)])
    return Path(path)


def make_mka_without_duration(path: Path, duration_s: float = 3.0) -> Path:
    """Opus in Matroska written to a pipe, so the muxer cannot seek back to write the
    duration: ffmpeg reports `Duration: N/A`, as for a live recording."""
    cmd = [
        FFMPEG_EXE,
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        *_audio_input(duration_s, 440, 48000, None),
        "-c:a",
        "libopus",
        "-f",
        "matroska",
        "pipe:1",
    ]
    with open(path, "wb") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({done.returncode}): {done.stderr.strip()}")
    return Path(path)


def make_ffconcat(path: Path, target: Path) -> Path:
    """A concat list naming a real local file: ffmpeg's concat demuxer would read it."""
    Path(path).write_text(f"ffconcat version 1.0\nfile '{Path(target).resolve()}'\n")
    return Path(path)


def make_hls_playlist(path: Path, target: Path) -> Path:
    """An HLS media playlist whose one segment is a real local file."""
    Path(path).write_text(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n"
        f"#EXTINF:3.0,\n{Path(target).resolve()}\n#EXT-X-ENDLIST\n"
    )
    return Path(path)


def make_dash_manifest(path: Path, target: Path) -> Path:
    """A static DASH MPD whose one representation is a real local file."""
    Path(path).write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" '
        'mediaPresentationDuration="PT3S" minBufferTime="PT1S" '
        'profiles="urn:mpeg:dash:profile:isoff-on-demand:2011">\n'
        ' <Period><AdaptationSet mimeType="audio/mp4"><Representation id="a" '
        f'bandwidth="64000"><BaseURL>file:{Path(target).resolve()}</BaseURL>'
        "</Representation></AdaptationSet></Period>\n</MPD>\n"
    )
    return Path(path)
