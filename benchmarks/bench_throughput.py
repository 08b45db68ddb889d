"""Acceptance benchmark for the daemon's throughput, against the old script and against
what the machine can do at all.

A faster-than-before figure alone would not say whether the daemon is good, so four
rates are measured in one invocation on the same files:

  (1) old method   the replaced script, one video at a time (benchmarks/old_method.py)
  (2) daemon       `runner import` + `runner daemon --until-done`, fresh SQLite DB
  (3) model only   the same windows through Embedder + WindowBatcher, no I/O at all
  (4) limit        cores / (decode + model core-seconds per audio-second), each timed
                   alone on one core (ffmpeg -threads 1; torch.set_num_threads(1))

(2)/(4) is the machine efficiency, (2)/(3) the pipeline efficiency.  Users run
millions of videos, so (1) and (2) are steady-state rates: each is also run on a
1-video catalogue (the shortest video) and the rate is taken from the difference,
(audio_N - audio_1) / (wall_N - wall_1), which removes process start, imports and
model load.  Videos are served from 127.0.0.1 by benchmarks/media_server.py with a
first-byte latency and a per-connection bandwidth cap, and carry a filler video track
of --video-kbps so downloads have a realistic size.

    python benchmarks/bench_throughput.py [--videos N] [--model tiny|large|PATH]
        [--latency-ms 100] [--bandwidth-mbs 20] [--device cpu|cuda] [--batch-seconds S]
        [--skip-old] [--video-kbps 1000] [--daemon-arg=--decoders=2 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.media_server import running_server
from runner.decode import SAMPLE_RATE_HZ, decode_all, ffmpeg_command
from runner.embed import (
    WINDOW_SAMPLES,
    Embedder,
    WindowBatcher,
    WindowItem,
    default_batch_seconds,
    resolve_device,
)
from tests import media

HERE = Path(__file__).resolve().parent
CACHE_DIR = Path(tempfile.gettempdir()) / "runner-bench"
MIN_VIDEO_S, MAX_VIDEO_S = 5.0, 120.0
DEFAULT_VIDEOS = {"tiny": 60, "large": 4}
#: audio-seconds of windows that time the model on one thread; None: all of them
DEFAULT_MODEL_SAMPLE_S = {"tiny": None, "large": 120.0}

#: Wav2Vec2 shapes: "tiny" is small enough for the pipeline, not the model, to be
#: what is measured; "large" is the real checkpoint's shape with random weights.
MODEL_PRESETS: dict[str, dict] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "conv_dim": (32,) * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
    },
    "large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "conv_dim": (512,) * 7,
    },
}


# --- inputs ------------------------------------------------------------------------


def build_model(path: Path, preset: str, *, seed: int = 0) -> Path:
    """A random-weight Wav2Vec2ForCTC of a preset shape, saved like a published one."""
    import transformers
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        vocab_size=12,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        **MODEL_PRESETS[preset],
    )
    Wav2Vec2ForCTC(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE_HZ,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    ).save_pretrained(path)
    return path


def resolve_model(name: str) -> Path:
    """A preset is built once into the temp dir and reused; anything else is a path."""
    if name not in MODEL_PRESETS:
        return Path(name)
    path = CACHE_DIR / f"model-{name}"
    if not path.is_dir():
        print(f"building the random-weight {name} model in {path} ...", flush=True)
        partial = CACHE_DIR / f"model-{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        build_model(partial, name).rename(path)
    return path


@dataclass(frozen=True)
class Video:
    name: str
    path: Path
    duration_s: float


def make_video(path: Path, duration_s: float, seed: int, video_kbps: int) -> Path:
    """Like tests.media.make_mp4 (noise audio, so no two videos embed alike), plus a CBR
    filler video track so the file is as big as a real video of that bitrate."""
    if video_kbps <= 0:
        return media.make_mp4(path, duration_s=duration_s, noise_seed=seed)
    rate = f"{video_kbps}k"
    media._run_ffmpeg(
        *media._video_input(duration_s),
        *media._audio_input(duration_s, 440, 44100, seed),
        *("-map", "0:v", "-map", "1:a", *media._FAST_X264),
        *("-b:v", rate, "-minrate", rate, "-maxrate", rate, "-bufsize", rate),
        *("-x264-params", "nal-hrd=cbr:force-cfr=1"),
        *media._layout_args(2),
        *("-c:a", "aac", "-t", str(duration_s), str(path)),
    )
    return path


def make_videos(count: int, video_kbps: int, *, seed: int = 1) -> list[Video]:
    """Mixed lengths, deterministic per (count, kbps, seed) and cached between runs."""
    root = CACHE_DIR / f"media-n{count}-k{video_kbps}-s{seed}"
    index = root / "videos.json"
    if index.is_file():
        return [
            Video(v["name"], root / v["name"], v["duration_s"])
            for v in json.loads(index.read_text())
        ]
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    durations_s = [round(rng.uniform(MIN_VIDEO_S, MAX_VIDEO_S), 1) for _ in range(count)]
    videos = [Video(f"v{i:04d}.mp4", root / f"v{i:04d}.mp4", d) for i, d in enumerate(durations_s)]
    print(f"making {count} videos in {root} ...", flush=True)
    seeds = [seed * 100_000 + i for i in range(count)]
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        made = pool.map(lambda v, s: make_video(v.path, v.duration_s, s, video_kbps), videos, seeds)
        list(made)
    index.write_text(json.dumps([{"name": v.name, "duration_s": v.duration_s} for v in videos]))
    return videos


def write_catalogue(path: Path, videos: Sequence[Video], base_url: str) -> Path:
    records = {v.name.removesuffix(".mp4"): {"url": f"{base_url}/media/{v.name}"} for v in videos}
    path.write_text(json.dumps(records))
    return path


# --- the two sides that run as processes -------------------------------------------


@dataclass(frozen=True)
class SideRun:
    wall_s: float
    cpu_s: float  # the processes and their reaped children (ffmpeg)
    videos: int
    audio_s: float


@dataclass(frozen=True)
class Rate:
    videos_s: float
    audio_s_s: float


@dataclass(frozen=True)
class ChildRun:
    wall_s: float
    cpu_s: float  # its own and its reaped children's (ffmpeg)
    peak_rss_bytes: int  # the largest of it and its reaped children


def run_child(argv: Sequence[str], log_path: Path) -> ChildRun:
    """One child process, reaped with wait4 so the kernel reports what it used."""
    with log_path.open("a") as log:
        start_s = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        wall_s = time.perf_counter() - start_s
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({proc.returncode}):\n{tail}")
    return ChildRun(wall_s, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


def runner_argv() -> list[str]:
    script = Path(sys.executable).with_name("runner")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "runner.cli"]


def daemon_argv(db_path: Path, model: Path, workdir: Path, *options: str) -> list[str]:
    return [
        *runner_argv(),
        *("--db", f"sqlite:///{db_path}", "daemon", "--model", str(model), "--until-done"),
        *("--workdir", str(workdir), *options),
    ]


def run_daemon(
    videos: Sequence[Video], base_url: str, model: Path, args: argparse.Namespace, workdir: Path
) -> SideRun:
    workdir.mkdir(parents=True)
    catalogue = write_catalogue(workdir / "all_videos.json", videos, base_url)
    db_path = workdir / "runner.db"
    importer = [*runner_argv(), "--db", f"sqlite:///{db_path}", "import", str(catalogue)]
    options = ("--device", args.device, "--batch-seconds", str(args.batch_seconds))
    daemon = daemon_argv(db_path, model, workdir / "work", *options, *args.daemon_arg)
    imported = run_child(importer, workdir / "log")
    ran = run_child(daemon, workdir / "log")
    check_all_done(db_path, len(videos))
    audio_s = sum(v.duration_s for v in videos)
    return SideRun(imported.wall_s + ran.wall_s, imported.cpu_s + ran.cpu_s, len(videos), audio_s)


def check_all_done(db_path: Path, expected: int) -> None:
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        counts = dict(conn.execute("SELECT status, count(*) FROM jobs GROUP BY status"))
        errors = [row[0] for row in conn.execute("SELECT error FROM jobs WHERE error IS NOT NULL")]
    if counts != {"done": expected}:
        raise SystemExit(f"daemon left {counts}, errors: {errors[:3]}")


def run_old(
    videos: Sequence[Video], base_url: str, model: Path, args: argparse.Namespace, workdir: Path
) -> tuple[SideRun, float]:
    """The old script's run, and the largest |v| of the vectors it produced."""
    workdir.mkdir(parents=True)
    catalogue = write_catalogue(workdir / "all_videos.json", videos, base_url)
    argv = [
        sys.executable,
        str(HERE / "old_method.py"),
        str(catalogue),
        "--model",
        str(model),
        "--out",
        str(workdir / "out"),
        "--device",
        args.device,
    ]
    ran = run_child(argv, workdir / "log")
    summary = json.loads((workdir / "out" / "summary.json").read_text())
    if summary["videos"] != len(videos):
        raise SystemExit(f"old method failed on {summary['failed']} video(s): see {workdir}")
    audio_s = sum(v.duration_s for v in videos)
    return SideRun(ran.wall_s, ran.cpu_s, len(videos), audio_s), summary["max_abs"]


