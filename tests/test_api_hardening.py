"""The API against a browser on this machine and against load: Content-Type and Host
checks, the /encode_audio limits, strict JSON and records no database can store."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine

from runner import jobs
from runner.api import ApiConfig, ApiError, _encode_view
from runner.models import jobs as jobs_table
from tests.api_server import (
    LOCAL,
    MAX_BODY_BYTES,
    TOKEN,
    ApiServer,
    HelperServer,
    daemon_config,
    run_api_server,
)
from tests.conftest import MediaServer

ENCODE_BODY = 1024
#: under long.mp4's 65 s: /encode_audio's own, smaller cap on decoded audio
ENCODE_MAX_AUDIO_S = 30.0
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, embedder: object
) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("api-hardening")
    config = ApiConfig(
        port=0,
        token=TOKEN,
        exempt_networks=LOCAL,
        max_body_bytes=MAX_BODY_BYTES,
        max_encode_requests=1,
        encode_max_body_bytes=ENCODE_BODY,
        encode_max_audio_s=ENCODE_MAX_AUDIO_S,
    )
    db_url = f"sqlite:///{root / 'runner.db'}"
    with run_api_server(db_url, daemon_config(tiny_model, root / "work"), embedder, config) as srv:
        yield srv


def test_post_routes_take_only_application_json(api: ApiServer) -> None:
    """A page can POST text/plain to 127.0.0.1 without a preflight; never accepted."""
    body = '{"key": "ct", "url": "https://a.invalid/v"}'
    for path in ("/jobs", "/encode_audio"):
        for headers in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "x/json"}):
            reply = api("POST", path, body, headers=headers)
            assert reply.status == 415, (path, headers, reply)
            assert "application/json" in reply.json()["error"]
    reply = api("POST", "/jobs", body, headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert reply.status == 200 and reply.json()["inserted"] == 1


def test_host_must_name_this_server_on_loopback(api: ApiServer) -> None:
    """DNS rebinding: a page's own hostname resolved to 127.0.0.1 is refused.  A
    loopback name with another port is this server through an SSH tunnel from that
    port (`ssh -L 9000:127.0.0.1:8080`), not a rebinding page."""
    port = int(api.base_url.rsplit(":", 1)[1])
    for host in (f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert api("GET", "/healthz", headers={"Host": host}).status == 200, host
    for host in ("127.0.0.1:9000", "localhost:9000", "[::1]:1", "127.0.0.1:1"):
        assert api("GET", "/status", headers={"Host": host}).status == 200, host
    for host in (
        "evil.test",
        f"evil.test:{port}",
        "evil.test:9000",
        "127.0.0.1:",
        "127.0.0.1:x",
        "127.0.0.1:99999",
        "127.0.0.1:" + "0" * 5000,  # more digits than int() takes: a 421, not a 500
        "[::1",
        "::1",
    ):
        for path in ("/healthz", "/status"):
            reply = api("GET", path, headers={"Host": host})
            assert reply.status == 421, (host, reply)
            assert "Host" in reply.json()["error"]


def test_encode_audio_is_bounded_and_refuses_at_once(api: ApiServer, helper: HelperServer) -> None:
    """Beyond max_encode_requests: 429 with Retry-After, before the body is read."""
    slow = {"video_url": helper.url("/slow?s=3")}
    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(api("POST", "/encode_audio", slow).status))
    thread.start()
    try:
        deadline = time.monotonic() + 2.5
        while True:  # an empty body: 400 while a slot is free, 429 once it is taken
            reply = api("POST", "/encode_audio", "", headers=JSON)
            if reply.status == 429 or time.monotonic() > deadline:
                break
            assert reply.status == 400
            time.sleep(0.02)
        assert reply.status == 429 and reply.headers["Retry-After"] == "1", reply
        assert "in progress" in reply.json()["error"]
        # other routes are not limited meanwhile
        assert api("GET", "/status").status == 200
    finally:
        thread.join(30)
    assert done and done[0] in (422, 504)  # stalls past the read timeout, or is no media
    assert api("POST", "/encode_audio", "", headers=JSON).status == 400  # the slot is free


def test_encode_audio_has_its_own_small_body_limit(api: ApiServer) -> None:
    big = {"video_url": "http://127.0.0.1/a.mp4", "pad": "x" * ENCODE_BODY}
    reply = api("POST", "/encode_audio", big)
    assert reply.status == 413 and f"over the {ENCODE_BODY}-byte limit" in reply.json()["error"]
    records = [
        {"key": f"big-{i}", "url": "https://a.invalid/v", "pad": "x" * 100} for i in range(20)
    ]
    assert api("POST", "/jobs", records).json()["inserted"] == 20  # POST /jobs: the large limit


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('{"key": "a\\u0000b", "url": "https://a.invalid/v"}', "key holds NUL"),
        (
            '[{"key": "ok-1", "url": "https://a.invalid/v"}, {"key": "n", "url": "https://a.invalid/\\u0000"}]',
            "'n'",
        ),
        ('{"nul\\u0000": {"url": "https://a.invalid/v"}}', "key holds NUL"),
        ('{"k": "\\udc80", "key": "s", "url": "https://a.invalid/v"}', "cannot read records"),
    ],
)
def test_post_jobs_refuses_text_no_database_stores(
    api: ApiServer, body: str, fragment: str
) -> None:
    reply = api("POST", "/jobs", body, headers=JSON)
    assert reply.status == 400, reply
    assert fragment in reply.json()["error"]
    assert api("GET", "/jobs/ok-1").status == 404  # nothing of the request was stored


def strict_json(body: bytes) -> Any:
    """JSON as the standard says: NaN and Infinity are refused."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(body, parse_constant=refuse)


