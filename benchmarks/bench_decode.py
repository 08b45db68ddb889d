"""How much of ffmpeg's own decode speed survives runner.decode's Python wrapper.

The decode stage has to keep up with the embedder; the budget is per core, because
several decodes run side by side.  So both ffmpeg alone (the ceiling) and AudioStream
are timed one clip after another on one core, and CPU time (ours plus reaped children)
is reported next to wall time.  Clips mimic the common input: 60 s of h264 64x64 video
with stereo 44.1 kHz AAC.

    python benchmarks/bench_decode.py [--clips N] [--clip-s 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.decode import AudioStream, ffmpeg_command
from tests import media

WINDOW_SAMPLES = 30 * 16_000


@dataclass(frozen=True)
class Timing:
    label: str
    audio_s: float
    wall_s: float
    cpu_s: float

    @property
    def audio_s_per_core_s(self) -> float:
        return self.audio_s / self.cpu_s

    @property
    def audio_s_per_wall_s(self) -> float:
        return self.audio_s / self.wall_s


def _cpu_s() -> float:
    """Children count only once reaped, which both runners do before returning."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def ffmpeg_alone(path: Path) -> None:
    """The same command AudioStream runs, output discarded: the best we could hope for."""
    subprocess.run(
        ffmpeg_command(path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )


def audio_stream(path: Path) -> None:
    with AudioStream(path, WINDOW_SAMPLES) as stream:
        for _window in stream:
            pass
        stream.info  # noqa: B018 - part of the job: parse the header


def measure_once(
    label: str, decode: Callable[[Path], None], clips: list[Path], clip_s: float
) -> Timing:
    cpu_start_s, wall_start_s = _cpu_s(), time.perf_counter()
    for clip in clips:
        decode(clip)
    wall_s = time.perf_counter() - wall_start_s
    return Timing(label, clip_s * len(clips), wall_s, _cpu_s() - cpu_start_s)


def measure(
    decoders: Mapping[str, Callable[[Path], None]], clips: list[Path], clip_s: float, rounds: int
) -> list[Timing]:
    """Alternates the contenders round by round and keeps each one's best round, so a
    noisy neighbour or a frequency change hits both alike rather than one of them."""
    for decode in decoders.values():
        decode(clips[0])  # warm the page cache and imports
    best: dict[str, Timing] = {}
    for _round in range(rounds):
        for label, decode in decoders.items():
            timing = measure_once(label, decode, clips, clip_s)
            if label not in best or timing.cpu_s < best[label].cpu_s:
                best[label] = timing
    return list(best.values())


def make_clips(root: Path, clips_count: int, clip_s: float) -> list[Path]:
    return [
        media.make_mp4(
            root / f"clip{i}.mp4",
            duration_s=clip_s,
            freq_hz=200 + 10 * i,
            sample_rate_hz=44100,
            channels=2,
        )
        for i in range(clips_count)
    ]


def report(baseline: Timing, wrapped: Timing) -> None:
    print(
        f"{'':18} {'audio s':>8} {'wall s':>7} {'core s':>7} {'audio-s/core-s':>15}"
        f" {'audio-s/wall-s':>15}"
    )
    for t in (baseline, wrapped):
        print(
            f"{t.label:18} {t.audio_s:8.0f} {t.wall_s:7.2f} {t.cpu_s:7.2f}"
            f" {t.audio_s_per_core_s:15.0f} {t.audio_s_per_wall_s:15.0f}"
        )
    ratio = wrapped.audio_s_per_core_s / baseline.audio_s_per_core_s
    print(f"AudioStream / ffmpeg alone, per core: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--clip-s", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        clips = make_clips(Path(tmp), args.clips, args.clip_s)
        if hasattr(os, "sched_setaffinity"):  # one core from here on, children included
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        decoders = {"ffmpeg alone": ffmpeg_alone, "AudioStream": audio_stream}
        baseline, wrapped = measure(decoders, clips, args.clip_s, args.rounds)
    report(baseline, wrapped)


if __name__ == "__main__":
    main()
