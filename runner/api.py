"""The HTTP API (aiohttp.web), served inside the daemon's event loop.

`runner daemon --http` and `runner serve --http` run it beside the pipeline stages,
so /encode_audio goes through the very same download → decode → embed stages and
the one model the daemon already holds; nothing here loads a model.  Database work
runs on the loop's default executor so a slow /status never delays a claim.

Security, because the API fetches URLs it is given: it listens on 127.0.0.1 unless
told otherwise, any other address needs a bearer token (checked on every route but
/healthz), and URLs are http/https only and, unless allowed, never reach loopback,
private or link-local addresses, on any hop of a redirect chain (runner/download.py).

A web page can reach a loopback API too (the browser sends the request, with the
user's network position): POST routes take only `Content-Type: application/json`
(a page cannot send that cross-origin without a CORS preflight we never answer),
and on loopback the `Host` header must name this machine, which refuses DNS
rebinding (a page's own hostname pointed at 127.0.0.1).

Load: /encode_audio runs at most `max_encode_requests` at once, further ones get a
429 at once (never queued), so ad-hoc requests cannot crowd the queued catalogue
work out of the stages; its body limit is small.  POST /jobs parses off the loop.

Every JSON answer is strict JSON (no NaN or Infinity, which most parsers refuse).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import io
import ipaddress
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import ijson
import numpy as np
from aiohttp import web
from sqlalchemy import Engine, select, text
from yarl import URL

from runner import catalogue, jobs
from runner.catalogue import BATCH_RECORDS, CatalogueFormat, Rejected, iter_records, url_problem
from runner.db import READ_ONLY
from runner.download import IPNetwork, UrlGuard, make_session
from runner.errors import (
    DecodeError,
    DownloadError,
    DownloadTimeoutError,
    EmbedError,
    EmbedOutOfMemoryError,
    JobError,
    RunnerError,
    Stopping,
    UrlRefusedError,
)
from runner.headline import MIN_TTL_S, ttl_for
from runner.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from runner.models import jobs as jobs_table
from runner.openapi import document
from runner.status import finite_or_none, read_status
from runner.web import PAGE_FILES, page_file

if TYPE_CHECKING:
    from runner.protocols import DaemonHandle

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
#: POST /jobs: same formats as `runner import`; an array's records carry their key here
JOBS_FORMAT = CatalogueFormat(key_field="key", url_field="url")
#: routes that answer without a token: load balancers probe /healthz; the page and its
#: script hold no data (they ask for the token and send it with their requests)
OPEN_ROUTES = frozenset({"/healthz", *PAGE_FILES})


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: kept out of repr: configs get logged and shown in tracebacks, the token must not
    token: str | None = field(default=None, repr=False)
    allow_private_urls: bool = False
    max_body_bytes: int = 8 << 20
    #: /encode_audio requests served at once; more get 429 (ad-hoc work must not
    #: starve the catalogue's jobs of the stages they share)
    max_encode_requests: int = 4
    #: /encode_audio's body limit: it only ever carries a URL and a timeout
    encode_max_body_bytes: int = 64 * 1024
    #: /encode_audio's own cap on decoded audio: a caller waits on it, so much
    #: smaller than the daemon's --max-audio-s
    encode_max_audio_s: float = 1800.0
    #: longest /encode_audio request; a request may ask for less with "timeout_s"
    encode_timeout_s: float = 600.0
    #: networks let through despite the private-address refusal (tests use 127.0.0.1)
    exempt_networks: tuple[IPNetwork, ...] = ()

    def url_guard(self) -> UrlGuard | None:
        return None if self.allow_private_urls else UrlGuard(exempt=self.exempt_networks)


#: digits a port or `top` may have; int() refuses strings of over 4,300 digits
DECIMAL_MAX_DIGITS = 10


def _decimal(text: str) -> bool:
    """A short run of ASCII digits: str.isdigit() also takes '²' and other digits
    int() refuses, and int() refuses thousands of digits too."""
    return text.isascii() and text.isdigit() and len(text) <= DECIMAL_MAX_DIGITS


def parse_bind(text: str) -> tuple[str, int]:
    """'8080', ':8080', '0.0.0.0:8080', '[::1]:8080' -> (host, port); 127.0.0.1 by default."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host, port_text = "", text.strip()
    host = host.strip("[]") or "127.0.0.1"
    if not _decimal(port_text) or not 0 <= int(port_text) <= 65535:
        raise RunnerError(f"--http {text!r}: expected PORT or HOST:PORT")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(config: ApiConfig) -> None:
    """Anything but loopback is reachable by others: refuse to serve it without a token."""
    if not is_loopback(config.host) and not config.token:
        raise RunnerError(
            f"--http {config.host}:{config.port} listens beyond this machine: "
            "set a token with --token or RUNNER_API_TOKEN"
        )


