"""`runner export` (json): float32 written by orjson in its shortest round-trip form,
strict JSON (NaN/Inf vectors skipped with a warning), and --merge with
--only-done-since keeping what the incremental export does not cover.  On SQLite
and PostgreSQL; done jobs come from runner.jobs, as in tests/test_export_formats.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, update

from runner.db import connect
from runner.export import export
from runner.jobs import requeue_failed
from runner.models import jobs
from tests.conftest import Cli
from tests.test_cli import one_line_error
from tests.test_export_formats import add_jobs, done_vectors, finish


@pytest.fixture
def engine(any_db_url: str) -> Iterator[Engine]:
    engine = connect(any_db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def cli(any_db_url: str) -> Cli:
    return Cli(any_db_url)


def _refuse(constant: str) -> Any:
    raise AssertionError(f"{constant} is not JSON")


def strict(path: Path) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity instead of reading them."""
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse)


def bits(values: Any) -> np.ndarray:
    """What a consumer does: np.float32 of each parsed number, as raw bits."""
    return np.array([np.float32(v) for v in values], dtype=np.float32).view(np.uint32)


def awkward_float32(dim: int) -> np.ndarray:
    """Values whose float64 text differs from their float32 one, or that are hard to
    round-trip: subnormals, the extremes, -0.0, and random bit patterns."""
    special = np.array(
        [
            *(0.1, 1 / 3, -0.0, 0.0, 1e-45, 1.1754942e-38, 1.1754944e-38),
            *(3.4028235e38, -3.4028235e38, 16777217.0, 2.0**-149, 123456.789, 5e-324),
        ],
        dtype=np.float32,
    )
    raw = np.random.default_rng(7).integers(0, 2**32, size=dim * 40, dtype=np.uint32)
    finite = raw.view(np.float32)[np.isfinite(raw.view(np.float32))]
    return np.concatenate([special, finite])[: dim * 8].reshape(8, dim)


def test_float32_round_trip_is_bit_exact(engine: Engine, tmp_path: Path) -> None:
    dim = 64
    awkward = awkward_float32(dim)
    vectors = {f"odd{i}": awkward[i] for i in range(awkward.shape[0])}
    add_jobs(engine, list(vectors))
    finish(engine, vectors, now=10.0)
    vectors.update(done_vectors(engine, 20, dim, now=20.0))

    counts = export(engine, tmp_path)
    assert counts.done == 28 and counts.skipped == 0
    text = (tmp_path / "audio_vectors.json").read_text()
    assert "[[0.1,0.33333334,-0.0,0.0,1e-45," in text  # shortest float32 text
    assert "0.10000000149011612" not in text
    got = strict(tmp_path / "audio_vectors.json")
    assert list(got) == list(vectors)
    for key, stored in vectors.items():
        assert len(got[key]) == 1, key
        np.testing.assert_array_equal(bits(got[key][0]), stored.view(np.uint32), err_msg=key)


def test_at_most_12_bytes_per_number(engine: Engine, tmp_path: Path) -> None:
    """Embedding-like values (normal, unit scale): the size goal of issue 13."""
    rng = np.random.default_rng(3)
    n, dim = 200, 1024
    vectors = {f"vid{i:06d}": rng.standard_normal(dim).astype(np.float32) for i in range(n)}
    add_jobs(engine, list(vectors))
    finish(engine, vectors, now=1.0)
    export(engine, tmp_path)
    size = (tmp_path / "audio_vectors.json").stat().st_size
    assert size / (n * dim) <= 12, size / (n * dim)
    got = strict(tmp_path / "audio_vectors.json")
    matrix = np.array([got[k][0] for k in vectors]).astype(np.float32)
    np.testing.assert_array_equal(
        matrix.view(np.uint32), np.stack(list(vectors.values())).view(np.uint32)
    )


