"""How a vector was made: the embedding spec, and the guard against mixing them.

An `EmbedSpec` names the model (`org/name@commit` for a checkpoint of the HF hub
cache, by hub id or by snapshot directory; else a local checkpoint's absolute path)
and a fingerprint of what from_pretrained reads (config.json and
preprocessor_config.json by content, the weight files it picks by name and size),
plus the hidden state (layer), the pooling and the dtype.  Its canonical JSON is
stored once in ``embed_specs``; its id (32 hex of a blake2b of that JSON) is stored
on every done job (``jobs.embed_spec``).

The guard (`check_guard`) runs when a daemon starts: a database that holds done
vectors of another spec, or records another spec before this one (a daemon of it
may be running without a done job yet), makes it refuse, in one line that names
the other spec and the command that requeues those jobs.  Check and record are one
locked transaction.  Two kinds of done vectors have no spec:

* made before specs were recorded (migration 0005): the code then always pooled
  the last hidden state with a mean, so they count as the spec of their model at
  the last layer with mean pooling, whatever the dtype (`legacy_model`);
* adopted from the old script's files (model 'adopted', runner/adopt.py): the
  operator imported them on purpose and nothing says how they were made; they
  never stop a daemon, and exports name them apart.

The guard must stay cheap on a million jobs, and reads the jobs at every start
(a shortcut that skipped them once this spec was recorded let a refused daemon
pass on its second start).  Its queries (`guard_queries`) are a few seeks of the
partial covering index ix_jobs_done_spec, so they never read a vector: on SQLite
at a million jobs, 900,000 of them done with one spec or from before specs, under
0.1 ms with or without ANALYZE (one query with `!=` and `NOT IN` took 1.2-1.8 s
once ANALYZE had run: SQLite scanned the table).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, delete, func, literal, or_, select, text

from runner.errors import RunnerError
from runner.models import ADOPTED, embed_specs, jobs

log = logging.getLogger(__name__)

#: pooling over the L2-normalised frames: their mean; or mean and standard deviation
POOLINGS = ("mean", "mean-std")
#: files identified by their content: they change what the vectors are
CONTENT_FILES = ("config.json", "preprocessor_config.json")
DONE = "done"


class SpecMismatch(RunnerError):
    """The database holds done vectors of another spec: the daemon refuses to start."""


@dataclass(frozen=True)
class EmbedSpec:
    #: hub id as given, or the checkpoint directory's absolute path
    model: str
    #: 16 hex over config.json, preprocessor_config.json and the weight files' names/sizes
    fingerprint: str
    #: the hidden state pooled: 0 the feature projection ... `layers` the last
    layer: int
    #: transformer layers of the model (so `layer == layers` means the last)
    layers: int
    pooling: str
    dtype: str
    #: width of the vectors (hidden size, or twice it for mean-std)
    dim: int
    #: transformers' model_type (wav2vec2, hubert, wavlm, data2vec-audio)
    family: str

    def to_json(self) -> str:
        """Canonical: sorted keys, no spaces; the id hashes exactly this."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def id(self) -> str:
        return hashlib.blake2b(self.to_json().encode(), digest_size=16).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> EmbedSpec:
        return cls(**json.loads(text))

    @property
    def last_layer(self) -> bool:
        return self.layer == self.layers

    def describe(self) -> str:
        layer = f"layer {self.layer}" + (" (last)" if self.last_layer else f" of {self.layers}")
        return (
            f"{self.model} ({self.family}, files {self.fingerprint}), {layer}, "
            f"{self.pooling} pooling, {self.dtype}, {self.dim}-d [spec {self.id}]"
        )


def legacy_model(spec: EmbedSpec) -> str | None:
    """The model whose vectors from before specs were recorded count as this spec:
    they were the last hidden state, mean-pooled; None if this spec is not that.
    Those jobs hold --model as given: a hub id without the `@commit` the spec adds."""
    if not (spec.last_layer and spec.pooling == "mean"):
        return None
    if not spec.model.startswith("/") and "@" in spec.model:
        return spec.model.rpartition("@")[0]
    return spec.model


