"""Every wav2vec2-family checkpoint the README promises, layers and pooling.

Tiny random checkpoints of each family are built with `save_pretrained` (as a hub
snapshot is laid out) and run through the real daemon, a real media server and
ffmpeg; the layer and mean-std pooling are checked against a direct computation
over the model's frames.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from runner.embed import Embedder, WindowBatcher, WindowItem, pool
from runner.errors import RunnerError
from tests.argv import daemon_args
from tests.conftest import Cli, MediaServer, save_feature_extractor, write_catalogue

HIDDEN = 32
#: family -> (config class, model class), all from transformers
FAMILIES = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
    "wav2vec2-ctc": ("Wav2Vec2Config", "Wav2Vec2ForCTC"),
    "hubert": ("HubertConfig", "HubertModel"),
    "wavlm": ("WavLMConfig", "WavLMModel"),
    "data2vec-audio": ("Data2VecAudioConfig", "Data2VecAudioModel"),
}


def build_checkpoint(path: Path, family: str, *, norm: str = "layer", seed: int = 0) -> Path:
    """A random-weight checkpoint of `family`, two layers of width 32, saved with a
    Wav2Vec2FeatureExtractor beside it."""
    import transformers

    config_name, model_name = FAMILIES[family]
    torch.manual_seed(seed)
    options: dict[str, Any] = {
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": HIDDEN * 2,
        "conv_dim": (16,) * 7,
        "vocab_size": 12,
        "num_conv_pos_embedding_groups": 2,
    }
    if family == "data2vec-audio":  # a stack of small positional convolutions, no norm choice
        options |= {"num_conv_pos_embeddings": 5, "conv_pos_kernel_size": 5}
    else:
        options |= {
            "num_conv_pos_embeddings": 16,
            "feat_extract_norm": norm,
            "do_stable_layer_norm": norm == "layer",
        }
    if family == "wavlm":
        options |= {"num_buckets": 16, "max_bucket_distance": 80}
    config = getattr(transformers, config_name)(**options)
    getattr(transformers, model_name)(config).save_pretrained(path)
    save_feature_extractor(path, attention_mask=norm == "layer")
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_checkpoint(root / family, family) for family in FAMILIES}


def noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.2 * rng.standard_normal(int(seconds * 16_000))).astype(np.float32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_gives_done_jobs_through_the_daemon(
    family: str, checkpoints: dict[str, Path], cli: Cli, tmp_path: Path, server: MediaServer
) -> None:
    names = ["stereo.mp4", "voice.opus"]
    records = {name: {"url": server.url(f"media/{name}")} for name in names}
    cli("import", str(write_catalogue(tmp_path / "catalogue.json", records)))
    cli(*daemon_args(checkpoints[family], tmp_path / "work", "--until-done"))
    out = tmp_path / "out"
    cli("export", "--out", str(out))
    vectors = json.loads((out / "audio_vectors.json").read_text())
    assert set(vectors) == set(names)
    for value in vectors.values():
        assert len(value[0]) == HIDDEN and np.linalg.norm(value[0]) > 0.1
    specs = json.loads((out / "audio_specs.json").read_text())["specs"]
    expected = family.removesuffix("-ctc")
    assert [(s["spec"]["family"], s["vectors"]) for s in specs] == [(expected, 2)]


def test_a_ctc_checkpoint_loads_its_encoder_weights(checkpoints: dict[str, Path]) -> None:
    """AutoModel drops the CTC head; the encoder must be the checkpoint's, not a
    fresh random one."""
    from transformers import Wav2Vec2ForCTC

    embedder = Embedder(str(checkpoints["wav2vec2-ctc"]), device="cpu")
    saved = Wav2Vec2ForCTC.from_pretrained(checkpoints["wav2vec2-ctc"]).wav2vec2.state_dict()
    loaded = embedder.model.state_dict()
    assert set(loaded) == set(saved)
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_windows_equal_windows_alone(family: str, checkpoints: dict[str, Path]) -> None:
    """Padding never leaks, whatever the family: a batch of windows of different
    lengths gives each the sums it gets alone."""
    embedder = Embedder(str(checkpoints[family]), device="cpu", pooling="mean-std")
    windows = [noise(s, i) for i, s in enumerate((1.0, 0.7, 0.45, 1.0))]
    batcher = WindowBatcher(embedder, batch_seconds=100)
    for i, window in enumerate(windows):
        batcher.add(WindowItem(i, window))
    while batcher.pending:
        batch = batcher.next_batch()
        parts = embedder.embed([item.samples for item in batch])
        for item, part in zip(batch, parts, strict=True):
            (alone,) = embedder.embed([item.samples])
            assert part.frames == alone.frames
            np.testing.assert_allclose(part.frame_sum, alone.frame_sum, rtol=1e-4, atol=1e-4)
            assert part.frame_sq_sum is not None and alone.frame_sq_sum is not None
            np.testing.assert_allclose(part.frame_sq_sum, alone.frame_sq_sum, rtol=1e-4, atol=1e-4)
    # Data2VecAudio's positional convolutions spread padding even with a mask
    assert embedder.masks_padding is (family != "data2vec-audio")


def hidden_state_frames(path: Path, layer: int, window: np.ndarray) -> np.ndarray:
    """The frames of hidden state `layer` of the whole, untouched model for one
    window, read at the input of layer `layer` (or the model's output for the
    last), as float64."""
    from transformers import AutoFeatureExtractor, AutoModel

    model = AutoModel.from_pretrained(path).eval()
    features = AutoFeatureExtractor.from_pretrained(path)
    values = features(window, sampling_rate=16_000, return_tensors="pt").input_values
    seen: list[torch.Tensor] = []
    layers = model.encoder.layers
    if layer < len(layers):
        layers[layer].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.inference_mode():
        out = model(values).last_hidden_state
    hidden = seen[0] if layer < len(layers) else out
    return hidden[0].double().numpy()


@pytest.mark.parametrize("family", ["wav2vec2", "wavlm"])
def test_layer_and_mean_std_equal_a_direct_computation(
    family: str, checkpoints: dict[str, Path]
) -> None:
    """A track of three windows (two full, one short), batched: mean and population
    std of the L2-normalised frames of hidden state 1, over every frame."""
    path = checkpoints[family]
    embedder = Embedder(str(path), device="cpu", layer=1, pooling="mean-std")
    assert (embedder.layer, embedder.dim) == (1, 2 * HIDDEN)
    track = noise(2.6, seed=5)
    windows = [track[i : i + 16_000] for i in range(0, len(track), 16_000)]
    parts = embedder.embed(windows)  # one padded batch: the daemon's path
    vector = pool(parts, embedder.hidden_size)

    frames = np.concatenate([hidden_state_frames(path, 1, w) for w in windows])
    unit = frames / np.linalg.norm(frames, axis=1, keepdims=True)
    expected = np.concatenate([unit.mean(axis=0), unit.std(axis=0)])
    assert vector.shape == (2 * HIDDEN,) and vector.dtype == np.float32
    assert sum(part.frames for part in parts) == len(frames)
    np.testing.assert_allclose(vector, expected, rtol=1e-4, atol=2e-5)


def test_layer_numbering(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["hubert"]
    window = noise(1.0, seed=2)
    last = Embedder(str(path), device="cpu")
    assert last.layer == last.layers == 2
    same = Embedder(str(path), device="cpu", layer=2)
    assert same.spec == last.spec  # -1 is the number of layers, by another name
    np.testing.assert_array_equal(
        same.embed([window])[0].frame_sum, last.embed([window])[0].frame_sum
    )
    first = Embedder(str(path), device="cpu", layer=0)
    assert first.spec.id != last.spec.id and len(first.model.encoder.layers) == 1
    direct = hidden_state_frames(path, 0, window)
    unit = direct / np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(
        first.embed([window])[0].frame_sum, unit.sum(axis=0), rtol=1e-4, atol=1e-4
    )
    assert Embedder(str(path), device="cpu", layer=-3).layer == 0


def test_layer_one_mean_std_through_the_daemon_is_twice_the_width(
    checkpoints: dict[str, Path], cli: Cli, tmp_path: Path, server: MediaServer
) -> None:
    records = {"long": {"url": server.url("media/long.mp4")}}  # 65 s: three windows
    cli("import", str(write_catalogue(tmp_path / "catalogue.json", records)))
    model = checkpoints["wav2vec2-ctc"]
    extra = ("--until-done", "--layer", "1", "--pooling", "mean-std")
    cli(*daemon_args(model, tmp_path / "work", *extra))
    out = tmp_path / "out"
    cli("export", "--out", str(out), "--format", "npz")
    with np.load(out / "vectors.npz") as npz:
        assert npz["vectors"].shape == (1, 2 * HIDDEN)
        (spec,) = json.loads(str(npz["specs_json"]))
    assert spec["spec"]["layer"] == 1 and spec["spec"]["pooling"] == "mean-std"
    assert spec["spec"]["dim"] == 2 * HIDDEN and spec["vectors"] == 1
    status = json.loads(cli("status", "--json").stdout)
    assert [s["id"] for s in status["specs"]] == [spec["id"]]
    assert "layer 1 of 2, mean-std pooling" in cli("status").stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--layer", "3"), "--layer 3 is out of range"),
        (("--layer", "-4"), "hidden states 0 to 2"),
        (("--pooling", "max"), "'max' is not one of"),
    ],
)
def test_bad_layer_or_pooling_is_one_line_at_start(
    args: tuple[str, ...], fragment: str, checkpoints: dict[str, Path], cli: Cli, tmp_path: Path
) -> None:
    result = cli(*daemon_args(checkpoints["wavlm"], tmp_path / "work", *args), ok=False)
    assert result.exit_code != 0
    assert fragment in result.stderr
    if not args[0].startswith("--pooling"):  # click's usage errors are click's own
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("runner: error:")


def test_not_an_audio_encoder_is_refused(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    BertModel(config).save_pretrained(tmp_path / "bert")
    build_checkpoint(tmp_path / "fx", "hubert")  # only for its preprocessor_config.json
    (tmp_path / "bert" / "preprocessor_config.json").write_bytes(
        (tmp_path / "fx" / "preprocessor_config.json").read_bytes()
    )
    with pytest.raises(RunnerError, match="not a wav2vec2-family audio encoder"):
        Embedder(str(tmp_path / "bert"), device="cpu")


def test_missing_model_files_are_one_line_errors(
    checkpoints: dict[str, Path], cli: Cli, tmp_path: Path
) -> None:
    """A path that is not there, a checkpoint without its feature extractor's file,
    and a bad --layer (said from config.json, before any weight loads): each one
    line, no exception class in it."""
    import shutil

    no_weights = tmp_path / "no-weights"
    shutil.copytree(checkpoints["hubert"], no_weights)
    (no_weights / "model.safetensors").unlink()
    no_features = tmp_path / "no-features"
    shutil.copytree(checkpoints["hubert"], no_features)
    (no_features / "preprocessor_config.json").unlink()
    cases = {
        str(tmp_path / "nowhere"): f"no such model directory: {tmp_path / 'nowhere'}",
        "relative/deeper/nowhere": "no such model directory: relative/deeper/nowhere",
        str(no_features): f"{no_features} has no preprocessor_config.json",
        str(no_weights): "--layer 5 is out of range",
    }
    for model, fragment in cases.items():
        result = cli(*daemon_args(Path(model), tmp_path / "work", "--layer", "5"), ok=False)
        (line,) = result.stderr.splitlines()
        assert line.startswith("runner: error: cannot load model") or "out of range" in line
        assert fragment in line and "Error:" not in line, line
    with pytest.raises(RunnerError, match="no such model directory"):
        Embedder(str(tmp_path / "nowhere"), device="cpu")


def test_a_hub_snapshot_directory_is_named_by_its_repo_and_commit(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """--model pointing into the HF hub cache gets the name a hub id gets, and a
    tokenizer's files in the snapshot do not change the spec."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--tiny-hubert" / "snapshots" / commit
    shutil.copytree(checkpoints["hubert"], snapshot)
    first = Embedder(str(snapshot), device="cpu").spec
    assert first.model == f"org/tiny-hubert@{commit}"
    (snapshot / "vocab.json").write_text('{"<pad>": 0, "a": 1}')
    (snapshot / "tokenizer_config.json").write_text("{}")
    assert Embedder(str(snapshot), device="cpu").spec.id == first.id
