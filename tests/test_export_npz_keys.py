"""npz keys: one long key must not size every key (issue 13).

A NumPy string array is as wide as its longest element, so the old ``keys`` array
with one 4,096-character key among 5,000 short ones was 82 MB in memory and in
the file.  Now the exporter holds the keys as UTF-8 and the file has
``keys_utf8``/``key_offsets``; ``keys`` is left out past NPZ_KEYS_MAX_CHARS."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine

from runner.db import connect
from runner.export import NPZ_KEYS_MAX_CHARS, export, npz_keys
from tests.test_export_formats import add_jobs, finish


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = connect(db_url)
    yield engine
    engine.dispose()


def make(engine: Engine, keys: list[str], dim: int) -> np.ndarray:
    vectors = np.random.default_rng(5).standard_normal((len(keys), dim)).astype(np.float32)
    add_jobs(engine, keys)
    finish(engine, dict(zip(keys, vectors, strict=True)), now=1.0)
    return vectors


def test_one_long_key_among_many_exports_in_little_memory(engine: Engine, tmp_path: Path) -> None:
    n, dim = 5_000, 4
    long_key = "ü" + "k" * 4_095  # 4,096 characters, 4,097 UTF-8 bytes
    keys = (
        [f"id{i:05d}" for i in range(n // 2)]
        + [long_key]
        + [f"id{i:05d}" for i in range(n // 2, n)]
    )
    vectors = make(engine, keys, dim)

    tracemalloc.start()
    try:
        counts = export(engine, tmp_path, fmt="npz", pca=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts.done == n + 1
    # the old <U4096 keys array alone: (n + 1) x 4096 x 4 bytes = 82 MB; this is ~4 MB
    assert peak < 8_000_000, peak

    for name in ("vectors.npz", "pca.npz"):
        path = tmp_path / name
        assert path.stat().st_size < 1_000_000, name  # not sized by the long key either
        with np.load(path) as npz:  # allow_pickle=False: no object arrays
            assert "keys" not in npz.files
            assert npz_keys(npz) == keys
            assert npz["keys_utf8"].dtype == np.uint8
            assert npz["key_offsets"].shape == (n + 2,)
            if name == "vectors.npz":
                np.testing.assert_array_equal(npz["vectors"], vectors)


@pytest.mark.parametrize(
    ("longest", "has_keys"), [(NPZ_KEYS_MAX_CHARS, True), (NPZ_KEYS_MAX_CHARS + 1, False)]
)
def test_keys_array_is_kept_up_to_the_limit(
    engine: Engine, tmp_path: Path, longest: int, has_keys: bool
) -> None:
    keys = ["a", "ключ", "x" * longest, ""]
    vectors = make(engine, keys, 3)
    export(engine, tmp_path, fmt="npz")
    with np.load(tmp_path / "vectors.npz") as npz:
        assert ("keys" in npz.files) is has_keys
        if has_keys:
            assert npz["keys"].dtype == np.dtype(f"<U{longest}")
            assert list(npz["keys"]) == keys
        assert npz_keys(npz) == keys
        np.testing.assert_array_equal(npz["vectors"], vectors)
