"""Embedding specs: recorded with every vector, guarded at daemon start, shown by
status and every export, never mixed by an export without saying so."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, delete, insert, select, update

from runner import catalogue, jobs
from runner.db import connect
from runner.export import npz_keys
from runner.models import embed_specs
from runner.models import jobs as jobs_table
from runner.spec import (
    EmbedSpec,
    SpecMismatch,
    check_guard,
    fingerprint,
    fingerprint_dir,
    guard_queries,
    legacy_model,
    model_name,
    record_for_serve,
    register,
    requeue_other_specs,
)
from tests.argv import daemon_args
from tests.conftest import TINY_HIDDEN, Cli, MediaServer, write_catalogue
from tests.postgres import PostgresServer

NOW = 1_800_000_000.0


def spec(model: str = "m", **changes: object) -> EmbedSpec:
    base = EmbedSpec(
        model=model,
        fingerprint="0" * 16,
        layer=2,
        layers=2,
        pooling="mean",
        dtype="float32",
        dim=4,
        family="wav2vec2",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def engine(any_db_url: str) -> Iterator[Engine]:
    engine = connect(any_db_url)
    yield engine
    engine.dispose()


def add_done(engine: Engine, vectors: dict[str, tuple[str | None, str]]) -> None:
    """Done jobs: key -> (embed_spec id or None, model_id)."""
    records = [catalogue.Record(key=k, url=f"http://media.test/{k}", meta={}) for k in vectors]
    with engine.begin() as conn:
        catalogue.upsert_records(conn, records, now=NOW)
    claimed = jobs.claim(engine, worker_id="w", limit=len(vectors), lease_s=60, now=NOW)
    started = [jobs.start(engine, job, now=NOW) for job in claimed]
    with engine.begin() as conn:
        for job in started:
            spec_id, model = vectors[job.key]
            result = jobs.Result(
                vector=np.full(4, 0.5, dtype=np.float32),
                video_duration_s=1.0,
                channels_count=1,
                processing_audio_time_s=0.1,
                model_id=model,
                embed_spec=spec_id,
            )
            jobs.complete(conn, job, result, now=NOW)


def statuses(engine: Engine) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(select(jobs_table.c.key, jobs_table.c.status, jobs_table.c.embed_spec))
        return {r.key: (r.status, r.embed_spec) for r in rows}


def test_guard_refuses_another_spec_and_requeue_makes_it_pass(engine: Engine) -> None:
    """On SQLite and PostgreSQL: the refusal names the stored spec and the command;
    the requeue puts back exactly the other spec's done jobs and forgets that spec."""
    old, new = spec("old-model"), spec("new-model", pooling="mean-std", dim=8)
    check_guard(engine, old)
    add_done(engine, {"a": (old.id, "old-model"), "b": (old.id, "old-model")})
    check_guard(engine, old)  # the same spec again: fine
    with pytest.raises(SpecMismatch) as refused:
        check_guard(engine, new)
    message = str(refused.value)
    assert "\n" not in message
    assert old.describe() in message and new.describe() in message
    assert f"runner requeue --other-specs --keep {new.id}" in message

    assert requeue_other_specs(engine, new.id) == (2, 1)
    assert {k: s for k, (s, _) in statuses(engine).items()} == {"a": "pending", "b": "pending"}
    with engine.connect() as conn:
        assert list(conn.execute(select(embed_specs.c.id)).scalars()) == [new.id]
        row = conn.execute(select(jobs_table).where(jobs_table.c.key == "a")).one()
    assert (row.vector, row.model_id, row.embed_spec, row.attempts) == (None, None, None, 0)
    check_guard(engine, new)  # passes now
    with pytest.raises(Exception, match="no such embedding spec"):
        requeue_other_specs(engine, "f" * 32)


