"""Two daemons on one SQLite file, with `runner import` and `runner export` running
beside them (issue 5, proof 2): no key is downloaded twice (the server counts
requests per path), nobody is told "database is locked", and everything ends done."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from benchmarks.soak import runner_argv
from tests.hitserver import killed_at_exit, make_corpus, serving
from tests.test_crash import start_daemon, wait_for

VIDEOS = 24
FIRST = 12  # imported before the daemons start; the rest is imported while they run


def catalogue(path: Path, urls: dict[str, str]) -> Path:
    path.write_text(json.dumps({key: {"url": url} for key, url in urls.items()}))
    return path


def query(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db, timeout=60) as conn:
        return conn.execute(sql).fetchall()


def workers_seen(db: Path) -> set[str]:
    """Worker ids holding or having finished jobs (a done row keeps its worker id)."""
    return {w for (w,) in query(db, "SELECT DISTINCT worker_id FROM jobs") if w}


def run_cli(db: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(runner_argv(db, *args), capture_output=True, text=True, timeout=120)


def test_two_daemons_import_and_export_share_one_sqlite_file(
    tmp_path: Path, tiny_model: Path
) -> None:
    files = make_corpus(tmp_path / "media", VIDEOS)
    db = tmp_path / "shared.db"
    with serving(files) as server:
        server.pause_s = 0.2  # downloads overlap, so both daemons hold work at once
        urls = {f"k{i:03d}": server.url(name) for i, name in enumerate(sorted(files))}
        first = dict(list(urls.items())[:FIRST])
        done = run_cli(db, "import", str(catalogue(tmp_path / "first.json", first)))
        assert done.returncode == 0, done.stderr

        # Downloads stall until both daemons hold jobs: whichever starts first claims
        # its capacity (2 downloads + 2 prefetch + 2 x 1 decoder = 6 of the 12), and
        # cannot finish the rest before the other is up, however slow its start.
        server.hold = True
        daemons = [
            start_daemon(f"sqlite:///{db}", tiny_model, tmp_path / f"work{i}", "--prefetch-files=2")
            for i in range(2)
        ]
        with killed_at_exit(*daemons):
            wait_for(
                lambda: sum(any(f":{d.pid}:" in w for w in workers_seen(db)) for d in daemons) == 2
            )
            server.hold = False  # both are working: now the import and the exports join in
            side = [run_cli(db, "import", str(catalogue(tmp_path / "all.json", urls)))]
            deadline = time.monotonic() + 120
            while query(db, "SELECT count(*) FROM jobs WHERE status = 'done'")[0][0] < VIDEOS:
                assert time.monotonic() < deadline, "timed out waiting for the daemons"
                side.append(run_cli(db, "export", "--out", str(tmp_path / f"out{len(side)}")))
                assert all(d.poll() is None for d in daemons), "a daemon died"
                time.sleep(0.1)
            side.append(run_cli(db, "export", "--out", str(tmp_path / "final")))
            for daemon in daemons:
                daemon.send_signal(signal.SIGTERM)
            for daemon in daemons:
                daemon.wait(60)

    log_text = (tmp_path / "daemon.log").read_text()  # both daemons append to it
    assert [d.returncode for d in daemons] == [0, 0], log_text[-3000:]
    assert len(side) >= 3  # the import and at least one export ran while they worked
    for proc in side:
        assert proc.returncode == 0, proc.stderr
        assert "locked" not in proc.stderr.lower(), proc.stderr
    assert "locked" not in log_text.lower()
    assert "no longer ours" not in log_text  # no job was taken from a live daemon
    assert "Traceback" not in log_text

    assert query(db, "SELECT status, count(*) FROM jobs GROUP BY status") == [("done", VIDEOS)]
    hits = {name: server.hits_of(name) for name in files}
    assert set(hits.values()) == {1}, {name: n for name, n in hits.items() if n != 1}
    by_worker = query(db, "SELECT worker_id, count(*) FROM jobs GROUP BY worker_id")
    assert len(by_worker) == 2, by_worker  # both daemons did part of the work
    assert len(json.loads((tmp_path / "final" / "audio_vectors.json").read_text())) == VIDEOS
