"""The HTTP API against a real daemon: real model, real media server, real SQLite."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from runner.api import ApiConfig, parse_bind, routes
from runner.errors import RunnerError
from runner.metrics import Metrics
from tests.api_server import (
    LOCAL,
    MAX_BODY_BYTES,
    TOKEN,
    ApiServer,
    HelperServer,
    daemon_config,
    request,
    run_api_server,
    start_runner_api,
    stop_runner_api,
)
from tests.conftest import TINY_HIDDEN, Cli, MediaServer, write_catalogue


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, embedder: object
) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("api")
    config = ApiConfig(port=0, token=TOKEN, exempt_networks=LOCAL, max_body_bytes=MAX_BODY_BYTES)
    db_url = f"sqlite:///{root / 'runner.db'}"
    with run_api_server(db_url, daemon_config(tiny_model, root / "work"), embedder, config) as srv:
        yield srv


# --- authentication ------------------------------------------------------------------


def test_healthz_is_open_and_every_other_route_needs_the_token(api: ApiServer) -> None:
    assert api("GET", "/healthz", token=None).json()["ok"] is True
    routes_ = [
        ("GET", "/status"),
        ("GET", "/metrics"),
        ("GET", "/jobs/x"),
        ("GET", "/openapi.json"),
        ("POST", "/jobs"),
        ("POST", "/encode_audio"),
    ]
    for method, path in routes_:
        for token in (None, "wrong", TOKEN + "x", ""):
            reply = api(method, path, {"video_url": "http://127.0.0.1/"}, token=token)
            assert reply.status == 401, (method, path, token)
            assert reply.headers["WWW-Authenticate"] == "Bearer"
            assert "token" in reply.json()["error"]
    reply = api("GET", "/status", headers={"Authorization": "Bearer \xff\xfe"})
    assert reply.status == 401
    reply = api("GET", "/status", headers={"Authorization": f"bearer {TOKEN}"})
    assert reply.status == 200


# --- /encode_audio -------------------------------------------------------------------


def test_encode_audio_old_contract_same_vector_as_a_queued_job(
    api: ApiServer, server: MediaServer
) -> None:
    url = server.url("media/stereo.mp4")
    reply = api("POST", "/encode_audio", {"video_url": url})
    assert reply.status == 200, reply
    body = reply.json()
    # the old contract's four fields, and the spec that made the vector (runner/spec.py)
    old = {"features", "processing_audio_time", "video_duration", "channels_count"}
    assert set(body) == old | {"embed_spec"}
    assert isinstance(body["embed_spec"], str) and len(body["embed_spec"]) == 32
    assert len(body["features"]) == 1 and len(body["features"][0]) == TINY_HIDDEN
    assert np.linalg.norm(body["features"][0]) > 0.1
    assert body["channels_count"] == 2
    assert body["video_duration"] == pytest.approx(3.0, abs=0.1)
    assert body["processing_audio_time"] > 0

    # the same video through the queue: the daemon claims it, the same stages embed it
    assert api("POST", "/jobs", {"key": "stereo-queued", "url": url}).json()["inserted"] == 1
    job = api.wait_for_job("stereo-queued")
    assert job["state"] == "done", job
    assert job["result"]["channels_count"] == 2
    np.testing.assert_allclose(job["result"]["vector"], body["features"][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({}, 400, "video_url is missing"),
        ({"video_url": ""}, 400, "video_url is missing"),
        ({"video_url": None}, 400, "video_url is missing"),
        ({"video_url": 5}, 400, "not a string"),
        ({"video_url": "ftp://127.0.0.1/a.mp4"}, 400, "scheme"),
        ({"video_url": "http:///nohost"}, 400, "host"),
        ({"video_url": "ftp://[zz"}, 400, "url is malformed"),
        ({"video_url": "http://a]b/"}, 400, "url is malformed"),
        ([], 400, "JSON object"),
        ("not json", 400, "invalid JSON at line 1 column 1"),
        ('{"video_url": ', 400, "invalid JSON"),
        (b"\xff\xfe\x00garbage", 400, "JSON"),
        ("", 400, "empty body"),
        ({"video_url": "http://127.0.0.1/x", "timeout_s": -1}, 400, "timeout_s"),
        ({"video_url": "http://127.0.0.1/x", "timeout_s": "1"}, 400, "timeout_s"),
        ('{"video_url": "http://127.0.0.1/x", "timeout_s": NaN}', 400, "timeout_s"),
        ('{"video_url": "http://127.0.0.1/x", "timeout_s": Infinity}', 400, "timeout_s"),
    ],
)
def test_encode_audio_bad_requests(
    api: ApiServer, body: object, status: int, fragment: str
) -> None:
    data = body if isinstance(body, dict | list | bytes) else str(body)
    reply = api("POST", "/encode_audio", data, headers={"Content-Type": "application/json"})
    assert reply.status == status, reply
    assert fragment in reply.json()["error"]


@pytest.mark.parametrize(
    ("path", "status", "fragment"),
    [
        ("status/404", 502, "HTTP 404"),
        ("status/503", 502, "HTTP 503"),
        ("page.html", 502, "not a media file"),
        ("media/random.bin", 422, "not a media file"),
        ("media/silent-video.mp4", 422, "no audio stream"),
        ("media/empty.mp4", 422, "empty file"),
        ("status/100", 504, "timed out"),  # aiohttp alone would wait forever
    ],
)
def test_encode_audio_source_errors(
    api: ApiServer, server: MediaServer, path: str, status: int, fragment: str
) -> None:
    reply = api("POST", "/encode_audio", {"video_url": server.url(path)})
    assert reply.status == status, reply
    assert fragment in reply.json()["error"]


def test_encode_audio_unreachable_and_timeouts(api: ApiServer, helper: HelperServer) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    reply = api("POST", "/encode_audio", {"video_url": f"http://127.0.0.1:{closed_port}/a.mp4"})
    assert reply.status == 502 and "cannot connect" in reply.json()["error"]

    # hosts the resolver cannot even encode: one failed job, not a dead download stage
    reply = api("POST", "/encode_audio", {"video_url": "http://a..b/x.mp4"})
    assert reply.status == 502 and "invalid url" in reply.json()["error"]
    api("POST", "/jobs", {"key": "bad-host", "url": "http://" + "x" * 70 + "/a.mp4"})
    job = api.wait_for_job("bad-host")
    assert job["state"] == "failed" and "invalid url" in job["error"], job

    reply = api("POST", "/encode_audio", {"video_url": helper.url("/stall")})
    assert reply.status == 504 and "timed out" in reply.json()["error"]

    slow = {"video_url": helper.url("/slow?s=2"), "timeout_s": 0.3}
    reply = api("POST", "/encode_audio", slow)
    assert reply.status == 504 and "not finished within 0.3 s" in reply.json()["error"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:9/a.mp4",
        "http://[::1]:9/a.mp4",
        "http://10.1.2.3/a.mp4",
        "https://192.168.0.1/a.mp4",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:10.0.0.1]/a.mp4",
        "http://[fe80::1]/a.mp4",
        "http://0.0.0.0:9/a.mp4",
    ],
)
def test_private_addresses_are_refused(api: ApiServer, url: str) -> None:
    reply = api("POST", "/encode_audio", {"video_url": url})
    assert reply.status == 403, reply
    assert reply.json()["error"].startswith("refused:")
    reply = api("POST", "/jobs", [{"key": "private", "url": url}])
    assert reply.status == 403 and "'private'" in reply.json()["error"]
    assert api("GET", "/jobs/private").status == 404


def test_every_redirect_is_checked(
    api: ApiServer, helper: HelperServer, server: MediaServer
) -> None:
    to_private = helper.url("/redirect?to=" + quote("http://127.0.0.2:9/a.mp4"))
    reply = api("POST", "/encode_audio", {"video_url": to_private})
    assert reply.status == 403 and "127.0.0.2" in reply.json()["error"]

    twice = helper.url("/redirect?to=" + quote(helper.url("/redirect?to=http://10.0.0.1/a")))
    reply = api("POST", "/encode_audio", {"video_url": twice})
    assert reply.status == 403 and "10.0.0.1" in reply.json()["error"]

    to_file = helper.url("/redirect?to=" + quote("file:///etc/passwd"))
    assert api("POST", "/encode_audio", {"video_url": to_file}).status in (403, 502)

    to_media = helper.url("/redirect?to=" + quote(server.url("media/song.mp3")))
    reply = api("POST", "/encode_audio", {"video_url": to_media})
    assert reply.status == 200 and reply.json()["channels_count"] == 1


def test_body_size_is_limited(api: ApiServer) -> None:
    big = {"video_url": "http://127.0.0.1/a.mp4", "pad": "x" * MAX_BODY_BYTES}
    for path in ("/encode_audio", "/jobs"):
        reply = api("POST", path, big)
        assert reply.status == 413, reply
        assert f"over the {MAX_BODY_BYTES}-byte limit" in reply.json()["error"]


# --- /jobs ---------------------------------------------------------------------------


def test_post_jobs_counts_like_runner_import(
    api: ApiServer, server: MediaServer, cli: Cli, tmp_path: Path
) -> None:
    records = [
        {"key": "imp-a", "url": server.url("status/404"), "title": "A"},
        {"key": "imp-b", "url": "not a url"},
        {"key": "imp-c"},
        {"url": server.url("status/404")},
    ]
    first = api("POST", "/jobs", records).json()
    assert first == {
        "inserted": 1,
        "updated": 0,
        "unchanged": 0,
        "invalid": 3,
        "rejected": 1,
        "first_rejection": "record #3: no 'key' field",
    }
    again = api("POST", "/jobs", records).json()
    assert (again["inserted"], again["unchanged"], again["invalid"]) == (0, 1, 3)

    # `runner import` of the same records (its array form keys on "key" here too)
    path = write_catalogue(tmp_path / "same.json", records)  # type: ignore[arg-type]
    printed = cli("import", str(path), "--key-field", "key").stdout
    assert printed.startswith("inserted 1, updated 0, unchanged 0, invalid 3")

    job = api("GET", "/jobs/imp-b").json()
    assert (job["state"], job["error_class"]) == ("failed", "invalid")
    assert "url" in job["error"] and job["result"] is None
    assert api("GET", "/jobs/imp-c").json()["error"].startswith("no url")


def test_post_jobs_accepts_one_record_and_the_catalogue_mapping(
    api: ApiServer, server: MediaServer
) -> None:
    url = server.url("status/410")
    assert api("POST", "/jobs", {"key": "one/with slash é", "url": url}).json()["inserted"] == 1
    mapping = {"map-a": {"url": url}, "map-b": {"url": url, "n": 1}}
    assert api("POST", "/jobs", mapping).json()["inserted"] == 2
    job = api.wait_for_job(quote("one/with slash é", safe=""))
    assert job["key"] == "one/with slash é"
    assert (job["state"], job["http_status"]) == ("failed", 410)
    for bad in ("5", '"text"', "[1, 2", "null"):
        reply = api("POST", "/jobs", bad, headers={"Content-Type": "application/json"})
        assert reply.status == 400 and reply.json()["error"], bad


def test_unknown_job_is_404(api: ApiServer) -> None:
    reply = api("GET", "/jobs/" + quote("never seen", safe=""))
    assert reply.status == 404 and "never seen" in reply.json()["error"]


# --- /status, /metrics, /openapi.json ------------------------------------------------

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]\w*="([^"\\]|\\.)*",?)*\})? \S+$')


def _samples(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"# (HELP|TYPE) \w+ ", line), line
            continue
        assert SAMPLE.match(line), line
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def test_status_and_metrics(api: ApiServer, server: MediaServer) -> None:
    api("POST", "/jobs", [{"key": "metrics-song", "url": server.url("media/song.mp3")}])
    assert api.wait_for_job("metrics-song")["state"] == "done"

    status = api("GET", "/status?top=3").json()
    assert status["counts"]["done"] >= 1 and "eta_s" in status and "rates" in status
    assert api("GET", "/status?top=x").status == 400

    reply = api("GET", "/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    values = _samples(reply.body.decode())
    assert values['runner_jobs{state="done"}'] >= 1
    assert values['runner_jobs_finished_total{error_class="",outcome="done"}'] >= 1
    assert values["runner_download_bytes_total"] > 1000
    for stage in ("download_seconds", "decode_seconds", "embed_batch_seconds"):
        assert values[f"runner_{stage}_count"] >= 1
        assert values[f'runner_{stage}_bucket{{le="+Inf"}}'] == values[f"runner_{stage}_count"]
    for queue in ("download", "decode", "window", "store", "inflight"):
        assert f'runner_queue_depth{{queue="{queue}"}}' in values
    assert 0 < values["runner_embed_busy_ratio"] <= 1
    assert values['runner_http_requests_total{code="200",route="/jobs/{key}"}'] >= 1


def test_openapi_document_lists_every_route(api: ApiServer) -> None:
    doc = api("GET", "/openapi.json").json()
    assert doc["openapi"].startswith("3.") and doc["security"] == [{"bearer": []}]
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = {
        (r.method, r.path.replace("{key:.+}", "{key}"))  # type: ignore[attr-defined]
        for r in routes
    }
    assert documented == served


# --- metrics rendering ---------------------------------------------------------------


def test_metrics_text_format() -> None:
    clock = iter([0.0, 10.0, 10.0]).__next__
    metrics = Metrics(clock=clock)
    metrics.embedded(2.5)
    metrics.downloaded(100, 0.07)
    metrics.downloaded(50, 7.0)
    metrics.request_answered('/a"b\\c\n', 200)
    text = metrics.render(jobs_by_state={"done": 3}, queues={"download": 1})
    assert 'runner_http_requests_total{code="200",route="/a\\"b\\\\c\\n"} 1.0' in text
    values = _samples(text)
    assert values['runner_download_seconds_bucket{le="0.05"}'] == 0
    assert values['runner_download_seconds_bucket{le="0.1"}'] == 1
    assert values['runner_download_seconds_bucket{le="10.0"}'] == 2
    assert values['runner_download_seconds_bucket{le="+Inf"}'] == 2
    assert values["runner_download_seconds_sum"] == pytest.approx(7.07)
    assert values["runner_download_bytes_total"] == 150
    assert values["runner_embed_busy_ratio"] == 0.25
    assert values['runner_jobs{state="done"}'] == 3


# --- the command line ----------------------------------------------------------------


def test_parse_bind() -> None:
    assert parse_bind("8080") == ("127.0.0.1", 8080)
    assert parse_bind(":9") == ("127.0.0.1", 9)
    assert parse_bind("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_bind("[::1]:80") == ("::1", 80)
    for bad in ("", "host:", "x:99999", "a:b"):
        with pytest.raises(RunnerError):
            parse_bind(bad)


@pytest.mark.parametrize("command", ["serve", "daemon"])
def test_listening_beyond_loopback_needs_a_token(
    cli: Cli, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNNER_API_TOKEN", raising=False)
    result = cli(command, "--http", "0.0.0.0:0", "--workdir", str(tmp_path / "w"), ok=False)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "runner: error: --http 0.0.0.0:0 listens beyond this machine: set a token with "
        "--token or RUNNER_API_TOKEN"
    ]
    assert not Path(cli.db_url.removeprefix("sqlite:///")).exists(), "touched the database"
    result = cli(command, "--http", "nonsense", ok=False)
    assert result.exit_code == 1 and "expected PORT or HOST:PORT" in result.stderr


def test_serve_and_daemon_http_as_processes(
    tmp_path: Path, tiny_model: Path, server: MediaServer, cli: Cli
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RUNNER_API_TOKEN"}
    env |= {"RUNNER_DB": cli.db_url, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    common = ["--model", str(tiny_model), "--device", "cpu", "--workdir", str(tmp_path / "w")]
    media = server.url("media/voice.m4a")

    # serve: the API only, private URLs refused, queued jobs left to daemons
    serve = ["serve", "--http", "127.0.0.1:0", *common]
    proc, base, reader = start_runner_api(serve, tmp_path, env)
    try:
        assert request(base, "GET", "/healthz", token=None).status == 200
        reply = request(base, "POST", "/encode_audio", {"video_url": media}, token=None)
        assert reply.status == 403 and "loopback" in reply.json()["error"]
        reply = request(base, "POST", "/jobs", {"key": "queued", "url": "https://a.invalid/v"})
        assert reply.json()["inserted"] == 1
        time.sleep(0.5)
        assert request(base, "GET", "/jobs/queued").json()["state"] == "pending"
    finally:
        stop_runner_api(proc, reader)

    # daemon --http: claims the queue and answers ad-hoc requests with the same model
    cli("import", str(write_catalogue(tmp_path / "c.json", {"v": {"url": media}})))
    args = ["daemon", "--http", "127.0.0.1:0", "--allow-private-urls", *common]
    proc, base, reader = start_runner_api([*args, "--token", "t0k"], tmp_path, env)
    try:
        assert request(base, "GET", "/status", token=None).status == 401
        reply = request(base, "POST", "/encode_audio", {"video_url": media}, token="t0k")
        assert reply.status == 200, reply
        deadline = time.monotonic() + 60
        while (job := request(base, "GET", "/jobs/v", token="t0k").json())["state"] != "done":
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        np.testing.assert_allclose(job["result"]["vector"], reply.json()["features"][0], 1e-4)
        assert json.loads(request(base, "GET", "/status", token="t0k").body)["counts"]["done"] == 1
    finally:
        stop_runner_api(proc, reader)
