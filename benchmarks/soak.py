"""Kill -9 soak: SIGKILL the daemon at random moments, then let it finish, and count
what was lost or done twice.

Each cycle starts `runner daemon --until-done` as a process and kills it with
SIGKILL, usually a random moment after it claimed its first jobs (downloads stall
half-way through the body, so kills land mid-download, mid-decode, mid-embed and
mid-store), sometimes a random moment after it started (while it loads).  A final
daemon then runs to the end.  The kills leave jobs 'running' under a dead worker's
id; the lease is long (--lease-s 600), so only the reaper's dead-pid check can give
them back, and the soak checks at each restart that it did.  --max-attempts is high
because every kill costs each job being worked on a try (the downloads stall on
purpose, so the same jobs are in progress at many kills), and the soak is about
kills, not about giving up.

Counted: duplicates (a key done, then stored or downloaded again), jobs lost (not
done at the end), and the vectors against an uninterrupted in-process run.

    python benchmarks/soak.py --cycles 10 --videos 30 [--seed 0] [--max-attempts 1000]

tests/test_soak.py runs the same scenario (`run_soak`) and asserts on its report.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from tests.argv import daemon_args, runner_process
from tests.hitserver import HitServer, killed_at_exit, make_corpus, serving

LEASE_S = 600
MAX_ATTEMPTS = 1000
#: after its first claim, the daemon lives this long at most before the kill
KILL_AFTER_CLAIM_S = (0.0, 0.6)
#: a fraction of the kills come at a random moment after start instead
EARLY_KILL_SHARE = 0.2
EARLY_KILL_S = (0.0, 3.0)
PAUSE_MID_BODY_S = 0.3


@dataclass
class SoakReport:
    cycles: int = 0
    jobs: int = 0
    #: cycles whose kill left jobs 'running' under the dead daemon's id
    kills_with_work: int = 0
    #: jobs left 'running' by kills, summed over cycles
    stranded: int = 0
    #: restarts that found stranded jobs and had returned them all before claiming
    dead_pid_reaps: int = 0
    #: restarts that claimed while a dead daemon's job was still 'running'
    reaps_missed: int = 0
    duplicates: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    #: extra requests (a download cut by a kill, repeated): expected, not duplicates
    redownloads: int = 0
    leftover_temp_files: list[str] = field(default_factory=list)
    final_counts: dict[str, int] = field(default_factory=dict)
    max_abs_diff: float = 0.0
    vectors_match: bool = False
    final_exit: int | None = None
    wall_s: float = 0.0

    def lines(self) -> list[str]:
        return [
            f"cycles (SIGKILL)          {self.cycles}",
            f"jobs                      {self.jobs}",
            f"kills that stranded work  {self.kills_with_work} ({self.stranded} jobs)",
            f"dead-pid reaps at restart {self.dead_pid_reaps} (missed {self.reaps_missed})",
            f"duplicates found          {len(self.duplicates)}",
            f"jobs lost                 {len(self.lost)}",
            f"re-downloads after kills  {self.redownloads}",
            f"temp files left           {len(self.leftover_temp_files)}",
            f"final states              {self.final_counts}",
            f"vectors vs uninterrupted  max |diff| {self.max_abs_diff:.2e}"
            f" ({'match' if self.vectors_match else 'DIFFER'})",
            f"wall time                 {self.wall_s:.0f} s",
        ]


# --- the database, read with plain sqlite3 beside the daemon ------------------------


def _query(db_path: Path, sql: str, *params: object) -> list[tuple]:
    with sqlite3.connect(db_path, timeout=60) as conn:
        return conn.execute(sql, params).fetchall()


def _done(db_path: Path) -> dict[str, tuple[float, bytes]]:
    rows = _query(db_path, "SELECT key, finished_at, vector FROM jobs WHERE status = 'done'")
    return {key: (finished_at, vector) for key, finished_at, vector in rows}


def _running_workers(db_path: Path) -> list[str]:
    return [w for (w,) in _query(db_path, "SELECT worker_id FROM jobs WHERE status = 'running'")]


def _counts(db_path: Path) -> dict[str, int]:
    return dict(_query(db_path, "SELECT status, count(*) FROM jobs GROUP BY status"))


# --- the daemon as a process -------------------------------------------------------


def runner_argv(db_path: Path, *args: str) -> list[str]:
    return runner_process(f"sqlite:///{db_path}", *args)


def _start_daemon(
    db_path: Path, model: Path, workdir: Path, log: Path, max_attempts: int
) -> subprocess.Popen:
    argv = runner_argv(
        db_path,
        *daemon_args(model, workdir, "--until-done"),
        "--downloads",
        "2",
        "--decoders",
        "1",
        "--prefetch-files",
        "2",
        "--batch-seconds",
        "8",
        "--lease-s",
        str(LEASE_S),
        "--max-attempts",
        str(max_attempts),
        "--retry-base-s",
        "0.2",
    )
    with log.open("a") as out:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=out)


def _wait_for_claim(db_path: Path, daemon: subprocess.Popen, timeout_s: float = 120) -> bool:
    """Until this daemon holds a job (True) or exits (False)."""
    mine = f":{daemon.pid}:"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(mine in w for w in _running_workers(db_path)):
            return True
        if daemon.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError(f"daemon {daemon.pid} claimed nothing in {timeout_s} s")


# --- the scenario ------------------------------------------------------------------


def reference_vectors(
    catalogue: Path, model: Path, work: Path, embedder: object | None = None
) -> dict[str, np.ndarray]:
    """The same catalogue through one uninterrupted in-process daemon."""
    from runner.catalogue import CatalogueFormat, import_catalogue
    from runner.config import DaemonConfig
    from runner.daemon import Daemon
    from runner.db import connect

    db_path = work / "reference.db"
    engine = connect(f"sqlite:///{db_path}")
    import_catalogue(engine, catalogue, CatalogueFormat())
    config = DaemonConfig(
        model_id=str(model),
        workdir=work / "reference-work",
        device="cpu",
        until_done=True,
        downloads=2,
        decoders=1,
        batch_seconds=8,
    )
    asyncio.run(Daemon(engine, config, embedder=embedder).run())  # type: ignore[arg-type]
    engine.dispose()
    return {key: np.frombuffer(blob, "<f4") for key, (_, blob) in _done(db_path).items()}


def _write_catalogue(path: Path, server: HitServer, names: list[str]) -> Path:
    import json

    path.write_text(json.dumps({f"k{i:04d}": {"url": server.url(n)} for i, n in enumerate(names)}))
    return path


def run_soak(
    work: Path,
    model: Path,
    *,
    cycles: int = 10,
    videos: int = 30,
    seed: int = 0,
    embedder: object | None = None,
    max_attempts: int = MAX_ATTEMPTS,
) -> SoakReport:
    started = time.monotonic()
    files = make_corpus(work / "media", videos)
    names = sorted(files)
    with serving(files) as server:
        catalogue = _write_catalogue(work / "all_videos.json", server, names)
        keys_to_names = {f"k{i:04d}": n for i, n in enumerate(names)}
        reference = reference_vectors(catalogue, model, work, embedder)
        server.hits.clear()
        server.pause_s = PAUSE_MID_BODY_S
        report = _kill_cycles(
            work, model, catalogue, server, keys_to_names, (cycles, seed, max_attempts)
        )
        _check_end(work, report, server, keys_to_names, reference)
    report.wall_s = time.monotonic() - started
    return report


def _kill_cycles(
    work: Path,
    model: Path,
    catalogue: Path,
    server: HitServer,
    keys_to_names: dict[str, str],
    plan: tuple[int, int, int],
) -> SoakReport:
    cycles, seed, max_attempts = plan
    rng = random.Random(seed)
    db_path, workdir, log = work / "soak.db", work / "soak-work", work / "daemon.log"
    subprocess.run(runner_argv(db_path, "import", str(catalogue)), check=True, capture_output=True)
    report = SoakReport(jobs=len(keys_to_names))
    seen_done: dict[str, tuple[float, bytes]] = {}
    hits_when_done: dict[str, int] = {}
    stranded_by: set[str] = set()
    for _ in range(cycles):
        daemon = _start_daemon(db_path, model, workdir, log, max_attempts)
        with killed_at_exit(daemon):
            _kill_at_random(db_path, daemon, rng, stranded_by, report)
        report.cycles += 1
        workers = [w for w in _running_workers(db_path) if f":{daemon.pid}:" in w]
        if workers:
            report.kills_with_work += 1
            report.stranded += len(workers)
            stranded_by.update(workers)
        _check_no_repeat(db_path, server, keys_to_names, seen_done, hits_when_done, report)
    server.pause_s = 0.0  # the last run only finishes the work
    daemon = _start_daemon(db_path, model, workdir, log, max_attempts)
    with killed_at_exit(daemon):
        if stranded_by and _wait_for_claim(db_path, daemon):
            _check_reaped(db_path, stranded_by, report)
        report.final_exit = daemon.wait(300)
    _check_no_repeat(db_path, server, keys_to_names, seen_done, hits_when_done, report)
    return report


def _kill_at_random(
    db_path: Path,
    daemon: subprocess.Popen,
    rng: random.Random,
    stranded_by: set[str],
    report: SoakReport,
) -> None:
    if rng.random() < EARLY_KILL_SHARE:
        time.sleep(rng.uniform(*EARLY_KILL_S))
    else:
        claimed = _wait_for_claim(db_path, daemon)
        if claimed and stranded_by:
            _check_reaped(db_path, stranded_by, report)
            stranded_by.clear()
        time.sleep(rng.uniform(*KILL_AFTER_CLAIM_S))
    daemon.send_signal(signal.SIGKILL)  # a no-op if it already finished
    daemon.wait(60)


def _check_reaped(db_path: Path, dead: set[str], report: SoakReport) -> None:
    """A restarted daemon reaps before it claims: by its first claim, no job may
    still be running under a dead daemon's id (the lease alone would take 600 s)."""
    if set(_running_workers(db_path)) & dead:
        report.reaps_missed += 1
    else:
        report.dead_pid_reaps += 1


