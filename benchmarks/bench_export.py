"""Export benchmark: `runner.export.export` against a plain json.dump of the same data.

    python benchmarks/bench_export.py [--rows 20000] [--dim 1024]

Builds a SQLite database of `rows` done jobs with random float32 vectors (inserted
directly in bulk: the point is the export, not the pipeline), then, in this one
process:
  baseline  json.dump of {key: [[floats]]} (the vectors as Python float lists, the
            old script's shape) to a file; building the dict is not timed
            (json.dumps + one write of the same dict is shown beside it)
  json      export(fmt="json"): audio_vectors.json, audio_process.json,
            audio_fail.json, each fsynced and renamed into place
  parquet   export(fmt="parquet"): vectors.parquet, failed.parquet
  npz       export(fmt="npz"): vectors.npz, process.json, fail.json
and prints wall seconds, the ratio to the baseline, the vector file's bytes per
number, and whether audio_vectors.json reads back (json.load, then np.float32) as
the stored float32 bit for bit.  Figures only: nothing here is enforced.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, insert

from runner.db import connect
from runner.export import export
from runner.models import jobs

INSERT_BATCH = 2_000
FINISHED_AT = 1_767_225_600.0  # 2026-01-01


def build(engine: Engine, vectors: np.ndarray) -> list[str]:
    """Done rows straight into the jobs table, as the daemon would leave them."""
    keys = [f"vid{i:08d}" for i in range(vectors.shape[0])]
    rows = [
        {
            "key": key,
            "url": f"https://cdn.example.com/videos/{key}.mp4",
            "status": "done",
            "attempts": 1,
            "created_at": FINISHED_AT - 3600,
            "finished_at": FINISHED_AT + i,
            "vector": vectors[i].astype("<f4").tobytes(),
            "vector_dim": vectors.shape[1],
            "video_duration_s": 60.0 + i % 600,
            "channels_count": 2,
            "processing_audio_time_s": 0.25,
            "model_id": "bench",
        }
        for i, key in enumerate(keys)
    ]
    with engine.begin() as conn:
        for start in range(0, len(rows), INSERT_BATCH):
            conn.execute(insert(jobs), rows[start : start + INSERT_BATCH])
    return keys


def dump(data: dict[str, list[list[float]]], path: Path) -> None:
    with path.open("w") as out:
        json.dump(data, out)


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    numbers = args.rows * args.dim
    vectors = np.random.default_rng(1).standard_normal((args.rows, args.dim)).astype(np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        engine = connect(f"sqlite:///{root / 'bench.db'}")
        keys = build(engine, vectors)

        as_lists = {key: [vectors[i].tolist()] for i, key in enumerate(keys)}
        baseline_file = root / "baseline.json"

        base_s = timed(lambda: dump(as_lists, baseline_file))
        base_bytes = baseline_file.stat().st_size
        # json.dumps then one write: faster than json.dump's many small writes
        dumps_s = timed(lambda: baseline_file.write_text(json.dumps(as_lists)))
        as_lists.clear()
        baseline_file.unlink()

        runs: list[tuple[str, float, Path]] = []
        for fmt, main_file in (
            ("json", "audio_vectors.json"),
            ("parquet", "vectors.parquet"),
            ("npz", "vectors.npz"),
        ):
            out = root / fmt
            wall = timed(lambda fmt=fmt, out=out: export(engine, out, fmt=fmt))
            runs.append((fmt, wall, out / main_file))

        with (root / "json" / "audio_vectors.json").open() as source:
            loaded = json.load(source)
        back = np.array([loaded[key][0] for key in keys], dtype=np.float64).astype(np.float32)
        exact = back.shape == vectors.shape and bool(
            np.array_equal(back.view(np.uint32), vectors.view(np.uint32))
        )
        del loaded, back
        engine.dispose()

        print(f"data: {args.rows:,} vectors x {args.dim} float32 ({numbers * 4 / 1e6:.0f} MB)")
        print(f"{'run':<30}{'wall s':>9}{'wall/base':>11}{'MB':>9}{'bytes/number':>14}")
        print(
            f"{'baseline json.dump (floats)':<30}{base_s:>9.2f}{1:>11.2f}"
            f"{base_bytes / 1e6:>9.0f}{base_bytes / numbers:>14.2f}"
        )
        print(
            f"{'json.dumps + write (floats)':<30}{dumps_s:>9.2f}{dumps_s / base_s:>11.2f}"
            f"{base_bytes / 1e6:>9.0f}{base_bytes / numbers:>14.2f}"
        )
        for fmt, wall, path in runs:
            size = path.stat().st_size
            print(
                f"{'export --format ' + fmt:<30}{wall:>9.2f}{wall / base_s:>11.2f}"
                f"{size / 1e6:>9.0f}{size / numbers:>14.2f}"
            )
        json_s = runs[0][1]
        json_size = runs[0][2].stat().st_size
        parquet_s, parquet_size = runs[1][1], runs[1][2].stat().st_size
        print(f"json export / json.dump: {json_s / base_s:.3f} (goal <= 0.25)")
        print(f"json export / json.dumps + write: {json_s / dumps_s:.3f}")
        print(f"json bytes per number: {json_size / numbers:.2f} (goal <= 12)")
        print(f"json reads back bit-exact as float32: {'yes' if exact else 'NO'}")
        print(
            f"parquet: {parquet_s:.2f} s ({parquet_s / base_s:.3f} of json.dump), "
            f"{parquet_size / 1e6:.0f} MB, {parquet_size / numbers:.2f} bytes per number"
        )


if __name__ == "__main__":
    main()
