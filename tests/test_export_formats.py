"""`runner export`: npz and PCA checked against numpy/sklearn on the same vectors,
and --only-done-since.  Done jobs are made through runner.jobs (import, claim,
complete), not the daemon, so the vectors are known exactly."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.decomposition import PCA, IncrementalPCA
from sqlalchemy import Engine

from runner import catalogue, jobs
from runner.db import connect
from runner.export import export, parse_timestamp
from tests.conftest import Cli
from tests.test_cli import one_line_error

WORKER = "test-worker"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = connect(db_url)
    yield engine
    engine.dispose()


def add_jobs(engine: Engine, keys: list[str], *, now: float = 0.0) -> None:
    records = [
        catalogue.Record(key=k, url=f"http://media.test/{k}", meta={"title": k}) for k in keys
    ]
    with engine.begin() as conn:
        catalogue.upsert_records(conn, records, now=now)


def claim_all(engine: Engine, *, now: float) -> dict[str, jobs.Job]:
    """Claimed and started (each try charged), as a daemon's downloads would."""
    claimed = jobs.claim(engine, worker_id=WORKER, now=now, limit=1_000_000, lease_s=3600)
    return {job.key: jobs.start(engine, job, now=now) for job in claimed}


def result(vector: np.ndarray, *, duration: float = 2.0) -> jobs.Result:
    return jobs.Result(
        vector=vector,
        video_duration_s=duration,
        channels_count=2,
        processing_audio_time_s=0.5,
        model_id="tiny",
    )


def finish(
    engine: Engine,
    done: dict[str, np.ndarray],
    failed: dict[str, str] | None = None,
    *,
    now: float,
    claimed_at: float | None = None,
    keep_running: tuple[str, ...] = (),
) -> None:
    """Claim every pending job, complete `done`, fail `failed` at `now`, leave
    `keep_running` running and give the rest back to pending."""
    claimed = claim_all(engine, now=now if claimed_at is None else claimed_at)
    with engine.begin() as conn:
        for key, vector in done.items():
            jobs.complete(conn, claimed[key], result(vector), now=now)
        for key, message in (failed or {}).items():
            failure = jobs.Failure(message=message, error_class="download", http_status=404)
            jobs.fail(conn, claimed[key], failure, now=now)
    rest = set(claimed) - set(done) - set(failed or {}) - set(keep_running)
    jobs.release(engine, [claimed[k] for k in rest], worker_id=WORKER)


