"""Jobs queued through the API are fetched through the URL guard (issue 12).

A URL an API caller gives is checked when it is queued, but what it redirects to,
and what its name resolves to, are decided when a daemon fetches it: so every
daemon fetches such a job through the same guard as /encode_audio.  The test
servers are on 127.0.0.1, let through by the tests' exemption; 127.0.0.2 stands for
an internal address the exemption does not cover.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from runner.api import ApiConfig
from runner.db import connect
from runner.download import UrlGuard
from runner.models import jobs as jobs_table
from tests.api_server import (
    LOCAL,
    TOKEN,
    ApiServer,
    HelperServer,
    daemon_config,
    run_api_server,
)
from tests.conftest import MediaServer

#: only the test servers' own address
GUARD = UrlGuard(exempt=(ipaddress.ip_network("127.0.0.1/32"),))


def serve(root: Path, tiny_model: Path, embedder: object, **daemon: object) -> ApiServer:
    config = ApiConfig(port=0, token=TOKEN, exempt_networks=LOCAL)
    db_url = f"sqlite:///{root / 'runner.db'}"
    return run_api_server(  # type: ignore[return-value]
        db_url,
        daemon_config(tiny_model, root / "work", url_guard=GUARD, **daemon),
        embedder,
        config,
    )


def test_a_queued_url_redirecting_inside_fails_when_fetched(
    tmp_path: Path, tiny_model: Path, embedder: object, helper: HelperServer, server: MediaServer
) -> None:
    inside = server.url("media/song.mp3").replace("127.0.0.1", "127.0.0.2")
    sneaky = helper.url(f"/redirect?to={inside}")
    plain = server.url("media/song.mp3")
    with serve(tmp_path, tiny_model, embedder) as api:
        reply = api(
            "POST", "/jobs", [{"key": "sneaky", "url": sneaky}, {"key": "ok", "url": plain}]
        )
        assert reply.status == 200, reply  # 127.0.0.1 passes the check when queued
        sneaky_job, ok_job = api.wait_for_job("sneaky"), api.wait_for_job("ok")
    assert ok_job["state"] == "done"
    assert sneaky_job["state"] == "failed"
    assert "refused" in sneaky_job["error"] and "127.0.0.2" in sneaky_job["error"]
    assert sneaky_job["result"] is None


def test_catalogue_urls_are_guarded_only_when_asked(
    tmp_path: Path, tiny_model: Path, embedder: object, helper: HelperServer, server: MediaServer
) -> None:
    """The operator's own catalogue may point inside (their own media servers) unless
    --guard-catalogue-urls says otherwise; an import of the same URL makes it the
    catalogue's again."""
    inside = server.url("media/song.mp3").replace("127.0.0.1", "127.0.0.2")
    sneaky = helper.url(f"/redirect?to={inside}")
    for guard_catalogue in (False, True):
        root = tmp_path / f"guard-{guard_catalogue}"
        root.mkdir()
        engine = connect(f"sqlite:///{root / 'runner.db'}")
        with engine.begin() as conn:
            conn.execute(
                jobs_table.insert(),
                [{"key": "cat", "url": sneaky, "host": "127.0.0.1", "created_at": 0.0}],
            )
        engine.dispose()
        with serve(root, tiny_model, embedder, guard_catalogue=guard_catalogue) as api:
            job = api.wait_for_job("cat")
        assert job["state"] == "failed"
        refused = "refused" in job["error"]
        assert refused is guard_catalogue, job["error"]  # unguarded: 127.0.0.2 is not served
