"""vectors.npz and pca.npz, streamed into the zip member by member.

np.savez needs every array whole in memory; here each .npy member is written with
its header first (the row count comes from a COUNT in the same snapshot) and then
chunk by chunk from the database, so the exporter holds one chunk of vectors plus
the keys as UTF-8 (their bytes + 8 per key), whatever the catalogue's size.

Keys.  A NumPy string array is sized by its longest element: one 4,096-character
key among a million short ones made ``keys`` a ``<U4096`` of 16 GB (in the file and
in every reader).  Without pickle (np.load refuses it by default) there is no
variable-length string array, so the keys are stored twice over, cheaply:

* ``keys_utf8`` (uint8: every key's UTF-8, concatenated) and ``key_offsets``
  (int64, N + 1: key i is ``keys_utf8[key_offsets[i]:key_offsets[i + 1]]``), always;
  `npz_keys` decodes them.
* ``keys`` (``<U{longest}``), as before, unless a key is longer than
  NPZ_KEYS_MAX_CHARS (1,024) characters: then it is left out instead of making the
  file 4 bytes x longest x N.  1,024 is where the array would outgrow a 1024-d
  float32 matrix; real catalogue keys (ids, URLs) are far shorter, so existing
  readers of ``npz["keys"]`` keep working.
"""

from __future__ import annotations

import contextlib
import itertools
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, select

from runner.errors import RunnerError
from runner.export_common import (
    SPEC_COLUMNS,
    Shape,
    atomic_binary,
    chunks,
    even_sizes,
    shape,
    spec_label,
    vectors_where,
)
from runner.export_json import dumps
from runner.models import jobs
from runner.spec import SpecGroup

NPZ_FILE = "vectors.npz"
NPZ_PROCESS_FILE = "process.json"
NPZ_FAIL_FILE = "fail.json"
PCA_FILE = "pca.npz"
#: longest key for which the ``keys`` string array is still written
NPZ_KEYS_MAX_CHARS = 1024
#: about this many bytes of vectors (or of ``keys``) per chunk
CHUNK_BYTES = 16 << 20


class NpzWriter:
    """An .npz (a zip of .npy members, as np.savez writes) built member by member."""

    def __init__(self, stream: Any) -> None:
        self.zip = zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    @contextlib.contextmanager
    def member(
        self, name: str, dtype: np.dtype[Any], shape: tuple[int, ...]
    ) -> Iterator[Callable[[np.ndarray], None]]:
        """Yields a function taking the rows of the array, in order; checks that
        exactly `shape` was written."""
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        written = 0
        with self.zip.open(f"{name}.npy", "w", force_zip64=True) as out:
            header = {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": shape,
            }
            np.lib.format.write_array_header_1_0(out, header)

            def write(part: np.ndarray) -> None:
                nonlocal written
                data = np.ascontiguousarray(part, dtype=dtype)
                out.write(data.data)
                written += data.nbytes

            yield write
        if written != expected:
            raise RunnerError("the database changed during the export; run it again")

    def put(self, name: str, array: np.ndarray) -> None:
        with self.member(name, array.dtype, array.shape) as write:
            write(array)

    def close(self) -> None:
        self.zip.close()


