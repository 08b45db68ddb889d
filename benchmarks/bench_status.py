"""Status at a million jobs: an idle daemon's CPU, and how fast status answers.

    python benchmarks/bench_status.py [--jobs 1000000] [--idle-s 30] [--no-pg]
                                      [--screenshot benchmarks/status_page.png]

On SQLite and then on PostgreSQL (a throwaway local server, as tests/postgres.py
starts), with the database of benchmarks/status_data.py (1M jobs, nothing due; no
statistics on SQLite, as runner leaves it; VACUUM ANALYZE on PostgreSQL, as
autovacuum would do after the load):

  baseline   the code before the status page (`git archive` of BASELINE_REF, with
             today's migrations so it runs on this schema), whose progress bar
             re-counted every state with a GROUP BY each second, and its
             `runner status --json`; that GROUP BY alone, timed in this process;
             and `runner status --json` of PREVIOUS_REF, the status page before
             triggers kept the counts
  idle       `runner daemon --progress --http` with nothing to do, its CPU time
             (and on PostgreSQL the server's too) over --idle-s seconds after
             start-up, /metrics scraped every 15 s as Prometheus would
  answers    `runner status --json` (the whole command, and read_status inside
             it), GET /status (the first after start; the first report for the
             two larger `top` buckets, made while the caller waits; cached ones),
             and the page in headless Chromium (navigation to numbers rendered)

Figures only, printed as ratios to the baseline of the same run plus absolute
ms and % of one core; nothing here is enforced.  With --screenshot, the page of
the SQLite run is saved as a PNG for README.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.status_data import fill  # noqa: E402

#: the commit before the status page and the counts cache
BASELINE_REF = "bc0998ba08f88a8d8bae5ce952949ca4d586c4b0"
#: the status page before triggers kept the counts (its `runner status --json`
#: took 0.5-0.8 s at a million jobs)
PREVIOUS_REF = "54fc5856be60c69e89854566d1a55e9091f38e85"
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
SCRAPE_EVERY_S = 15.0


def cpu_s(pid: int) -> float:
    """User + system seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def server_cpu_s(data_dir: Path | None) -> float:
    """CPU seconds of a PostgreSQL server: its postmaster and every backend it forked."""
    if data_dir is None:
        return 0.0
    try:
        master = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == master or int(stat[1]) == master:
            total += (int(stat[11]) + int(stat[12])) * TICK_S
    return total


def get(base: str, path: str) -> tuple[int, bytes, float]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    started = time.perf_counter()
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return response.status, body, time.perf_counter() - started
    finally:
        conn.close()


