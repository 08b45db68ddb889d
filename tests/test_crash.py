"""The daemon as a real process: SIGKILL loses nothing, SIGTERM stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np

from tests.argv import daemon_args, runner_process
from tests.conftest import Cli, MediaServer, write_catalogue

MIX = ["long.mp4", "stereo.mp4", "song.mp3", "clip.webm", "surround.mp4", "voice.m4a"]


def corpus(server: MediaServer, n: int) -> dict:
    """`n` keys over a few clips, each key at its own URL (the query differs), so each
    is fetched on its own: keys of one URL would share a single fetch."""
    return {
        f"v{i:03d}": {"url": server.url(f"media/{MIX[i % len(MIX)]}?key=v{i:03d}")}
        for i in range(n)
    }


def start_daemon(db_url: str, model: Path, workdir: Path, *extra: str) -> subprocess.Popen:
    """The daemon in its own process; its log goes to workdir/../daemon.log."""
    argv = [
        *runner_process(db_url),
        *daemon_args(model, workdir),
        "--downloads",
        "2",
        "--decoders",
        "1",
        "--batch-seconds",
        "30",
        *extra,
    ]
    with (workdir.parent / "daemon.log").open("a") as log:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)


def finish(daemon: subprocess.Popen, workdir: Path, timeout_s: float = 300) -> None:
    daemon.wait(timeout_s)
    assert daemon.returncode == 0, (workdir.parent / "daemon.log").read_text()[-3000:]


def counts(db_url: str) -> dict[str, int]:
    with sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=30) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())


def wait_for(predicate, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def exported(cli: Cli, out: Path) -> tuple[dict, dict, dict]:
    cli("export", "--out", str(out))
    return tuple(
        json.loads((out / name).read_text())
        for name in ("audio_vectors.json", "audio_process.json", "audio_fail.json")  # type: ignore[return-value]
    )


def test_sigkill_midway_then_restart_loses_nothing(
    tmp_path: Path, tiny_model: Path, server: MediaServer
) -> None:
    records = corpus(server, 18)
    catalogue = write_catalogue(tmp_path / "all_videos.json", records)

    reference = Cli(f"sqlite:///{tmp_path / 'reference.db'}")
    reference("import", str(catalogue))
    reference(
        *daemon_args(tiny_model, tmp_path / "work-ref", "--until-done"),
        "--batch-seconds",
        "30",
    )
    ref_vectors, ref_process, ref_fail = exported(reference, tmp_path / "ref")

    db_url = f"sqlite:///{tmp_path / 'crash.db'}"
    cli = Cli(db_url)
    cli("import", str(catalogue))
    workdir = tmp_path / "work"
    daemon = start_daemon(db_url, tiny_model, workdir)
    wait_for(lambda: counts(db_url).get("done", 0) >= 3)
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(30)
    at_kill = counts(db_url)
    assert at_kill.get("done", 0) < len(records), "the kill came too late to test anything"
    assert at_kill.get("running", 0) > 0, at_kill  # the dead daemon stranded work

    finish(start_daemon(db_url, tiny_model, workdir, "--until-done"), workdir)
    assert counts(db_url) == {"done": len(records)}

    vectors, process, fail = exported(cli, tmp_path / "out")
    assert fail == ref_fail == {}
    assert vectors.keys() == ref_vectors.keys() == records.keys()
    for key in records:
        np.testing.assert_allclose(vectors[key][0], ref_vectors[key][0], rtol=1e-4, atol=1e-5)
        assert process[key]["video_duration"] == ref_process[key]["video_duration"]
        assert process[key]["channels_count"] == ref_process[key]["channels_count"]
    assert not [p for p in workdir.rglob("*") if p.is_file() and p.name != ".lock"]


def test_sigterm_releases_in_flight_jobs_and_exits_zero(
    tmp_path: Path, tiny_model: Path, server: MediaServer
) -> None:
    db_url = f"sqlite:///{tmp_path / 'term.db'}"
    cli = Cli(db_url)
    records = corpus(server, 30)
    cli("import", str(write_catalogue(tmp_path / "all_videos.json", records)))
    workdir = tmp_path / "work"
    daemon = start_daemon(db_url, tiny_model, workdir)
    wait_for(lambda: counts(db_url).get("done", 0) >= 1 and counts(db_url).get("running", 0) > 0)
    daemon.send_signal(signal.SIGTERM)
    finish(daemon, workdir, timeout_s=60)
    after = counts(db_url)
    assert after.get("running", 0) == 0, after
    assert after.get("pending", 0) > 0 and sum(after.values()) == len(records)
    assert not list(workdir.iterdir()), "the daemon left its temp dir behind"
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
        # a released job's interrupted attempt is not held against it
        held = conn.execute("SELECT count(*) FROM jobs WHERE status='pending' AND attempts > 0")
        assert held.fetchone()[0] == 0
