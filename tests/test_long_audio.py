"""A 2-hour file must cost the daemon about what a 10-second file costs in memory.

Held whole, 2 hours of 16 kHz float32 is 460 MB; a catalogue has hour-long videos,
and a daemon that holds tracks whole would be killed on a small machine.  So the real
daemon process runs on one 2-hour file and on one 10-second file (same codec, same
model), and their peak RSS, as the kernel reports it to `wait4`, is compared.  The
difference also holds what one full batch of windows costs the model (about 100 MB
for this model at the default 120 audio-s), which a 10-second file never fills;
benchmarks/bench_memory.py separates the two with a 4-minute file.
"""

from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest

from tests import media
from tests.argv import daemon_args, runner_process
from tests.conftest import TINY_HIDDEN, Cli, MediaServer, write_catalogue

LONG_S = 7200.0
SHORT_S = 10.0
MAX_EXTRA_RSS_BYTES = 300 * 10**6
DAEMON_TIMEOUT_S = 200.0


@pytest.fixture(scope="module")
def sine_urls(server: MediaServer) -> dict[float, str]:
    """8 kHz mono FLAC: 2 hours encode in about 2 s."""
    urls = {}
    for duration_s in (LONG_S, SHORT_S):
        name = f"sine-{duration_s:.0f}s.flac"
        media.make_long_sine(server.root / name, duration_s=duration_s)
        urls[duration_s] = server.url(f"media/{name}")
    return urls


def wait_rusage(proc: subprocess.Popen, timeout_s: float) -> resource.struct_rusage:
    """Reaps the child with wait4, which reports its peak RSS (and its ffmpeg's)."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage
        if time.monotonic() > deadline_s:
            proc.kill()
            proc.wait()
            pytest.fail(f"daemon still running after {timeout_s:.0f} s")
        time.sleep(0.05)


def run_daemon(tmp_path: Path, model: Path, url: str, name: str) -> int:
    """One job through `runner daemon --until-done` in its own process; its peak RSS."""
    db_url = f"sqlite:///{tmp_path / name}.db"
    Cli(db_url)("import", str(write_catalogue(tmp_path / f"{name}.json", {name: {"url": url}})))
    argv = [
        *runner_process(db_url),
        *daemon_args(model, tmp_path / f"work-{name}", "--until-done"),
    ]
    log_path = tmp_path / f"{name}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    usage = wait_rusage(proc, DAEMON_TIMEOUT_S)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    return usage.ru_maxrss * 1024  # Linux reports kilobytes


def stored_job(tmp_path: Path, name: str) -> tuple[str, float, int]:
    with closing(sqlite3.connect(tmp_path / f"{name}.db")) as conn:
        row = conn.execute(
            "SELECT status, video_duration_s, vector_dim, error FROM jobs"
        ).fetchone()
    assert row[0] == "done", row
    return row[0], row[1], row[2]


@pytest.mark.slow
def test_two_hour_file_costs_little_more_memory_than_ten_seconds(
    tmp_path: Path, tiny_model: Path, sine_urls: dict[float, str]
) -> None:
    short_rss_bytes = run_daemon(tmp_path, tiny_model, sine_urls[SHORT_S], "short")
    long_rss_bytes = run_daemon(tmp_path, tiny_model, sine_urls[LONG_S], "long")

    _, short_duration_s, _ = stored_job(tmp_path, "short")
    _, long_duration_s, vector_dim = stored_job(tmp_path, "long")
    assert short_duration_s == pytest.approx(SHORT_S, abs=0.5)
    assert long_duration_s == pytest.approx(LONG_S, abs=1.0)
    assert vector_dim == TINY_HIDDEN
    extra_mb = (long_rss_bytes - short_rss_bytes) / 1e6
    assert long_rss_bytes - short_rss_bytes < MAX_EXTRA_RSS_BYTES, (
        f"peak RSS {long_rss_bytes / 1e6:.0f} MB for 2 h vs {short_rss_bytes / 1e6:.0f} MB "
        f"for 10 s: {extra_mb:.0f} MB more"
    )