@contextlib.contextmanager
def daemon(
    db_url: str, model: Path, workdir: Path, pythonpath: Path, log: Path
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`runner daemon --progress --http 127.0.0.1:0` from the code under `pythonpath`."""
    env = dict(os.environ, RUNNER_DB=db_url, PYTHONPATH=str(pythonpath))
    env.pop("RUNNER_API_TOKEN", None)
    argv = [sys.executable, "-m", "runner.cli", "daemon", "--progress", "--http", "127.0.0.1:0"]
    argv += ["--model", str(model), "--device", "cpu", "--workdir", str(workdir)]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, cwd=workdir.parent)
    try:
        deadline = time.monotonic() + 180
        while True:
            match = re.search(r"HTTP API listening on (\S+)", log.read_text(errors="replace"))
            if match:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield proc, match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def idle_cpu(
    proc: subprocess.Popen, base: str, idle_s: float, data_dir: Path | None
) -> tuple[float, float]:
    """(daemon, server) CPU as a fraction of one core over `idle_s`, after a settling
    pause; /metrics is scraped every SCRAPE_EVERY_S as Prometheus would."""
    time.sleep(5.0)  # start-up: the first reap, the first claim, imports finishing
    start_cpu, start_server = cpu_s(proc.pid), server_cpu_s(data_dir)
    started = time.monotonic()
    next_scrape = started
    while (now := time.monotonic()) < started + idle_s:
        if now >= next_scrape:
            assert get(base, "/metrics")[0] == 200
            next_scrape += SCRAPE_EVERY_S
        time.sleep(min(0.5, max(0.0, started + idle_s - now)))
    elapsed = time.monotonic() - started
    return (
        (cpu_s(proc.pid) - start_cpu) / elapsed,
        (server_cpu_s(data_dir) - start_server) / elapsed,
    )


def baseline_tree(root: Path, ref: str = BASELINE_REF) -> Path | None:
    """The code of commit `ref`, unpacked from git (None: no git history here)."""
    target = root / f"baseline-{ref[:10]}"
    archive = root / f"baseline-{ref[:10]}.tar"
    try:
        with archive.open("wb") as out:
            subprocess.run(
                ["git", "archive", ref, "runner", "migrations", "alembic.ini"],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.PIPE,
                check=True,
            )
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"  (no baseline: git archive {ref[:10]} failed: {exc})")
        return None
    target.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    # the current migrations: the old code then finds the schema at its head (newer
    # revisions only add what it never reads) rather than refusing the database
    shutil.rmtree(target / "migrations")
    shutil.copytree(REPO / "migrations", target / "migrations")
    return target


def group_by_ms(db_url: str, times: int = 10) -> tuple[float, float]:
    """The old bar's query alone: (median wall ms, client CPU ms) per call."""
    from sqlalchemy import func, select

    from runner.db import connect
    from runner.models import jobs
    from runner.queries import reading

    engine = connect(db_url)
    group_by = select(jobs.c.status, func.count()).group_by(jobs.c.status)
    try:
        walls, cpus = [], []
        for _ in range(times):
            wall, cpu = time.perf_counter(), time.process_time()
            with reading(engine) as conn:
                conn.execute(group_by).all()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        return statistics.median(walls) * 1000, statistics.median(cpus) * 1000
    finally:
        engine.dispose()


def status_command(db_url: str, tree: Path = REPO) -> tuple[float, float]:
    """`runner status --json` of the code in `tree`: (whole command wall ms;
    read_status ms inside it), each the median of three runs."""
    code = (
        "import time, sys; t0 = time.perf_counter();"
        "from runner.db import connect; from runner.status import read_status;"
        "e = connect(sys.argv[1]); t1 = time.perf_counter();"
        "read_status(e, now=time.time()); print((time.perf_counter() - t1) * 1000)"
    )
    # run from `tree`: `python -m` and `-c` put the working directory first on the path
    env = dict(os.environ, PYTHONPATH=str(tree))
    inside = statistics.median(
        float(
            subprocess.run(
                [sys.executable, "-c", code, db_url],
                env=env,
                cwd=tree,
                capture_output=True,
                check=True,
            ).stdout
        )
        for _ in range(3)
    )
    walls = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "runner.cli", "--db", db_url, "status", "--json"],
            env=env,
            cwd=tree,
            stdout=subprocess.DEVNULL,
            check=True,
        )
        walls.append(time.perf_counter() - started)
    return statistics.median(walls) * 1000, inside


def page_load_ms(base: str, screenshot: Path | None) -> float | None:
    """Median ms from navigation to the page's numbers rendered, in headless Chromium."""
    try:
        from tests.chromium import find_chromium, open_page
    except ImportError:
        return None
    if find_chromium() is None:
        print("  (no chromium: page not timed)")
        return None

    async def run() -> float:
        async with open_page() as page:
            await page.send(
                "Emulation.setDeviceMetricsOverride", width=1100, height=900, deviceScaleFactor=1,
                mobile=False,
            )  # fmt: skip
            times = []
            for _ in range(4):
                await page.evaluate("document.body && (document.body.dataset.state = 'old'); true")
                started = time.perf_counter()
                await page.goto(base + "/")
                await page.wait_for("document.body && document.body.dataset.state === 'ready'", 30)
                times.append(time.perf_counter() - started)
            if screenshot is not None:
                height = await page.evaluate("document.documentElement.scrollHeight")
                shot = await page.send(
                    "Page.captureScreenshot",
                    format="png",
                    captureBeyondViewport=True,
                    clip={"x": 0, "y": 0, "width": 1100, "height": height, "scale": 1},
                )
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                print(f"  screenshot: {screenshot} ({screenshot.stat().st_size // 1024} KiB)")
            return statistics.median(times[1:]) * 1000

    return asyncio.run(run())


def answers(base: str) -> dict[str, float]:
    first_status, _, first_s = get(base, "/status")
    assert first_status == 200
    # reports are made for 10, 100 or 1000 reasons: the first for 100 and for 1000
    # are made while the caller waits
    misses = [get(base, f"/status?top={k}")[2] for k in (100, 1000)]
    hits = [get(base, "/status")[2] for _ in range(5)]
    return {
        "first": first_s * 1000,
        "miss": statistics.median(misses) * 1000,
        "hit": statistics.median(hits) * 1000,
    }


