"""Vectors: deterministic, discriminative, far from zero, and batch-independent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runner.embed import (
    Embedder,
    WindowBatcher,
    WindowItem,
    embed_audio,
    pool,
)
from tests.conftest import TINY_HIDDEN, build_tiny_model

RATE = 16_000


def tone(freq_hz: float, seconds: float, *, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    return (0.5 * np.sin(2 * np.pi * freq_hz * t) + noise * rng.standard_normal(t.size)).astype(
        np.float32
    )


def windows_of(signal: np.ndarray, window: int) -> list[np.ndarray]:
    return [signal[i : i + window] for i in range(0, len(signal), window)]


def test_vector_shape_norm_and_determinism(embedder: Embedder) -> None:
    audio = tone(440, 2.0, noise=0.05)
    first = embed_audio(embedder, [audio])
    second = embed_audio(embedder, [audio.copy()])
    assert first.shape == (TINY_HIDDEN,) and first.dtype == np.float32
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-6)
    # The mean of unit vectors: far from zero (the old script's pooling gave ~1e-16).
    assert 0.1 < np.linalg.norm(first) <= 1.0 + 1e-5


def test_different_audio_gives_clearly_different_vectors(embedder: Embedder) -> None:
    low = embed_audio(embedder, [tone(220, 2.0)])
    noise = embed_audio(embedder, [tone(3000, 2.0, noise=0.5, seed=3)])
    cosine = float(low @ noise / np.linalg.norm(low) / np.linalg.norm(noise))
    assert cosine < 0.99
    assert np.abs(low - noise).max() > 1e-2


def test_batched_equals_one_at_a_time_with_short_tail(embedder: Embedder) -> None:
    window = RATE * 2
    videos = [
        tone(300, 5.3, noise=0.1, seed=1),
        tone(900, 2.0, seed=2),
        tone(500, 0.7, noise=0.2, seed=3),
    ]
    reference = [embed_audio(embedder, windows_of(v, window)) for v in videos]
    items = [WindowItem(i, w) for i, v in enumerate(videos) for w in windows_of(v, window)]
    batcher = WindowBatcher(embedder, batch_seconds=100)
    for item in items:
        batcher.add(item)
    batch = batcher.next_batch()
    assert len(batch) == len(items)  # everything padded into one batch
    parts = embedder.embed([item.samples for item in batch])
    for i, expected in enumerate(reference):
        mine = [p for item, p in zip(batch, parts, strict=True) if item.owner == i]
        np.testing.assert_allclose(pool(mine, embedder.hidden_size), expected, rtol=1e-4, atol=1e-5)


def test_group_norm_models_batch_only_equal_lengths(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "group", feat_extract_norm="group")
    embedder = Embedder(str(model), device="cpu")
    assert not embedder.masks_padding
    batcher = WindowBatcher(embedder, batch_seconds=100)
    for n in (32_000, 16_000, 32_000, 8_000):
        batcher.add(WindowItem(n, np.zeros(n, dtype=np.float32)))
    assert [len(i.samples) for i in batcher.next_batch()] == [32_000, 32_000]
    assert [len(i.samples) for i in batcher.next_batch()] == [16_000]


def test_inputs_match_the_feature_extractor(embedder: Embedder) -> None:
    windows = [tone(440, 1.0, noise=0.1), tone(200, 0.4, noise=0.3, seed=4)]
    values, mask = embedder._inputs(windows)
    reference = embedder.features(
        windows, sampling_rate=RATE, padding=True, return_attention_mask=True, return_tensors="np"
    )
    np.testing.assert_allclose(values.numpy(), reference["input_values"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(mask.numpy(), reference["attention_mask"])


def test_batcher_serves_oldest_first_and_respects_budget(embedder: Embedder) -> None:
    batcher = WindowBatcher(embedder, batch_seconds=4)
    sizes = [RATE * 1, RATE * 3, RATE * 1, RATE * 2, RATE // 2]
    for i, n in enumerate(sizes):
        batcher.add(WindowItem(i, np.zeros(n, dtype=np.float32)))
    served: list[int] = []
    while batcher.pending:
        batch = batcher.next_batch()
        assert max(len(b.samples) for b in batch) * len(batch) <= 4 * RATE or len(batch) == 1
        served.append(batch[0].owner)
    assert served[0] == 0


@pytest.mark.parametrize("device", ["cuda:7", "tpu", "nonsense"])
def test_bad_device_is_a_clear_error(tiny_model: Path, device: str) -> None:
    with pytest.raises(ValueError, match="device"):
        Embedder(str(tiny_model), device=device)