def test_vectors_without_a_spec(engine: Engine) -> None:
    """Legacy vectors (before specs were recorded) count as their model's last layer
    with mean pooling; adopted vectors never stop a daemon, nor get requeued."""
    add_done(engine, {"legacy": (None, "m"), "adopted": (None, "adopted")})
    check_guard(engine, spec("m"))  # same model, last layer, mean: fine
    for other in (spec("m", layer=1), spec("m", pooling="mean-std"), spec("other")):
        with pytest.raises(SpecMismatch, match=r"m \(recorded before specs"):
            check_guard(engine, other)
    # the refused specs were recorded (so the command can name them), then forgotten
    bfloat16 = spec("m", dtype="bfloat16")
    register(engine, bfloat16)
    assert requeue_other_specs(engine, bfloat16.id) == (0, 4)
    register(engine, spec("other"))
    assert requeue_other_specs(engine, spec("other").id) == (1, 1)
    assert statuses(engine) == {"legacy": ("pending", None), "adopted": ("done", None)}


def test_a_refused_daemon_is_refused_again(engine: Engine) -> None:
    """The guard reads the done rows at every start: once the refused spec was the
    only one recorded, a shortcut let its second start pass beside vectors from
    before specs of another model (and missed rows written behind its back)."""
    add_done(engine, {"a": (None, "old-model"), "b": (None, "old-model")})
    new = spec("new-model")
    for _ in range(2):
        with pytest.raises(SpecMismatch, match=r"old-model \(recorded before specs"):
            check_guard(engine, new)
    assert requeue_other_specs(engine, new.id) == (2, 0)  # what the message says
    check_guard(engine, new)
    check_guard(engine, new)
    # the jobs done again, one by a daemon that recorded no spec: the next start sees it
    add_done(engine, {"a": (new.id, "new-model"), "b": ("e" * 32, "new-model")})
    with pytest.raises(SpecMismatch, match=r"spec e{32} \(not recorded\)"):
        check_guard(engine, new)


def spec_rows(engine: Engine) -> list[tuple[str, float]]:
    with engine.connect() as conn:
        stmt = select(embed_specs.c.id, embed_specs.c.created_at).order_by(embed_specs.c.created_at)
        return [(row.id, row.created_at) for row in conn.execute(stmt)]


def test_a_recorded_spec_without_done_vectors_stops_another(engine: Engine) -> None:
    """A daemon of spec a has started and finished nothing yet: b is refused, naming
    a and the command.  b's refusal (recorded after a) does not stop a's restarts;
    once the command forgot a, b runs and a is the one refused."""
    a, b = spec("model-a"), spec("model-b", layer=1)
    check_guard(engine, a, now=NOW)
    with pytest.raises(SpecMismatch) as refused:
        check_guard(engine, b, now=NOW - 60)  # a clock behind: still recorded after a
    message = str(refused.value)
    assert "\n" not in message and "no done vectors yet" in message
    assert a.describe() in message and b.describe() in message
    assert f"runner requeue --other-specs --keep {b.id}" in message
    assert [spec_id for spec_id, _ in spec_rows(engine)] == [a.id, b.id]
    with pytest.raises(SpecMismatch):
        check_guard(engine, b)  # its second start too
    check_guard(engine, a)  # a restarts: b was refused, it stops nothing
    assert requeue_other_specs(engine, b.id) == (0, 1)
    check_guard(engine, b)
    with pytest.raises(SpecMismatch, match="model-b"):
        check_guard(engine, a)


