"""Acceptance: three daemons, as separate processes, share one PostgreSQL database.

They claim side by side with ``FOR UPDATE SKIP LOCKED``; every job must end done
exactly once (claimed once: one attempt) and no video may be downloaded twice (one
hit per path on the media server).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from sqlalchemy import text

from runner.db import make_engine
from tests.argv import daemon_args, runner_process
from tests.conftest import Cli, MediaServer, write_catalogue

N_JOBS = 50
N_DAEMONS = 3
#: short clips: the test is about claiming, not about decoding
SHORT = ["voice.m4a", "song.mp3", "mono48k.mp4", "voice.opus", "clip.webm"]


def scale_corpus(server: MediaServer) -> dict[str, dict[str, str]]:
    """One path per key (a symlink to a short clip), so a second download of any
    key shows as a second hit on its path."""
    records = {}
    for i in range(N_JOBS):
        clip = SHORT[i % len(SHORT)]
        name = f"scale-{i:02d}{Path(clip).suffix}"
        link = server.root / name
        if not link.exists():
            link.symlink_to(server.root / clip)
        records[f"s{i:02d}"] = {"url": server.url(f"media/{name}")}
    return records


def start_daemon(db_url: str, model: Path, home: Path) -> subprocess.Popen:
    home.mkdir()
    argv = [
        *runner_process(db_url),
        *daemon_args(model, home / "work", "--until-done"),
        # a small window per daemon, so the 50 jobs are spread over all three
        "--downloads",
        "1",
        "--decoders",
        "1",
        "--prefetch-files",
        "1",
        "--batch-seconds",
        "30",
    ]
    with (home / "daemon.log").open("w") as log:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)


def test_three_daemons_one_database_each_job_done_once(
    pg_url: str, tmp_path: Path, tiny_model: Path, server: MediaServer
) -> None:
    records = scale_corpus(server)
    Cli(pg_url)("import", str(write_catalogue(tmp_path / "all_videos.json", records)))
    homes = [tmp_path / f"daemon{i}" for i in range(N_DAEMONS)]
    daemons = [start_daemon(pg_url, tiny_model, home) for home in homes]
    for daemon, home in zip(daemons, homes, strict=True):
        daemon.wait(240)
        log = (home / "daemon.log").read_text()
        assert daemon.returncode == 0, log[-3000:]
        assert "no longer ours" not in log, log[-3000:]

    engine = make_engine(pg_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT key, status, attempts, worker_id FROM jobs")).all()
    engine.dispose()
    assert sorted(r.key for r in rows) == sorted(records)
    assert {r.key: (r.status, r.attempts) for r in rows} == {k: ("done", 1) for k in records}
    paths = {"/" + record["url"].split("/", 3)[3] for record in records.values()}
    assert {path: server.hits[path] for path in paths} == {path: 1 for path in paths}
    # the work really was shared: more than one daemon claimed jobs
    workers = {r.worker_id for r in rows}
    assert len(workers) >= 2, workers
