"""HLS playlists fetched by the downloader (issue 14).

A URL serving an HLS playlist is fetched as its segments, in order, into one file
the decoder reads like any other.  Everything here is real: playlists and segments
made by ffmpeg (`-f hls`, MPEG-TS, fMP4, one-file byte ranges, AES-128), served by
an aiohttp server on 127.0.0.1, fetched by `download()` or by the daemon with the
tiny model.  The whole file the streams are cut from is served too, so the vectors
can be compared with its vector.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from runner.api import ApiConfig
from runner.decode import decode_all
from runner.download import Downloaded, DownloadLimits, UrlGuard, download, make_session
from runner.errors import DownloadError, DownloadTimeoutError, JobError, UrlRefusedError
from tests import media
from tests.api_server import LOCAL, TOKEN, daemon_config, run_api_server
from tests.argv import daemon_args
from tests.conftest import Cli, write_catalogue
from tests.threaded_server import serve_in_thread

SOURCE_S = 6.0
#: a 16-byte AES-128 key, and an IV for the playlist that states one
KEY = bytes(range(16))
IV_HEX = "0x000102030405060708090a0b0c0d0e0f"
#: keyframes every second (10 fps), so `-hls_time 2` can cut the video every 2 s
_VIDEO = ("-c:v", "libx264", "-preset", "ultrafast", "-g", "10", "-pix_fmt", "yuv420p")
_HLS = ("-f", "hls", "-hls_playlist_type", "vod", "-hls_time", "2")
CONTENT_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".ts": "video/mp2t",
    ".m4s": "video/iso.segment",
    ".mp4": "video/mp4",
    ".bin": "application/octet-stream",
}
#: only the test server's own address: 127.0.0.2 stands for an internal one
GUARD = UrlGuard(exempt=(ipaddress.ip_network("127.0.0.1/32"),))


def _hls(source: Path, out: Path, *args: str) -> Path:
    """ffmpeg's HLS muxer: `out` is the playlist, segments beside it; audio copied,
    so every stream carries the very audio packets of the whole file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    media._run_ffmpeg("-i", str(source), *args, *_HLS, str(out))
    return out


def _edit(source: Path, dest: Path, old: str, new: str) -> None:
    text = source.read_text()
    assert old in text, (old, text)
    dest.write_text(text.replace(old, new, 1))