def test_two_daemons_starting_together(any_db_url: str) -> None:
    """Check and record are one locked transaction: of two daemons of different
    specs starting at the same moment on an empty database, exactly one passes."""
    specs = [spec("model-a"), spec("model-b")]
    for _ in range(5):
        engines = [connect(any_db_url) for _ in specs]
        barrier = threading.Barrier(len(specs))

        def start(engine: Engine, mine: EmbedSpec, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            try:
                check_guard(engine, mine)
            except SpecMismatch:
                return False
            return True

        with ThreadPoolExecutor(len(specs)) as pool:
            passed = list(pool.map(start, engines, specs))
        assert sorted(passed) == [False, True]
        winner = specs[passed.index(True)]
        assert spec_rows(engines[0])[0][0] == winner.id
        with engines[0].begin() as conn:
            conn.execute(delete(embed_specs))
        for engine in engines:
            engine.dispose()


def test_guard_query_seeks_the_covering_index(tmp_path: Path) -> None:
    """SQLite plans the guard as seeks on ix_jobs_done_spec, never a scan of the
    table (whose rows hold the vectors), with or without ANALYZE's statistics (with
    them, SQLite scanned the table for the three seeks OR-ed in one query)."""
    engine = connect(f"sqlite:///{tmp_path / 'runner.db'}")
    mine = spec("m")
    rows = [
        {
            "key": f"k{i}",
            "status": "done" if i % 10 else "pending",
            "created_at": NOW,
            "embed_spec": mine.id if i % 10 else None,
            "model_id": "m",
            "vector": b"\0" * 64,
            "vector_dim": 16,
        }
        for i in range(2000)
    ]
    with engine.begin() as conn:
        conn.execute(insert(jobs_table), rows)
    queries = [
        query.compile(engine, compile_kwargs={"literal_binds": True})
        for query in guard_queries(mine)
    ]
    for analyze in (False, True):
        with engine.begin() as conn:
            if analyze:
                conn.exec_driver_sql("ANALYZE")
            for query in queries:
                plan = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}")]
                assert len(plan) == 1, plan
                assert plan[0].startswith("SEARCH jobs USING COVERING INDEX ix_jobs_done_spec ")
    check_guard(engine, mine)
    engine.dispose()


def test_serve_records_its_spec_only_where_none_is(engine: Engine) -> None:
    """`runner serve` stores no vectors: never refused; its spec is recorded (for
    /encode_audio's id to be looked up) only on a database that records none."""
    served, daemon_spec = spec("m"), spec("m", dtype="bfloat16")
    assert record_for_serve(engine, served) is None
    assert record_for_serve(engine, served) is None
    assert [spec_id for spec_id, _ in spec_rows(engine)] == [served.id]
    check_guard(engine, served)  # a daemon of the same spec
    with pytest.raises(SpecMismatch, match="a `runner serve` recorded it"):
        check_guard(engine, daemon_spec)
    requeue_other_specs(engine, daemon_spec.id)
    check_guard(engine, daemon_spec)
    warning = record_for_serve(engine, served)
    assert warning is not None and served.id in warning and "bfloat16" in warning
    assert [spec_id for spec_id, _ in spec_rows(engine)] == [daemon_spec.id]