def steady_rate(single: SideRun, full: SideRun) -> Rate:
    """The 1-video run is start-up plus one video; the difference is pure steady state."""
    wall_s = full.wall_s - single.wall_s
    return Rate((full.videos - single.videos) / wall_s, (full.audio_s - single.audio_s) / wall_s)


def steady_note(single: SideRun, full: SideRun) -> str:
    wall_s, cpu_s = full.wall_s - single.wall_s, full.cpu_s - single.cpu_s
    core_ms = cpu_s / (full.audio_s - single.audio_s) * 1000
    return (
        f"{core_ms:.2f} core-ms per audio-s, {cpu_s / wall_s:.2f} cores busy; "
        f"runs took {single.wall_s:.1f} s (1 video) and {full.wall_s:.1f} s"
    )


# --- the in-process sides: model alone and the machine's limit ---------------------


def predecode(embedder: Embedder, videos: Sequence[Video]) -> list[list[np.ndarray]]:
    """Each video's windows exactly as the daemon embeds them (frameless tails dropped)."""
    tracks = []
    for video in videos:
        windows, _ = decode_all(video.path, WINDOW_SAMPLES)
        tracks.append([w for w in windows if embedder.frames_for(len(w)) > 0])
    return tracks


def push_through(
    embedder: Embedder, tracks: Sequence[Sequence[np.ndarray]], batch_seconds: float
) -> None:
    """Batches picked as the daemon's embed stage picks them when the model is the
    bottleneck: its buffer is full each time it asks for the next batch."""
    batcher = WindowBatcher(embedder, batch_seconds)
    for job_id, windows in enumerate(tracks):
        for window in windows:
            batcher.add(WindowItem(job_id, window))
            if batcher.full:
                embedder.embed([item.samples for item in batcher.next_batch()])
    while batch := batcher.next_batch():
        embedder.embed([item.samples for item in batch])


