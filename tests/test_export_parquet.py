"""`runner export --format parquet`, read back as data tools read it (pyarrow and
DuckDB), checked against the npz export of the same database; on SQLite and
PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine

from runner import export_parquet
from runner.db import connect
from runner.export import npz_keys
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


def matrix(table: pa.Table, dim: int) -> np.ndarray:
    column = table.column("vector").combine_chunks()
    return column.flatten().to_numpy().reshape(-1, dim)


def duck(sql: str) -> list[tuple]:
    with duckdb.connect() as conn:
        return conn.execute(sql).fetchall()


def test_parquet_equals_npz_in_pyarrow_and_duckdb(
    cli: Cli, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_parquet, "PARQUET_GROUP_ROWS", 7)  # several row groups
    dim = 8
    vectors = done_vectors(engine, 40, dim, now=1_767_225_600.0)
    add_jobs(engine, ["ключ-ü", "nan", "lost", "todo"])
    special = {"ключ-ü": np.arange(dim, dtype=np.float32), "nan": np.full(dim, np.nan, np.float32)}
    finish(engine, special, {"lost": "HTTP 404"}, now=1_767_225_601.5)
    vectors.update(special)

    cli("export", "--out", str(tmp_path / "npz"), "--format", "npz")
    line = cli("export", "--out", str(tmp_path / "pq"), "--format", "parquet").stdout
    assert "exported 42 vectors, 1 failures" in line
    assert "vectors.parquet, failed.parquet" in line
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == [
        "failed.parquet",
        "vectors.parquet",
    ]
    with np.load(tmp_path / "npz" / "vectors.npz") as npz:
        keys, expected = npz_keys(npz), npz["vectors"]
    assert keys == list(vectors)
    process = json.loads((tmp_path / "npz" / "process.json").read_text())
    fail = json.loads((tmp_path / "npz" / "fail.json").read_text())

    path = tmp_path / "pq" / "vectors.parquet"
    assert pq.ParquetFile(path).num_row_groups == 6  # 42 rows, 7 a group: streamed
    table = pq.read_table(path)
    assert table.schema.field("key").type == pa.string()
    assert table.schema.field("vector").type == pa.list_(pa.float32(), dim)
    assert table.schema.field("finished_at").type == pa.timestamp("us", tz="UTC")
    assert table.column_names == [
        "key",
        "url",
        "vector",
        "video_duration",
        "channels_count",
        "processing_audio_time",
        "model",
        "finished_at",
    ]
    assert table.column("key").to_pylist() == keys
    got = matrix(table, dim)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    rows = table.drop_columns(["vector"]).to_pylist()
    assert rows[0]["url"] == "http://media.test/v0000"
    assert rows[0]["model"] == "tiny"
    assert rows[-1]["finished_at"] == datetime(2026, 1, 1, 0, 0, 1, 500_000, tzinfo=UTC)
    for row in rows:
        facts = process[row["key"]]
        assert row["video_duration"] == facts["video_duration"]
        assert row["channels_count"] == facts["channels_count"]
        assert row["processing_audio_time"] == facts["processing_audio_time"]

    # DuckDB, as is: the vector column is a FLOAT[] of D values
    duck_rows = duck(f"SELECT key, vector FROM '{path}'")
    assert [key for key, _ in duck_rows] == keys
    from_duck = np.array([vector for _, vector in duck_rows], dtype=np.float32)
    np.testing.assert_array_equal(from_duck.view(np.uint32), expected.view(np.uint32))
    assert duck(f"SELECT count(*), min(len(vector)), max(len(vector)) FROM '{path}'") == [
        (42, dim, dim)
    ]

    failed_path = tmp_path / "pq" / "failed.parquet"
    failures = pq.read_table(failed_path).to_pylist()
    assert [row.pop("key") for row in failures] == list(fail)
    assert failures[0].pop("finished_at") == datetime(2026, 1, 1, 0, 0, 1, 500_000, tzinfo=UTC)
    assert failures == list(fail.values())
    assert duck(f"SELECT key, http_status, attempts FROM '{failed_path}'") == [("lost", 404, 1)]


def test_parquet_only_done_since(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    done_vectors(engine, 5, 4, now=1000.0, prefix="old")
    add_jobs(engine, ["old-fail"])
    finish(engine, {}, {"old-fail": "HTTP 404"}, now=1000.0)
    new = done_vectors(engine, 3, 4, now=2000.0, seed=1, prefix="new")
    add_jobs(engine, ["new-fail"])
    finish(engine, {}, {"new-fail": "HTTP 404"}, now=2000.0)
    cli("export", "--out", str(tmp_path), "--format", "parquet", "--only-done-since", "1500")
    table = pq.read_table(tmp_path / "vectors.parquet")
    assert table.column("key").to_pylist() == list(new)
    np.testing.assert_array_equal(matrix(table, 4), np.stack(list(new.values())))
    assert pq.read_table(tmp_path / "failed.parquet").column("key").to_pylist() == ["new-fail"]


def test_parquet_of_an_empty_database(cli: Cli, tmp_path: Path) -> None:
    cli("export", "--out", str(tmp_path), "--format", "parquet")
    assert pq.read_table(tmp_path / "vectors.parquet").num_rows == 0
    assert duck(f"SELECT count(*) FROM '{tmp_path / 'vectors.parquet'}'") == [(0,)]
    assert duck(f"SELECT count(*) FROM '{tmp_path / 'failed.parquet'}'") == [(0,)]


def test_mixed_dimensions_refuse_parquet_and_keep_the_earlier_file(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    add_jobs(engine, ["a"])
    finish(engine, {"a": np.ones(4, np.float32)}, now=1.0)
    cli("export", "--out", str(out), "--format", "parquet")
    before = (out / "vectors.parquet").read_bytes()
    add_jobs(engine, ["b"])
    finish(engine, {"b": np.ones(6, np.float32)}, now=2.0)
    result = cli("export", "--out", str(out), "--format", "parquet", ok=False)
    assert "different dimensions (4 to 6)" in one_line_error(result)
    assert (out / "vectors.parquet").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["failed.parquet", "vectors.parquet"]
    # a window with one dimension only is fine
    cli("export", "--out", str(out), "--format", "parquet", "--only-done-since", "2")
    assert pq.read_table(out / "vectors.parquet").column("key").to_pylist() == ["b"]


def test_merge_is_not_for_parquet(cli: Cli, tmp_path: Path) -> None:
    result = cli("export", "--out", str(tmp_path), "--format", "parquet", "--merge", ok=False)
    assert "--merge works with --format json only" in one_line_error(result)
