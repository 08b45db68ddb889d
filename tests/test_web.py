"""The status page (GET /): served from the package, rendered by a real headless
Chromium against `runner serve` on a real SQLite file, its numbers checked against
/status, and the token flow (asked once, kept for the tab, never in a URL)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from runner.api import ApiConfig
from runner.db import connect
from runner.status import format_duration
from runner.web import PAGE_FILES
from tests.api_server import (
    ApiServer,
    daemon_config,
    request,
    run_api_server,
    start_runner_api,
    stop_runner_api,
)
from tests.chromium import Page, find_chromium, open_page, unavailable
from tests.test_export_formats import add_jobs, finish

REPO = Path(__file__).resolve().parent.parent
TOKEN = "page-token-3f9c1e"
VEC = np.ones(4, dtype=np.float32)


# --- the files and the routes ----------------------------------------------------------


def test_page_files_ship_in_the_package() -> None:
    """importlib.resources finds them (as it would in a wheel), and pyproject's
    package-data names every file of runner/web that is not Python."""
    files = {name for name, _ in PAGE_FILES.values()}
    web = resources.files("runner.web")
    for name in files:
        assert web.joinpath(name).read_bytes(), name
    on_disk = {p.name for p in (REPO / "runner" / "web").iterdir() if p.suffix != ".py"}
    on_disk.discard("__pycache__")
    assert on_disk == files
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["runner.web"]
    assert {f".{name.rsplit('.', 1)[1]}" for name in files} <= {p.lstrip("*") for p in patterns}


@pytest.fixture(scope="module")
def plain_api(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, embedder: object
) -> Iterator[ApiServer]:
    """A daemon that claims nothing, its API behind a token."""
    root = tmp_path_factory.mktemp("web")
    db_url = f"sqlite:///{root / 'runner.db'}"
    config = daemon_config(tiny_model, root / "work", claim_jobs=False)
    with run_api_server(db_url, config, embedder, ApiConfig(port=0, token=TOKEN)) as srv:
        yield srv


def test_page_is_open_and_the_data_is_not(plain_api: ApiServer) -> None:
    page = plain_api("GET", "/", token=None)
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "form-action 'none'" in csp and "unsafe" not in csp
    html = page.body.decode()
    assert '<script src="/ui/app.js" defer></script>' in html
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere
    for path, (_, content_type) in PAGE_FILES.items():
        reply = plain_api("GET", path, token=None)
        assert reply.status == 200 and reply.headers["Content-Type"].startswith(content_type)
    script = plain_api("GET", "/ui/app.js", token=None).body.decode()
    assert "sessionStorage" in script and "Authorization" in script
    assert "localStorage" not in script and "?token" not in script
    assert plain_api("GET", "/status", token=None).status == 401


def test_status_has_what_the_page_needs(plain_api: ApiServer) -> None:
    report = plain_api("GET", "/status", token=TOKEN).json()
    me = report["daemon"]
    assert me["model_id"] == plain_api.daemon.config.model_id and me["claims_jobs"] is False
    assert set(me["queues"]) == {"download", "decode", "window", "store", "inflight"}
    assert 0 <= me["embed_busy_ratio"] <= 1
    (row,) = [w for w in report["workers"] if w.get("this")]
    assert row["worker_id"] == plain_api.daemon.worker_id == me["worker_id"]
    assert len(report["throughput"]["buckets"]) == 24
    assert set(report["rates"]["5m"]) >= {"covered_s", "audio_h_per_h", "per_min"}
    doc = plain_api("GET", "/openapi.json", token=TOKEN).json()
    status_schema = doc["components"]["schemas"]["Status"]["properties"]
    assert {"throughput", "workers", "daemon", "specs", "top_failures"} <= set(status_schema)
    assert doc["paths"]["/"]["get"]["security"] == []


# --- the page in a real browser -------------------------------------------------------


def _fill(db_url: str) -> None:
    """30 jobs: 8 done 10 minutes ago, 3 failed 5 minutes ago, 2 running, 17 pending."""
    engine = connect(db_url)
    try:
        now = time.time()
        add_jobs(engine, [f"k{i:02d}" for i in range(30)], now=now - 3600)
        finish(engine, {f"k{i:02d}": VEC for i in range(8)}, now=now - 600, claimed_at=now - 900)
        finish(engine, {}, {f"k{i:02d}": "HTTP 404" for i in range(8, 11)}, now=now - 300)
        finish(engine, {}, now=now - 60, keep_running=("k11", "k12"))
    finally:
        engine.dispose()


PAGE_NUMBERS = """JSON.stringify({
  counts: Object.fromEntries([...document.querySelectorAll('#counts tbody tr')]
    .map(r => [r.dataset.state, Number(r.querySelector('td').dataset.value)])),
  progress: document.getElementById('progress-text').textContent,
  eta: document.getElementById('eta').textContent,
  etaS: document.getElementById('eta').dataset.etaS,
  failures: [...document.querySelectorAll('#top-failures tbody tr')]
    .map(r => [...r.cells].map(c => c.textContent)),
  workers: [...document.querySelectorAll('#workers tbody tr')]
    .map(r => [r.dataset.worker, Number(r.cells[2].dataset.value)]),
  doneInChart: [...document.querySelectorAll('#throughput tbody tr')]
    .reduce((n, r) => n + Number(r.cells[1].dataset.value), 0),
  classes: [...document.querySelectorAll('#failures-by-class tbody tr')]
    .map(r => [r.dataset.class, Number(r.cells[1].dataset.value)]),
  charts: document.querySelectorAll('svg[role=img]').length,
  spec: document.getElementById('spec').textContent,
})"""


def test_page_in_a_headless_browser_matches_status(
    tmp_path: Path, tiny_model: Path, cli: object
) -> None:
    if find_chromium() is None:  # before starting anything
        unavailable("no chromium on PATH")
    db_url = f"sqlite:///{tmp_path / 'runner.db'}"
    _fill(db_url)
    env = {k: v for k, v in os.environ.items() if k != "RUNNER_API_TOKEN"}
    env |= {"RUNNER_DB": db_url, "PYTHONPATH": str(REPO), "RUNNER_API_TOKEN": TOKEN}
    args = ["serve", "--http", "127.0.0.1:0", "--model", str(tiny_model), "--device", "cpu"]
    proc, base, reader = start_runner_api([*args, "--workdir", str(tmp_path / "w")], tmp_path, env)
    try:
        asyncio.run(_browse(base, tmp_path))
    finally:
        stop_runner_api(proc, reader)


async def reload(page: Page, state: str) -> None:
    """Reload and wait for the new document (not the old one) to reach `state`."""
    await page.evaluate("window.oldDocument = true; location.reload(); true")
    await page.wait_for(
        f"!window.oldDocument && document.body && document.body.dataset.state === '{state}'"
    )


async def _browse(base: str, root: Path) -> None:
    async with open_page(root) as page:
        # no token yet: the page asks for it, once
        await page.goto(base + "/")
        await page.wait_for("document.body.dataset.state === 'token'")
        await page.evaluate(
            f"document.getElementById('token').value = {json.dumps(TOKEN)};"
            "document.getElementById('token-form').requestSubmit(); true"
        )
        await page.wait_for("document.body.dataset.state === 'ready'")
        shown = json.loads(await page.evaluate(PAGE_NUMBERS))
        report = json.loads(request(base, "GET", "/status?top=10", token=TOKEN).body)

        # the numbers rendered are the ones /status gives
        assert shown["counts"] == report["counts"] | {"total": report["total"]}
        assert shown["counts"] == {"pending": 17, "running": 2, "done": 8, "failed": 3, "total": 30}
        assert shown["progress"] == "11 of 30 finished (36.7 %), 19 left"
        assert float(shown["etaS"]) == pytest.approx(report["eta_s"], rel=0.05)
        assert (
            shown["eta"] == f"ETA: {format_duration(float(shown['etaS']))} (at the last 60m rate)"
        )
        assert shown["failures"] == [["3", "download", "HTTP 404", "k10, k09, k08"]]
        assert ["test-worker", 2] in shown["workers"]
        assert shown["doneInChart"] == 8 == sum(b["done"] for b in report["throughput"]["buckets"])
        assert shown["classes"] == [["download", 3]]
        assert shown["charts"] >= 3  # two throughput charts and a failure sparkline
        assert "tiny" in shown["spec"]  # the model of the done jobs

        # kept for the tab: a reload asks for nothing
        assert await page.evaluate("sessionStorage.getItem('runner-api-token')") == TOKEN
        await reload(page, "ready")
        assert await page.evaluate("document.getElementById('token-form').hidden") is True

        # at phone width nothing sticks out sideways (wide tables scroll in their box)
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            width=375,
            height=800,
            deviceScaleFactor=2,
            mobile=True,
        )
        await reload(page, "ready")
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, width

        # a wrong token is forgotten and asked for again
        await page.evaluate("sessionStorage.setItem('runner-api-token', 'wrong'); true")
        await reload(page, "token")
        assert "refused" in await page.evaluate(
            "document.getElementById('token-error').textContent"
        )
        assert await page.evaluate("sessionStorage.getItem('runner-api-token')") is None

        # the token travelled only in the Authorization header, never in a URL
        sent = [p["request"] for m, p in page.events if m == "Network.requestWillBeSent"]
        assert sent, "no requests seen"
        assert all(TOKEN not in r["url"] for r in sent)
        status_calls = [r for r in sent if "/status" in r["url"]]
        assert any(r["headers"].get("Authorization") == f"Bearer {TOKEN}" for r in status_calls)


IMG = "<img src=x onerror=alert(1)>"
SVG_TAG = '"><svg onload=alert(1)>'
#: no element the payloads would make, and no handler attribute anywhere
INJECTED = """JSON.stringify({
  imgs: document.querySelectorAll('img').length,
  handlers: [...document.querySelectorAll('*')]
    .filter(e => e.hasAttribute('onerror') || e.hasAttribute('onload')).map(e => e.outerHTML),
  svgs: [...document.querySelectorAll('svg')].filter(s => !s.hasAttribute('role')).length,
  text: document.body.textContent,
})"""

#: the page's own render() given /status with counts read some seconds before `now`
AS_OF_WITH_COUNTS_AGED = """(async () => {
  const token = sessionStorage.getItem('runner-api-token');
  const reply = await fetch('/status?top=10', {headers: {Authorization: `Bearer ${token}`}});
  const report = await reply.json();
  render({...report, counts_as_of: report.now - %d});
  return document.getElementById('as-of').textContent;
})()"""


def test_keys_messages_and_worker_ids_are_shown_as_text(
    plain_api: ApiServer, tmp_path: Path
) -> None:
    """Keys, failure messages and worker ids come from catalogues, remote servers and
    other machines: the page shows markup in them as text, never as elements.  And
    counts older than the report (a big database's) say how old they are."""
    if find_chromium() is None:
        unavailable("no chromium on PATH")
    engine = connect(plain_api.db_url)
    try:
        now = time.time()
        add_jobs(engine, ["xss-a", "xss-b", "xss-c"], now=now - 100)
        finish(engine, {}, {"xss-a": SVG_TAG, "xss-b": IMG}, now=now - 30, keep_running=("xss-c",))
        with engine.begin() as conn:
            for old, new in (("xss-a", IMG), ("xss-b", SVG_TAG)):
                conn.exec_driver_sql("UPDATE jobs SET key = ? WHERE key = ?", (new, old))
            conn.exec_driver_sql(
                "UPDATE jobs SET worker_id = ? WHERE key = 'xss-c'", (f"{SVG_TAG}:1:{IMG}",)
            )
    finally:
        engine.dispose()

    async def browse() -> dict[str, object]:
        async with open_page(tmp_path) as page:
            await page.goto(plain_api.base_url + "/")
            await page.wait_for("document.body.dataset.state === 'token'")
            await page.evaluate(
                f"document.getElementById('token').value = {json.dumps(TOKEN)};"
                "document.getElementById('token-form').requestSubmit(); true"
            )
            await page.wait_for(
                "document.body.dataset.state === 'ready' && "
                f"document.getElementById('workers').textContent.includes({json.dumps(IMG)})"
            )
            found = dict(json.loads(await page.evaluate(INJECTED)))
            # counts older than ~10 s (a big database's, re-read every 25-60 s) say so
            found["as_of"] = await page.evaluate(AS_OF_WITH_COUNTS_AGED % 30)
            found["as_of_fresh"] = await page.evaluate(AS_OF_WITH_COUNTS_AGED % 2)
            return found

    found = asyncio.run(browse())
    assert "Counts as of 30s earlier." in str(found["as_of"]), found["as_of"]
    assert "Counts as of" not in str(found["as_of_fresh"]), found["as_of_fresh"]
    assert found["imgs"] == 0 and found["handlers"] == [] and found["svgs"] == 0, found
    text = str(found["text"])
    for payload in (IMG, SVG_TAG, f"{SVG_TAG}:1:{IMG}"):
        assert payload in text, payload  # shown, as text


def test_a_slow_report_is_served_while_the_next_is_made(plain_api: ApiServer) -> None:
    """At a million jobs a report takes tenths of a second: callers get the last one
    (past its TTL, within `stale_s`) while a thread makes the next."""
    from runner.api import _Reports

    daemon = plain_api.daemon
    # TTL ~0 and every report "slow": each get after the first is served stale
    reports = _Reports(budget=1e9, slow_s=0.0, stale_s=60.0)
    first = reports.get(daemon, 3)
    total = first["total"]
    engine = connect(plain_api.db_url)
    try:
        add_jobs(engine, [f"stale-{i}" for i in range(3)], now=time.time())
    finally:
        engine.dispose()
    served = reports.get(daemon, 3)  # the kept one, at once; a new one is on its way
    assert served["total"] == total
    deadline = time.monotonic() + 10
    while reports.get(daemon, 3)["total"] != total + 3:
        assert time.monotonic() < deadline, "the next report never came"
        time.sleep(0.02)
    assert len(reports.get(daemon, 0)["top_failures"]) == 0  # one report, sliced per top
    # once stopped (the API is going away), no thread makes another
    while reports._making:  # the refresh the last get started
        assert time.monotonic() < deadline, "a refresh never ended"
        time.sleep(0.02)
    reports.stop()
    made = dict(reports.made)
    assert reports.get(daemon, 3)["total"] == total + 3  # still served, stale
    assert reports.made == made and not reports._making


class _GatedHeadlines:
    """The daemon's real HeadlineCache, behind a gate: each read waits for `go`."""

    def __init__(self, daemon: object) -> None:
        self.real = daemon.headlines  # type: ignore[attr-defined]
        self.go = threading.Event()
        self.calls = 0

    def get(self, engine: object, **kwargs: object) -> object:
        self.calls += 1
        assert self.go.wait(30)
        return self.real.get(engine, **kwargs)


def test_one_report_is_made_at_a_time_and_callers_wait_for_it(plain_api: ApiServer) -> None:
    """Callers that miss while a report is being made wait for that one rather than
    each making their own; every `top` up to 10 is the same report, sliced."""
    from runner.api import _Reports

    class Daemon:
        engine = plain_api.daemon.engine
        headlines = _GatedHeadlines(plain_api.daemon)

    reports = _Reports()
    got: dict[int, dict[str, object]] = {}
    tops = (1, 3, 5, 7, 10)
    threads = [
        threading.Thread(target=lambda t=t: got.__setitem__(t, reports.get(Daemon(), t)))  # type: ignore[misc]
        for t in tops
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    # one makes the report (held at the gate), the other four wait on it
    while Daemon.headlines.calls < 1 or len(reports._cond._waiters) < len(tops) - 1:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, (Daemon.headlines.calls, reports.made)
        time.sleep(0.01)
    Daemon.headlines.go.set()
    for thread in threads:
        thread.join(30)
    assert Daemon.headlines.calls == 1 and reports.made == {10: 1}
    assert set(got) == set(tops)
    assert len({id(r["throughput"]) for r in got.values()}) == 1  # one report for all


def test_reports_are_kept_for_three_tops_only(plain_api: ApiServer) -> None:
    """A caller cycling through `top` values cannot make the cache hold (and make) a
    report for each: they are made for 10, 100 or 1000 reasons and sliced."""
    from runner.api import REPORT_TOPS, _Reports, report_top

    assert [report_top(t) for t in (0, 5, 10, 11, 100, 101, 999, 1000)] == [
        10, 10, 10, 100, 100, 1000, 1000, 1000,
    ]  # fmt: skip
    reports = _Reports()
    for top in (*range(0, 1001, 37), 1000):
        assert len(reports.get(plain_api.daemon, top)["top_failures"]) <= top
    assert set(reports.kept) <= set(REPORT_TOPS)
    assert plain_api("GET", "/status?top=1001", token=TOKEN).status == 400
    assert plain_api("GET", "/status?top=1000", token=TOKEN).status == 200
    # a digit int() refuses ('²'.isdigit() is True) is a 400, not a 500
    assert plain_api("GET", "/status?top=%C2%B2", token=TOKEN).status == 400
    # nor are more digits than int() takes (4,300)
    assert plain_api("GET", "/status?top=" + "1" * 5000, token=TOKEN).status == 400


def test_a_cached_headline_is_served_while_another_thread_reads(tmp_path: Path) -> None:
    """HeadlineCache reads without holding its lock: while one caller forces a read
    (held here in the database driver), another content with the kept figures is
    answered at once rather than queued behind it."""
    from sqlalchemy import event

    from runner.headline import HeadlineCache

    engine = connect(f"sqlite:///{tmp_path / 'h.db'}")
    try:
        add_jobs(engine, ["a", "b"], now=time.time())
        ticks = iter(range(10_000))
        # every read "costs" 1 s by this timer: kept for a minute (the ceiling)
        cache = HeadlineCache(timer=lambda: float(next(ticks) % 2))
        cache.get(engine)
        kept = cache.get(engine, max_age_s=0)
        assert cache.ttl_s == 60.0
        hold, held = threading.Event(), threading.Event()

        def gate(*_: object) -> None:
            if threading.current_thread().name == "forcer":
                held.set()
                assert hold.wait(30)

        event.listen(engine, "before_cursor_execute", gate)
        forcer = threading.Thread(
            target=lambda: cache.get(engine, max_age_s=0), name="forcer", daemon=True
        )
        forcer.start()
        assert held.wait(30)  # the forced read is in the database now
        answered: list[object] = []
        other = threading.Thread(target=lambda: answered.append(cache.get(engine)), daemon=True)
        other.start()
        other.join(30)
        assert answered == [kept]  # while the read was still held
        hold.set()
        forcer.join(30)
        assert cache.reads == 3
        event.remove(engine, "before_cursor_execute", gate)
    finally:
        engine.dispose()


def test_data_is_not_cached_and_a_tunnel_from_another_port_works(plain_api: ApiServer) -> None:
    """`ssh -L 9000:127.0.0.1:8080 host`: the browser sends Host: 127.0.0.1:9000.  A
    TCP relay on another local port stands in for the tunnel; the page and its data
    answer through it, and the data says no cache may keep it."""
    target = urlsplit(plain_api.base_url)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    opened: list[socket.socket] = []

    def relay() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                upstream = socket.create_connection((target.hostname, target.port))
                opened.extend((client, upstream))
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=relay, daemon=True).start()
    try:
        tunnel = f"http://127.0.0.1:{port}"
        assert port != target.port
        page = request(tunnel, "GET", "/", token=None)
        assert page.status == 200 and page.headers["Cache-Control"] == "no-cache"
        for path in ("/status", "/jobs/none", "/openapi.json", "/metrics"):
            reply = request(tunnel, "GET", path, token=TOKEN)
            assert reply.status in (200, 404), (path, reply)
            assert reply.headers["Cache-Control"] == "no-store", path
        refused = request(tunnel, "GET", "/status", token=None)
        assert refused.status == 401 and refused.headers["Cache-Control"] == "no-store"
        rebinding = request(
            tunnel, "GET", "/status", token=TOKEN, headers={"Host": f"evil.test:{port}"}
        )
        assert rebinding.status == 421
    finally:
        listener.close()
        for sock in opened:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