def warm_up(embedder: Embedder, tracks: Sequence[Sequence[np.ndarray]]) -> None:
    embedder.embed([tracks[0][0]])


def time_model(
    embedder: Embedder, tracks: Sequence[Sequence[np.ndarray]], batch_seconds: float
) -> tuple[float, float]:
    """Wall and CPU seconds of this process for the whole catalogue."""
    warm_up(embedder, tracks)
    wall_start_s, cpu_start_s = time.perf_counter(), time.process_time()
    push_through(embedder, tracks, batch_seconds)
    return time.perf_counter() - wall_start_s, time.process_time() - cpu_start_s


def decode_core_s(videos: Sequence[Video]) -> float:
    """ffmpeg alone, the daemon's exact command, output discarded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for video in videos:
        subprocess.run(
            ffmpeg_command(video.path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


@dataclass(frozen=True)
class Limit:
    audio_s_s: float
    decode_core_s_per_audio_s: float
    #: on one CPU thread, timed on model_sample_audio_s; None when the model is on a GPU
    model_core_s_per_audio_s: float | None
    model_sample_audio_s: float


def sample_tracks(
    tracks: Sequence[Sequence[np.ndarray]], max_audio_s: float | None
) -> tuple[list[list[np.ndarray]], float]:
    """The catalogue's first windows up to max_audio_s (None or 0: all), and their length."""
    limit_samples = max_audio_s * SAMPLE_RATE_HZ if max_audio_s else float("inf")
    picked: list[list[np.ndarray]] = []
    samples = 0
    for windows in tracks:
        picked.append([])
        for window in windows:
            if samples >= limit_samples:
                return picked, samples / SAMPLE_RATE_HZ
            picked[-1].append(window)
            samples += len(window)
    return picked, samples / SAMPLE_RATE_HZ


