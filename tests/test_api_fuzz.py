"""Property: no input gets a 5xx.  Every operation of the served OpenAPI document is
driven with hypothesis: random paths, queries, headers and bodies, from raw bytes
to well-formed requests whose URLs point at real media, errors and refused hosts.

The one exception is what the document itself promises for a source that fails:
/encode_audio answers 502 (unreachable) and 504 (timed out), as the old endpoint
did.  A 500 is never documented, so a bug always fails the test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.api import ApiConfig
from tests.api_server import (
    LOCAL,
    MAX_BODY_BYTES,
    TOKEN,
    ApiServer,
    daemon_config,
    request,
    run_api_server,
)
from tests.conftest import MediaServer

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, embedder: object
) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("api-fuzz")
    config = ApiConfig(
        port=0,
        token=TOKEN,
        exempt_networks=LOCAL,
        max_body_bytes=MAX_BODY_BYTES,
        encode_timeout_s=20,
    )
    db_url = f"sqlite:///{root / 'runner.db'}"
    with run_api_server(db_url, daemon_config(tiny_model, root / "work"), embedder, config) as srv:
        yield srv


@pytest.fixture(scope="module")
def operations(api: ApiServer) -> list[tuple[str, str, dict]]:
    doc = api("GET", "/openapi.json").json()
    return [
        (method.upper(), path, operation)
        for path, methods in doc["paths"].items()
        for method, operation in methods.items()
    ]


def urls(server: MediaServer) -> st.SearchStrategy[str]:
    paths = ["media/voice.opus", "media/random.bin", "media/empty.mp4", "page.html", "nope"]
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from([server.url(p) for p in paths]),
        # (1xx stalls until the download's timeout: test_api.py covers it once)
        st.integers(200, 599).map(lambda code: server.url(f"status/{code}")),
        st.builds(
            "{}://{}/{}".format,
            st.sampled_from(["http", "https", "ftp", "file", "HTTP", ""]),
            st.sampled_from(["127.0.0.2", "[::1]", "10.0.0.1", "a.invalid", "", "[zz", "%00"]),
            st.text(max_size=10),
        ),
    )


def json_values() -> st.SearchStrategy[object]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    )


def bodies(server: MediaServer) -> st.SearchStrategy[bytes]:
    record = st.fixed_dictionaries(
        {"key": st.one_of(st.text(max_size=12), st.integers(), st.none()), "url": urls(server)},
        optional={"title": json_values()},
    )
    encode = st.fixed_dictionaries(
        {"video_url": urls(server)},
        optional={"timeout_s": st.one_of(st.floats(0.01, 3), st.text(max_size=3), st.none())},
    )
    structured = st.one_of(json_values(), record, st.lists(record, max_size=4), encode)
    return st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        structured.map(lambda value: json.dumps(value).encode()),
    )


def _check(
    api: ApiServer, method: str, path: str, body: bytes | None, headers: dict, documented: set
) -> None:
    reply = request(api.base_url, method, path, body, token=None, headers=headers)
    assert reply.status < 500 or reply.status in documented, (method, path, body, reply)
    if reply.headers.get("Content-Type", "").startswith("application/json"):
        json.loads(reply.body)


@FUZZ
@given(data=st.data())
def test_no_input_gets_a_5xx(
    api: ApiServer, server: MediaServer, operations: list, data: st.DataObject
) -> None:
    method, path, operation = data.draw(st.sampled_from(operations))
    if "{key}" in path:
        key = data.draw(st.text(min_size=1, max_size=30))
        path = path.replace("{key}", quote(key, safe=""))
    query = data.draw(
        st.dictionaries(
            st.sampled_from(["top", "x", ""]),
            st.one_of(st.integers(-5, 2000).map(str), st.text(max_size=5)),
            max_size=2,
        )
    )
    if query:
        path += "?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in query.items())
    headers = {
        "Authorization": data.draw(
            st.one_of(
                st.sampled_from([f"Bearer {TOKEN}"] * 6 + ["Bearer", "Basic x", ""]),
                st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=20),
            )
        ),
        "Content-Type": data.draw(st.sampled_from(["application/json", "text/plain", "x/y"])),
    }
    body = data.draw(bodies(server)) if "requestBody" in operation else None
    documented = {int(code) for code in operation["responses"] if int(code) >= 500}
    assert 500 not in documented
    _check(api, method, path, body, headers, documented)
    # every method on every path, not only the documented ones
    other = data.draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    _check(api, other, path, body, headers, documented if other == method else set())


@FUZZ
@given(
    path=st.text(max_size=30).map(lambda text: "/" + quote(text, safe="/")),
    body=st.binary(max_size=100),
)
def test_unknown_paths_are_4xx(api: ApiServer, path: str, body: bytes) -> None:
    _check(api, "POST", path, body, {"Authorization": f"Bearer {TOKEN}"}, set())