# --- helpers -----------------------------------------------------------------------

DAEMON = web.AppKey("daemon", object)
CONFIG = web.AppKey("config", ApiConfig)
#: the guarded session /encode_audio fetches with; None: the daemon's own
ADHOC_SESSION = web.AppKey("adhoc_session", aiohttp.ClientSession)


@dataclass
class _Slots:
    """/encode_audio requests in progress: a counter, not a semaphore, because a
    request beyond the limit is refused rather than left waiting."""

    active: int = 0


ENCODE_SLOTS = web.AppKey("encode_slots", _Slots)


def _daemon(request: web.Request) -> DaemonHandle:
    return request.app[DAEMON]  # type: ignore[return-value]


class ApiError(Exception):
    """A 4xx with a message for the client; it goes in the JSON body, never in the
    status line (where a newline from the input would be a header injection)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


#: strict JSON: json.dumps would write NaN and Infinity, which are not JSON and which
#: most clients refuse; a non-finite number now raises ValueError where it is made
_dumps = functools.partial(json.dumps, allow_nan=False)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"error": message, **extra}, status=status)


async def _in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: fn(*args, **kwargs))


async def _read_body(request: web.Request, limit: int | None = None) -> bytes:
    """The body, or 413 beyond `limit` (tighter than the app's client_max_size, which
    turns any body over `max_body_bytes` into a 413 by itself)."""
    if limit is not None and (request.content_length or 0) > limit:
        raise ApiError(413, f"request body over the {limit}-byte limit")
    body = await request.read()
    if limit is not None and len(body) > limit:  # chunked: no Content-Length to check
        raise ApiError(413, f"request body over the {limit}-byte limit")
    return body


async def _json_body(request: web.Request, limit: int | None = None) -> Any:
    """The body as JSON, or a 4xx that says what is wrong with it."""
    return _loads(await _read_body(request, limit))


def _loads(body: bytes) -> Any:
    if not body.strip():
        raise ApiError(400, "empty body: expected JSON")
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"body is not UTF-8 JSON ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"invalid JSON: {exc}") from None


# --- middlewares -------------------------------------------------------------------


def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error is JSON {"error": ...}; a bug is a logged 500, never a traceback page."""
    try:
        response = await handler(request)
    except ApiError as exc:
        response = _error(exc.status, exc.message)
        response.headers.update(exc.headers)
    except web.HTTPException as exc:  # aiohttp's own: 404, 405, 413
        if exc.status < 400:
            raise
        message = exc.reason
        if exc.status == 413:
            message = f"request body over the {request.app[CONFIG].max_body_bytes}-byte limit"
        response = _error(exc.status, message)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = _error(500, "internal error (see the daemon's log)")
    if request.path not in PAGE_FILES:  # data, often behind a token: no cache keeps it
        response.headers.setdefault("Cache-Control", "no-store")
    _daemon(request).metrics.request_answered(_route_name(request), response.status)
    return response