@pytest.fixture(scope="module")
def hls_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hls")
    whole = media.make_mp4(root / "whole.mp4", duration_s=SOURCE_S, channels=1, noise_seed=11)
    av = ("-map", "0:v", "-map", "0:a", *_VIDEO, "-c:a", "copy")
    _hls(whole, root / "plain/index.m3u8", *av, "-hls_segment_filename", str(root / "plain/s%d.ts"))
    _hls(
        whole,
        root / "fmp4/index.m3u8",
        *av,
        "-hls_segment_type",
        "fmp4",
        "-hls_segment_filename",
        str(root / "fmp4/s%d.m4s"),
    )
    _hls(whole, root / "single/index.m3u8", *av, "-hls_flags", "single_file")
    (root / "aes").mkdir()
    (root / "aes/key.bin").write_bytes(KEY)
    (root / "keyinfo").write_text(f"key.bin\n{root / 'aes/key.bin'}\n{IV_HEX[2:]}\n")
    _hls(
        whole,
        root / "aes/index.m3u8",
        *av,
        "-hls_key_info_file",
        str(root / "keyinfo"),
        "-hls_segment_filename",
        str(root / "aes/s%d.ts"),
    )
    # no IV line: each segment's IV is its media sequence number, starting at 5
    (root / "seqinfo").write_text(f"../aes/key.bin\n{root / 'aes/key.bin'}\n")
    _hls(
        whole,
        root / "aes-seq/index.m3u8",
        *av,
        "-hls_key_info_file",
        str(root / "seqinfo"),
        "-start_number",
        "5",
        "-hls_segment_filename",
        str(root / "aes-seq/s%d.ts"),
    )
    _hls(whole, root / "audio/index.m3u8", "-map", "0:a", "-c:a", "copy")
    _hls(whole, root / "video/index.m3u8", "-map", "0:v", *_VIDEO)

    plain = root / "plain/index.m3u8"
    text = plain.read_text()
    assert "#EXT-X-ENDLIST" in text and "#EXT-X-KEY" not in text, text
    # ffmpeg states each segment's IV, which is its sequence number: unstated, the
    # player (we) must derive the same
    seq = root / "aes-seq/index.m3u8"
    stated = seq.read_text()
    assert "#EXT-X-MEDIA-SEQUENCE:5" in stated and "IV=0x00000000000000000000000000000005" in stated
    seq.write_text(re.sub(r",IV=0x[0-9a-fA-F]+", "", stated))
    assert "#EXT-X-BYTERANGE" in (root / "single/index.m3u8").read_text()
    _edit(plain, root / "plain/live.m3u8", "#EXT-X-ENDLIST\n", "")
    live = root / "plain/live.m3u8"
    _edit(live, live, "#EXT-X-PLAYLIST-TYPE:VOD\n", "")
    sample_aes = '#EXT-X-KEY:METHOD=SAMPLE-AES,URI="k"\n#EXTINF'
    _edit(plain, root / "plain/sample-aes.m3u8", "#EXTINF", sample_aes)
    _edit(plain, root / "plain/gone.m3u8", "s1.ts", "gone.ts")
    _edit(plain, root / "plain/busy.m3u8", "s1.ts", "/status/503")
    _edit(plain, root / "plain/slow.m3u8", "s0.ts", "/slow/plain/s0.ts")
    _edit(root / "plain/slow.m3u8", root / "plain/slow.m3u8", "s1.ts", "/slow/plain/s1.ts")
    _edit(root / "plain/slow.m3u8", root / "plain/slow.m3u8", "s2.ts", "/slow/plain/s2.ts")
    _edit(plain, root / "plain/inside.m3u8", "s1.ts", "http://127.0.0.2:9/s1.ts")
    _edit(plain, root / "plain/local.m3u8", "s1.ts", "file:///etc/passwd")
    not_a_key = '#EXT-X-KEY:METHOD=AES-128,URI="s0.ts"\n#EXTINF'  # a segment, not 16 bytes
    _edit(plain, root / "plain/bad-key.m3u8", "#EXTINF", not_a_key)
    (root / "plain/empty.m3u8").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-ENDLIST\n")
    shutil.copy(plain, root / "plain/index")  # a playlist at a URL without .m3u8
    (root / "plain/fake.m3u8").write_bytes((root / "whole.mp4").read_bytes())
    (root / "master.m3u8").write_text(
        "#EXTM3U\n"
        '#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="aud",NAME="main",DEFAULT=YES,AUTOSELECT=YES,'
        'URI="audio/index.m3u8"\n'
        '#EXT-X-STREAM-INF:BANDWIDTH=300000,CODECS="avc1.42e00a,mp4a.40.2",AUDIO="aud"\n'
        "video/index.m3u8\n"
    )
    (root / "muxed.m3u8").write_text(
        "#EXTM3U\n"
        '#EXT-X-STREAM-INF:BANDWIDTH=50000,CODECS="avc1.42e00a"\n'
        "video/index.m3u8\n"
        '#EXT-X-STREAM-INF:BANDWIDTH=400000,CODECS="avc1.42e00a,mp4a.40.2"\n'
        "nowhere/index.m3u8\n"
        '#EXT-X-STREAM-INF:BANDWIDTH=200000,CODECS="avc1.42e00a,mp4a.40.2"\n'
        "plain/index.m3u8\n"
    )
    (root / "nested.m3u8").write_text(
        '#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=50000,CODECS="mp4a.40.2"\nmaster.m3u8\n'
    )
    (root / "no-audio.m3u8").write_text(
        '#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=50000,CODECS="avc1.42e00a"\nvideo/index.m3u8\n'
    )
    return root


