"""runner.decode against the real ffmpeg on generated media: no mocks, because the
things that break in practice (header formats, layouts, resampling, process cleanup)
live in ffmpeg's behaviour, not in our code's control flow."""

from __future__ import annotations

import gc
import itertools
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from runner.decode import (
    SAMPLE_RATE_HZ,
    AudioStream,
    _media_info,
    decode_all,
    layout_channels_count,
)
from runner.errors import DecodeError
from tests import media

SMALL_WINDOW_SAMPLES = 4000
LONG_S = 600.0


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("decode-media")


def _made(media_dir: Path, name: str, maker: Callable[..., Path], **kwargs: object) -> Path:
    """Makes each file once per module, whichever test asks first."""
    path = media_dir / name
    if not path.exists():
        maker(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def long_path(media_dir: Path) -> Path:
    return _made(media_dir, "long.flac", media.make_long_sine, duration_s=LONG_S, freq_hz=440)


def _dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum)) * SAMPLE_RATE_HZ / len(samples)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


GOOD = [
    # name, maker, kwargs, expected channels, duration_s
    (
        "stereo.mp4",
        media.make_mp4,
        {"duration_s": 3.0, "freq_hz": 440, "sample_rate_hz": 44100, "channels": 2},
        2,
        3.0,
    ),
    (
        "mono48k.mp4",
        media.make_mp4,
        {"duration_s": 2.0, "freq_hz": 660, "sample_rate_hz": 48000, "channels": 1},
        1,
        2.0,
    ),
    ("surround.mp4", media.make_mp4, {"duration_s": 2.5, "freq_hz": 330, "channels": 6}, 6, 2.5),
    ("song.mp3", media.make_mp3, {"duration_s": 2.0, "freq_hz": 880}, 2, 2.0),
    ("clip.webm", media.make_webm, {"duration_s": 2.0, "freq_hz": 550}, 2, 2.0),
    ("voice.m4a", media.make_m4a, {"duration_s": 1.5, "freq_hz": 300, "channels": 1}, 1, 1.5),
    ("voice.opus", media.make_opus, {"duration_s": 1.5, "freq_hz": 750}, 2, 1.5),
]


@pytest.mark.parametrize(
    ("name", "maker", "kwargs", "channels", "duration_s"), GOOD, ids=[g[0] for g in GOOD]
)
def test_formats_decode_to_16k_mono_with_info(
    media_dir: Path,
    name: str,
    maker: Callable[..., Path],
    kwargs: dict[str, object],
    channels: int,
    duration_s: float,
) -> None:
    windows, info = decode_all(_made(media_dir, name, maker, **kwargs), SMALL_WINDOW_SAMPLES)
    samples = np.concatenate(windows)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert info.channels_count == channels
    assert info.duration_s == pytest.approx(duration_s, abs=0.1)
    assert len(samples) == pytest.approx(duration_s * SAMPLE_RATE_HZ, abs=0.1 * SAMPLE_RATE_HZ)
    # The sine's frequency surviving proves the resample rate is really 16 kHz.
    assert _dominant_hz(samples) == pytest.approx(kwargs["freq_hz"], abs=2)


def test_windows_are_full_except_a_short_nonempty_last(media_dir: Path) -> None:
    path = _made(media_dir, "stereo.mp4", media.make_mp4, duration_s=3.0, freq_hz=440)
    with AudioStream(path, 7_000) as stream:
        sizes = [len(window) for window in stream]
        samples_total = stream.samples_total
    assert set(sizes[:-1]) == {7_000}
    assert 0 < sizes[-1] <= 7_000
    assert sum(sizes) == samples_total == 48_000


def test_window_equal_to_track_yields_one_window(media_dir: Path) -> None:
    path = _made(media_dir, "stereo.mp4", media.make_mp4, duration_s=3.0, freq_hz=440)
    windows, _ = decode_all(path, 48_000)
    assert [len(w) for w in windows] == [48_000]


def test_windows_are_independent_arrays(media_dir: Path) -> None:
    """The pipeline queues windows while decoding goes on; a reused buffer would corrupt them."""
    path = _made(media_dir, "noise.mp4", media.make_mp4, duration_s=1.0, noise_seed=3)
    windows, _ = decode_all(path, 4000)
    whole, _ = decode_all(path, 10 * SAMPLE_RATE_HZ)
    assert not any(np.shares_memory(a, b) for a, b in itertools.pairwise(windows))
    assert np.array_equal(np.concatenate(windows), whole[0])


def test_distinct_noise_seeds_decode_differently(media_dir: Path) -> None:
    one = np.concatenate(
        decode_all(_made(media_dir, "noise.mp4", media.make_mp4, duration_s=1.0, noise_seed=3))[0]
    )
    two = np.concatenate(
        decode_all(_made(media_dir, "noise4.mp4", media.make_mp4, duration_s=1.0, noise_seed=4))[0]
    )
    assert abs(float(np.corrcoef(one, two)[0, 1])) < 0.2


@pytest.mark.parametrize(
    ("name", "maker", "kwargs", "message"),
    [
        (
            "silent-video.mp4",
            media.make_video_without_audio,
            {"duration_s": 1.0},
            "no audio stream",
        ),
        ("random.bin", media.make_random_bytes, {"n_bytes": 50_000, "seed": 7}, "not a media file"),
        ("empty.mp4", media.make_empty, {}, "empty file"),
        ("nothing.wav", media.make_wav_without_samples, {}, "no audio samples decoded"),
    ],
)
def test_bad_inputs_raise_decode_error(
    media_dir: Path, name: str, maker: Callable[..., Path], kwargs: dict[str, object], message: str
) -> None:
    path = _made(media_dir, name, maker, **kwargs)
    with pytest.raises(DecodeError, match=f"^{message}") as caught:
        decode_all(path)
    assert len(str(caught.value)) < 300