def model_core_s_per_audio_s(
    embedder: Embedder, tracks: Sequence[Sequence[np.ndarray]], args: argparse.Namespace
) -> tuple[float, float]:
    """The model on one thread; a per-audio-second cost, so a sample of windows will do."""
    sample, sample_audio_s = sample_tracks(tracks, args.model_sample_s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, cpu_s = time_model(embedder, sample, args.batch_seconds)
    finally:
        torch.set_num_threads(threads)
    return cpu_s / sample_audio_s, sample_audio_s


def machine_limit(
    embedder: Embedder,
    videos: Sequence[Video],
    tracks: Sequence[Sequence[np.ndarray]],
    args: argparse.Namespace,
    model_only: Rate,
) -> Limit:
    """On CPU decode and model share the cores; on a GPU the model has its own device,
    so the limit is the slower of the decoders on all cores and the model alone (3)."""
    cores = usable_cores()
    decode_cps = decode_core_s(videos) / sum(v.duration_s for v in videos)
    if embedder.device.type != "cpu":
        return Limit(min(cores / decode_cps, model_only.audio_s_s), decode_cps, None, 0.0)
    model_cps, sample_audio_s = model_core_s_per_audio_s(embedder, tracks, args)
    return Limit(cores / (decode_cps + model_cps), decode_cps, model_cps, sample_audio_s)


# --- report ------------------------------------------------------------------------


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown cpu"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe_machine(args: argparse.Namespace) -> str:
    device = args.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_name(torch.device(device))})"
    return (
        f"machine: {cpu_name()}, {usable_cores()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, device {device}"
    )


def print_table(rows: dict[str, tuple[Rate, str]]) -> None:
    print(f"{'':16} {'videos/s':>9} {'audio-s/s':>10}  notes")
    for label, (rate, note) in rows.items():
        print(f"{label:16} {rate.videos_s:9.2f} {rate.audio_s_s:10.1f}  {note}")


@dataclass
class Results:
    #: (1-video run, full run) for "old" and "daemon"
    runs: dict[str, tuple[SideRun, SideRun]]
    old_max_abs: float | None = None
    model_only: Rate | None = None
    model_only_core_ms: float = 0.0
    limit: Limit | None = None


def measure_processes(
    videos: list[Video], model: Path, args: argparse.Namespace, tmp: Path
) -> Results:
    """(1) and (2), each on a 1-video catalogue and on the full one."""
    single = [min(videos, key=lambda v: v.duration_s)]
    results = Results(runs={})
    with running_server(videos[0].path.parent, args.latency_ms, args.bandwidth_mbs) as url:
        if not args.skip_old:
            print("running the old method ...", flush=True)
            old_single, _ = run_old(single, url, model, args, tmp / "old-1")
            old_full, results.old_max_abs = run_old(videos, url, model, args, tmp / "old-n")
            results.runs["old"] = (old_single, old_full)
        print("running the daemon ...", flush=True)
        results.runs["daemon"] = (
            run_daemon(single, url, model, args, tmp / "daemon-1"),
            run_daemon(videos, url, model, args, tmp / "daemon-n"),
        )
    return results


def measure_in_process(
    videos: list[Video], model: Path, args: argparse.Namespace, results: Results
) -> None:
    """(3) and (4) on the same windows."""
    print("timing the model alone and the machine's limit ...", flush=True)
    embedder = Embedder(str(model), device=args.device)
    tracks = predecode(embedder, videos)
    audio_s = sum(v.duration_s for v in videos)
    wall_s, cpu_s = time_model(embedder, tracks, args.batch_seconds)
    results.model_only = Rate(len(videos) / wall_s, audio_s / wall_s)
    results.model_only_core_ms = cpu_s / audio_s * 1000
    results.limit = machine_limit(embedder, videos, tracks, args, results.model_only)


def print_header(videos: list[Video], args: argparse.Namespace) -> None:
    audio_s = sum(v.duration_s for v in videos)
    size_mb = sum(v.path.stat().st_size for v in videos) / 1e6
    print()
    print(describe_machine(args))
    print(f"model: {args.model} ({args.model_path}), batch {args.batch_seconds:g} audio-s")
    print(
        f"catalogue: {len(videos)} videos, {audio_s:.0f} audio-s ({MIN_VIDEO_S:g}-"
        f"{MAX_VIDEO_S:g} s each), {size_mb:.0f} MB; served with {args.latency_ms:g} ms "
        f"latency, {args.bandwidth_mbs:g} MB/s per connection"
    )