@dataclass
class HlsServer:
    root: Path
    base_url: str = ""
    hits: collections.Counter[str] = field(default_factory=collections.Counter)

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def app(self) -> web.Application:
        async def file(request: web.Request) -> web.StreamResponse:
            self.hits[request.path] += 1
            path = self.root / request.match_info["path"]
            if not path.is_file():
                raise web.HTTPNotFound()
            content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
            return web.FileResponse(path, headers={"Content-Type": content_type})

        async def slow(request: web.Request) -> web.StreamResponse:
            await asyncio.sleep(0.4)
            return await file(request)

        async def status(request: web.Request) -> web.Response:
            self.hits[request.path] += 1
            return web.Response(status=int(request.match_info["code"]), text="no")

        async def moved(request: web.Request) -> web.Response:
            raise web.HTTPFound("/plain/index.m3u8")

        app = web.Application()
        app.router.add_get("/status/{code:\\d+}", status)
        app.router.add_get("/slow/{path:.+}", slow)
        app.router.add_get("/moved", moved)
        app.router.add_get("/{path:.+}", file)
        return app


@pytest.fixture(scope="module")
def hls(hls_root: Path) -> Iterator[HlsServer]:
    server = HlsServer(hls_root)
    with serve_in_thread(server.app(), name="hls-server") as server.base_url:
        yield server


LIMITS = DownloadLimits(connect_timeout_s=2, read_timeout_s=5)


def fetch(
    url: str, dest: Path, limits: DownloadLimits = LIMITS, guard: UrlGuard | None = None
) -> Downloaded:
    async def go() -> Downloaded:
        async with make_session(limits, connections=4, per_host=4, guard=guard) as session:
            return await download(session, url, dest, limits)

    return asyncio.run(go())


def fails(url: str, tmp_path: Path, **kwargs: Any) -> JobError:
    with pytest.raises(JobError) as caught:
        fetch(url, tmp_path / "out", **kwargs)
    return caught.value


def samples(path: Path) -> np.ndarray:
    windows, _ = decode_all(path)
    return np.concatenate(windows)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def spectral_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """How alike two decodes of the same audio sound: the cosine of their magnitude
    spectrograms once lined up.  Not of the samples: a container that trims the AAC
    encoder's priming (MP4) and one that cannot say it (MPEG-TS) start 1024 samples
    at 44.1 kHz apart, 371.5 at 16 kHz, and half a sample of noise is no match."""
    n = min(len(a), len(b))
    spectrum = np.fft.rfft(a[:n], 2 * n) * np.conj(np.fft.rfft(b[:n], 2 * n))
    lag = int(np.argmax(np.fft.irfft(spectrum, 2 * n)))
    lag = lag - 2 * n if lag > n else lag  # a[i + lag] lines up with b[i]
    a, b = (a[lag:], b) if lag >= 0 else (a, b[-lag:])
    n = min(len(a), len(b))

    def magnitudes(x: np.ndarray) -> np.ndarray:
        frames = np.lib.stride_tricks.sliding_window_view(x[:n], 512)[::256]
        return np.abs(np.fft.rfft(frames * np.hanning(512))).ravel()

    return cosine(magnitudes(a), magnitudes(b))


# --- download() against the real server -----------------------------------------------


def test_media_playlist_is_its_segments_in_order(hls: HlsServer, tmp_path: Path) -> None:
    got = fetch(hls.url("plain/index.m3u8"), tmp_path / "out")
    segments = sorted((hls.root / "plain").glob("s*.ts"), key=lambda p: int(p.stem[1:]))
    assert len(segments) == 3
    expected = b"".join(p.read_bytes() for p in segments)
    assert got.path.read_bytes() == expected and got.size_bytes == len(expected)
    _, info = decode_all(got.path)
    assert info.channels_count == 1 and abs(info.duration_s - SOURCE_S) < 0.2, info


