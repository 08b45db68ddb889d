"""`runner export`: the old script's JSON files, NumPy files, Parquet, and PCA.

Rows are streamed from the database and written as they come, so memory does not
grow with the catalogue: the JSON files hold one row at a time, npz and Parquet one
chunk of a few thousand vectors (never a list of lists, never the whole matrix).
Every pass of one export reads inside one read transaction, so the files agree with
each other even while the daemon writes.  Each file appears atomically (temp file
in the same directory, fsync, rename): a reader or a crash never sees half a file,
and a failed export leaves the earlier files as they were.

The formats live in runner/export_json.py, export_npz.py and export_parquet.py;
this module is the entry point and keeps the names callers import.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, Engine

from runner.errors import RunnerError
from runner.export_common import one_set_of_files, only_spec, reading, shape, vectors_where
from runner.export_json import (
    FAIL_FILE,
    PROCESS_FILE,
    SPECS_FILE,
    VECTORS_FILE,
    JsonObjectWriter,
    vector_json,
    write_done,
    write_failed,
    write_process,
    write_specs,
)
from runner.export_npz import (
    NPZ_FAIL_FILE,
    NPZ_FILE,
    NPZ_KEYS_MAX_CHARS,
    NPZ_PROCESS_FILE,
    PCA_FILE,
    check_pca,
    npz_keys,
    write_pca,
)
from runner.export_npz import write_vectors as write_npz
from runner.export_parquet import PARQUET_FAIL_FILE, PARQUET_FILE
from runner.export_parquet import write_failed as write_failed_parquet
from runner.export_parquet import write_vectors as write_parquet
from runner.models import ADOPTED
from runner.spec import SpecGroup, conflicting, spec_groups

__all__ = [
    "FAIL_FILE",
    "FORMATS",
    "NPZ_FAIL_FILE",
    "NPZ_FILE",
    "NPZ_KEYS_MAX_CHARS",
    "NPZ_PROCESS_FILE",
    "PARQUET_FAIL_FILE",
    "PARQUET_FILE",
    "PCA_FILE",
    "PROCESS_FILE",
    "SPECS_FILE",
    "VECTORS_FILE",
    "ExportCounts",
    "JsonObjectWriter",
    "export",
    "npz_keys",
    "parse_timestamp",
    "vector_json",
]

FORMATS = ("json", "npz", "parquet")
#: vectors per IncrementalPCA.partial_fit call (and per transform call)
PCA_CHUNK_ROWS = 4_096


@dataclass(frozen=True)
class ExportCounts:
    done: int
    failed: int
    merged: int = 0
    #: components of the PCA written to pca.npz, if any
    pca: int | None = None
    files: tuple[str, ...] = ()
    #: done vectors left out of the JSON files because they hold NaN or Inf
    skipped: int = 0
    #: the first of them, for the warning
    skipped_key: str | None = None
    #: how the exported vectors were made (runner/spec.py), largest group first
    specs: tuple[SpecGroup, ...] = ()
    #: they are of more than one spec (exported because --mixed-specs said so)
    mixed: bool = False
    #: --merge kept entries of files that do not say which spec they are of
    merged_unrecorded: bool = False


def parse_timestamp(text: str) -> float:
    """Unix seconds from '1717200000', '2024-06-01', '2024-06-01T12:00:00+02:00'.

    An ISO 8601 time without an offset is UTC, so the same command means the same
    moment on every machine.
    """
    value = text.strip()
    with contextlib.suppress(ValueError):
        seconds = float(value)
        if math.isfinite(seconds):
            return seconds
    iso = value[:-1] + "+00:00" if value[-1:] in ("Z", "z") else value
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        raise RunnerError(
            f"{text!r} is not a time: give an ISO 8601 date or date-time "
            "(2024-06-01, 2024-06-01T12:00:00+02:00; UTC unless an offset is given) "
            "or unix seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def export(
    engine: Engine,
    out: Path,
    *,
    merge: bool = False,
    fmt: str = "json",
    pca: int | None = None,
    since: float | None = None,
    pca_chunk_rows: int = PCA_CHUNK_ROWS,
    spec: str | None = None,
    mixed_specs: bool = False,
) -> ExportCounts:
    """`runner export`.

    json: audio_vectors.json, audio_process.json, audio_fail.json (the old script's
    files; vectors with NaN/Inf are skipped and counted, see runner/export_json.py).
    npz: vectors.npz (keys, keys_utf8 + key_offsets, vectors float32 N x D, in job
    order; see runner/export_npz.py), process.json and fail.json (the JSON
    format's shapes).  parquet: vectors.parquet and failed.parquet.
    `pca`: also pca.npz, fitted on every done vector; the other files are unchanged.
    `since`: only jobs that finished at or after it (unix seconds).
    `merge` (json): keep the entries of the existing files that this export does
    not cover (keys the database lacks; with `since`, keys finished before it).
    `spec`: only the vectors of this embedding spec id.  Vectors of more than one
    spec (see runner.spec.conflicting) are refused unless `mixed_specs`; every
    format records the specs it holds, and per vector when there is more than one
    kind (audio_specs.json for json, `specs_json` and `spec_index` in vectors.npz,
    schema metadata and an `embed_spec` column in vectors.parquet).
    """
    if fmt not in FORMATS:
        raise RunnerError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if pca is not None and pca < 1:
        raise RunnerError(f"--pca must be at least 1 (got {pca})")
    if merge and fmt != "json":
        raise RunnerError("--merge works with --format json only")
    if merge and spec is not None:
        raise RunnerError(
            "--merge and --spec cannot go together: the merged files would hold "
            "the earlier export's vectors of other specs"
        )
    with only_spec(spec):
        return _export(engine, out, merge, fmt, pca, since, pca_chunk_rows, mixed_specs)


def _check_specs(conn: Connection, since: float | None, pca: bool, mixed: bool) -> list[SpecGroup]:
    """The exported vectors' spec groups; refuses a mix unless `mixed`."""
    groups = spec_groups(conn, vectors_where(since))
    mix = conflicting(groups)
    if pca and since is not None:  # the PCA is fitted on every vector
        mix = mix or conflicting(spec_groups(conn, vectors_where(None)))
    if mix and not mixed:
        kinds = "; ".join(f"{g.vectors} of {g.describe()}" for g in mix)
        raise RunnerError(
            f"the vectors to export were made {len(mix)} different ways: {kinds}. "
            "Export one with --spec ID, or all of them with --mixed-specs (each "
            "vector's spec is then written beside it), or embed the others again "
            "(`runner requeue --other-specs --keep ID`)"
        )
    return groups


def _merge_specs_agree(out: Path, groups: list[SpecGroup]) -> bool:
    """Refuse a --merge that would put vectors of two specs in one file, whose
    audio_specs.json could then not say which key is which.  Returns True when the
    earlier files do not record a spec (written by a runner before specs), so the
    caller can warn that what it keeps is of a spec nobody recorded."""
    if not (out / VECTORS_FILE).exists():
        return False
    try:
        old = json.loads((out / SPECS_FILE).read_text(encoding="utf-8"))
        old_labels = {str(spec["label"]) for spec in old["specs"]}
    except FileNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunnerError(f"cannot merge into {out}: unreadable {SPECS_FILE} ({exc})") from None
    new_labels = {g.label for g in groups}
    old_labels.discard(ADOPTED)
    new_labels.discard(ADOPTED)
    if old_labels and new_labels and old_labels != new_labels:
        raise RunnerError(
            f"cannot merge into {out}: its vectors are of spec(s) "
            f"{', '.join(sorted(old_labels))} and this export's of "
            f"{', '.join(sorted(new_labels))}; one file would mix them. Export to "
            "another directory"
        )
    return False


def _export(
    engine: Engine,
    out: Path,
    merge: bool,
    fmt: str,
    pca: int | None,
    since: float | None,
    pca_chunk_rows: int,
    mixed_specs: bool,
) -> ExportCounts:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunnerError(f"cannot create output directory {out}: {exc.strerror}") from None
    skipped: list[str] = []
    merged = 0
    with reading(engine) as conn, one_set_of_files():
        groups = _check_specs(conn, since, pca is not None, mixed_specs)
        everything = None
        if pca is not None:  # refuse before any file is written
            everything = shape(conn, vectors_where(None))
            check_pca(pca, everything)
        unrecorded = merge and fmt == "json" and _merge_specs_agree(out, groups)
        if fmt == "json":
            done, merged_done, skipped_json = write_done(conn, out, merge, since)
            skipped = skipped_json.keys
            failed, merged_failed = write_failed(conn, out / FAIL_FILE, merge, since, skipped)
            merged = merged_done + merged_failed
            write_specs(conn, out / SPECS_FILE, since, groups)
            files = [VECTORS_FILE, PROCESS_FILE, FAIL_FILE, SPECS_FILE]
        elif fmt == "npz":
            done = write_npz(conn, out / NPZ_FILE, since, groups)
            write_process(conn, out / NPZ_PROCESS_FILE, since)
            failed, _ = write_failed(conn, out / NPZ_FAIL_FILE, False, since)
            files = [NPZ_FILE, NPZ_PROCESS_FILE, NPZ_FAIL_FILE]
        else:
            done = write_parquet(conn, out / PARQUET_FILE, since, groups)
            failed = write_failed_parquet(conn, out / PARQUET_FAIL_FILE, since)
            files = [PARQUET_FILE, PARQUET_FAIL_FILE]
        if pca is not None and everything is not None:
            write_pca(conn, out / PCA_FILE, pca, everything, since, pca_chunk_rows)
            files.append(PCA_FILE)
    return ExportCounts(
        done=done,
        failed=failed,
        merged=merged,
        pca=pca,
        files=tuple(files),
        skipped=len(skipped),
        skipped_key=skipped[0] if skipped else None,
        specs=tuple(groups),
        mixed=bool(conflicting(groups)),
        merged_unrecorded=unrecorded and merged > 0,
    )