def test_fingerprint_follows_config_and_weight_sizes(tmp_path: Path) -> None:
    """Config files by content, the weights from_pretrained picks by name and size,
    through the hub cache's symlinks as through plain files; nothing else."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    files = {
        "config.json": b'{"model_type": "wav2vec2"}',
        "preprocessor_config.json": b'{"do_normalize": true}',
        "model.safetensors": b"\0" * 64,
        "README.md": b"not part of it",
    }
    for name, content in files.items():
        (blobs / name).write_bytes(content)
        (snapshot / name).symlink_to(blobs / name)
    plain = tmp_path / "plain"
    plain.mkdir()
    for name, content in files.items():
        (plain / name).write_bytes(content)
    before = fingerprint_dir(snapshot)
    assert fingerprint_dir(plain) == before
    (plain / "README.md").write_bytes(b"changed")
    # what a processor or a whole-repo download adds: nothing from_pretrained reads
    for name in ("vocab.json", "tokenizer_config.json", "special_tokens_map.json"):
        (plain / name).write_text('{"<pad>": 0}')
    (plain / "pytorch_model.bin").write_bytes(b"\0" * 99)  # safetensors is preferred
    assert fingerprint_dir(plain) == before
    (plain / "model.safetensors").write_bytes(b"\1" * 64)  # same size: same print
    assert fingerprint_dir(plain) == before
    (plain / "model.safetensors").write_bytes(b"\0" * 65)
    assert fingerprint_dir(plain) != before
    (blobs / "preprocessor_config.json").write_bytes(b'{"do_normalize": false}')
    assert fingerprint_dir(snapshot) != before

    # without model.safetensors: pytorch_model.bin; sharded: the index and its shards
    (plain / "model.safetensors").unlink()
    bin_only = fingerprint_dir(plain)
    (plain / "pytorch_model.bin").write_bytes(b"\0" * 98)
    assert fingerprint_dir(plain) != bin_only
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (sharded / name).write_bytes(files[name])
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"weight_map": {"a": shards[0], "b": shards[1]}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in shards:
        (sharded / name).write_bytes(b"\0" * 10)
    first = fingerprint_dir(sharded)
    (sharded / shards[1]).write_bytes(b"\0" * 11)
    assert fingerprint_dir(sharded) != first


def test_a_hub_id_and_its_snapshot_directory_are_one_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`org/name@commit` either way; a processor's files downloaded into the snapshot
    later change nothing (the reviewer's three spec ids for one checkpoint)."""
    import huggingface_hub.constants

    commit = "c0ffee" * 6 + "abcd"
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, content in {
        "config.json": '{"model_type": "wav2vec2"}',
        "preprocessor_config.json": '{"do_normalize": true}',
        "model.safetensors": "weights",
    }.items():
        (snapshot / name).write_text(content)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def spec_of(model_id: str) -> EmbedSpec:
        return spec(model_name(model_id), fingerprint=fingerprint(model_id, "{}"))

    by_id = spec_of("org/tiny")
    assert by_id.model == f"org/tiny@{commit}"
    (snapshot / "vocab.json").write_text('{"<pad>": 0, "a": 1}')
    (snapshot / "tokenizer_config.json").write_text("{}")
    assert spec_of("org/tiny") == by_id
    assert spec_of(str(snapshot)) == by_id
    assert legacy_model(by_id) == "org/tiny"  # what jobs from before specs hold
    assert model_name(str(tmp_path)) == str(tmp_path.resolve())  # any other directory


def daemon(cli: Cli, model: Path, workdir: Path, *extra: str, ok: bool = True):  # type: ignore[no-untyped-def]
    return cli(*daemon_args(model, workdir, "--until-done", *extra), ok=ok)


def test_daemon_records_refuses_and_requeue_works(
    cli: Cli, tmp_path: Path, tiny_model: Path, server: MediaServer, db_url: str
) -> None:
    names = ["stereo.mp4", "song.mp3"]
    records = {name: {"url": server.url(f"media/{name}")} for name in names}
    cli("import", str(write_catalogue(tmp_path / "catalogue.json", records)))
    daemon(cli, tiny_model, tmp_path / "work")
    status = json.loads(cli("status", "--json").stdout)
    (first,) = status["specs"]
    assert first["spec"]["model"] == str(tiny_model.resolve())
    assert first["spec"]["dim"] == TINY_HIDDEN and first["spec"]["pooling"] == "mean"
    assert statuses(connect(db_url)) == {n: ("done", first["id"]) for n in names}
    assert f"embedding spec: {first['description']}" in cli("status").stdout

    # another spec on the same database: one line, naming the stored spec and the way on
    refused = daemon(cli, tiny_model, tmp_path / "work", "--pooling", "mean-std", ok=False)
    assert refused.exit_code == 1 and refused.stdout == ""
    (line,) = refused.stderr.splitlines()
    assert line.startswith("runner: error: this database holds done vectors of another")
    assert first["description"] in line
    command = line.split("`")[1]
    assert command.startswith("runner requeue --other-specs --keep ")
    assert "done" in cli("status").stdout  # nothing was touched

    requeued = cli(*command.split()[1:]).stdout
    assert requeued.startswith("requeued 2 done job(s) of other specs; forgot 1 spec(s)")
    daemon(cli, tiny_model, tmp_path / "work", "--pooling", "mean-std")
    out = tmp_path / "out"
    exported = cli("export", "--out", str(out)).stdout
    vectors = json.loads((out / "audio_vectors.json").read_text())
    assert {len(v[0]) for v in vectors.values()} == {2 * TINY_HIDDEN}
    specs = json.loads((out / "audio_specs.json").read_text())
    assert "keys" not in specs
    (only,) = specs["specs"]
    assert only["id"] == command.split()[-1] and only["vectors"] == 2
    assert f"2 vector(s): {only['description']}" in exported