class KeyBuffer:
    """The keys of an export in job order, as compact UTF-8 (see the module doc)."""

    def __init__(self, rows: int) -> None:
        self.data = bytearray()
        self.offsets = np.zeros(rows + 1, dtype=np.int64)
        self.count = 0
        self.longest = 0

    def add(self, key: str) -> None:
        self.data += key.encode("utf-8")
        self.count += 1
        self.offsets[self.count] = len(self.data)
        self.longest = max(self.longest, len(key))

    def write(self, npz: NpzWriter) -> None:
        rows = self.count
        if self.longest <= NPZ_KEYS_MAX_CHARS:
            dtype = np.dtype(f"<U{max(1, self.longest)}")
            per_chunk = max(1, CHUNK_BYTES // dtype.itemsize)
            with npz.member("keys", dtype, (rows,)) as write:
                for start in range(0, rows, per_chunk):
                    stop = min(rows, start + per_chunk)
                    write(np.array(self.decode(start, stop), dtype=dtype))
        npz.put("keys_utf8", np.frombuffer(self.data, dtype=np.uint8))  # no copy
        npz.put("key_offsets", self.offsets[: rows + 1])

    def decode(self, start: int, stop: int) -> list[str]:
        bounds = self.offsets[start : stop + 1].tolist()
        view = memoryview(self.data)
        return [bytes(view[a:b]).decode("utf-8") for a, b in itertools.pairwise(bounds)]


def npz_keys(npz: Any) -> list[str]:
    """The keys of a vectors.npz or pca.npz (an `np.load` result), however long."""
    if "keys_utf8" in npz.files:
        data = npz["keys_utf8"].tobytes()
        bounds = npz["key_offsets"].tolist()
        return [data[a:b].decode("utf-8") for a, b in itertools.pairwise(bounds)]
    return [str(key) for key in npz["keys"]]


def _vector_rows(conn: Connection, since: float | None, dim: int, sizes: Iterable[int]) -> Any:
    stmt = select(jobs.c.key, jobs.c.vector, *SPEC_COLUMNS).where(*vectors_where(since))
    return chunks(conn, stmt.order_by(jobs.c.id), dim, sizes)


def rows_per_chunk(dim: int) -> int:
    return max(1, CHUNK_BYTES // max(1, 4 * dim))


def write_vectors(
    conn: Connection, path: Path, since: float | None, groups: list[SpecGroup] | None = None
) -> int:
    """vectors.npz: keys (see the module doc), vectors (float32 N x D, job order),
    `specs_json` (a 0-d string: the JSON list of how they were made, as in
    audio_specs.json) and, when that list has more than one entry, `spec_index`
    (uint16, N: each vector's entry in it)."""
    groups = groups or []
    wanted = shape(conn, vectors_where(since))
    keys = KeyBuffer(wanted.rows)
    labels = {group.label: i for i, group in enumerate(groups)}
    index = np.zeros(wanted.rows, dtype=np.uint16) if len(groups) > 1 else None
    with atomic_binary(path) as stream:
        npz = NpzWriter(stream)
        with npz.member("vectors", np.dtype(np.float32), (wanted.rows, wanted.dim)) as write:
            sizes = even_sizes(wanted.rows, rows_per_chunk(wanted.dim))
            for rows, vectors in _vector_rows(conn, since, wanted.dim, sizes):
                for row in rows:
                    if index is not None:
                        index[keys.count] = labels[spec_label(row)]
                    keys.add(row.key)
                write(vectors)
        keys.write(npz)
        npz.put("specs_json", np.array(dumps([g.as_dict() for g in groups]).decode()))
        if index is not None:
            npz.put("spec_index", index)
        npz.close()
    return wanted.rows


# --- PCA ----------------------------------------------------------------------------


def batches(rows: int, size: int, min_rows: int = 0) -> list[slice]:
    """Like sklearn's gen_batches: a last batch smaller than `min_rows` is merged
    into the one before, since partial_fit needs at least n_components rows."""
    from sklearn.utils import gen_batches

    return list(gen_batches(rows, size, min_batch_size=min_rows))


def check_pca(components: int, everything: Shape) -> None:
    if everything.rows == 0:
        raise RunnerError("--pca: there are no done vectors to fit")
    if components > everything.dim:
        raise RunnerError(f"--pca {components} is more than the vector dimension {everything.dim}")
    if everything.rows < components:
        raise RunnerError(
            f"--pca {components} needs at least {components} vectors; "
            f"the database has {everything.rows} done"
        )


def _finite(rows: list[Any], vectors: np.ndarray) -> np.ndarray:
    """sklearn's own NaN error is a multi-line ValueError; name the key instead."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        key = rows[int(np.argmax(bad))].key
        raise RunnerError(f"--pca: the vector of {key!r} holds NaN or Inf; it cannot be fitted")
    return vectors


def write_pca(
    conn: Connection,
    path: Path,
    components: int,
    everything: Shape,
    since: float | None,
    chunk_rows: int,
) -> None:
    """Fit IncrementalPCA on all done vectors, chunk by chunk, and write the reduced
    vectors (those since `since`) with the fitted components and mean.  Both passes
    stream from the database: no more than one chunk is in memory at a time."""
    from sklearn.decomposition import IncrementalPCA

    size = max(chunk_rows, components)
    fit_sizes = [s.stop - s.start for s in batches(everything.rows, size, components)]
    pca = IncrementalPCA(n_components=components, batch_size=size)
    with np.errstate(divide="ignore", invalid="ignore"):  # constant data: 0/0 ratios
        for rows, chunk in _vector_rows(conn, None, everything.dim, fit_sizes):
            pca.partial_fit(_finite(rows, chunk))

    wanted = shape(conn, vectors_where(since))
    keys = KeyBuffer(wanted.rows)
    with atomic_binary(path) as stream:
        npz = NpzWriter(stream)
        with npz.member("vectors", np.dtype(np.float32), (wanted.rows, components)) as write:
            sizes = [s.stop - s.start for s in batches(wanted.rows, size)]
            for rows, chunk in _vector_rows(conn, since, wanted.dim, sizes):
                for row in rows:
                    keys.add(row.key)
                write(pca.transform(_finite(rows, chunk)))
        keys.write(npz)
        npz.put("components", pca.components_)
        npz.put("mean", pca.mean_)
        npz.put("explained_variance", pca.explained_variance_)
        npz.put("explained_variance_ratio", pca.explained_variance_ratio_)
        npz.close()