@pytest.mark.parametrize(
    "path",
    ["aes/index.m3u8", "aes-seq/index.m3u8", "fmp4/index.m3u8", "single/index.m3u8"],
    ids=["aes-128-iv", "aes-128-sequence-iv", "fmp4", "byte-ranges"],
)
def test_every_kind_of_media_playlist_decodes_to_the_same_audio(
    hls: HlsServer, tmp_path: Path, path: str
) -> None:
    """AES-128 (IV stated, and IV from the media sequence), fMP4 after its init section,
    byte ranges of one file: the audio decoded is the whole file's."""
    got = fetch(hls.url(path), tmp_path / "out")
    audio = samples(got.path)
    assert abs(len(audio) / 16_000 - SOURCE_S) < 0.1, len(audio)
    assert spectral_cosine(audio, samples(hls.root / "whole.mp4")) > 0.99


def test_byte_ranges_are_asked_for_not_whole_files(hls: HlsServer, tmp_path: Path) -> None:
    before = hls.hits["/single/index.ts"]
    got = fetch(hls.url("single/index.m3u8"), tmp_path / "out")
    assert got.path.read_bytes() == (hls.root / "single/index.ts").read_bytes()
    assert hls.hits["/single/index.ts"] - before == 3  # one request per range


def test_master_playlist_takes_the_audio_rendition(hls: HlsServer, tmp_path: Path) -> None:
    hls.hits.clear()
    got = fetch(hls.url("master.m3u8"), tmp_path / "out")
    assert hls.hits["/audio/index.m3u8"] == 1 and hls.hits["/audio/index0.ts"] == 1
    assert not [p for p in hls.hits if p.startswith("/video/")], hls.hits
    assert abs(len(samples(got.path)) / 16_000 - SOURCE_S) < 0.1


def test_master_without_renditions_takes_the_cheapest_variant_with_audio(
    hls: HlsServer, tmp_path: Path
) -> None:
    hls.hits.clear()
    fetch(hls.url("muxed.m3u8"), tmp_path / "out")
    assert hls.hits["/plain/index.m3u8"] == 1
    assert not [p for p in hls.hits if p.startswith(("/video/", "/nowhere/"))], hls.hits


def test_playlist_found_by_its_body_and_relative_to_its_final_url(
    hls: HlsServer, tmp_path: Path
) -> None:
    """Served as application/octet-stream at a URL without .m3u8, and reached through
    a redirect: segment names resolve against where the playlist really is."""
    expected = fetch(hls.url("plain/index.m3u8"), tmp_path / "a").path.read_bytes()
    assert fetch(hls.url("plain/index"), tmp_path / "b").path.read_bytes() == expected
    assert fetch(hls.url("moved"), tmp_path / "c").path.read_bytes() == expected


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("plain/live.m3u8", "live HLS playlist (no #EXT-X-ENDLIST)"),
        ("plain/sample-aes.m3u8", "encrypted with SAMPLE-AES: only AES-128 can be decrypted"),
        ("plain/empty.m3u8", "HLS playlist lists no segments"),
        ("no-audio.m3u8", "no audio rendition and no variant with audio"),
        ("nested.m3u8", "HLS master playlist names another master playlist"),
        ("plain/fake.m3u8", "not an HLS playlist"),
        ("plain/bad-key.m3u8", "HLS key of segment 1: the AES-128 key is not 16 bytes"),
    ],
    ids=["live", "sample-aes", "empty", "no-audio", "nested", "not-a-playlist", "bad-key"],
)
def test_playlists_we_cannot_use_fail_at_once_with_a_clear_message(
    hls: HlsServer, tmp_path: Path, path: str, message: str
) -> None:
    hls.hits.clear()
    error = fails(hls.url(path), tmp_path)
    assert message in str(error), str(error)
    assert type(error) is DownloadError and not error.transient
    assert error.error_class == "download"
    assert "\n" not in str(error)
    if path != "plain/bad-key.m3u8":
        assert not [p for p in hls.hits if p.endswith((".ts", ".m4s"))], hls.hits


def test_segment_errors_are_classified_like_a_whole_file(hls: HlsServer, tmp_path: Path) -> None:
    gone = fails(hls.url("plain/gone.m3u8"), tmp_path)
    assert str(gone) == "HLS segment 2 of 3: HTTP 404 Not Found"
    assert gone.http_status == 404 and not gone.transient
    busy = fails(hls.url("plain/busy.m3u8"), tmp_path)
    assert str(busy).startswith("HLS segment 2 of 3: HTTP 503")
    assert busy.http_status == 503 and busy.transient and busy.backs_off_host


