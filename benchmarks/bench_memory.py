"""Peak memory of the daemon on a 2-hour file against a 10-second one.

Catalogues hold hour-long videos, and 2 hours of 16 kHz float32 is 460 MB: a daemon
that held tracks whole would need that much more for each long video in flight.  So
the daemon's peak RSS (as wait4 reports it, ffmpeg included) is compared between a
2-hour and a 10-second file of the same codec with the same model, and so is that of
the obvious alternative, a one-at-a-time loop that decodes the whole track into
memory and then embeds it window by window.  A 4-minute file sits in between: it
fills whole batches, so what a batch's activations cost shows up there already and
is not mistaken for the cost of a long track.

    python benchmarks/bench_memory.py [--model tiny|large|PATH] [--hours 2] [--device cpu]
        [--batch-seconds S] [--skip-whole-track]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_throughput import (
    CACHE_DIR,
    Video,
    daemon_argv,
    resolve_model,
    run_child,
    runner_argv,
    write_catalogue,
)
from benchmarks.media_server import running_server
from runner.embed import default_batch_seconds, resolve_device
from tests import media

SHORT_S = 10.0
#: Long enough for several full batches (up to 120 audio-s): a batch's peak is reached here.
MIDDLE_S = 240.0
TARGET_EXTRA_BYTES = 300 * 10**6


@dataclass(frozen=True)
class Peak:
    rss_bytes: int
    wall_s: float


def make_sine(duration_s: float) -> Video:
    """8 kHz mono FLAC, the cheapest long file to make (2 h in about 2 s); cached."""
    name = f"sine-{duration_s:.0f}s.flac"
    path = CACHE_DIR / "memory" / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part.flac")
        media.make_long_sine(partial, duration_s=duration_s)
        partial.rename(path)
    return Video(name, path, duration_s)


def daemon_peak(
    video: Video, base_url: str, model: Path, options: Sequence[str], tmp: Path
) -> Peak:
    workdir = tmp / f"daemon-{video.duration_s:.0f}"
    workdir.mkdir()
    db_path = workdir / "runner.db"
    catalogue = write_catalogue(workdir / "all_videos.json", [video], base_url)
    run_child(
        [*runner_argv(), "--db", f"sqlite:///{db_path}", "import", str(catalogue)], workdir / "log"
    )
    ran = run_child(daemon_argv(db_path, model, workdir / "work", *options), workdir / "log")
    with closing(sqlite3.connect(db_path)) as conn:
        status, error = conn.execute("SELECT status, error FROM jobs").fetchone()
    if status != "done":
        raise SystemExit(f"the daemon left {video.name} {status}: {error}")
    return Peak(ran.peak_rss_bytes, ran.wall_s)


def whole_track_peak(video: Video, model: Path, device: str, tmp: Path) -> Peak:
    argv = [
        sys.executable,
        __file__,
        "--whole-track",
        str(video.path),
        "--model",
        str(model),
        "--device",
        device,
    ]
    ran = run_child(argv, tmp / f"whole-{video.duration_s:.0f}.log")
    return Peak(ran.peak_rss_bytes, ran.wall_s)


def whole_track(path: Path, model: Path, device: str) -> None:
    """The baseline, run as its own process: the whole decoded track held, then embedded."""
    from runner.decode import decode_all
    from runner.embed import Embedder, embed_audio

    embedder = Embedder(str(model), device=device)
    windows, _ = decode_all(path)  # every window of the track, all in memory at once
    embed_audio(embedder, windows)


def print_report(peaks: dict[str, list[Peak]], videos: list[Video]) -> None:
    names = [_length(v.duration_s) for v in videos]
    deltas = [f"{names[-1]} - {name}" for name in names[:-1]]
    print(f"{'':18}" + "".join(f"{n:>10}" for n in names) + "".join(f"{d:>14}" for d in deltas))
    for label, row in peaks.items():
        cells = "".join(f"{p.rss_bytes / 1e6:7.0f} MB" for p in row)
        extra = "".join(f"{(row[-1].rss_bytes - p.rss_bytes) / 1e6:+11.0f} MB" for p in row[:-1])
        walls = ", ".join(f"{p.wall_s:.0f}" for p in row)
        print(f"{label:18}{cells}{extra}   (runs took {walls} s)")
    daemon = peaks["daemon"]
    extra_bytes = daemon[-1].rss_bytes - daemon[0].rss_bytes
    verdict = "met" if extra_bytes < TARGET_EXTRA_BYTES else "MISSED"
    print(
        f"target: the daemon needs < {TARGET_EXTRA_BYTES / 1e6:.0f} MB more for {names[-1]} "
        f"than for {names[0]}: {verdict}"
    )


def _length(duration_s: float) -> str:
    if duration_s >= 3600:
        return f"{duration_s / 3600:g} h"
    return f"{duration_s / 60:g} min" if duration_s >= 60 else f"{duration_s:g} s"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, large or a model path")
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--batch-seconds", type=float, default=None, help="[default: the daemon's for --device]"
    )
    parser.add_argument("--skip-whole-track", action="store_true")
    parser.add_argument("--whole-track", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_seconds is None:
        args.batch_seconds = default_batch_seconds(resolve_device(args.device))
    return args


def main() -> None:
    args = parse_args()
    model = resolve_model(args.model)
    if args.whole_track is not None:
        whole_track(args.whole_track, model, args.device)
        return
    videos = [make_sine(d) for d in (SHORT_S, MIDDLE_S, args.hours * 3600)]
    daemon_options = ("--device", args.device, "--batch-seconds", str(args.batch_seconds))
    peaks: dict[str, list[Peak]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name,
        running_server(videos[0].path.parent, latency_ms=0, bandwidth_mbs=0) as url,
    ):
        tmp = Path(tmp_name)
        print("running the daemon ...", flush=True)
        peaks["daemon"] = [daemon_peak(v, url, model, daemon_options, tmp) for v in videos]
        if not args.skip_whole_track:
            print("running the whole-track loop ...", flush=True)
            peaks["whole track held"] = [
                whole_track_peak(v, model, args.device, tmp) for v in videos
            ]
    print(f"model: {args.model} ({model}); daemon batch {args.batch_seconds:g} audio-s")
    print_report(peaks, videos)


if __name__ == "__main__":
    main()