def test_non_finite_vectors_are_skipped_with_one_warning(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    good = done_vectors(engine, 5, 4, now=10.0)
    bad = {
        "has-nan": np.array([1, np.nan, 2, 3], np.float32),
        "has-inf": np.array([np.inf, 0, 0, 0], np.float32),
        "has-neg-inf": np.array([0, 0, 0, -np.inf], np.float32),
    }
    add_jobs(engine, [*bad, "lost"])
    finish(engine, bad, {"lost": "HTTP 404"}, now=20.0)

    out = tmp_path / "out"
    result = cli("export", "--out", str(out))
    assert result.stdout.startswith("exported 5 vectors, 1 failures")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("runner: warning: skipped 3 vector(s) holding NaN or Inf")
    assert "'has-nan'" in lines[0]
    vectors = strict(out / "audio_vectors.json")
    assert list(vectors) == list(good) == list(strict(out / "audio_process.json"))
    assert list(strict(out / "audio_fail.json")) == ["lost"]
    assert "null" not in (out / "audio_vectors.json").read_text()

    # the binary formats hold them as stored
    cli("export", "--out", str(tmp_path / "npz"), "--format", "npz")
    with np.load(tmp_path / "npz" / "vectors.npz") as npz:
        assert npz["vectors"].shape == (8, 4)
        np.testing.assert_array_equal(npz["vectors"][5:], np.stack(list(bad.values())))


def test_merge_with_only_done_since_keeps_what_it_does_not_rewrite(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    """The incremental export of issue 13: earlier results stay, newer replace them."""
    old = done_vectors(engine, 30, 6, now=1000.0, prefix="old")
    add_jobs(engine, ["old-fail", "flip", "retrying"])
    finish(
        engine, {}, {"old-fail": "HTTP 404", "flip": "HTTP 500", "retrying": "HTTP 503"}, now=1000.0
    )
    out = tmp_path / "out"
    cli("export", "--out", str(out))
    (out / "audio_vectors.json").write_text(
        (out / "audio_vectors.json").read_text().replace("{\n", '{\n"foreign": [[0.5, 0.25]],\n', 1)
    )
    first = [
        strict(out / name)
        for name in ("audio_vectors.json", "audio_process.json", "audio_fail.json")
    ]
    assert len(first[0]) == 31 and len(first[2]) == 3

    # later: new work; "flip" retried and done; "retrying" retried, not finished yet;
    # old0003 recomputed into a NaN vector (skipped, so its old entry stays)
    requeue_failed(engine, keys=["flip", "retrying"])
    new = done_vectors(engine, 10, 6, now=2000.0, seed=1, prefix="new")
    flip = np.full(6, 9.0, np.float32)
    add_jobs(engine, ["new-fail"])
    finish(engine, {"flip": flip}, {"new-fail": "HTTP 404"}, now=2000.0, keep_running=("retrying",))
    nan = np.full(6, np.nan, np.float32).tobytes()
    with engine.begin() as conn:
        conn.execute(
            update(jobs).where(jobs.c.key == "old0003").values(vector=nan, finished_at=2000.0)
        )

    for _ in range(2):  # and running it again changes nothing
        line = cli("export", "--out", str(out), "--only-done-since", "1500", "--merge").stdout
        assert line.startswith("exported 11 vectors, 1 failures, kept ")
        vectors, process, fail = (
            strict(out / name)
            for name in ("audio_vectors.json", "audio_process.json", "audio_fail.json")
        )
        assert list(vectors)[:11] == ["flip", *new]  # this run's first, in job order
        assert set(vectors) == {*old, *new, "flip", "foreign"}
        assert set(process) == {*old, *new, "flip"}
        for key in old:  # the earlier entries, number for number
            assert vectors[key] == first[0][key], key
            assert process[key] == first[1][key], key
        assert vectors["foreign"] == [[0.5, 0.25]]
        np.testing.assert_array_equal(bits(vectors["flip"][0]), flip.view(np.uint32))
        for key, vector in new.items():
            np.testing.assert_array_equal(bits(vectors[key][0]), vector.view(np.uint32))
        # "flip" is done now, so its old failure goes; "retrying" is running again:
        # the database knows it has no result yet, as a plain --merge would say
        assert fail == {"new-fail": fail["new-fail"], "old-fail": first[2]["old-fail"]}
        assert line.startswith(f"exported 11 vectors, 1 failures, kept {31 + 30 + 1}")

    # a plain export (no --merge) says exactly what the database says
    cli("export", "--out", str(out))
    assert "foreign" not in strict(out / "audio_vectors.json")


def test_merge_refuses_a_file_that_is_not_an_object(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    done_vectors(engine, 3, 4, now=10.0)
    (tmp_path / "audio_vectors.json").write_text("[[1.0, 2.0]]\n")
    result = cli("export", "--out", str(tmp_path), "--merge", ok=False)
    assert "is not a JSON object" in one_line_error(result)
    assert (tmp_path / "audio_vectors.json").read_text() == "[[1.0, 2.0]]\n"
    assert not list(tmp_path.glob(".*tmp*"))


def test_an_export_that_fails_half_way_leaves_the_earlier_set_whole(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    """A merge that fails on the last file (here a cut audio_fail.json) must not
    leave new vectors beside the old failures: no file of the set is replaced."""
    done_vectors(engine, 3, 4, now=10.0)
    cli("export", "--out", str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.glob("audio_*.json")}
    done_vectors(engine, 2, 4, now=20.0, prefix="w")
    cut = before["audio_fail.json"] + b'{"x": '
    (tmp_path / "audio_fail.json").write_bytes(cut)
    result = cli("export", "--out", str(tmp_path), "--merge", ok=False)
    assert "cannot merge" in one_line_error(result)
    after = {p.name: p.read_bytes() for p in tmp_path.glob("audio_*.json")}
    assert after == {**before, "audio_fail.json": cut}
    assert not list(tmp_path.glob(".*tmp*"))