def test_byte_cap_counts_every_playlist_key_and_segment(hls: HlsServer, tmp_path: Path) -> None:
    sizes = [p.stat().st_size for p in (hls.root / "plain").glob("s*.ts")]
    # every segment fits the cap alone, their sum does not
    limits = DownloadLimits(connect_timeout_s=2, read_timeout_s=5, max_bytes=sum(sizes) - 1)
    assert max(sizes) < limits.max_bytes
    error = fails(hls.url("plain/index.m3u8"), tmp_path, limits=limits)
    assert "cap (playlists, keys and segments together)" in str(error), str(error)
    assert str(error).startswith("HLS segment 3 of 3: ")
    assert not error.transient


def test_playlist_size_and_segment_count_are_capped(hls: HlsServer, tmp_path: Path) -> None:
    small = DownloadLimits(connect_timeout_s=2, read_timeout_s=5, max_playlist_bytes=64)
    error = fails(hls.url("plain/index.m3u8"), tmp_path, limits=small)
    assert str(error) == "HLS playlist is over the 64-byte limit"
    few = DownloadLimits(connect_timeout_s=2, read_timeout_s=5, max_segments=2)
    error = fails(hls.url("plain/index.m3u8"), tmp_path, limits=few)
    assert str(error) == "HLS playlist lists 3 segments, over the limit of 2"


def test_hostile_playlists_are_refused_before_they_cost_memory_or_crash(
    hls: HlsServer, tmp_path: Path
) -> None:
    """300,000 one-line segments in under 4 MiB: counted before the parser, which
    spends about a kilobyte on each (a review measured +336 MB to refuse it after).
    A media sequence no 16-byte IV can hold is a failure of the job, not an
    unexpected error."""
    flood = "#EXTM3U\n#EXT-X-TARGETDURATION:1\n" + "#EXTINF:1,\na\n" * 300_000
    (hls.root / "flood.m3u8").write_text(flood + "#EXT-X-ENDLIST\n")
    error = fails(hls.url("flood.m3u8"), tmp_path)
    assert str(error) == "HLS playlist lists 300000 segments, over the limit of 30000"
    for sequence in ("-1", str(1 << 128)):
        (hls.root / "sequence.m3u8").write_text(
            f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:{sequence}\n"
            '#EXT-X-KEY:METHOD=AES-128,URI="k.key"\n#EXTINF:2,\nplain/s0.ts\n#EXT-X-ENDLIST\n'
        )
        error = fails(hls.url("sequence.m3u8"), tmp_path)
        assert type(error) is DownloadError and not error.transient
        assert str(error) == f"HLS playlist has an unusable media sequence: {sequence}"


def test_rate_floor_spans_the_whole_stream(hls: HlsServer, tmp_path: Path) -> None:
    """Each segment arrives 0.4 s late: no single response lasts a stall window, but
    the stream as a whole is under the floor and is cut as a slow download is."""
    limits = DownloadLimits(
        connect_timeout_s=2, read_timeout_s=5, min_bytes_per_s=200_000, stall_window_s=0.6
    )
    with pytest.raises(DownloadTimeoutError) as caught:
        fetch(hls.url("plain/slow.m3u8"), tmp_path / "out", limits=limits)
    assert "too slow" in str(caught.value) and caught.value.transient


def test_playlist_cannot_reach_inside_through_a_guarded_session(
    hls: HlsServer, tmp_path: Path
) -> None:
    """SSRF through a playlist: a guarded fetch (API jobs, /encode_audio) refuses a
    segment on an internal address; no playlist may name a file of this machine."""
    error = fails(hls.url("plain/inside.m3u8"), tmp_path, guard=GUARD)
    assert isinstance(error, UrlRefusedError), error
    assert "refused" in str(error) and "127.0.0.2" in str(error), str(error)
    local = fails(hls.url("plain/local.m3u8"), tmp_path)  # even unguarded
    assert isinstance(local, UrlRefusedError)
    assert "'file' url" in str(local), str(local)
    # the control: the same guard lets the honest playlist through
    fetch(hls.url("plain/index.m3u8"), tmp_path / "ok", guard=GUARD)


