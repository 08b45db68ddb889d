"""A server that misbehaves in every way a URL we do not control can: each case ends
in the right state within a bounded time, and the good videos in the same run are
done meanwhile.

The hostile server listens on 127.0.0.2, the good media on 127.0.0.1 (conftest's
server): two hosts, so the 429/503 host back-off is visible as a back-off of the
hostile host only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests import media
from tests.conftest import Cli, MediaServer, write_catalogue
from tests.hitserver import killed_at_exit
from tests.test_crash import start_daemon
from tests.threaded_server import serve_in_thread

MAX_BYTES = 1_000_000
READ_TIMEOUT_S = 0.5
MAX_ATTEMPTS = 3
RETRY_AFTER_S = 1
GOOD = ["stereo.mp4", "song.mp3", "voice.m4a", "clip.webm"]
#: the drip: one byte every DRIP_S against a floor of MIN_BYTES_PER_S over STALL_WINDOW_S
DRIP_S = 0.2
DRIP_LENGTH = 100_000  # announced, so the body looks merely slow: 20000 s at this rate
STALL_WINDOW_S = 1
MIN_BYTES_PER_S = 1000
BODY_ATTEMPTS = 2
FAST_S = 5.0  # "within seconds": generous for a loaded 2-core machine


class HostileServer:
    """Real sockets on 127.0.0.2; every handler records when it was hit."""

    def __init__(self, media: Path) -> None:
        self.media = media
        self.hits: dict[str, list[float]] = collections.defaultdict(list)
        #: the same hits in unix seconds, to compare with the jobs' finished_at
        self.wall_hits: dict[str, list[float]] = collections.defaultdict(list)
        #: (first byte, client gone) of each drip request, in monotonic seconds
        self.drips: list[tuple[float, float]] = []
        #: name -> (file, content type) served complete under /body/{name}
        self.bodies: dict[str, tuple[Path, str]] = {}
        self.base_url = ""
        self._closing = False

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    async def _hold(self, request: web.Request) -> None:
        """Silence until the client gives up (or the server stops)."""
        while not self._closing and request.transport and not request.transport.is_closing():
            await asyncio.sleep(0.05)

    async def endless(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        await response.prepare(request)
        chunk = b"\0" * 65536
        while not self._closing:
            try:
                await response.write(chunk)
            except ConnectionError:
                break
        return response

    async def silence(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "video/mp4", "Content-Length": "100000"}
        )
        await response.prepare(request)
        await self._hold(request)
        return response

    async def cut(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "video/mp4", "Content-Length": "100000"}
        )
        await response.prepare(request)
        await response.write(b"\0" * 5000)
        assert request.transport is not None
        request.transport.close()
        return response

    async def redirect_file(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("file:///etc/passwd")

    async def html(self, request: web.Request) -> web.Response:
        return web.Response(text="<html><body>Sign in</body></html>", content_type="text/html")

    async def flaky(self, request: web.Request) -> web.StreamResponse:
        """503 twice, then the file."""
        if len(self.hits[request.path]) <= 2:
            return web.Response(status=503, text="busy")
        return web.FileResponse(self.media / "song.mp3", headers={"Content-Type": "audio/mpeg"})

    async def too_many(self, request: web.Request) -> web.StreamResponse:
        """429 with Retry-After once, then the file."""
        if len(self.hits[request.path]) <= 1:
            return web.Response(
                status=429, text="slow down", headers={"Retry-After": str(RETRY_AFTER_S)}
            )
        return web.FileResponse(self.media / "voice.m4a", headers={"Content-Type": "audio/mp4"})

    async def drip(self, request: web.Request) -> web.StreamResponse:
        """One byte every DRIP_S of a long announced body: never silent for long enough
        to trip the read timeout, only the rate floor stops it."""
        response = web.StreamResponse(
            headers={"Content-Type": "video/mp4", "Content-Length": str(DRIP_LENGTH)}
        )
        await response.prepare(request)
        started = time.monotonic()
        for _ in range(DRIP_LENGTH):
            if self._closing or request.transport is None or request.transport.is_closing():
                break
            try:
                await response.write(b"\0")
            except ConnectionError:
                break
            await asyncio.sleep(DRIP_S)
        self.drips.append((started, time.monotonic()))
        return response

    async def body(self, request: web.Request) -> web.StreamResponse:
        """A file sent whole with its true Content-Length and a chosen content type."""
        path, content_type = self.bodies[request.match_info["name"]]
        return web.FileResponse(path, headers={"Content-Type": content_type})

    def app(self) -> web.Application:
        @web.middleware
        async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
            self.hits[request.path].append(time.monotonic())
            self.wall_hits[request.path].append(time.time())
            return await handler(request)

        app = web.Application(middlewares=[record])
        for path, handler in {
            "/endless.mp4": self.endless,
            "/silence.mp4": self.silence,
            "/cut.mp4": self.cut,
            "/redirect.mp4": self.redirect_file,
            "/page.mp4": self.html,
            "/flaky.mp3": self.flaky,
            "/busy.m4a": self.too_many,
            "/drip.mp4": self.drip,
            "/body/{name}": self.body,
        }.items():
            app.router.add_get(path, handler)
        return app

    @contextlib.contextmanager
    def running(self) -> Iterator[HostileServer]:
        with serve_in_thread(self.app(), name="hostile-server", host="127.0.0.2") as url:
            self.base_url = url
            try:
                yield self
            finally:
                self._closing = True  # lets the endless and silent handlers return


@pytest.fixture
def hostile(media_dir: Path) -> Iterator[HostileServer]:
    with HostileServer(media_dir).running() as server:
        yield server


#: key -> (path, final status, error class, HTTP status, attempts, message excerpt)
EXPECTED = {
    "endless": ("/endless.mp4", "failed", "download", 200, 1, "exceeds the 1000000-byte cap"),
    "silence": ("/silence.mp4", "failed", "download", 200, MAX_ATTEMPTS, "timed out"),
    "cut": ("/cut.mp4", "failed", "download", 200, MAX_ATTEMPTS, "body"),
    "redirect": ("/redirect.mp4", "failed", "download", None, 1, "redirect"),
    "html": ("/page.mp4", "failed", "download", 200, 1, "not a media file"),
    "flaky": ("/flaky.mp3", "done", None, None, 3, None),
    "busy": ("/busy.m4a", "done", None, None, 2, None),
}


def test_every_hostile_case_ends_right_and_good_jobs_finish(
    tmp_path: Path, tiny_model: Path, server: MediaServer, hostile: HostileServer
) -> None:
    records = {key: {"url": hostile.url(case[0])} for key, case in EXPECTED.items()}
    records.update({f"good-{name}": {"url": server.url(f"media/{name}")} for name in GOOD})
    db_url = f"sqlite:///{tmp_path / 'hostile.db'}"
    cli = Cli(db_url)
    cli("import", str(write_catalogue(tmp_path / "all_videos.json", records)))
    workdir = tmp_path / "work"
    daemon = start_daemon(
        db_url,
        tiny_model,
        workdir,
        "--until-done",
        f"--max-bytes={MAX_BYTES}",
        f"--read-timeout-s={READ_TIMEOUT_S}",
        "--connect-timeout-s=5",
        f"--max-attempts={MAX_ATTEMPTS}",
        "--retry-base-s=0.2",
        "--retry-max-s=2",
    )
    with killed_at_exit(daemon):
        daemon.wait(120)  # bounded: a hang raises TimeoutExpired
    log = (tmp_path / "daemon.log").read_text()
    assert daemon.returncode == 0, log[-3000:]

    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
        conn.row_factory = sqlite3.Row
        rows = {r["key"]: dict(r) for r in conn.execute("SELECT * FROM jobs")}
    for name in GOOD:
        assert rows[f"good-{name}"]["status"] == "done", rows[f"good-{name}"]
    got = {
        key: (row["status"], row["error_class"], row["http_status"], row["attempts"])
        for key, row in rows.items()
        if key in EXPECTED
    }
    assert got == {key: case[1:5] for key, case in EXPECTED.items()}, {
        key: row["error"] for key, row in rows.items()
    }
    for key, (path, status, _, _, attempts, message) in EXPECTED.items():
        row = rows[key]
        assert row["url"] == hostile.url(path)
        if message is None:
            assert row["error"] is None
        else:
            assert message in row["error"], (key, row["error"])
        if status == "failed" and attempts == MAX_ATTEMPTS:
            assert row["error"].startswith(f"gave up after {MAX_ATTEMPTS} attempts: "), row["error"]

    # 503 twice then the file: three requests; 429 then the file, after Retry-After
    assert len(hostile.hits["/flaky.mp3"]) == 3
    first, second = hostile.hits["/busy.m4a"]
    assert second - first >= RETRY_AFTER_S * 0.95
    assert not [p for p in workdir.rglob("*") if p.is_file()], "temp files left behind"

    fails = _exported_failures(cli, tmp_path / "out")
    assert set(fails) == {k for k, case in EXPECTED.items() if case[1] == "failed"}
    for key, entry in fails.items():
        assert entry["url"] == hostile.url(EXPECTED[key][0])
        assert entry["error"] == rows[key]["error"]
        assert entry["error_class"] == EXPECTED[key][2]
        assert entry["http_status"] == EXPECTED[key][3]
        assert entry["attempts"] == EXPECTED[key][4]


def _exported_failures(cli: Cli, out: Path) -> dict:
    cli("export", "--out", str(out))
    return json.loads((out / "audio_fail.json").read_text())


@pytest.fixture(scope="module")
def bodies(
    tmp_path_factory: pytest.TempPathFactory, media_dir: Path
) -> dict[str, tuple[Path, str]]:
    """Bodies that download fine but are no honest media: name -> (file, content type)."""
    root = tmp_path_factory.mktemp("hostile-bodies")
    target = media_dir / "voice.m4a"  # real media, named by absolute path in the playlists
    full_mp3 = media.make_mp3(root / "full.mp3", duration_s=12.0, channels=1)
    full_mp4 = media.make_mp4(root / "full.mp4", duration_s=12.0, channels=1)
    faststart = root / "faststart.mp4"  # moov first, as a streamable mp4 is: a cut keeps it
    media._run_ffmpeg("-i", str(full_mp4), "-c", "copy", "-movflags", "+faststart", str(faststart))
    return {
        "slow.wav": (media.make_slow_wav(root / "slow.wav"), "audio/wav"),
        "nan.wav": (media.make_float_wav_with_nan(root / "nan.wav"), "audio/wav"),
        "manifest.mpd": (media.make_dash_manifest(root / "a.mpd", target), "application/dash+xml"),
        "manifest.bin": (
            media.make_dash_manifest(root / "b.mpd", target),
            "application/octet-stream",
        ),
        "playlist.m3u8": (
            media.make_hls_playlist(root / "p.m3u8", target),
            "application/vnd.apple.mpegurl",
        ),
        "list.ffconcat": (media.make_ffconcat(root / "l.txt", target), "application/octet-stream"),
        "cut.mp3": (media.make_truncated(root / "cut.mp3", full_mp3), "audio/mpeg"),
        "cut.mp4": (media.make_truncated(root / "cut.mp4", faststart), "video/mp4"),
    }


#: key -> (path on the hostile server, error class, HTTP status, attempts, message excerpt);
#: every one fails, and none leaves a vector
BODY_CASES = {
    "drip": ("/drip.mp4", "download", 200, BODY_ATTEMPTS, "--min-bytes-per-s"),
    "slow-wav": ("/body/slow.wav", "too_long", None, 1, "--max-audio-s"),
    "dash": ("/body/manifest.mpd", "decode", None, 1, "not a media file"),
    "dash-octet": ("/body/manifest.bin", "decode", None, 1, "not a media file"),
    # the downloader fetches HLS itself: the absolute path it names is asked of the
    # server the playlist came from, never read from this machine's disk
    "hls": ("/body/playlist.m3u8", "download", 404, 1, "HLS segment 1 of 1: HTTP 404"),
    "ffconcat": ("/body/list.ffconcat", "decode", None, 1, "not a media file"),
    "nan": ("/body/nan.wav", "decode", None, 1, "non-finite"),
    "cut-mp3": ("/body/cut.mp3", "truncated", None, 1, "truncated: the container states 12.0 s"),
    "cut-mp4": ("/body/cut.mp4", "truncated", None, 1, "truncated: the container states 12.0 s"),
}


def test_hostile_bodies_fail_right_while_good_jobs_finish(
    tmp_path: Path,
    tiny_model: Path,
    server: MediaServer,
    hostile: HostileServer,
    bodies: dict[str, tuple[Path, str]],
) -> None:
    """A drip cut by the rate floor, a 1 Hz WAV claiming 55 hours, manifests naming a
    local file, NaN samples and cut files: each fails with the right class, no vector
    is stored or exported, and the good videos of the same run are done."""
    hostile.bodies = bodies
    records = {key: {"url": hostile.url(case[0])} for key, case in BODY_CASES.items()}
    records.update({f"good-{name}": {"url": server.url(f"media/{name}")} for name in GOOD})
    db_url = f"sqlite:///{tmp_path / 'bodies.db'}"
    cli = Cli(db_url)
    cli("import", str(write_catalogue(tmp_path / "all_videos.json", records)))
    workdir = tmp_path / "work"
    started = time.monotonic()
    daemon = start_daemon(
        db_url,
        tiny_model,
        workdir,
        "--until-done",
        f"--max-bytes={MAX_BYTES}",
        "--read-timeout-s=5",  # well above DRIP_S: only the rate floor can cut the drip
        "--connect-timeout-s=5",
        f"--max-attempts={BODY_ATTEMPTS}",
        "--retry-base-s=0.05",
        "--retry-max-s=0.2",
        f"--stall-window-s={STALL_WINDOW_S}",
        f"--min-bytes-per-s={MIN_BYTES_PER_S}",
    )
    with killed_at_exit(daemon):
        daemon.wait(120)  # bounded: a hang raises TimeoutExpired
    run_s = time.monotonic() - started
    log = (tmp_path / "daemon.log").read_text()
    assert daemon.returncode == 0, log[-3000:]

    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
        conn.row_factory = sqlite3.Row
        rows = {r["key"]: dict(r) for r in conn.execute("SELECT * FROM jobs")}
    for name in GOOD:
        row = rows[f"good-{name}"]
        assert row["status"] == "done" and row["vector"] is not None, row["error"]
    got = {
        key: (row["status"], row["error_class"], row["http_status"], row["attempts"])
        for key, row in rows.items()
        if key in BODY_CASES
    }
    assert got == {key: ("failed", *case[1:4]) for key, case in BODY_CASES.items()}, {
        key: row["error"] for key, row in rows.items()
    }
    for key, (path, *_, message) in BODY_CASES.items():
        row = rows[key]
        assert row["url"] == hostile.url(path)
        assert message in row["error"], (key, row["error"])
        assert row["vector"] is None and row["vector_dim"] is None, key

    # the drip: each try cut about one stall window in, the run far shorter than the body
    assert rows["drip"]["error"].startswith(f"gave up after {BODY_ATTEMPTS} attempts: too slow")
    assert len(hostile.drips) == BODY_ATTEMPTS
    for first_byte, gone in hostile.drips:
        assert STALL_WINDOW_S * 0.9 <= gone - first_byte < STALL_WINDOW_S + 1.5, hostile.drips
    assert run_s < 60, run_s  # the drip alone would run DRIP_LENGTH * DRIP_S = 20000 s
    # the 1 Hz WAV: failed as soon as ffmpeg stated its 55 hours, not after decoding them
    (fetched,) = hostile.wall_hits["/body/slow.wav"]
    assert rows["slow-wav"]["finished_at"] - fetched < FAST_S
    assert "200000 s long per its container" in rows["slow-wav"]["error"]
    assert not [p for p in workdir.rglob("*") if p.is_file()], "temp files left behind"

    out = tmp_path / "out"
    cli("export", "--out", str(out))
    fails = json.loads((out / "audio_fail.json").read_text())
    assert set(fails) == set(BODY_CASES)
    for key, entry in fails.items():
        assert (entry["error_class"], entry["http_status"], entry["attempts"]) == BODY_CASES[key][
            1:4
        ]
        assert entry["error"] == rows[key]["error"]
    assert set(_strict_json(out / "audio_vectors.json")) == {f"good-{name}" for name in GOOD}


def _strict_json(path: Path) -> dict:
    """json.loads that refuses NaN, Infinity and -Infinity, which JSON does not have."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)
