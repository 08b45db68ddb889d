"""Import benchmark: `runner import` of a large catalogue against a naive baseline.

    python benchmarks/bench_import.py [--records 1000000]

Generates a catalogue (url plus a little metadata per record, ~110 bytes each),
then times, each in its own process so peak RSS is its own:
  baseline  json.load of the whole file + one sqlite3 executemany
  import    `runner import` into a fresh database
  reimport  `runner import` of the same file again (all unchanged)
and prints wall seconds, peak RSS, and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = """
import json, sqlite3, sys
records = json.load(open(sys.argv[1]))
conn = sqlite3.connect(sys.argv[2])
conn.execute("CREATE TABLE jobs (key TEXT PRIMARY KEY, url TEXT, meta TEXT)")
conn.executemany("INSERT INTO jobs VALUES (?, ?, ?)",
                 ((k, v.get("url"), json.dumps(v)) for k, v in records.items()))
conn.commit()
"""


def write_catalogue(path: Path, records: int) -> None:
    rng = random.Random(1)
    with path.open("w") as out:
        out.write("{")
        for i in range(records):
            sep = "," if i else ""
            record = {
                "url": f"https://cdn.example.com/videos/{i:08d}.mp4",
                "title": f"video {i}",
                "duration": rng.randint(5, 7200),
            }
            out.write(f'{sep}\n"vid{i:08d}": {json.dumps(record)}')
        out.write("\n}\n")


def measure(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MB and stdout of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} failed")
    return wall, usage.ru_maxrss / 1024, stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        catalogue = root / "all_videos.json"
        write_catalogue(catalogue, args.records)
        size_mb = catalogue.stat().st_size / 1e6
        runner = [
            sys.executable,
            "-m",
            "runner.cli",
            "--db",
            f"sqlite:///{root / 'r.db'}",
            "import",
            str(catalogue),
        ]
        rows = [
            (
                "baseline (json.load + sqlite3)",
                *measure([sys.executable, "-c", BASELINE, str(catalogue), str(root / "b.db")]),
            ),
            ("runner import", *measure(runner)),
            ("runner import (again)", *measure(runner)),
        ]
    base_wall = rows[0][1]
    print(f"catalogue: {args.records:,} records, {size_mb:.0f} MB")
    print(f"{'run':<32}{'wall s':>9}{'peak RSS MB':>13}{'wall/base':>11}  output")
    for name, wall, rss, out in rows:
        print(f"{name:<32}{wall:>9.1f}{rss:>13.0f}{wall / base_wall:>11.2f}  {out}")


if __name__ == "__main__":
    main()
