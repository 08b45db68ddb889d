"""Downloaded bodies that are not honest media files: playlists and manifests that point
ffmpeg elsewhere, tiny files that claim days of audio, cut downloads whose header still
promises the whole, and float audio carrying NaN.  Each must fail as a DecodeError
before any of it reaches the model, while every good file still decodes."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from runner import jobs
from runner.attempt import Attempt
from runner.decode import SAMPLE_RATE_HZ, AudioStream, decode_all
from runner.embed import WINDOW_SAMPLES, WindowItem
from runner.errors import DecodeError, TooLongError, TruncatedError
from runner.metrics import Metrics
from runner.stages.decoder import Decoded, DecoderPool
from runner.stages.downloader import ByteBudget, Downloaded
from runner.workdir import Workdir
from tests import media
from tests.conftest import GOOD_MEDIA

FAST_S = 5.0  # "within seconds": generous for a loaded 2-core machine


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-media")


def _made(root: Path, name: str, maker: Callable[..., Path], **kwargs: object) -> Path:
    path = root / name
    if not path.exists():
        maker(path, **kwargs)
    return path


def _count_windows(path: Path, **kwargs: float | None) -> tuple[int, BaseException | None]:
    """Windows yielded before the stream ended or failed, and the failure if any."""
    yielded = 0
    try:
        with AudioStream(path, 4000, **kwargs) as stream:
            for _ in stream:
                yielded += 1
    except DecodeError as exc:
        return yielded, exc
    return yielded, None


@pytest.mark.parametrize("name", GOOD_MEDIA)
def test_good_media_still_decode(media_dir: Path, name: str) -> None:
    """The whitelists, truncation and finiteness checks leave every real format alone
    (Opus preroll, 5.1, mp3 priming, a video track alongside)."""
    windows, info = decode_all(media_dir / name)
    decoded_s = sum(len(w) for w in windows) / SAMPLE_RATE_HZ
    assert decoded_s == pytest.approx(info.duration_s, abs=0.2)


@pytest.mark.parametrize(
    "maker", [media.make_ffconcat, media.make_hls_playlist, media.make_dash_manifest]
)
def test_playlists_and_manifests_are_not_followed(
    hostile_dir: Path, maker: Callable[..., Path]
) -> None:
    target = _made(hostile_dir, "target.m4a", media.make_m4a, duration_s=3.0)
    assert decode_all(target)[0]  # what the playlist names is itself good media
    playlist = maker(hostile_dir / f"{maker.__name__}.txt", target)
    yielded, exc = _count_windows(playlist)
    assert yielded == 0
    assert isinstance(exc, DecodeError)
    assert "not a media file" in str(exc)


def test_tiny_file_claiming_days_fails_too_long_fast(hostile_dir: Path) -> None:
    path = _made(hostile_dir, "slow.wav", media.make_slow_wav)
    assert path.stat().st_size < 300_000
    started = time.monotonic()
    yielded, exc = _count_windows(path)
    assert time.monotonic() - started < FAST_S
    assert yielded == 0
    assert isinstance(exc, TooLongError)
    assert exc.error_class == "too_long" and not exc.transient
    assert "--max-audio-s" in str(exc)


def test_cap_on_decoded_samples_when_no_duration_is_stated(hostile_dir: Path) -> None:
    path = _made(hostile_dir, "live.mka", media.make_mka_without_duration, duration_s=3.0)
    yielded, exc = _count_windows(path, max_audio_s=1.0)
    assert isinstance(exc, TooLongError)
    assert "decoded more than" in str(exc)  # the samples cap, not the header
    assert "--max-audio-s" in str(exc)
    assert yielded <= SAMPLE_RATE_HZ // 4000  # stopped at the cap, not at the end
    assert _count_windows(path, max_audio_s=None)[1] is None


def test_cap_is_a_limit_not_a_target(hostile_dir: Path) -> None:
    path = _made(hostile_dir, "target.m4a", media.make_m4a, duration_s=3.0)
    assert _count_windows(path, max_audio_s=10.0)[1] is None
    assert isinstance(_count_windows(path, max_audio_s=2.0)[1], TooLongError)


@pytest.mark.parametrize(
    ("name", "maker"),
    [("full.mp3", media.make_mp3), ("full.webm", media.make_webm), ("full.mp4", media.make_mp4)],
)
def test_truncated_sources_fail(hostile_dir: Path, name: str, maker: Callable[..., Path]) -> None:
    full = _made(hostile_dir, name, maker, duration_s=60.0, channels=1)
    if name == "full.mp4":  # moov first, as a streamable mp4 is: the cut keeps the index
        faststart = hostile_dir / "faststart.mp4"
        media._run_ffmpeg("-i", str(full), "-c", "copy", "-movflags", "+faststart", str(faststart))
        full = faststart
    assert decode_all(full)[1].duration_s == pytest.approx(60.0, abs=0.5)
    cut = media.make_truncated(hostile_dir / f"cut-{name}", full, keep_fraction=1 / 3)
    with pytest.raises(TruncatedError) as caught:
        decode_all(cut)
    message = str(caught.value)
    assert caught.value.error_class == "truncated" and not caught.value.transient
    assert "60.0 s" in message and "s of audio" in message


def test_non_finite_samples_fail(hostile_dir: Path) -> None:
    path = _made(hostile_dir, "nan.wav", media.make_float_wav_with_nan)
    yielded, exc = _count_windows(path)
    assert isinstance(exc, DecodeError) and exc.error_class == "decode"
    assert "non-finite" in str(exc)
    assert yielded == 2  # the 0.25 s windows before the NaN at 0.5 s, none after


def _run_pool(path: Path, **kwargs: float | None) -> tuple[list[WindowItem], Decoded, float]:
    """One file through a real DecoderPool: the windows it put, its marker, and the time."""

    async def go() -> tuple[list[WindowItem], Decoded, float]:
        queue_in: asyncio.Queue[Downloaded] = asyncio.Queue()
        out: asyncio.Queue[WindowItem | Decoded] = asyncio.Queue()
        pool = DecoderPool(
            1,
            queue_in,
            out,
            ByteBudget(1 << 30),
            Workdir(path.parent),
            Metrics(),
            min_window_samples=400,
            **kwargs,
        )
        job = jobs.Job(
            id=1, key="v1", url="http://media.test/v1", attempts=1, claims=1, worker_id="w"
        )
        await queue_in.put(Downloaded(Attempt(job=job), path, path.stat().st_size))
        started = time.monotonic()
        task = asyncio.create_task(pool.run())
        windows: list[WindowItem] = []
        try:
            while not isinstance(item := await out.get(), Decoded):
                windows.append(item)
        finally:
            task.cancel()
            pool.shutdown()
        return windows, item, time.monotonic() - started

    return asyncio.run(go())


def test_pool_fails_too_long_before_a_single_window(tmp_path: Path) -> None:
    path = media.make_slow_wav(tmp_path / "slow.wav")
    windows, marker, elapsed_s = _run_pool(path)
    assert windows == [] and marker.windows == 0
    assert isinstance(marker.error, TooLongError)
    assert elapsed_s < FAST_S


def test_pool_fails_nan_source(tmp_path: Path) -> None:
    path = media.make_float_wav_with_nan(tmp_path / "nan.wav", nan_at_s=0.5)
    windows, marker, _ = _run_pool(path)
    assert isinstance(marker.error, DecodeError) and "non-finite" in str(marker.error)
    assert WINDOW_SAMPLES > 0.5 * SAMPLE_RATE_HZ  # the NaN is in the first pool window
    assert windows == []


def test_a_video_outlasting_its_audio_is_not_truncated(tmp_path: Path) -> None:
    """The container's duration is the longest stream's: 12 s of picture over 6 s of
    sound is a whole file (found by review), unlike a cut one, which ffmpeg reports."""
    path = tmp_path / "long-picture.mp4"
    subprocess.run(
        [
            media.FFMPEG_EXE,
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=64x48:rate=10:duration=12",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:sample_rate=16000:duration=6",
            "-c:v",
            "libx264",
            "-c:a",
            "aac",
            str(path),
        ],
        check=True,
    )
    windows, info = decode_all(path, WINDOW_SAMPLES)
    assert 5.5 < sum(len(w) for w in windows) / SAMPLE_RATE_HZ < 6.5
    assert info.duration_s > 11
