"""Shared fixtures: a real tiny model, real media, a real HTTP server, real SQLite."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from runner.cli import main
from tests.api_server import HelperServer, run_helper_server
from tests.threaded_server import serve_in_thread

TINY_HIDDEN = 32


def build_tiny_model(
    path: Path,
    *,
    seed: int = 0,
    hidden_size: int = TINY_HIDDEN,
    layers: int = 2,
    feat_extract_norm: str = "layer",
) -> Path:
    """A random-weight Wav2Vec2ForCTC saved like the published checkpoint."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden_size * 2,
        conv_dim=(16,) * 7,
        vocab_size=12,
        feat_extract_norm=feat_extract_norm,
        do_stable_layer_norm=feat_extract_norm == "layer",
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    Wav2Vec2ForCTC(config).save_pretrained(path)
    save_feature_extractor(path, attention_mask=feat_extract_norm == "layer")
    return path


def save_feature_extractor(path: Path, *, attention_mask: bool) -> None:
    """The 16 kHz feature extractor the published checkpoints carry; layer-norm
    models take an attention mask, group-norm ones cannot."""
    from transformers import Wav2Vec2FeatureExtractor

    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16_000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=attention_mask,
    ).save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-wav2vec2")


@pytest.fixture(scope="session")
def embedder(tiny_model: Path):  # type: ignore[no-untyped-def]
    from runner.embed import Embedder

    return Embedder(str(tiny_model), device="cpu")


#: name -> (maker in tests/media.py, its kwargs, content type)
MEDIA = {
    "stereo.mp4": (
        "make_mp4",
        {"duration_s": 3.0, "freq_hz": 440, "sample_rate_hz": 44100, "channels": 2},
        "video/mp4",
    ),
    "mono48k.mp4": (
        "make_mp4",
        {"duration_s": 2.0, "freq_hz": 660, "sample_rate_hz": 48000, "channels": 1},
        "video/mp4",
    ),
    "surround.mp4": ("make_mp4", {"duration_s": 2.5, "freq_hz": 330, "channels": 6}, "video/mp4"),
    "song.mp3": ("make_mp3", {"duration_s": 2.0, "freq_hz": 880, "channels": 1}, "audio/mpeg"),
    "clip.webm": ("make_webm", {"duration_s": 2.0, "freq_hz": 550}, "video/webm"),
    "voice.m4a": ("make_m4a", {"duration_s": 1.5, "freq_hz": 300, "channels": 1}, "audio/mp4"),
    "voice.opus": ("make_opus", {"duration_s": 1.5, "freq_hz": 750}, "audio/ogg"),
    "long.mp4": ("make_mp4", {"duration_s": 65.0, "freq_hz": 500, "channels": 2}, "video/mp4"),
    "silent-video.mp4": ("make_video_without_audio", {"duration_s": 1.0}, "video/mp4"),
    "random.bin": ("make_random_bytes", {"n_bytes": 50_000, "seed": 7}, "application/octet-stream"),
    "empty.mp4": ("make_empty", {}, "video/mp4"),
}
GOOD_MEDIA = [
    "stereo.mp4",
    "mono48k.mp4",
    "surround.mp4",
    "song.mp3",
    "clip.webm",
    "voice.m4a",
    "voice.opus",
    "long.mp4",
]


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests import media

    root = tmp_path_factory.mktemp("media")
    for name, (maker, kwargs, _) in MEDIA.items():
        getattr(media, maker)(root / name, **kwargs)
    return root


@dataclass
class MediaServer:
    """A real aiohttp server on 127.0.0.1 serving media, errors and oddities."""

    root: Path
    base_url: str = ""
    hits: collections.Counter = field(default_factory=collections.Counter)

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"


def _media_app(server: MediaServer) -> web.Application:
    async def media_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        server.hits[request.path] += 1
        path = server.root / name
        if not path.is_file():
            raise web.HTTPNotFound()
        content_type = MEDIA.get(name, (None, None, "application/octet-stream"))[2]
        return web.FileResponse(path, headers={"Content-Type": content_type})

    async def status(request: web.Request) -> web.Response:
        server.hits[request.path] += 1
        return web.Response(status=int(request.match_info["code"]), text="nope")

    async def html(request: web.Request) -> web.Response:
        server.hits[request.path] += 1
        return web.Response(text="<html><body>login</body></html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/media/{name}", media_file)
    app.router.add_get("/status/{code:\\d+}", status)
    app.router.add_get("/page.html", html)
    return app


@pytest.fixture(scope="session")
def server(media_dir: Path) -> Iterator[MediaServer]:
    srv = MediaServer(root=media_dir)
    with serve_in_thread(_media_app(srv), name="media-server") as srv.base_url:
        yield srv


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runner.db'}"


@dataclass
class Cli:
    db_url: str

    def __call__(self, *args: str, ok: bool = True) -> Result:
        result = CliRunner().invoke(main, ["--db", self.db_url, *args], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, (result.output, result.stderr)
        return result


@pytest.fixture
def cli(db_url: str) -> Cli:
    return Cli(db_url)


def write_catalogue(path: Path, records: dict) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def helper() -> Iterator[HelperServer]:
    """Redirects, and responses slow to start or stalling half-way (tests/api_server.py)."""
    with run_helper_server() as server:
        yield server


from tests.postgres import any_db_url, pg_url, postgres_server  # noqa: E402, F401
