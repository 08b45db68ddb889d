"""Graceful shutdown and the disk (issue 5, proof 5).

SIGTERM: the daemon stops claiming, lets what it holds finish within --grace-s and
exits 0; a second signal, or the end of the grace period, releases the rest at
once.  Temp files: at most one per download slot, one per prefetch slot and one per
decoder exist at any moment, and none outlives its job, whether the job ends done,
failed or released at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from runner.catalogue import CatalogueFormat, import_catalogue
from runner.config import DaemonConfig
from runner.daemon import Daemon
from runner.db import connect
from runner.download import DownloadLimits
from runner.embed import Embedder
from runner.retry import RetryPolicy
from tests.conftest import MediaServer, write_catalogue
from tests.hitserver import HitServer, killed_at_exit, make_corpus, serving
from tests.test_crash import start_daemon, wait_for
from tests.test_hostile import HostileServer


def states(db: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(db, timeout=60) as conn:
        return {k: (s, a) for k, s, a in conn.execute("SELECT key, status, attempts FROM jobs")}


def running_keys(db: Path) -> set[str]:
    return {key for key, (status, _) in states(db).items() if status == "running"}


def temp_files(workdir: Path) -> list[Path]:
    return [p for p in workdir.rglob("*") if p.is_file() and p.name != ".lock"]


def import_corpus(tmp_path: Path, server: HitServer) -> Path:
    db = tmp_path / "runner.db"
    urls = {f"k{i}": {"url": server.url(name)} for i, name in enumerate(sorted(server.files))}
    engine = connect(f"sqlite:///{db}")
    import_catalogue(engine, write_catalogue(tmp_path / "all.json", urls), CatalogueFormat())
    engine.dispose()
    return db


# --- signals, on the daemon as a process -------------------------------------------

#: capacity = downloads + prefetch files + 2 x decoders: the daemon claims 4 at a time
SMALL = ("--downloads=1", "--prefetch-files=1", "--decoders=1")


def test_sigterm_lets_in_flight_jobs_finish_within_grace(tmp_path: Path, tiny_model: Path) -> None:
    with serving(make_corpus(tmp_path / "media", 8)) as server:
        server.pause_s = 0.8  # each download stalls half-way for this long
        db = import_corpus(tmp_path, server)
        daemon = start_daemon(f"sqlite:///{db}", tiny_model, tmp_path / "work", *SMALL)
        with killed_at_exit(daemon):
            wait_for(lambda: sum(server.hits.values()) >= 1)  # mid-download
            held = running_keys(db)
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    assert daemon.returncode == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    after = states(db)
    assert 1 <= len(held) <= 4
    assert {k for k, (s, _) in after.items() if s == "done"} == held  # finished, not dropped
    assert {s for k, (s, _) in after.items() if k not in held} == {"pending"}  # not claimed
    assert not temp_files(tmp_path / "work")
    assert "finishing" in (tmp_path / "daemon.log").read_text()


def test_second_signal_releases_everything_at_once(tmp_path: Path, tiny_model: Path) -> None:
    with serving(make_corpus(tmp_path / "media", 8)) as server:
        server.pause_s = 120  # a download that would hold the grace period up
        db = import_corpus(tmp_path, server)
        workdir = tmp_path / "work"
        daemon = start_daemon(f"sqlite:///{db}", tiny_model, workdir, *SMALL, "--grace-s=300")
        with killed_at_exit(daemon):
            wait_for(lambda: any(p.stat().st_size > 0 for p in temp_files(workdir)))
            daemon.send_signal(signal.SIGTERM)
            wait_for(lambda: "finishing" in (tmp_path / "daemon.log").read_text())
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)  # not the 300 s grace, nor the 120 s stall
    assert daemon.returncode == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    # released, and the interrupted attempts are not held against the videos
    assert set(states(db).values()) == {("pending", 0)}
    assert not list(workdir.iterdir()), "temp files or the daemon's directory left behind"


# --- in-process (the session's tiny embedder): the grace period, the disk ---------


def run_in_process(
    db: Path,
    config: DaemonConfig,
    embedder: Embedder,
    *,
    until: Callable[[], bool],
    then: Callable[[Daemon], None] = lambda daemon: None,
) -> Daemon:
    """Run a daemon until `until()` holds, call `then(daemon)` while it still runs,
    then stop it as SIGTERM would (its own handler, a real signal)."""
    engine = connect(f"sqlite:///{db}")
    daemon = Daemon(engine, config, embedder=embedder)

    async def main() -> None:
        task = asyncio.create_task(daemon.run())
        while not until():
            assert not task.done(), task.result()
            await asyncio.sleep(0.05)
        then(daemon)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 60)

    try:
        asyncio.run(main())
    finally:
        engine.dispose()
    return daemon


def test_grace_period_ends_with_the_rest_released(
    tmp_path: Path, tiny_model: Path, embedder: Embedder
) -> None:
    workdir = tmp_path / "work"
    with serving(make_corpus(tmp_path / "media", 6)) as server:
        server.pause_s = 120  # stalled downloads outlast the grace period
        db = import_corpus(tmp_path, server)
        config = DaemonConfig(
            model_id=str(tiny_model),
            workdir=workdir,
            device="cpu",
            downloads=2,
            decoders=1,
            grace_s=0.5,
        )
        daemon = run_in_process(
            db, config, embedder, until=lambda: any(temp_files(workdir)) and bool(server.hits)
        )
    assert daemon.lifecycle.draining  # it was a graceful stop, cut short by the grace period
    assert set(states(db).values()) == {("pending", 0)}
    assert not list(workdir.iterdir())


def test_temp_files_are_bounded_by_the_prefetch_budget(
    tmp_path: Path, tiny_model: Path, embedder: Embedder
) -> None:
    """Downloads are instant and decoding is the bottleneck, so files pile up to the
    bound: one per download slot (a finished file waits there for a prefetch slot),
    one per prefetch slot, one per decoder."""
    downloads, prefetch_files, decoders = 4, 2, 1
    bound = downloads + prefetch_files + decoders
    workdir = tmp_path / "work"
    peak = [0]
    stop_watching = threading.Event()

    def watch() -> None:
        while not stop_watching.is_set():
            with contextlib.suppress(OSError):  # a file or directory went while listed
                peak[0] = max(peak[0], len(temp_files(workdir)))

    with serving(make_corpus(tmp_path / "media", 30)) as server:
        db = import_corpus(tmp_path, server)
        config = DaemonConfig(
            model_id=str(tiny_model),
            workdir=workdir,
            device="cpu",
            downloads=downloads,
            prefetch_files=prefetch_files,
            decoders=decoders,
            batch_seconds=8,
        )
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            run_in_process(
                db,
                config,
                embedder,
                until=lambda: {s for s, _ in states(db).values()} == {"done"},
            )
        finally:
            stop_watching.set()
            watcher.join(10)
    assert 1 <= peak[0] <= bound, peak
    assert not list(workdir.iterdir())


def test_temp_files_are_removed_after_failures_and_on_shutdown(
    tmp_path: Path,
    tiny_model: Path,
    embedder: Embedder,
    server: MediaServer,
    media_dir: Path,
) -> None:
    """Every way a job can end with its file on disk: decode failure, byte cap, cut
    body (retried, then given up), done.  Once all have ended, and while the daemon
    still runs, its directory holds nothing but its lock; after the stop, not even
    that."""
    workdir = tmp_path / "work"
    with HostileServer(media_dir).running() as hostile:
        urls = {
            "undecodable": server.url("media/random.bin"),
            "empty": server.url("media/empty.mp4"),
            "no-audio": server.url("media/silent-video.mp4"),
            "missing": server.url("status/404"),
            "endless": hostile.url("/endless.mp4"),
            "cut": hostile.url("/cut.mp4"),
            "good": server.url("media/stereo.mp4"),
        }
        db = tmp_path / "runner.db"
        engine = connect(f"sqlite:///{db}")
        records = {key: {"url": url} for key, url in urls.items()}
        import_catalogue(engine, write_catalogue(tmp_path / "all.json", records), CatalogueFormat())
        engine.dispose()
        config = DaemonConfig(
            model_id=str(tiny_model),
            workdir=workdir,
            device="cpu",
            downloads=2,
            decoders=1,
            batch_seconds=8,
            limits=DownloadLimits(max_bytes=500_000),
            retry=RetryPolicy(max_attempts=2, base_delay_s=0.05, max_delay_s=0.2),
        )
        left_while_running: list[Path] = []
        run_in_process(
            db,
            config,
            embedder,
            until=lambda: (
                "pending" not in {s for s, _ in states(db).values()} and not running_keys(db)
            ),
            then=lambda daemon: left_while_running.extend(temp_files(workdir)),
        )
    final = states(db)
    assert final["good"][0] == "done"
    assert {k for k, (s, _) in final.items() if s == "failed"} == set(urls) - {"good"}
    assert left_while_running == []
    assert not list(workdir.iterdir())