def _host_allowed(host_header: str, config: ApiConfig) -> bool:
    """Whether `Host` names this server: the bound host or a loopback name, with any
    port or none.  Anything else, on loopback, is a page's own hostname resolved to
    127.0.0.1 (DNS rebinding).  The port adds nothing against that (a rebinding page
    names its own host, whatever the port), and an SSH tunnel from another local
    port (`ssh -L 9000:127.0.0.1:8080`) sends that port."""
    text = host_header.strip().lower()
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        if not bracket:
            return False
    else:
        name, colon, port_text = text.partition(":")
        rest = colon + port_text
    if rest and (rest[:1] != ":" or not _decimal(rest[1:]) or int(rest[1:]) > 65535):
        return False
    return name == config.host.lower() or is_loopback(name)


@web.middleware
async def _host(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse a `Host` that is not this server's while bound to loopback; bound
    elsewhere, a token is required (check_bind) and it is what protects the API."""
    config = request.app[CONFIG]
    host_header = request.headers.get("Host")
    if (
        host_header is not None
        and is_loopback(config.host)
        and not _host_allowed(host_header, config)
    ):
        raise ApiError(421, "Host header does not name this server (loopback only)")
    return await handler(request)


@web.middleware
async def _content_type(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """POST routes take application/json only: a web page can POST text/plain or a
    form to 127.0.0.1 without a CORS preflight, but not application/json."""
    if (
        request.method == "POST"
        and request.match_info.http_exception is None
        and request.content_type != "application/json"
    ):
        raise ApiError(415, "expected Content-Type: application/json")
    return await handler(request)


@web.middleware
async def _auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    token = request.app[CONFIG].token
    if token and request.path not in OPEN_ROUTES:
        sent = request.headers.get("Authorization", "")
        scheme, _, value = sent.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode("utf-8", "surrogateescape"), token.encode()
        ):
            raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
    return await handler(request)


# --- routes ------------------------------------------------------------------------

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    return _json({"ok": True, "stopping": daemon.stopping})


#: /status makes reports for these many failure reasons only, and slices: one
#: cached report serves the page (10) and scripts (5 by default) alike, and no
#: caller can make the cache hold a report per `top` it asks for
REPORT_TOPS = (10, 100, 1000)
REPORT_TOP = REPORT_TOPS[0]
MAX_TOP = REPORT_TOPS[-1]


def report_top(top: int) -> int:
    """The report that serves `top` (0 to MAX_TOP) failure reasons."""
    return next(t for t in REPORT_TOPS if t >= top)


@dataclass
class _Reports:
    """/status reports, kept for a time-to-live that grows with what one costs (at
    most 2 % of a core spent answering), so open pages and scripts polling a big
    database share one report instead of each costing a full read; a report that
    cheap to make that its TTL would be under `min_ttl_s` is made for every caller.

    One report per key is made at a time: callers that need the same one meanwhile
    wait for it.  A report that took long to make (`slow_s`: a million jobs) is
    served a while past its time-to-live, up to `stale_s`, while a thread makes the
    next, so polling callers never wait for it; the API also makes the first one as
    it starts.  Once the API stops (`stop`), no thread makes another.
    """

    budget: float = 0.02
    min_ttl_s: float = MIN_TTL_S
    max_ttl_s: float = 15.0
    slow_s: float = 0.1
    stale_s: float = 60.0
    clock: Callable[[], float] = time.time
    #: report top -> (fresh until, usable until, report)
    kept: dict[int, tuple[float, float, dict[str, Any]]] = field(default_factory=dict)
    #: reports made, per key (tests count them)
    made: dict[int, int] = field(default_factory=dict)
    stopped: bool = False
    _costs: dict[int, tuple[float, ...]] = field(default_factory=dict)
    _making: set[int] = field(default_factory=set)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def get(self, daemon: DaemonHandle, top: int) -> dict[str, Any]:
        key = report_top(top)
        report: dict[str, Any] | None = None
        with self._cond:
            while True:
                now = self.clock()
                hit = self.kept.get(key)
                if hit is not None and now < hit[1]:
                    if now >= hit[0]:
                        self._refresh_later(daemon, key)
                    report = hit[2]
                    break
                if key in self._making:  # someone makes it: theirs will do
                    made = self.made.get(key, 0)
                    self._cond.wait_for(lambda: key not in self._making)
                    if self.made.get(key, 0) != made and key in self.kept:
                        report = self.kept[key][2]
                        break
                    continue  # theirs failed: make it here
                self._making.add(key)
                break
        if report is None:
            report = self._make(daemon, key)
        return report | {"top_failures": report["top_failures"][:top]}

    def stop(self) -> None:
        """No report is made in the background from now on."""
        with self._cond:
            self.stopped = True

    def _make(self, daemon: DaemonHandle, key: int) -> dict[str, Any]:
        """Make the report for `key`, which the caller has marked as being made."""
        try:
            made_at, started = self.clock(), time.perf_counter()
            headline = daemon.headlines.get(daemon.engine)
            report = read_status(daemon.engine, top=key, headline=headline)
            cost_s = time.perf_counter() - started
        except BaseException:
            with self._cond:
                self._making.discard(key)
                self._cond.notify_all()
            raise
        with self._cond:
            costs = self._costs[key] = (*self._costs.get(key, ())[-1:], cost_s)
            ttl_s = ttl_for(
                costs, budget=self.budget, min_ttl_s=self.min_ttl_s, max_ttl_s=self.max_ttl_s
            )
            usable_s = max(ttl_s, self.stale_s) if cost_s >= self.slow_s else ttl_s
            self.kept[key] = (made_at + ttl_s, made_at + usable_s, report)
            self.made[key] = self.made.get(key, 0) + 1
            self._making.discard(key)
            self._cond.notify_all()
        return report

    def _refresh_later(self, daemon: DaemonHandle, key: int) -> None:
        """Make the next report for `key` in a thread (under `_cond`)."""
        if self.stopped or key in self._making:
            return
        self._making.add(key)

        def refresh() -> None:
            if self.stopped:
                with self._cond:
                    self._making.discard(key)
                    self._cond.notify_all()
                return
            try:
                self._make(daemon, key)
            except Exception:
                log.exception("making a /status report failed")

        try:
            threading.Thread(target=refresh, name="runner-status-report", daemon=True).start()
        except RuntimeError:  # no thread to be had (exhausted, shutting down): callers make it
            self._making.discard(key)
            self._cond.notify_all()
            log.warning("could not start a thread to make the next /status report")


REPORTS = web.AppKey("reports", _Reports)


def _with_daemon(report: dict[str, Any], daemon: DaemonHandle) -> dict[str, Any]:
    """The report plus this daemon as only it knows itself, its row among the
    database's workers marked (and added, if it holds and finished nothing)."""
    me = daemon.describe()
    workers = []
    found = False
    for worker in report.get("workers", []):
        if worker["worker_id"] == me["worker_id"]:
            worker = worker | {"this": True, **me}
            found = True
        workers.append(worker)
    if not found:
        workers.insert(0, {"this": True, "running": 0, "finished_1h": 0, **me})
    return report | {"daemon": me, "workers": workers}


@routes.get("/status")
async def status(request: web.Request) -> web.Response:
    top_text = request.query.get("top", "5")
    if not _decimal(top_text) or int(top_text) > MAX_TOP:
        raise ApiError(400, f"top: expected an integer from 0 to {MAX_TOP}")
    daemon = _daemon(request)
    report = await _in_thread(request.app[REPORTS].get, daemon, int(top_text))
    return _json(finite_or_none(_with_daemon(report, daemon)))


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    headline = await _in_thread(daemon.headlines.get, daemon.engine)
    by_state = {state.value: n for state, n in headline.counts.items()}
    text = daemon.metrics.render(jobs_by_state=by_state, queues=daemon.queue_depths())
    return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})


