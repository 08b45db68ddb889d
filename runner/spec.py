"""How a vector was made: the embedding spec, and the guard against mixing them.

An `EmbedSpec` names the model (hub id, or a local checkpoint's absolute path) and
a fingerprint of its files (config.json and preprocessor_config.json by content,
weight files by name and size), plus the hidden state (layer), the pooling and
the dtype.  Its canonical JSON is stored once in ``embed_specs``; its id (32 hex
of a blake2b of that JSON) is stored on every done job (``jobs.embed_spec``).

The guard (`check_guard`) runs when a daemon starts: a database that holds done
vectors of another spec makes it refuse, in one line that names the stored spec
and the command that requeues those jobs.  Two kinds of done vectors have no spec:

* made before specs were recorded (migration 0005): the code then always pooled
  the last hidden state with a mean, so they count as the spec of their model at
  the last layer with mean pooling, whatever the dtype (`legacy_model`);
* adopted from the old script's files (model 'adopted', runner/adopt.py): the
  operator imported them on purpose and nothing says how they were made; they
  never stop a daemon, and exports name them apart.

The guard must stay cheap on a million jobs: no index covers ``embed_spec``, and
on SQLite reading it means reading past each row's vector (1.3 s per million
1024-d vectors, warm).  So it reads the jobs table only when ``embed_specs``
holds another spec than this daemon's, or none yet: once a spec is recorded, only
a daemon of another spec can make vectors of another spec, and it records its
spec before it makes any.  `runner requeue --other-specs` removes the specs it
leaves without a done vector, so the steady state costs one tiny query.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, delete, func, literal, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from runner.db import READ_ONLY
from runner.errors import RunnerError
from runner.models import ADOPTED, embed_specs, jobs

log = logging.getLogger(__name__)

#: pooling over the L2-normalised frames: their mean; or mean and standard deviation
POOLINGS = ("mean", "mean-std")
#: files whose name and size identify a checkpoint's weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".json")
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
    they were the last hidden state, mean-pooled; None if this spec is not that."""
    return spec.model if spec.last_layer and spec.pooling == "mean" else None


# --- fingerprints -----------------------------------------------------------------


def fingerprint_dir(path: Path) -> str:
    """config.json and preprocessor_config.json by content, weight files by name and
    size (hashing gigabytes of weights at every start would cost seconds)."""
    digest = hashlib.blake2b(digest_size=8)
    for name in CONTENT_FILES:
        file = path / name
        content = file.read_bytes() if file.is_file() else b"-"
        digest.update(name.encode() + b"\0" + content + b"\0")
    for file in sorted(path.iterdir()):
        weights = file.name not in CONTENT_FILES and file.name.endswith(WEIGHT_SUFFIXES)
        if weights and file.is_file():  # is_file and stat follow the hub cache's symlinks
            digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
    return digest.hexdigest()


def checkpoint_dir(model_id: str) -> Path | None:
    """Where from_pretrained(model_id) read the files: the directory itself, or the
    hub cache's snapshot holding its config.json; None if neither is found."""
    path = Path(model_id)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # not a repo id at all: a path that is not there, say
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def model_name(model_id: str) -> str:
    """A local checkpoint by its absolute path (another directory is another model,
    even with equal sizes); a hub id as given."""
    path = Path(model_id)
    return str(path.resolve()) if path.is_dir() else model_id


def fingerprint(model_id: str, config_json: str) -> str:
    """The checkpoint's files as loaded; without them (not found in the hub cache),
    the loaded configuration's JSON."""
    directory = checkpoint_dir(model_id)
    if directory is not None:
        return fingerprint_dir(directory)
    log.warning("no files found for %s: its spec fingerprints the loaded config only", model_id)
    return hashlib.blake2b(config_json.encode(), digest_size=8).hexdigest()


# --- the database -----------------------------------------------------------------


def register(engine: Engine, spec: EmbedSpec, *, now: float | None = None) -> None:
    """Record the spec in embed_specs (once; daemons starting together may race)."""
    values = {"id": spec.id, "spec": spec.to_json(), "created_at": now or time.time()}
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    with engine.begin() as conn:
        conn.execute(insert(embed_specs).values(**values).on_conflict_do_nothing())


def stored_specs(conn: Connection, ids: Iterable[str] | None = None) -> dict[str, EmbedSpec]:
    stmt = select(embed_specs.c.id, embed_specs.c.spec).order_by(embed_specs.c.created_at)
    if ids is not None:
        stmt = stmt.where(embed_specs.c.id.in_(list(ids)))
    return {row.id: EmbedSpec.from_json(row.spec) for row in conn.execute(stmt)}


def foreign_done(spec_id: str, legacy: str | None) -> Any:
    """WHERE term: done vectors that are not of spec `spec_id`, adopted ones aside
    (legacy: the model whose vectors from before specs count as this spec)."""
    unrecorded = and_(
        jobs.c.embed_spec.is_(None),
        func.coalesce(jobs.c.model_id, "").not_in([ADOPTED, legacy or ADOPTED]),
    )
    return and_(
        jobs.c.status == DONE,  # a done job always has its vector
        or_(and_(jobs.c.embed_spec.is_not(None), jobs.c.embed_spec != spec_id), unrecorded),
    )


def _reading(engine: Engine) -> Connection:
    """A read transaction: on SQLite it does not take the write lock."""
    return engine.connect().execution_options(**{READ_ONLY: True})


def check_guard(engine: Engine, spec: EmbedSpec) -> None:
    """Refuse (SpecMismatch, one line) if done vectors of another spec are stored;
    otherwise record this spec.  The refused spec is recorded too, so that the
    command the message gives can name it."""
    with _reading(engine) as conn:
        known = stored_specs(conn)
    if set(known) == {spec.id}:
        return  # recorded before: it passed then, and no other spec has run since
    if spec.id not in known:
        register(engine, spec)
    with _reading(engine) as conn:
        stmt = select(jobs.c.embed_spec, jobs.c.model_id).where(
            foreign_done(spec.id, legacy_model(spec))
        )
        row = conn.execute(stmt.limit(1)).first()
    if row is None:
        return
    if row.embed_spec is not None:
        other = known.get(row.embed_spec)
        stored = other.describe() if other else f"spec {row.embed_spec} (not recorded)"
    else:
        stored = f"{row.model_id} (recorded before specs: last layer, mean pooling)"
    raise SpecMismatch(
        f"this database holds done vectors of another embedding spec: {stored}; this "
        f"daemon's is {spec.describe()}. Start the daemon with the stored spec's "
        f"options, or stop every daemon of the other spec and run `runner requeue "
        f"--other-specs --keep {spec.id}` to embed those jobs again with this one"
    )


def forget_unused(conn: Connection, keep: str) -> int:
    """Remove the specs, other than `keep`, that no done job has (after a requeue),
    so the guard's steady state reads no jobs.  Returns how many went."""
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