def _check_no_repeat(
    db_path: Path,
    server: HitServer,
    keys_to_names: dict[str, str],
    seen_done: dict[str, tuple[float, bytes]],
    hits_when_done: dict[str, int],
    report: SoakReport,
) -> None:
    """A key once done is never stored again nor fetched again."""
    done = _done(db_path)
    for key, state in seen_done.items():
        again = done.get(key) != state or server.hits_of(keys_to_names[key]) > hits_when_done[key]
        if again and key not in report.duplicates:
            report.duplicates.append(key)
    for key, state in done.items():
        if key not in seen_done:
            seen_done[key] = state
            hits_when_done[key] = server.hits_of(keys_to_names[key])


def _check_end(
    work: Path,
    report: SoakReport,
    server: HitServer,
    keys_to_names: dict[str, str],
    reference: dict[str, np.ndarray],
) -> None:
    db_path = work / "soak.db"
    report.final_counts = _counts(db_path)
    done = _done(db_path)
    report.lost = sorted(set(keys_to_names) - set(done))
    report.redownloads = sum(server.hits_of(n) for n in keys_to_names.values()) - len(done)
    report.leftover_temp_files = sorted(
        str(p) for p in (work / "soak-work").rglob("*") if p.is_file()
    )
    diffs = [
        float(np.max(np.abs(np.frombuffer(blob, "<f4") - reference[key])))
        for key, (_, blob) in done.items()
    ]
    report.max_abs_diff = max(diffs, default=0.0)
    report.vectors_match = set(done) == set(reference) and all(
        np.allclose(np.frombuffer(blob, "<f4"), reference[key], rtol=1e-4, atol=1e-5)
        for key, (_, blob) in done.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--videos", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=MAX_ATTEMPTS,
        help="the daemon's --max-attempts (each kill costs every claimed job one)",
    )
    args = parser.parse_args()
    from tests.conftest import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="runner-soak-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "tiny-wav2vec2")
        report = run_soak(
            work,
            model,
            cycles=args.cycles,
            videos=args.videos,
            seed=args.seed,
            max_attempts=args.max_attempts,
        )
    print("\n".join(report.lines()))
    ok = not (report.duplicates or report.lost or report.leftover_temp_files)
    sys.exit(0 if ok and report.vectors_match and report.final_exit == 0 else 1)


if __name__ == "__main__":
    main()