@pytest.fixture
def mixed(db_url: str) -> tuple[Engine, EmbedSpec, EmbedSpec]:
    """Two specs' vectors in one database (as two daemons started together could
    make), plus an adopted one."""
    engine = connect(db_url)
    a, b = spec("model-a"), spec("model-b", layer=1)
    register(engine, a)
    register(engine, b)
    add_done(engine, {"a1": (a.id, "model-a"), "b1": (b.id, "model-b"), "a2": (a.id, "model-a")})
    add_done(engine, {"old": (None, "adopted")})
    return engine, a, b


def test_export_refuses_a_mix_unless_told(
    mixed: tuple[Engine, EmbedSpec, EmbedSpec], cli: Cli, tmp_path: Path
) -> None:
    _, a, b = mixed
    for fmt in ("json", "npz", "parquet"):
        refused = cli("export", "--out", str(tmp_path / fmt), "--format", fmt, ok=False)
        assert refused.exit_code == 1
        (line,) = refused.stderr.splitlines()
        assert "made 2 different ways: 2 of model-a" in line and "1 of model-b" in line
        assert "--mixed-specs" in line and "--spec ID" in line
        assert not (tmp_path / fmt).exists() or not list((tmp_path / fmt).iterdir())

    # one spec: only its vectors (the adopted one is not of it)
    cli("export", "--out", str(tmp_path / "a"), "--spec", a.id)
    assert set(json.loads((tmp_path / "a" / "audio_vectors.json").read_text())) == {"a1", "a2"}

    # all of them, each vector's spec beside it, in every format
    run = cli("export", "--out", str(tmp_path / "all"), "--mixed-specs")
    assert "mixes 3 embedding specs" in run.stderr
    specs = json.loads((tmp_path / "all" / "audio_specs.json").read_text())
    assert [(s["label"], s["vectors"]) for s in specs["specs"]] == [
        (a.id, 2),
        ("adopted", 1),
        (b.id, 1),
    ]
    assert specs["keys"] == {"a1": a.id, "b1": b.id, "a2": a.id, "old": "adopted"}

    cli("export", "--out", str(tmp_path / "npz"), "--format", "npz", "--mixed-specs")
    with np.load(tmp_path / "npz" / "vectors.npz") as npz:
        labels = [s["label"] for s in json.loads(str(npz["specs_json"]))]
        by_key = dict(zip(npz_keys(npz), (labels[i] for i in npz["spec_index"]), strict=True))
    assert by_key == specs["keys"]

    cli("export", "--out", str(tmp_path / "pq"), "--format", "parquet", "--mixed-specs")
    table = pq.read_table(tmp_path / "pq" / "vectors.parquet")
    assert (
        dict(zip(table["key"].to_pylist(), table["embed_spec"].to_pylist(), strict=True))
        == (specs["keys"])
    )
    metadata = json.loads(table.schema.metadata[b"runner.embed_specs"])
    assert [s["label"] for s in metadata] == labels


