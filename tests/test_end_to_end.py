"""import → daemon --until-done → export against a real server, model and ffmpeg."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.argv import daemon_args
from tests.conftest import GOOD_MEDIA, TINY_HIDDEN, Cli, MediaServer, write_catalogue

EXPECTED_CHANNELS = {
    "stereo.mp4": 2,
    "mono48k.mp4": 1,
    "surround.mp4": 6,
    "song.mp3": 1,
    "clip.webm": 2,
    "voice.m4a": 1,
    "voice.opus": 2,
    "long.mp4": 2,
}
EXPECTED_FAILURES = {
    "missing": "HTTP 404",
    "broken-server": "HTTP 500",
    "no-audio": "no audio stream",
    "garbage": "not a media file",
    "empty": "empty file",
    "html": "not a media file",
}


def catalogue(server: MediaServer) -> dict:
    records = {name: {"url": server.url(f"media/{name}"), "title": name} for name in GOOD_MEDIA}
    records |= {
        "missing": {"url": server.url("status/404")},
        "broken-server": {"url": server.url("status/500")},
        "no-audio": {"url": server.url("media/silent-video.mp4")},
        "garbage": {"url": server.url("media/random.bin")},
        "empty": {"url": server.url("media/empty.mp4")},
        "html": {"url": server.url("page.html")},
        "no-url": {"title": "nothing to fetch"},
    }
    return records


def run_all(cli: Cli, tmp_path: Path, model: Path, records: dict, *extra: str) -> Path:
    cli("import", str(write_catalogue(tmp_path / "all_videos.json", records)))
    cli(
        *daemon_args(model, tmp_path / "work", "--until-done"),
        "--batch-seconds",
        "40",
        "--retry-base-s",
        "0.05",
        "--max-attempts",
        "2",
        *extra,
    )
    out = tmp_path / "out"
    cli("export", "--out", str(out))
    return out


def load(out: Path) -> tuple[dict, dict, dict]:
    return tuple(
        json.loads((out / name).read_text())
        for name in ("audio_vectors.json", "audio_process.json", "audio_fail.json")  # type: ignore[return-value]
    )


def test_end_to_end(
    cli: Cli, tmp_path: Path, tiny_model: Path, server: MediaServer, media_dir: Path
) -> None:
    records = catalogue(server)
    out = run_all(cli, tmp_path, tiny_model, records)
    vectors, process, fail = load(out)

    assert set(vectors) == set(GOOD_MEDIA) == set(process)
    for key, value in vectors.items():
        assert isinstance(value, list) and len(value) == 1 and len(value[0]) == TINY_HIDDEN
        assert np.linalg.norm(value[0]) > 0.1, key
    for key, facts in process.items():
        assert set(facts) == {"processing_audio_time", "video_duration", "channels_count"}
        assert facts["channels_count"] == EXPECTED_CHANNELS[key], key
        assert facts["processing_audio_time"] > 0
    assert process["stereo.mp4"]["video_duration"] == pytest.approx(3.0, abs=0.1)
    assert process["long.mp4"]["video_duration"] == pytest.approx(65.0, abs=0.2)

    assert set(fail) == set(EXPECTED_FAILURES) | {"no-url"}
    for key, fragment in EXPECTED_FAILURES.items():
        assert fail[key]["url"] == records[key]["url"]
        assert fragment in fail[key]["error"], (key, fail[key])
    assert fail["no-url"]["url"] is None and "no url" in fail["no-url"]["error"]

    assert not list((tmp_path / "work").rglob("*.part")), "temp files left behind"
    status = json.loads(cli("status", "--json").stdout)
    assert status["counts"] == {
        "pending": 0,
        "running": 0,
        "done": len(GOOD_MEDIA),
        "failed": len(EXPECTED_FAILURES) + 1,
    }
    assert status["top_failures"][0]["count"] >= 1


def test_same_audio_same_vector_and_rerun_changes_nothing(
    cli: Cli, tmp_path: Path, tiny_model: Path, server: MediaServer
) -> None:
    records = {
        "a": {"url": server.url("media/stereo.mp4")},
        "a-again": {"url": server.url("media/stereo.mp4")},
        "b": {"url": server.url("media/song.mp3")},
    }
    out = run_all(cli, tmp_path, tiny_model, records)
    vectors, _, _ = load(out)
    np.testing.assert_allclose(vectors["a"][0], vectors["a-again"][0], rtol=1e-5, atol=1e-6)
    assert np.abs(np.subtract(vectors["a"][0], vectors["b"][0])).max() > 1e-2

    hits_before = sum(server.hits.values())
    cli(*daemon_args(tiny_model, tmp_path / "work", "--until-done"))
    assert sum(server.hits.values()) == hits_before  # done work is never redone


def test_export_merge_keeps_unknown_keys(
    cli: Cli, tmp_path: Path, tiny_model: Path, server: MediaServer
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "audio_vectors.json").write_text(json.dumps({"old": [[0.5, 0.25]]}))
    (out / "audio_process.json").write_text(json.dumps({"old": {"channels_count": 2}}))
    (out / "audio_fail.json").write_text(json.dumps({"old-fail": {"url": "u", "error": "e"}}))
    cli(
        "import",
        str(write_catalogue(tmp_path / "c.json", {"a": {"url": server.url("media/song.mp3")}})),
    )
    cli(*daemon_args(tiny_model, tmp_path / "work", "--until-done"))
    cli("export", "--out", str(out), "--merge")
    vectors, process, fail = load(out)
    assert set(vectors) == {"a", "old"} and vectors["old"] == [[0.5, 0.25]]
    assert set(process) == {"a", "old"}
    assert fail == {"old-fail": {"url": "u", "error": "e"}}
    cli("export", "--out", str(out))
    assert set(load(out)[0]) == {"a"}