def run_backend(
    name: str,
    db_url: str,
    data_dir: Path | None,
    root: Path,
    model: Path,
    args: argparse.Namespace,
    screenshot: Path | None,
) -> None:
    print(f"{name}: filling {args.jobs:,} jobs ...", flush=True)
    print(f"  filled in {fill(db_url, args.jobs, model_id=str(model)):.1f} s")
    group_wall, group_cpu = group_by_ms(db_url)
    print(
        f"  baseline query, the old bar's GROUP BY: {group_wall:.1f} ms a call "
        f"({group_cpu:.1f} ms of this process's CPU); every second that is "
        f"{group_wall / 10:.1f} % of a core"
    )
    old = baseline_tree(root)
    old_idle = None
    if old is not None:
        with daemon(db_url, model, root / "w-old", old, root / f"{name}-old.log") as (proc, base):
            old_idle = idle_cpu(proc, base, args.idle_s, data_dir)
        print(
            f"  baseline daemon (before the status page), idle: {old_idle[0] * 100:.2f} % of a core"
            + (f", server {old_idle[1] * 100:.2f} %" if data_dir else "")
        )
    with daemon(db_url, model, root / "w-new", REPO, root / f"{name}-new.log") as (proc, base):
        new_idle = idle_cpu(proc, base, args.idle_s, data_dir)
        got = answers(base)
        page = page_load_ms(base, screenshot)
    command_ms, inside_ms = status_command(db_url)
    old_command = status_command(db_url, old) if old is not None else None
    previous = baseline_tree(root, PREVIOUS_REF)
    previous_command = status_command(db_url, previous) if previous is not None else None
    line = f"  daemon now, idle: {new_idle[0] * 100:.2f} % of a core"
    if data_dir:
        line += f", server {new_idle[1] * 100:.2f} %"
    if old_idle:
        old_total, new_total = sum(old_idle), sum(new_idle)
        line += f" ({new_total / old_total:.2f}x the baseline's daemon+server CPU)"
    print(line)
    print(
        f"  GET /status: first {got['first']:.0f} ms (the report made at start), a new "
        f"report made for the caller {got['miss']:.0f} ms, served from the cache "
        f"{got['hit']:.1f} ms"
    )
    print(
        f"  runner status --json: {command_ms:.0f} ms for the whole command, of which "
        f"read_status {inside_ms:.0f} ms (the rest is Python start-up and imports)"
    )
    for what, measured in (
        ("the code before the status page", old_command),
        ("the status page with counts scanned", previous_command),
    ):
        if measured is not None:
            print(
                f"  runner status --json, {what}: {measured[0]:.0f} ms, "
                f"read_status {measured[1]:.0f} ms; now {command_ms / measured[0]:.2f}x "
                f"and {inside_ms / measured[1]:.2f}x"
            )
    if page is not None:
        print(f"  the page in headless Chromium, navigation to numbers: {page:.0f} ms")
    print(flush=True)


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[tuple[str, Path] | None]:
    from benchmarks.bench_import import start_local_server

    server, why = start_local_server(root)
    if server is None:
        print(f"postgresql: skipped, {why}")
        yield None
        return
    try:
        server.execute("CREATE DATABASE runner_bench_status")
        yield server.url("runner_bench_status"), server.data
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument("--screenshot", type=Path, help="save the SQLite run's page as PNG")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from tests.conftest import build_tiny_model

        model = build_tiny_model(root / "tiny-model")
        sqlite_root = root / "sqlite"
        sqlite_root.mkdir()
        db_url = f"sqlite:///{sqlite_root / 'runner.db'}"
        run_backend("sqlite", db_url, None, sqlite_root, model, args, args.screenshot)
        if args.no_pg:
            return
        pg_root = Path(tempfile.mkdtemp(prefix="runner-bench-pg-"))
        work = root / "pg"
        work.mkdir()
        try:
            with postgres(pg_root) as pg:
                if pg is not None:
                    run_backend("postgresql", pg[0], pg[1], work, model, args, None)
        finally:
            shutil.rmtree(pg_root, ignore_errors=True)


if __name__ == "__main__":
    main()