def test_missing_file_raises_decode_error(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="cannot read file"):
        decode_all(tmp_path / "gone.mp4")


def test_not_a_media_file_carries_ffmpeg_reason(media_dir: Path) -> None:
    path = _made(media_dir, "random.bin", media.make_random_bytes, n_bytes=50_000, seed=7)
    with pytest.raises(DecodeError, match=r"not a media file \(.*Invalid data"):
        decode_all(path)


def test_failed_decode_after_open_names_ffmpeg_reason() -> None:
    header = (
        "Input #0, mp3, from 'x.mp3':\n  Duration: 00:00:02.00, bitrate: 64 kb/s\n"
        "  Stream #0:0: Audio: mp3 (mp3float), 44100 Hz, stereo, fltp, 64 kb/s"
    )
    log = header + "\n[mp3float @ 0x1] Header missing\nsomething broke badly\n"
    with pytest.raises(DecodeError, match=r"^audio stream could not be decoded: something broke"):
        _media_info(header, log, "x.mp3", returncode=1, samples_total=10)


def test_file_names_are_not_read_as_protocols(
    media_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _made(media_dir, "concat:evil.m4a", media.make_m4a, duration_s=1.0)
    monkeypatch.chdir(media_dir)
    _, info = decode_all("concat:evil.m4a")
    assert info.duration_s == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize(
    ("layout", "channels"),
    [
        ("mono", 1),
        ("stereo", 2),
        ("2.1", 3),
        ("3.0", 3),
        ("3.0(back)", 3),
        ("quad", 4),
        ("quad(side)", 4),
        ("4.0", 4),
        ("5.0", 5),
        ("5.1", 6),
        ("5.1(side)", 6),
        ("6.1", 7),
        ("7.1", 8),
        ("7.1(wide-side)", 8),
        ("7.1.4", 12),
        ("22.2", 24),
        ("hexagonal", 6),
        ("octagonal", 8),
        ("downmix", 2),
        ("6 channels", 6),
        ("3 channels (FL+FR+LFE)", 3),
        ("FL+FR+LFE", 3),
        ("ambisonic 1", 4),
        ("gibberish", 0),
    ],
)
def test_layout_channels_count(layout: str, channels: int) -> None:
    assert layout_channels_count(layout) == channels


def test_info_before_the_end_is_an_error(long_path: Path) -> None:
    with AudioStream(long_path, SAMPLE_RATE_HZ) as stream:
        next(iter(stream))
        with pytest.raises(RuntimeError):
            _ = stream.info


def test_stream_iterates_once(media_dir: Path) -> None:
    path = _made(media_dir, "stereo.mp4", media.make_mp4, duration_s=3.0, freq_hz=440)
    with AudioStream(path, SMALL_WINDOW_SAMPLES) as stream:
        list(stream)
        with pytest.raises(RuntimeError):
            list(stream)


def test_early_exit_reaps_ffmpeg_and_leaks_nothing(long_path: Path) -> None:
    fds_before = _open_fds()
    with AudioStream(long_path, SAMPLE_RATE_HZ) as stream:
        windows = iter(stream)
        next(windows)
        assert stream.returncode is None  # still running: leaving the block must kill it
        pid = stream._proc.pid if stream._proc else -1
    assert stream.returncode is not None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped: no zombie left behind
    assert _open_fds() <= fds_before  # no pipe or temp file left open


def test_break_reaps_ffmpeg_without_context_manager(long_path: Path) -> None:
    stream = AudioStream(long_path, SAMPLE_RATE_HZ)
    for _window in stream:
        break
    gc.collect()  # CPython finalises the abandoned generator at once; this covers others
    assert stream.returncode is not None


def test_long_file_in_small_windows_keeps_memory_bounded(long_path: Path) -> None:
    window_samples = SAMPLE_RATE_HZ // 2
    track_bytes = int(LONG_S * SAMPLE_RATE_HZ * 4)
    tracemalloc.start()
    try:
        with AudioStream(long_path, window_samples) as stream:
            max_window = 0
            peak_440 = 0
            for window in stream:
                max_window = max(max_window, len(window))
                peak_440 += int(_dominant_hz(window) == pytest.approx(440, abs=2))
            _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max_window == window_samples
    assert stream.samples_total == LONG_S * SAMPLE_RATE_HZ
    assert stream.info.duration_s == pytest.approx(LONG_S, abs=0.1)
    assert peak_440 == LONG_S * 2  # every window is the sine, none is garbage
    assert peak_bytes < track_bytes / 50  # a few windows at most, never the track


@pytest.mark.slow
def test_two_hour_file_streams_in_bounded_memory(media_dir: Path) -> None:
    duration_s = 7200.0
    path = _made(media_dir, "two-hours.flac", media.make_long_sine, duration_s=duration_s)
    tracemalloc.start()
    try:
        with AudioStream(path, 30 * SAMPLE_RATE_HZ) as stream:
            windows_count = sum(1 for _ in stream)
            _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert windows_count == 240
    assert stream.samples_total == duration_s * SAMPLE_RATE_HZ
    assert peak_bytes < 4 * 30 * SAMPLE_RATE_HZ * 4  # ~2 windows; the track is 460 MB