def _finite(*values: float | None) -> bool:
    return all(value is None or math.isfinite(value) for value in values)


def _job_view(row: Any) -> dict[str, Any]:
    """The job as JSON.  A done job whose stored vector (or duration) is NaN or
    infinite has `result: null` and `result_error` says why: the job itself is
    readable, and strict JSON cannot carry the numbers."""
    result, result_error = None, None
    if row.status == jobs.Status.DONE.value and row.vector is not None:
        vector = np.frombuffer(row.vector, dtype="<f4", count=row.vector_dim)
        if np.isfinite(vector).all() and _finite(row.video_duration_s, row.processing_audio_time_s):
            result = {
                "vector": [float(x) for x in vector],
                "video_duration": row.video_duration_s,
                "channels_count": row.channels_count,
                "processing_audio_time": row.processing_audio_time_s,
                "model_id": row.model_id,
            }
        else:
            result_error = "the stored result is not finite (NaN or Infinity)"
    return {
        "key": row.key,
        "url": row.url,
        "state": row.status,
        "attempts": row.attempts,
        "error": row.error,
        "error_class": row.error_class,
        "http_status": row.http_status,
        "finished_at": row.finished_at if _finite(row.finished_at) else None,
        "result": result,
        "result_error": result_error,
    }


def read_job(engine: Engine, key: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        conn = conn.execution_options(**{READ_ONLY: True})
        with conn.begin():
            row = conn.execute(select(jobs_table).where(jobs_table.c.key == key)).first()
    return None if row is None else _job_view(row)


@routes.get("/jobs/{key:.+}")
async def get_job(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    view = await _in_thread(read_job, _daemon(request).engine, key)
    if view is None:
        return _error(404, f"no job with key {key!r}")
    return _json(view)


def _parse_records(body: bytes) -> tuple[list[catalogue.Record], Rejected]:
    """The same parser and checks as `runner import`; one record object is a list of one.

    CPU work on a body of up to `max_body_bytes`: run in a thread, off the loop.
    Records holding text no database can store (NUL, lone surrogates) refuse the
    whole request with a 400, as a refused URL does, rather than half of it.
    """
    shape = _loads(body)
    if isinstance(shape, dict) and "key" in shape:
        body = b"[" + body + b"]"
    elif not isinstance(shape, dict | list):
        raise ApiError(
            400, "expected a record {key, url, ...}, an array of them, or {key: {url, ...}}"
        )
    rejected = Rejected()
    try:
        records = list(iter_records(io.BytesIO(body), Path("body"), JOBS_FORMAT, rejected))
    except (ijson.JSONError, RunnerError, ValueError) as exc:  # ValueError: urlsplit
        raise ApiError(400, f"cannot read records: {exc}") from None
    if rejected.unstorable:
        raise ApiError(400, f"cannot store records: {rejected.unstorable}")
    for record in records:
        if record.invalid is not None and record.invalid.startswith(catalogue.UNSTORABLE):
            raise ApiError(400, f"job {record.key!r}: {record.invalid}")
    return records, rejected


def _first_by_host(records: list[catalogue.Record]) -> dict[str, catalogue.Record]:
    first_by_host: dict[str, catalogue.Record] = {}
    for record in records:
        if record.url is not None and not record.invalid:
            try:
                host = (URL(record.url).raw_host or "").lower()
            except ValueError:
                host = record.url
            first_by_host.setdefault(host, record)
    return first_by_host


async def _refuse_private(records: list[catalogue.Record], guard: UrlGuard | None) -> None:
    """Queued URLs are checked now, by address, like /encode_audio's (one look-up a host;
    the look-ups are the resolver's, off the loop; the hosts are gathered in a thread)."""
    if guard is None:
        return
    first_by_host = await _in_thread(_first_by_host, records)
    for record in first_by_host.values():
        assert record.url is not None
        try:
            await guard.check_resolved(record.url)
        except (UrlRefusedError, ValueError) as exc:
            raise ApiError(403, f"job {record.key!r}: {exc}") from None


#: a job whose URL an API caller gave: every daemon fetches it through the URL guard
MARK_FROM_API = text(
    "UPDATE jobs SET origin = 'api' WHERE key = :key AND url = :url AND status != 'done'"
)


def store_records(engine: Engine, records: list[catalogue.Record]) -> catalogue.ImportCounts:
    """One transaction, batched like `runner import`; the jobs whose URL this request
    set are marked as the API's, so daemons fetch them guarded."""
    counts, now = catalogue.ImportCounts(), time.time()
    with engine.begin() as conn:
        for start in range(0, len(records), BATCH_RECORDS):
            batch = records[start : start + BATCH_RECORDS]
            counts.add(catalogue.upsert_records(conn, batch, now=now))
            marks = [{"key": r.key, "url": r.url} for r in batch if r.url and not r.invalid]
            if marks:
                conn.execute(MARK_FROM_API, marks)
    return counts


@routes.post("/jobs")
async def post_jobs(request: web.Request) -> web.Response:
    body = await _read_body(request)
    records, rejected = await _in_thread(_parse_records, body)
    await _refuse_private(records, request.app[CONFIG].url_guard())
    counts = await _in_thread(store_records, _daemon(request).engine, records)
    return _json(
        {
            "inserted": counts.inserted,
            "updated": counts.updated,
            "unchanged": counts.unchanged,
            "invalid": counts.invalid + rejected.count,
            "rejected": rejected.count,
            "first_rejection": rejected.first_reason,
        }
    )


def _encode_request(payload: Any, config: ApiConfig) -> tuple[str, float]:
    if not isinstance(payload, dict):
        raise ApiError(400, 'expected a JSON object {"video_url": "..."}')
    url = payload.get("video_url")
    if url is None or (isinstance(url, str) and not url.strip()):
        raise ApiError(400, "video_url is missing")
    problem = url_problem(url)
    if problem:
        raise ApiError(400, f"video_url: {problem}")
    timeout_s = payload.get("timeout_s", config.encode_timeout_s)
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        raise ApiError(400, "timeout_s: expected a positive number of seconds")
    assert isinstance(url, str)
    return url.strip(), min(float(timeout_s), config.encode_timeout_s)


#: JobError class -> HTTP status; the first match wins
ERROR_STATUSES: tuple[tuple[type[JobError], int], ...] = (
    (UrlRefusedError, 403),
    (DownloadTimeoutError, 504),
    (DownloadError, 502),
    (DecodeError, 422),
    (EmbedOutOfMemoryError, 503),  # the device, not the video: try again
    (EmbedError, 422),  # failed alone in the model, or not finite (the embed loop's check)
)


def _encode_view(result: jobs.Result) -> dict[str, Any]:
    """/encode_audio's answer; 422 if the model gave NaN or Infinity, which strict
    JSON cannot carry and which is no usable embedding anyway."""
    if not np.isfinite(result.vector).all() or not _finite(
        result.video_duration_s, result.processing_audio_time_s
    ):
        raise ApiError(422, "the embedding is not finite (NaN or Infinity)")
    return {
        "features": [[float(x) for x in result.vector]],
        "processing_audio_time": result.processing_audio_time_s,
        "video_duration": result.video_duration_s,
        "channels_count": result.channels_count,
        "embed_spec": result.embed_spec,
    }


@routes.post("/encode_audio")
async def encode_audio(request: web.Request) -> web.Response:
    """At most `max_encode_requests` at once; the next one gets a 429 before its body
    is even read, so a burst of them can neither queue up nor hold the stages."""
    config, slots = request.app[CONFIG], request.app[ENCODE_SLOTS]
    if slots.active >= config.max_encode_requests:
        raise ApiError(
            429,
            f"{config.max_encode_requests} /encode_audio requests already in progress: retry later",
            {"Retry-After": "1"},
        )
    slots.active += 1
    try:
        return await _encode_audio(request, config)
    finally:
        slots.active -= 1


async def _encode_audio(request: web.Request, config: ApiConfig) -> web.Response:
    payload = await _json_body(request, config.encode_max_body_bytes)
    url, timeout_s = _encode_request(payload, config)
    guard = config.url_guard()
    if guard is not None:
        try:
            guard.check_url(url)
        except UrlRefusedError as exc:
            return _error(403, str(exc))
        except ValueError as exc:
            return _error(400, f"video_url: invalid url: {exc}")
    try:
        session = request.app.get(ADHOC_SESSION)
        result = await asyncio.wait_for(
            _daemon(request).encode_url(
                url,
                session=session,
                audio_cap=(config.encode_max_audio_s, "--encode-max-audio-s"),
            ),
            timeout_s,
        )
    except TimeoutError:  # asyncio.TimeoutError is this builtin since 3.11
        return _error(504, f"not finished within {timeout_s:g} s")
    except Stopping as exc:
        return _error(503, str(exc))
    except JobError as exc:
        status_code = next((s for kind, s in ERROR_STATUSES if isinstance(exc, kind)), 500)
        return _error(
            status_code, str(exc), error_class=exc.error_class, http_status=exc.http_status
        )
    return _json(_encode_view(result))


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return _json(document(secured=bool(request.app[CONFIG].token)))


#: the page and its files: scripts from this server only, no inline code, no framing,
#: and requests to this server only (the page talks to nothing else)
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def _page(request: web.Request) -> web.Response:
    """The status page (runner/web/), as shipped in the package: no build step, no
    CDN, nothing fetched from elsewhere, so it works on a machine without internet."""
    body, content_type = page_file(request.path)
    return web.Response(body=body, content_type=content_type, headers=PAGE_HEADERS)


for _path in PAGE_FILES:
    routes.get(_path)(_page)


# --- app and server ----------------------------------------------------------------


def make_app(
    daemon: DaemonHandle, config: ApiConfig, adhoc_session: aiohttp.ClientSession | None = None
) -> web.Application:
    app = web.Application(
        middlewares=[_errors, _host, _auth, _content_type], client_max_size=config.max_body_bytes
    )
    app[DAEMON] = daemon
    app[CONFIG] = config
    app[ENCODE_SLOTS] = _Slots()
    app[REPORTS] = _Reports()
    if adhoc_session is not None:
        app[ADHOC_SESSION] = adhoc_session
    app.add_routes(routes)
    return app


@contextlib.asynccontextmanager
async def serve_api(daemon: DaemonHandle, config: ApiConfig) -> AsyncIterator[str]:
    """Listen for as long as the daemon's stages run; yields the base URL.

    On the way out, callers still waiting on /encode_audio get a 503 at once
    rather than holding the shutdown up.
    """
    check_bind(config)
    guard = config.url_guard()
    session = None
    if guard is not None:  # URLs from callers: never into this machine's networks
        session = make_session(
            daemon.config.limits,
            connections=daemon.config.downloads,
            per_host=daemon.config.per_host,
            guard=guard,
        )
    # handler_cancellation: a caller who hangs up cancels its handler, and so its
    # /encode_audio slot and its download, instead of holding them to the timeout
    app_runner = web.AppRunner(
        make_app(daemon, config, session),
        access_log=None,
        shutdown_timeout=5.0,
        handler_cancellation=True,
    )
    await app_runner.setup()
    try:
        site = web.TCPSite(app_runner, config.host, config.port)
        await site.start()
        host, port = app_runner.addresses[0][:2]
        daemon.api_url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        log.info("HTTP API listening on %s", daemon.api_url)
        # the first report, made now rather than by the first caller (at a million
        # jobs it takes a few tenths of a second)
        warm = asyncio.get_running_loop().run_in_executor(
            None, app_runner.app[REPORTS].get, daemon, REPORT_TOP
        )
        warm.add_done_callback(_log_failure)
        yield daemon.api_url
    finally:
        app_runner.app[REPORTS].stop()
        daemon.abandon_adhoc("the daemon is stopping")
        await app_runner.cleanup()
        if session is not None:
            await session.close()


def _log_failure(future: asyncio.Future[Any]) -> None:
    """A background report that failed is logged, not left for asyncio to complain of."""
    if not future.cancelled() and future.exception() is not None:
        log.warning("the first /status report failed: %s", future.exception())


def api_service(config: ApiConfig) -> Callable[[DaemonHandle], Any]:
    """`serve_api` as a daemon service: the CLI hands this to the daemon it builds."""
    return lambda daemon: serve_api(daemon, config)