# --- the daemon and the API ------------------------------------------------------------


def test_daemon_embeds_hls_like_the_whole_file(
    cli: Cli, tmp_path: Path, tiny_model: Path, hls: HlsServer
) -> None:
    """The proof of issue 14: a media playlist and a master playlist of a file also
    served whole give vectors with cosine >= 0.99 to the whole file's."""
    good = {
        "whole": "whole.mp4",
        "media": "plain/index.m3u8",
        "master": "master.m3u8",
        "aes": "aes/index.m3u8",
        "fmp4": "fmp4/index.m3u8",
        "ranges": "single/index.m3u8",
    }
    bad = {
        "live": ("plain/live.m3u8", None, "live HLS playlist"),
        "sample-aes": ("plain/sample-aes.m3u8", None, "SAMPLE-AES"),
        "gone": ("plain/gone.m3u8", 404, "HLS segment 2 of 3: HTTP 404"),
    }
    records = {key: {"url": hls.url(path)} for key, path in good.items()}
    records |= {key: {"url": hls.url(case[0])} for key, case in bad.items()}
    cli("import", str(write_catalogue(tmp_path / "all.json", records)))
    cli(*daemon_args(tiny_model, tmp_path / "work", "--until-done"), "--max-attempts", "1")
    out = tmp_path / "out"
    cli("export", "--out", str(out))
    vectors = json.loads((out / "audio_vectors.json").read_text())
    process = json.loads((out / "audio_process.json").read_text())
    fail = json.loads((out / "audio_fail.json").read_text())

    assert set(vectors) == set(good), fail
    whole = np.asarray(vectors["whole"], dtype=np.float64).ravel()
    for key in good:
        similarity = cosine(np.asarray(vectors[key], dtype=np.float64).ravel(), whole)
        assert similarity >= 0.99, (key, similarity)
        assert abs(process[key]["video_duration"] - SOURCE_S) < 0.2, (key, process[key])
        assert process[key]["channels_count"] == 1, (key, process[key])
    assert set(fail) == set(bad)
    for key, (_, status, message) in bad.items():
        assert fail[key]["error_class"] == "download", fail[key]
        assert fail[key]["http_status"] == status, fail[key]
        assert message in fail[key]["error"], fail[key]
    assert not [p for p in (tmp_path / "work").rglob("*") if p.is_file()]


def test_api_jobs_and_encode_audio_fetch_playlists_guarded(
    tmp_path: Path, tiny_model: Path, embedder: object, hls: HlsServer
) -> None:
    config = ApiConfig(port=0, token=TOKEN, exempt_networks=LOCAL)
    with run_api_server(
        f"sqlite:///{tmp_path / 'runner.db'}",
        daemon_config(tiny_model, tmp_path / "work", url_guard=GUARD),
        embedder,
        config,
    ) as api:
        reply = api("POST", "/encode_audio", {"video_url": hls.url("plain/inside.m3u8")})
        assert reply.status == 403 and "127.0.0.2" in reply.json()["error"], reply
        reply = api("POST", "/encode_audio", {"video_url": hls.url("master.m3u8")})
        assert reply.status == 200, reply
        assert abs(reply.json()["video_duration"] - SOURCE_S) < 0.2
        jobs = [
            {"key": "inside", "url": hls.url("plain/inside.m3u8")},
            {"key": "ok", "url": hls.url("plain/index.m3u8")},
        ]
        assert api("POST", "/jobs", jobs).status == 200
        inside, ok = api.wait_for_job("inside"), api.wait_for_job("ok")
    assert ok["state"] == "done", ok
    assert inside["state"] == "failed" and inside["result"] is None
    assert "refused" in inside["error"] and "127.0.0.2" in inside["error"], inside