def test_a_stored_vector_that_is_not_finite_is_reported_not_sent(api: ApiServer) -> None:
    engine = create_engine(api.db_url)
    vector = np.array([np.nan, 1.0, np.inf], dtype="<f4")
    with engine.begin() as conn:
        conn.execute(
            jobs_table.insert().values(
                key="nan-job",
                url="https://a.invalid/v",
                status="done",
                created_at=0.0,
                finished_at=1.0,
                vector=vector.tobytes(),
                vector_dim=3,
                video_duration_s=1.0,
                channels_count=1,
                processing_audio_time_s=0.1,
                model_id="m",
            )
        )
    engine.dispose()
    reply = api("GET", "/jobs/nan-job")
    assert reply.status == 200, reply
    job = strict_json(reply.body)
    assert job["state"] == "done" and job["result"] is None
    assert "not finite" in job["result_error"]
    status = api("GET", "/status")
    assert status.status == 200 and strict_json(status.body)["counts"]["done"] >= 1


def test_an_embedding_that_is_not_finite_is_a_422() -> None:
    result = jobs.Result(np.array([0.5, np.nan], dtype=np.float32), 1.0, 1, 0.1, "m")
    with pytest.raises(ApiError) as caught:
        _encode_view(result)
    assert caught.value.status == 422 and "not finite" in caught.value.message
    fine = jobs.Result(np.array([0.5, 0.25], dtype=np.float32), 1.0, 1, 0.1, "m")
    assert _encode_view(fine)["features"] == [[0.5, 0.25]]


def test_encode_audio_has_its_own_smaller_audio_cap(api: ApiServer, server: MediaServer) -> None:
    """A caller waits on /encode_audio: a source longer than --encode-max-audio-s fails
    as too_long (422) before any of it is embedded, while the daemon's own, larger
    --max-audio-s still applies to catalogue jobs."""
    reply = api("POST", "/encode_audio", {"video_url": server.url("media/long.mp4")})
    assert reply.status == 422, reply
    body = reply.json()
    assert body["error_class"] == "too_long"
    assert "--encode-max-audio-s" in body["error"]
    short = api("POST", "/encode_audio", {"video_url": server.url("media/song.mp3")})
    assert short.status == 200, short
    api("POST", "/jobs", [{"key": "long-job", "url": server.url("media/long.mp4")}])
    assert api.wait_for_job("long-job")["state"] == "done"


def test_a_caller_that_gives_up_stops_its_download(api: ApiServer, helper: HelperServer) -> None:
    """The caller's timeout ends the work too: the stalled download is cancelled at
    once (its temp file gone well before the 2 s read timeout would end it)."""
    workdir = api.daemon.config.workdir
    reply = api("POST", "/encode_audio", {"video_url": helper.url("/stall"), "timeout_s": 0.5})
    assert reply.status == 504, reply
    given_up = time.monotonic()
    while list(workdir.rglob("*.part")):
        assert time.monotonic() - given_up < 1.0, "the download went on after the caller left"
        time.sleep(0.02)


def test_a_caller_that_hangs_up_stops_its_download(api: ApiServer, helper: HelperServer) -> None:
    """Closing the connection cancels the handler (handler_cancellation), and with it
    the download and the /encode_audio slot, not only a timeout does."""
    workdir = api.daemon.config.workdir
    body = json.dumps({"video_url": helper.url("/stall")}).encode()
    host, port = api.base_url.removeprefix("http://").rsplit(":", 1)
    head = (
        f"POST /encode_audio HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(head + body)
        started = time.monotonic()
        while not list(workdir.rglob("*.part")):  # the download is under way
            assert time.monotonic() - started < 5, "the download never started"
            time.sleep(0.02)
    hung_up = time.monotonic()
    while list(workdir.rglob("*.part")):
        assert time.monotonic() - hung_up < 1.0, "the download went on after the caller left"
        time.sleep(0.02)
    assert api("GET", "/healthz").status == 200


def test_embed_failures_have_their_own_statuses() -> None:
    """A non-finite embedding is refused in the embed loop (an EmbedError): through
    /encode_audio that is a 422 like undecodable media, and running out of device
    memory a 503 to retry, never a 500."""
    from runner.api import ERROR_STATUSES
    from runner.errors import EmbedError, EmbedOutOfMemoryError

    def status(exc: Exception) -> int:
        return next((s for kind, s in ERROR_STATUSES if isinstance(exc, kind)), 500)

    assert status(EmbedError("the embedding is not finite")) == 422
    assert status(EmbedOutOfMemoryError("out of memory")) == 503