def limit_note(limit: Limit) -> str:
    decode = f"decode {limit.decode_core_s_per_audio_s * 1000:.2f} core-ms per audio-s"
    if limit.model_core_s_per_audio_s is None:
        return f"{decode} on every core, or the model alone on its device"
    return (
        f"{decode} + model {limit.model_core_s_per_audio_s * 1000:.2f} on one thread "
        f"(timed on {limit.model_sample_audio_s:.0f} audio-s)"
    )


def table_rows(results: Results, mean_video_s: float) -> dict[str, tuple[Rate, str]]:
    assert results.model_only is not None and results.limit is not None
    rows: dict[str, tuple[Rate, str]] = {}
    for label, key in (("(1) old method", "old"), ("(2) daemon", "daemon")):
        if key in results.runs:
            rows[label] = (steady_rate(*results.runs[key]), steady_note(*results.runs[key]))
    rows["(3) model only"] = (
        results.model_only,
        f"{results.model_only_core_ms:.2f} core-ms per audio-s, "
        f"{torch.get_num_threads()} torch threads",
    )
    rows["(4) limit"] = (
        Rate(results.limit.audio_s_s / mean_video_s, results.limit.audio_s_s),
        limit_note(results.limit),
    )
    return rows


def print_ratios(rows: dict[str, tuple[Rate, str]], old_max_abs: float | None) -> None:
    daemon = rows["(2) daemon"][0].audio_s_s
    if "(1) old method" in rows:
        print(
            f"(2)/(1) speed-up over the old method: "
            f"{daemon / rows['(1) old method'][0].audio_s_s:.1f}x"
        )
    print(
        f"(2)/(4) machine efficiency:  {daemon / rows['(4) limit'][0].audio_s_s:.2f}"
        "  (target >= 0.7 with the tiny model)"
    )
    print(
        f"(2)/(3) pipeline efficiency: {daemon / rows['(3) model only'][0].audio_s_s:.2f}"
        "  (target >= 0.9 with the large model)"
    )
    if old_max_abs is not None:
        print(
            f"old pooling (PCA, then the mean over the axis PCA centred): max |v| = "
            f"{old_max_abs:.3g} over all videos, zero by construction"
        )


def report(videos: list[Video], results: Results, args: argparse.Namespace) -> None:
    print_header(videos, args)
    rows = table_rows(results, sum(v.duration_s for v in videos) / len(videos))
    print_table(rows)
    print_ratios(rows, results.old_max_abs)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--videos",
        type=int,
        default=None,
        help="catalogue size [default: 60 for tiny, 4 otherwise]",
    )
    parser.add_argument("--model", default="tiny", help="tiny, large or a model path")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--bandwidth-mbs", type=float, default=20.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--batch-seconds", type=float, default=None, help="[default: the daemon's for --device]"
    )
    parser.add_argument("--skip-old", action="store_true")
    parser.add_argument(
        "--model-sample-s",
        type=float,
        default=None,
        help="audio-s of windows that time the model on one thread "
        "[default: all for tiny, 120 otherwise]",
    )
    parser.add_argument(
        "--video-kbps",
        type=int,
        default=1000,
        help="filler video bitrate; 0 for a tiny 64x64 video track",
    )
    parser.add_argument(
        "--daemon-arg",
        action="append",
        default=[],
        help="extra `runner daemon` option, e.g. --daemon-arg=--decoders=2",
    )
    args = parser.parse_args(argv)
    if args.videos is None:
        args.videos = DEFAULT_VIDEOS.get(args.model, 4)
    if args.model_sample_s is None:
        args.model_sample_s = DEFAULT_MODEL_SAMPLE_S.get(args.model, 120.0)
    if args.batch_seconds is None:
        args.batch_seconds = default_batch_seconds(resolve_device(args.device))
    if args.videos < 2:
        parser.error("--videos must be at least 2: one run is the start-up measurement")
    return args


def main() -> None:
    args = parse_args()
    args.model_path = resolve_model(args.model)
    videos = make_videos(args.videos, args.video_kbps)
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        results = measure_processes(videos, args.model_path, args, Path(tmp))
    measure_in_process(videos, args.model_path, args, results)
    report(videos, results, args)


if __name__ == "__main__":
    main()