def done_vectors(
    engine: Engine, n: int, dim: int, *, now: float, seed: int = 0, prefix: str = "v"
) -> dict[str, np.ndarray]:
    """n done jobs whose vectors lie near a 3-dimensional subspace (so a 3-component
    PCA is nearly exact and comparable with a full PCA)."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(3, dim))
    weights = rng.normal(size=(n, 3)) * np.array([5.0, 2.0, 1.0])
    matrix = (weights @ basis + 0.01 * rng.normal(size=(n, dim)) + 3.0).astype(np.float32)
    vectors = {f"{prefix}{i:04d}": matrix[i] for i in range(n)}
    add_jobs(engine, list(vectors), now=now)
    finish(engine, vectors, now=now)
    return vectors


def test_npz_holds_exactly_the_stored_vectors(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    vectors = done_vectors(engine, 37, 8, now=100.0)
    add_jobs(engine, ["lost", "todo", "ключ-ü"])
    finish(engine, {"ключ-ü": np.arange(8, dtype=np.float32)}, {"lost": "HTTP 404"}, now=200.0)
    vectors["ключ-ü"] = np.arange(8, dtype=np.float32)

    out = tmp_path / "out"
    line = cli("export", "--out", str(out), "--format", "npz").stdout
    assert "exported 38 vectors, 1 failures" in line and "vectors.npz" in line
    assert sorted(p.name for p in out.iterdir()) == ["fail.json", "process.json", "vectors.npz"]
    with np.load(out / "vectors.npz") as npz:  # allow_pickle=False: no object arrays
        keys, matrix = npz["keys"], npz["vectors"]
    assert keys.dtype.kind == "U" and matrix.dtype == np.float32
    assert matrix.shape == (38, 8)
    assert list(keys) == list(vectors)  # job order
    np.testing.assert_array_equal(matrix, np.stack(list(vectors.values())))

    process = json.loads((out / "process.json").read_text())
    assert list(process) == list(vectors)
    assert process["v0000"] == {
        "processing_audio_time": 0.5,
        "video_duration": 2.0,
        "channels_count": 2,
    }
    fail = json.loads((out / "fail.json").read_text())
    assert fail == {
        "lost": {
            "url": "http://media.test/lost",
            "error": "HTTP 404",
            "error_class": "download",
            "http_status": 404,
            "attempts": 1,
        }
    }

    cli("export", "--out", str(out))  # the default JSON files say the same
    old = json.loads((out / "audio_vectors.json").read_text())
    assert list(old) == list(vectors)
    np.testing.assert_array_equal(np.array([v[0] for v in old.values()], np.float32), matrix)
    assert json.loads((out / "audio_process.json").read_text()) == process
    assert json.loads((out / "audio_fail.json").read_text()) == fail


def test_npz_of_an_empty_database(cli: Cli, tmp_path: Path) -> None:
    cli("export", "--out", str(tmp_path), "--format", "npz")
    with np.load(tmp_path / "vectors.npz") as npz:
        assert npz["keys"].shape == (0,) and npz["vectors"].shape[0] == 0
    assert json.loads((tmp_path / "process.json").read_text()) == {}


def test_npz_holds_the_matrix_once(engine: Engine, tmp_path: Path) -> None:
    """4000 x 256 float32 is 4 MB; as a list of lists of floats it would be ~33 MB."""
    rng = np.random.default_rng(1)
    n, dim = 4000, 256
    keys = [f"k{i}" for i in range(n)]
    add_jobs(engine, keys)
    finish(engine, {k: rng.normal(size=dim).astype(np.float32) for k in keys}, now=1.0)
    tracemalloc.start()
    try:
        export(engine, tmp_path, fmt="npz")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * n * dim * 4, peak


def test_pca_matches_sklearn_on_the_same_vectors(engine: Engine, tmp_path: Path) -> None:
    vectors = done_vectors(engine, 57, 16, now=10.0)
    x = np.stack(list(vectors.values()))
    counts = export(engine, tmp_path, fmt="npz", pca=3, pca_chunk_rows=10)
    assert counts.pca == 3 and "pca.npz" in counts.files
    with np.load(tmp_path / "pca.npz") as npz:
        got = {name: npz[name] for name in npz.files}
    assert list(got["keys"]) == list(vectors)
    assert got["vectors"].shape == (57, 3) and got["vectors"].dtype == np.float32

    # The same partial_fit sequence as IncrementalPCA.fit with that batch size
    # (57 rows in batches of 10: the last 7 merge into the one before).
    reference = IncrementalPCA(n_components=3, batch_size=10).fit(x)
    np.testing.assert_allclose(got["components"], reference.components_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["mean"], reference.mean_, rtol=1e-5)
    np.testing.assert_allclose(
        got["explained_variance_ratio"], reference.explained_variance_ratio_, rtol=1e-4
    )
    np.testing.assert_allclose(got["vectors"], reference.transform(x), rtol=1e-4, atol=1e-4)

    # And, the data being nearly 3-dimensional, the same as an exact PCA (up to sign).
    exact = PCA(n_components=3).fit(x.astype(np.float64))
    signs = np.sign(np.sum(got["components"] * exact.components_, axis=1))
    np.testing.assert_allclose(got["components"] * signs[:, None], exact.components_, atol=1e-3)
    np.testing.assert_allclose(got["mean"], x.astype(np.float64).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(
        got["vectors"] * signs, exact.transform(x.astype(np.float64)), rtol=1e-3, atol=1e-3
    )
    np.testing.assert_allclose(
        got["explained_variance_ratio"], exact.explained_variance_ratio_, atol=1e-4
    )


def test_pca_from_json_export_equals_pca_from_npz(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    """--format json streams the fit from the database instead of the matrix: same result."""
    done_vectors(engine, 30, 6, now=10.0)
    cli("export", "--out", str(tmp_path / "j"), "--pca", "2")
    cli("export", "--out", str(tmp_path / "n"), "--format", "npz", "--pca", "2")
    audio = json.loads((tmp_path / "j" / "audio_vectors.json").read_text())
    assert len(audio["v0000"][0]) == 6  # the JSON files keep the full vectors
    with np.load(tmp_path / "j" / "pca.npz") as a, np.load(tmp_path / "n" / "pca.npz") as b:
        assert (
            sorted(a.files)
            == sorted(b.files)
            == sorted(
                [
                    "keys",
                    "keys_utf8",
                    "key_offsets",
                    "vectors",
                    "components",
                    "mean",
                    "explained_variance",
                    "explained_variance_ratio",
                ]
            )
        )
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize(
    ("pca", "fragment"),
    [
        ("0", "--pca must be at least 1 (got 0)"),
        ("-3", "--pca must be at least 1"),
        ("9", "--pca 9 is more than the vector dimension 8"),
        ("5", "--pca 5 needs at least 5 vectors; the database has 4 done"),
    ],
)
def test_pca_errors_are_one_line_and_write_nothing(
    cli: Cli, engine: Engine, tmp_path: Path, pca: str, fragment: str
) -> None:
    done_vectors(engine, 4, 8, now=10.0)
    out = tmp_path / "out"
    result = cli("export", "--out", str(out), "--format", "npz", "--pca", pca, ok=False)
    assert fragment in one_line_error(result)
    assert not out.exists() or not list(out.iterdir())


def test_pca_without_vectors(cli: Cli, tmp_path: Path) -> None:
    result = cli("export", "--out", str(tmp_path), "--pca", "2", ok=False)
    assert "no done vectors" in one_line_error(result)


def test_mixed_dimensions_refuse_npz_but_not_json(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    add_jobs(engine, ["a", "b"])
    finish(engine, {"a": np.ones(4, np.float32), "b": np.ones(6, np.float32)}, now=1.0)
    result = cli("export", "--out", str(tmp_path), "--format", "npz", ok=False)
    assert "different dimensions (4 to 6)" in one_line_error(result)
    cli("export", "--out", str(tmp_path))


def test_merge_is_for_json_only(cli: Cli, tmp_path: Path) -> None:
    result = cli("export", "--out", str(tmp_path), "--format", "npz", "--merge", ok=False)
    assert "--merge works with --format json only" in one_line_error(result)


def test_only_done_since(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    old = done_vectors(engine, 12, 5, now=1000.0, prefix="old")
    add_jobs(engine, ["old-fail"])
    finish(engine, {}, {"old-fail": "HTTP 404"}, now=1000.0)
    new = done_vectors(engine, 8, 5, now=2000.0, seed=1, prefix="new")
    add_jobs(engine, ["new-fail"])
    finish(engine, {}, {"new-fail": "HTTP 404"}, now=2000.0)

    for since in ("1500", "1970-01-01T00:25:00Z", "1970-01-01T01:25:00+01:00", "2000"):
        out = tmp_path / f"json-{since}"
        cli("export", "--out", str(out), "--only-done-since", since)
        assert list(json.loads((out / "audio_vectors.json").read_text())) == list(new)
        assert list(json.loads((out / "audio_process.json").read_text())) == list(new)
        assert list(json.loads((out / "audio_fail.json").read_text())) == ["new-fail"]

    out = tmp_path / "npz"
    cli("export", "--out", str(out), "--format", "npz", "--only-done-since", "1500", "--pca", "2")
    with np.load(out / "vectors.npz") as npz:
        assert list(npz["keys"]) == list(new)
        np.testing.assert_array_equal(npz["vectors"], np.stack(list(new.values())))
    assert list(json.loads((out / "fail.json").read_text())) == ["new-fail"]
    # The PCA is still fitted on the whole corpus; only the new rows are written.
    everything = np.stack([*old.values(), *new.values()])
    reference = IncrementalPCA(n_components=2, batch_size=4096).fit(everything)
    with np.load(out / "pca.npz") as npz:
        assert list(npz["keys"]) == list(new)
        np.testing.assert_allclose(npz["mean"], reference.mean_, rtol=1e-5)
        np.testing.assert_allclose(
            npz["vectors"], reference.transform(np.stack(list(new.values()))), atol=1e-4
        )

    out = tmp_path / "none"
    cli("export", "--out", str(out), "--only-done-since", "2024-01-01")
    assert json.loads((out / "audio_vectors.json").read_text()) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1717200000", 1717200000.0),
        ("1717200000.5", 1717200000.5),
        ("2024-06-01", 1717200000.0),
        ("2024-06-01T00:00:00Z", 1717200000.0),
        ("2024-06-01T02:00:00+02:00", 1717200000.0),
        (" 2024-06-01 00:00 ", 1717200000.0),
    ],
)
def test_parse_timestamp(text: str, expected: float) -> None:
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize("bad", ["yesterday", "2024-13-01", "nan", ""])
def test_bad_since_is_one_line(cli: Cli, tmp_path: Path, bad: str) -> None:
    result = cli("export", "--out", str(tmp_path), "--only-done-since", bad, ok=False)
    line = one_line_error(result)
    assert "--only-done-since" in line and "ISO 8601" in line