# --- fingerprints -----------------------------------------------------------------

#: the weight files AutoModel.from_pretrained picks, in its order of preference:
#: (file, its shard index); the first one present is what loads
WEIGHT_CHOICES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def weight_files(path: Path) -> list[Path]:
    """The weight files from_pretrained loads from `path`: model.safetensors, or its
    index and the shards it names; else pytorch_model.bin, or its index and shards.
    Nothing else in the directory (a tokenizer's files, the other format's copy)."""
    for single, index in WEIGHT_CHOICES:
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            try:
                shards = set(json.loads((path / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                shards = set()
            return [path / index, *(path / name for name in sorted(shards))]
    return []


def fingerprint_dir(path: Path) -> str:
    """What AutoModel and AutoFeatureExtractor read: config.json and
    preprocessor_config.json by content, the chosen weight files by name and size
    (hashing gigabytes of weights at every start would cost seconds).  Other files
    (vocab.json and a tokenizer's, a second copy of the weights in the other
    format) change nothing that loads, so nothing here."""
    digest = hashlib.blake2b(digest_size=8)
    for name in CONTENT_FILES:
        file = path / name
        content = file.read_bytes() if file.is_file() else b"-"
        digest.update(name.encode() + b"\0" + content + b"\0")
    for file in weight_files(path):  # is_file and stat follow the hub cache's symlinks
        size = file.stat().st_size if file.is_file() else -1
        digest.update(f"{file.name}\0{size}\0".encode())
    return digest.hexdigest()


def checkpoint_dir(model_id: str) -> Path | None:
    """Where from_pretrained(model_id) read the files: the directory itself, or the
    hub cache's snapshot holding its config.json; None if neither is found."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # not a repo id at all: a path that is not there, say
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def hub_name(directory: Path) -> str | None:
    """`org/name@commit` for a snapshot of the HF hub cache
    (.../models--org--name/snapshots/<commit>), else None."""
    snapshots, repo = directory.parent, directory.parent.parent
    if snapshots.name != "snapshots" or not repo.name.startswith("models--"):
        return None
    return f"{repo.name.removeprefix('models--').replace('--', '/')}@{directory.name}"


def model_name(model_id: str) -> str:
    """What the spec calls the model.  A checkpoint of the hub cache, whether named
    by its hub id or by its snapshot directory, is `org/name@commit` (one name for
    both spellings, and a new revision is another model); any other local
    checkpoint is its absolute path (another directory is another model, even with
    equal sizes); a hub id whose files are not found, as given."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        return hub_name(resolved) or str(resolved)
    directory = checkpoint_dir(model_id)
    named = hub_name(directory.resolve()) if directory is not None else None
    return named or model_id


def fingerprint(model_id: str, config_json: str) -> str:
    """The checkpoint's files as loaded; without them (not found in the hub cache),
    the loaded configuration's JSON."""
    directory = checkpoint_dir(model_id)
    if directory is not None:
        return fingerprint_dir(directory)
    log.warning("no files found for %s: its spec fingerprints the loaded config only", model_id)
    return hashlib.blake2b(config_json.encode(), digest_size=8).hexdigest()


# --- the database -----------------------------------------------------------------

#: pg_advisory_xact_lock key serialising the guard's check-and-record ("runnerspec")
SPEC_LOCK_ID = 0x72756E73706563


def _lock(conn: Connection) -> None:
    """Take the lock that makes check-and-record one step.  SQLite's engine began the
    transaction IMMEDIATE (runner/db.py), so it holds the write lock already;
    PostgreSQL takes an advisory lock, held until the transaction ends."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": SPEC_LOCK_ID})


def _recorded(conn: Connection) -> dict[str, float]:
    """Every recorded spec's id -> created_at."""
    rows = conn.execute(select(embed_specs.c.id, embed_specs.c.created_at))
    return {row.id: float(row.created_at) for row in rows}


def _record(conn: Connection, spec: EmbedSpec, recorded: dict[str, float], now: float) -> None:
    """Insert the spec (under `_lock`).  created_at is kept after every other one's,
    whatever the clocks of the machines that recorded them say: the guard relies on
    the order in which specs were recorded."""
    created = max([now, *(at + 0.001 for at in recorded.values())])
    values = {"id": spec.id, "spec": spec.to_json(), "created_at": created}
    # here, not at the top: `runner status` reads specs and need not load both dialects
    from sqlalchemy.dialects import postgresql, sqlite

    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    conn.execute(insert(embed_specs).values(**values).on_conflict_do_nothing())


def register(engine: Engine, spec: EmbedSpec, *, now: float | None = None) -> None:
    """Record the spec in embed_specs, if it is not already there."""
    with engine.begin() as conn:
        _lock(conn)
        _record(conn, spec, _recorded(conn), now or time.time())


def stored_specs(conn: Connection, ids: Iterable[str] | None = None) -> dict[str, EmbedSpec]:
    stmt = select(embed_specs.c.id, embed_specs.c.spec).order_by(embed_specs.c.created_at)
    if ids is not None:
        stmt = stmt.where(embed_specs.c.id.in_(list(ids)))
    return {row.id: EmbedSpec.from_json(row.spec) for row in conn.execute(stmt)}


def _foreign_terms(spec_id: str, legacy: str | None, *, ranges: bool) -> list[Any]:
    """The kinds of done vectors not of spec `spec_id` (adopted ones aside; legacy:
    the model whose vectors from before specs count as this spec), each one seek of
    the partial index ix_jobs_done_spec (status, embed_spec, model_id) WHERE status
    = 'done': specs below this id, above it; no spec and a model_id that is NULL
    or not an excluded one.

    With `ranges` (SQLite) that last is NULL, or below, between or above the
    excluded names (a `NOT IN` would walk the index entries of every vector from
    before specs: 100 ms at 900,000).  The gaps are cut in Python's order, which is
    SQLite's (bytes) but not a PostgreSQL collation's (en_US puts 'MIT/x' after
    'adopted'): there, and in the requeue, `NOT IN`, which no order can break."""
    done = jobs.c.status == DONE  # a done job always has its vector
    unrecorded = and_(done, jobs.c.embed_spec.is_(None))
    model = jobs.c.model_id
    excluded = sorted({ADOPTED, legacy or ADOPTED})
    if ranges:
        gaps = [model.is_(None), model < excluded[0]]
        gaps += [and_(model > low, model < high) for low, high in itertools.pairwise(excluded)]
        gaps.append(model > excluded[-1])
    else:
        gaps = [model.is_(None) | model.not_in(excluded)]
    return [
        and_(done, jobs.c.embed_spec < spec_id),
        and_(done, jobs.c.embed_spec > spec_id),
        *(and_(unrecorded, gap) for gap in gaps),
    ]


def foreign_done(spec_id: str, legacy: str | None) -> Any:
    """WHERE term: done vectors that are not of spec `spec_id`, adopted ones aside
    (legacy: the model whose vectors from before specs count as this spec)."""
    return or_(*_foreign_terms(spec_id, legacy, ranges=False))


def guard_queries(spec: EmbedSpec, dialect: str = "sqlite") -> list[Any]:
    """One done vector of another spec than `spec`, if there is one: a few queries,
    one per range of ix_jobs_done_spec, each planned as a seek of that covering
    index whatever SQLite's statistics say.  (Their OR in one query was planned as
    a MULTI-INDEX OR without statistics, but as a scan of the whole table, vectors
    and all, once ANALYZE had run on a database of one spec.)"""
    columns = (jobs.c.embed_spec, jobs.c.model_id)
    terms = _foreign_terms(spec.id, legacy_model(spec), ranges=dialect == "sqlite")
    return [select(*columns).where(term).limit(1) for term in terms]


def check_guard(engine: Engine, spec: EmbedSpec, *, now: float | None = None) -> None:
    """Refuse (SpecMismatch, one line) to start a daemon of `spec` if the database
    holds done vectors of another spec, or records another spec before this one (a
    daemon of it may be running and not have finished a job yet); otherwise record
    this spec.  Check and record are one locked transaction, so of two daemons
    starting together the second sees the first one's spec.

    Specs recorded after this one do not stop it (unless they have done vectors):
    a spec recorded while this one was recorded was refused at its start.  The
    refused spec is recorded too, so that the command the message gives can name it.
    """
    with engine.begin() as conn:
        _lock(conn)
        recorded = _recorded(conn)
        row = next(
            (
                row
                for query in guard_queries(spec, conn.dialect.name)
                if (row := conn.execute(query).first())
            ),
            None,
        )
        mine = recorded.get(spec.id)
        earlier = [i for i, at in recorded.items() if i != spec.id and (mine is None or at < mine)]
        if mine is None:  # passing or not: the command below needs it recorded
            _record(conn, spec, recorded, now or time.time())
        known = stored_specs(conn)
    if row is None and not earlier:
        return
    keep = (
        f"run `runner requeue --other-specs --keep {spec.id}` to embed those jobs "
        "again with this one"
    )
    if row is not None:
        if row.embed_spec is not None:
            other = known.get(row.embed_spec)
            stored = other.describe() if other else f"spec {row.embed_spec} (not recorded)"
        else:
            stored = f"{row.model_id} (recorded before specs: last layer, mean pooling)"
        raise SpecMismatch(
            f"this database holds done vectors of another embedding spec: {stored}; "
            f"this daemon's is {spec.describe()}. Start the daemon with the stored "
            f"spec's options, or stop every daemon of the other spec and {keep}"
        )
    others = "; ".join(known[i].describe() for i in earlier if i in known)
    raise SpecMismatch(
        f"this database records another embedding spec, with no done vectors yet (a "
        f"daemon of it may be running, or a `runner serve` recorded it): {others}; "
        f"this daemon's is {spec.describe()}. Start the daemon with the recorded "
        f"spec's options, or stop every daemon of the other spec and run `runner "
        f"requeue --other-specs --keep {spec.id}` (it forgets the other spec)"
    )


def record_for_serve(engine: Engine, spec: EmbedSpec, *, now: float | None = None) -> str | None:
    """`runner serve` stores no vectors, so it is never refused; it records its spec
    (for the id /encode_audio answers to be looked up) only where no other spec is
    recorded, so as not to stop the daemons.  Returns a warning otherwise."""
    with engine.begin() as conn:
        _lock(conn)
        recorded = _recorded(conn)
        if spec.id in recorded:
            return None
        if not recorded:
            _record(conn, spec, recorded, now or time.time())
            return None
        known = stored_specs(conn)
    others = "; ".join(s.describe() for s in known.values())
    return (
        f"this server's embedding spec is not the database's, so it is not recorded "
        f"(/encode_audio answers name spec {spec.id}, {spec.describe()}; the "
        f"database records {others})"
    )


def forget_unused(conn: Connection, keep: str) -> int:
    """Remove the specs, other than `keep`, that no done job has (after a requeue),
    so they stop no daemon of `keep`.  Returns how many went."""
    used = select(literal(1)).where(jobs.c.status == DONE, jobs.c.embed_spec == embed_specs.c.id)
    stmt = delete(embed_specs).where(embed_specs.c.id != keep, ~used.exists())
    return int(conn.execute(stmt).rowcount or 0)


def requeue_other_specs(engine: Engine, keep: str) -> tuple[int, int]:
    """`runner requeue --other-specs --keep ID`: the done jobs of every other spec
    back to pending, and those specs forgotten once no done vector has them.
    Returns (jobs requeued, specs forgotten)."""
    from runner.jobs import requeue_other_specs as requeue

    with engine.begin() as conn:
        known = stored_specs(conn)
        if keep not in known:
            listed = "; ".join(spec.describe() for spec in known.values()) or "none"
            raise RunnerError(
                f"--keep {keep}: no such embedding spec (a daemon records its spec when "
                f"it starts); recorded: {listed}"
            )
        requeued = requeue(conn, keep=keep, legacy_model=legacy_model(known[keep]))
        forgotten = forget_unused(conn, keep)
    return requeued, forgotten


# --- what status and exports show -------------------------------------------------


@dataclass(frozen=True)
class SpecGroup:
    """Done vectors made one way: a recorded spec, or none (legacy or adopted)."""

    #: the spec id; None for vectors without one
    id: str | None
    #: model_id of vectors without a spec ('adopted', or the legacy model)
    model: str | None
    spec: EmbedSpec | None
    vectors: int

    @property
    def adopted(self) -> bool:
        return self.id is None and self.model == ADOPTED

    @property
    def label(self) -> str:
        if self.id is not None:
            return self.id
        return ADOPTED if self.adopted else f"unrecorded:{self.model}"

    def describe(self) -> str:
        if self.spec is not None:
            return self.spec.describe()
        if self.id is not None:
            return f"spec {self.id} (not recorded)"
        if self.adopted:
            return "adopted from the old script's files (how they were made is unknown)"
        return f"{self.model} (made before specs were recorded: last layer, mean pooling)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "vectors": self.vectors,
            "spec": None if self.spec is None else asdict(self.spec),
            "model": self.spec.model if self.spec is not None else self.model,
            "description": self.describe(),
        }


def spec_groups(conn: Connection, where: list[Any]) -> list[SpecGroup]:
    """The done vectors matching `where`, counted by how they were made, largest
    first (one scan: exports read every row anyway)."""
    unrecorded_model = case((jobs.c.embed_spec.is_(None), jobs.c.model_id), else_=None)
    stmt = (
        select(jobs.c.embed_spec, unrecorded_model, func.count())
        .where(*where)
        .group_by(jobs.c.embed_spec, unrecorded_model)
    )
    rows = conn.execute(stmt).all()
    specs = stored_specs(conn, [spec_id for spec_id, _, _ in rows if spec_id is not None])
    groups = [
        SpecGroup(id=spec_id, model=model, spec=specs.get(spec_id or ""), vectors=int(n))
        for spec_id, model, n in rows
    ]
    return sorted(groups, key=lambda g: (-g.vectors, g.label))


def conflicting(groups: list[SpecGroup]) -> list[SpecGroup]:
    """The groups that make an export a mix: adopted vectors aside (they never were
    of a spec), and vectors from before specs that count as the one recorded spec."""
    recorded = [g for g in groups if g.id is not None]
    legacy = [g for g in groups if g.id is None and not g.adopted]
    if len(recorded) == 1 and recorded[0].spec is not None:
        model = legacy_model(recorded[0].spec)
        legacy = [g for g in legacy if g.model != model]
    elif not recorded and len(legacy) == 1:
        legacy = []
    mix = recorded + legacy
    return mix if len(mix) > 1 else []


def registered_specs(conn: Connection) -> list[dict[str, Any]]:
    """`runner status`: every spec a daemon has started with, oldest first (cheap:
    embed_specs only; counting the vectors of each would read every done row, which
    `runner export` does and prints)."""
    return [
        {"id": spec_id, "spec": asdict(spec), "description": spec.describe()}
        for spec_id, spec in stored_specs(conn).items()
    ]


def spec_lines(specs: list[dict[str, Any]]) -> list[str]:
    """`runner status`'s lines for `registered_specs`."""
    if not specs:
        return []
    if len(specs) == 1:
        return [f"embedding spec: {specs[0]['description']}"]
    return [
        f"embedding specs: {len(specs)} recorded (a daemon of another spec refuses to "
        "start while done vectors of these exist; `runner export` counts them):",
        *(f"  {spec['description']}" for spec in specs),
    ]