def test_adopted_and_legacy_vectors_beside_one_spec_export(
    db_url: str, cli: Cli, tmp_path: Path
) -> None:
    """Not a mix: adopted vectors (no spec at all) and legacy vectors of the spec's
    own model are exported, each named in audio_specs.json."""
    engine = connect(db_url)
    mine = spec("m")
    register(engine, mine)
    add_done(engine, {"new": (mine.id, "m"), "legacy": (None, "m"), "old": (None, "adopted")})
    out = cli("export", "--out", str(tmp_path / "out")).stdout
    assert "1 vector(s): m (made before specs were recorded" in out
    specs = json.loads((tmp_path / "out" / "audio_specs.json").read_text())
    assert specs["keys"] == {"new": mine.id, "legacy": "unrecorded:m", "old": "adopted"}
    # --spec: the legacy vector counts as the spec (as for the guard and the requeue)
    cli("export", "--out", str(tmp_path / "one"), "--spec", mine.id)
    vectors = json.loads((tmp_path / "one" / "audio_vectors.json").read_text())
    assert set(vectors) == {"new", "legacy"}
    cli("export", "--out", str(tmp_path / "npz"), "--spec", mine.id, "--format", "npz")
    with np.load(tmp_path / "npz" / "vectors.npz") as npz:
        assert sorted(npz_keys(npz)) == ["legacy", "new"]
    # a legacy vector of another model is a mix
    with engine.begin() as conn:
        conn.execute(
            update(jobs_table).where(jobs_table.c.key == "legacy").values(model_id="other")
        )
    refused = cli("export", "--out", str(tmp_path / "again"), ok=False)
    assert "other (made before specs were recorded" in refused.stderr


def test_merge_never_puts_two_specs_in_one_file(db_url: str, cli: Cli, tmp_path: Path) -> None:
    """--merge into files of another spec is refused (audio_specs.json could not say
    which key is which); into files that record no spec it warns."""
    engine = connect(db_url)
    a, b = spec("model-a"), spec("model-b")
    register(engine, a)
    add_done(engine, {"a1": (a.id, "model-a")})
    out = tmp_path / "out"
    cli("export", "--out", str(out))
    # the database moves on to spec b (its a-vectors pruned)
    with engine.begin() as conn:
        conn.execute(delete(jobs_table))
    register(engine, b)
    add_done(engine, {"b1": (b.id, "model-b")})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = cli("export", "--out", str(out), "--merge", ok=False)
    assert refused.exit_code == 1
    (line,) = refused.stderr.splitlines()
    assert f"its vectors are of spec(s) {a.id}" in line and b.id in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    (out / "audio_specs.json").unlink()  # files written before runner recorded specs
    merged = cli("export", "--out", str(out), "--merge")
    assert "do not record their embedding spec" in merged.stderr
    vectors = json.loads((out / "audio_vectors.json").read_text())
    assert set(vectors) == {"a1", "b1"}
    engine.dispose()


def test_guard_and_requeue_on_a_postgresql_database_with_a_language_collation(
    postgres_server: PostgresServer,
) -> None:
    """In an ICU 'en' collation 'MIT/ast' sorts after 'adopted', the reverse of
    Python's (and SQLite's) order: range terms cut in Python's order would match
    every model, refuse this spec's own older vectors, and requeue (destroy) them
    and the adopted ones.  A review found it; PostgreSQL now uses NOT IN."""
    name = "runner_icu_collation"
    postgres_server.execute(f"DROP DATABASE IF EXISTS {name}")
    postgres_server.execute(
        f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu"
        " ICU_LOCALE 'en' LOCALE 'C.utf8'"
    )
    engine = connect(postgres_server.url(name))
    try:
        mine = spec("MIT/ast")  # last layer, mean: older vectors of MIT/ast count as it
        add_done(engine, {"legacy": (None, "MIT/ast"), "old": (None, "adopted")})
        check_guard(engine, mine)  # passes: nothing of another spec
        assert requeue_other_specs(engine, mine.id) == (0, 0)
        assert statuses(engine) == {"legacy": ("done", None), "old": ("done", None)}
        add_done(engine, {"other": (None, "Other/model")})
        with pytest.raises(SpecMismatch):
            check_guard(engine, mine)
    finally:
        engine.dispose()
        postgres_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
