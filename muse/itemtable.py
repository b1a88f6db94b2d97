"""The item-vector table on disk: every item's vector of one (dataset, source, version), kept as a
folder of memory-mapped arrays that training reads rows from and a GSU server loads at start-up.

One folder per :class:`muse.vectorstore.CollectionRef`, :func:`table_dir`::

    <data dir>/embeddings/<source>/v<version>/items-<dataset>/
        item_ids.npy    int64 [n]: the dataset's canonical item order
        vectors.npy     [n, d] in the storage dtype: unit float32 rows, or int8 as shipped (key.json's
                        ``scale``: the vector is row / scale, then L2-normalised)
        present.npy     bool [n]: False where the item has no vector (its row is zero)
        key.json        {"key": what the vectors depend on, "scale", "normalised"}
        index_keys.npy  int64 [2^b]: the id -> row hash (:class:`IdHash`) over ``item_ids`` ...
        index_rows.npy  int32 [2^b]: ... giving the item's row among the present rows, or ABSENT
        index.json      {"format", "rows", "present", "bits"}: written last; names the index valid
        int8_vectors.npy, int8_scale.npy, int8.json: the rows as int8 with a per-row scale, for
                        int8 GSU tables (:func:`int8_rows`; written by the first server that wants them)

The table is written by the embedding stage (``indexer.item_vectors``: when a version is
backfilled or promoted, or when training first asks for it) and, for a version that has none, by a
GSU server from one scan of the version's Milvus item collection (:func:`export_from_store`). The
index is derived data: :func:`ensure_index` writes it when missing, so a GSU server maps ``item_ids``
-> device row without building a hash of 35M ids at every start.

What a key holds (both writers): ``source`` {``name``, ``version``, ``dim``, ...} and ``dataset``
{``name``, ``meta_mtime_ns``}: :func:`check_table` compares them with the (dataset, source,
version) a reader serves and with the dataset on this machine, if any.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from muse.arrays import l2_normalise
from muse.errors import DataError, MuseError
from muse.ondisk import ArrayWriter, open_array, write_array
from muse.settings import Settings

log = logging.getLogger(__name__)

KEY_FILE = "key.json"
INDEX_FILE = "index.json"
INDEX_KEYS = "index_keys.npy"
INDEX_ROWS = "index_rows.npy"
#: Bumped when the index's layout changes (an index of another format is rebuilt).
INDEX_FORMAT = 1
#: Index value of an item the table knows and that has no vector (``IdHash.get`` gives -1 for an
#: item it does not know at all).
ABSENT = -2
#: Items per block when a table is copied or exported.
BLOCK = 65_536


def table_dir(settings: Settings, dataset: str, source: str, version: int) -> Path:
    """The folder of the item table of (dataset, source, version)."""
    return settings.path("embeddings", source, f"v{int(version)}", f"items-{dataset}")


def ref_table_dir(settings: Settings, ref: Any) -> Path:
    """:func:`table_dir` of a :class:`muse.vectorstore.CollectionRef`."""
    return table_dir(settings, ref.dataset, ref.source, ref.version)


@dataclass(frozen=True)
class ItemVectors:
    """Every item of a dataset under one source version (``ranker.data.ItemVectorsLike``)."""

    item_ids: np.ndarray  # int64 [n], the dataset's canonical order
    vectors: np.ndarray  # [n, d]: unit float32 rows, or int8 with ``scale``; rows of absent items are zero
    present: np.ndarray  # bool [n]: False where the item has no vector (no image, unknown, not shipped)
    scale: float | None = None  # int8 storage: the vector is row / scale (then L2-normalised)
    normalised: bool = True  # float rows are unit vectors already

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def unit_rows(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Rows (all by default) as unit float32 vectors (zero rows stay zero)."""
        raw = np.asarray(self.vectors if rows is None else self.vectors[rows])
        if self.scale is None and self.normalised:
            return raw.astype(np.float32, copy=False)
        return l2_normalise(raw.astype(np.float32) / np.float32(self.scale or 1.0))

    def as_float(self) -> ItemVectors:
        """The whole table as unit float32 rows in RAM (small catalogues: intrinsic evaluation, benches)."""
        return ItemVectors(np.array(self.item_ids), np.array(self.unit_rows()), np.array(self.present))


def read_table(folder: Path) -> tuple[ItemVectors, dict[str, Any]]:
    """The table in ``folder``, memory-mapped, and its ``key.json`` document.

    Raises:
        DataError: the folder is missing, unfinished or unreadable.
    """
    folder = Path(folder)
    try:
        doc = json.loads((folder / KEY_FILE).read_text())
    except FileNotFoundError as e:
        raise DataError(f"{folder} holds no item table ({KEY_FILE} missing)") from e
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}/{KEY_FILE} cannot be read: {e}") from e
    table = ItemVectors(open_array(folder / "item_ids.npy"), open_array(folder / "vectors.npy"),
                        open_array(folder / "present.npy"), doc.get("scale"), bool(doc.get("normalised", True)))
    n = len(table.item_ids)
    if table.vectors.ndim != 2 or len(table.vectors) != n or len(table.present) != n:
        raise DataError(f"{folder}: {n} item ids, vectors of shape {table.vectors.shape} and {len(table.present)} "
                        "present flags do not match")
    return table, doc


def check_table(folder: Path, dataset: str, source: str, version: int, dim: int | None = None,
                dataset_path: Path | None = None) -> tuple[ItemVectors | None, str]:
    """The table in ``folder`` when it holds the vectors of (dataset, source, version), else
    ``(None, why not)``. With ``dataset_path`` (the dataset is on this machine) the dataset's
    ``meta.json`` must be the one the table was written from; with ``dim`` the width must match."""
    try:
        table, doc = read_table(folder)
    except DataError as e:
        return None, str(e)
    key = doc.get("key") or {}
    src, ds = key.get("source") or {}, key.get("dataset") or {}
    found = (ds.get("name"), src.get("name"), src.get("version"))
    if found != (dataset, source, int(version)):
        return None, f"it holds {found}, not {(dataset, source, int(version))}"
    if dim is not None and table.dim != int(dim):
        return None, f"its vectors are {table.dim}-d, the collections {int(dim)}-d"
    if dataset_path is not None:
        meta = Path(dataset_path) / "meta.json"
        stamp = meta.stat().st_mtime_ns if meta.exists() else None
        if ds.get("meta_mtime_ns") != stamp:
            return None, f"the dataset {dataset!r} was written again since (meta.json {ds.get('meta_mtime_ns')} -> {stamp})"
    return table, ""


# -- the id -> row hash ---------------------------------------------------------------------------
_EMPTY = np.iinfo(np.int64).min
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class IdHash:
    """Item id -> row: an open-addressing hash table (linear probing, Fibonacci hashing, load
    <= 1/2) looked up for a whole array at once in numpy: a 100K-id lookup is a handful of
    vector operations where a binary search (``np.searchsorted``) makes 17 dependent random reads
    per id. Values are int32 (rows of a table, or :data:`ABSENT`). The id ``-2**63`` is reserved as
    the empty marker. Not thread-safe: the caller locks around :meth:`put`."""

    def __init__(self, capacity: int = 1024) -> None:
        self._alloc(self._bits_for(capacity))
        self.n = 0

    @staticmethod
    def _bits_for(n: int) -> int:
        return max(10, int(np.ceil(np.log2(max(n, 1) * 2))))

    @classmethod
    def from_arrays(cls, keys: np.ndarray, vals: np.ndarray, n: int) -> IdHash:
        """A hash over arrays written by :meth:`arrays` (e.g. read back from a table's index)."""
        size = len(keys)
        if size < 1024 or size & (size - 1) or len(vals) != size:
            raise DataError(f"an id hash needs power-of-two arrays of equal length, got {len(keys)} and {len(vals)}")
        out = cls.__new__(cls)
        out.bits = size.bit_length() - 1
        out.mask = size - 1
        out.keys = np.asarray(keys, np.int64)
        out.vals = np.asarray(vals, np.int32)
        out.n = int(n)
        return out

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(keys int64 [2^b], vals int32 [2^b])``: what :meth:`from_arrays` reads back."""
        return self.keys, self.vals

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.vals.nbytes)

    def _alloc(self, bits: int) -> None:
        self.bits = bits
        self.mask = (1 << bits) - 1
        self.keys = np.full(1 << bits, _EMPTY, np.int64)
        self.vals = np.zeros(1 << bits, np.int32)

    def _slots(self, ids: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((ids.astype(np.uint64) * _GOLDEN) >> np.uint64(64 - self.bits)).astype(np.int64)

    def _find(self, ids: np.ndarray) -> np.ndarray:
        """The slot of each id, -1 where it is not in the table."""
        keys, mask = self.keys, self.mask
        out = np.full(len(ids), -1, np.int64)
        slot = self._slots(ids)
        k = keys[slot]
        hit = k == ids
        out[hit] = slot[hit]
        todo = np.flatnonzero(~hit & (k != _EMPTY))
        slot = (slot[todo] + 1) & mask
        while len(todo):
            k = keys[slot]
            hit = k == ids[todo]
            out[todo[hit]] = slot[hit]
            more = ~hit & (k != _EMPTY)
            todo = todo[more]
            slot = (slot[more] + 1) & mask
        return out

    def get(self, ids: np.ndarray) -> np.ndarray:
        """int64 values of ``ids``, -1 where an id is not in the table."""
        ids = np.asarray(ids, dtype=np.int64)
        slot = self._find(ids)
        ok = slot >= 0
        out = np.full(len(ids), -1, np.int64)
        out[ok] = self.vals[slot[ok]]
        return out

    def put(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Set the values of ``ids`` (unique): overwritten where present, inserted where not."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        slot = self._find(ids)
        known = slot >= 0
        self.vals[slot[known]] = rows[known]
        ids, rows = ids[~known], rows[~known]
        if len(ids) == 0:
            return
        if (self.n + len(ids)) * 2 > len(self.keys):
            old_k, old_v = self.keys, self.vals
            present = old_k != _EMPTY
            self._alloc(self._bits_for(self.n + len(ids)))
            self.n = 0
            self._insert(old_k[present], old_v[present].astype(np.int64))
        self._insert(ids, rows)

    def _insert(self, ids: np.ndarray, rows: np.ndarray) -> None:
        slot = self._slots(ids)
        while len(ids):
            free = self.keys[slot] == _EMPTY
            # among the ids aiming at one free slot, the first takes it
            _, first = np.unique(slot[free], return_index=True)
            take = np.flatnonzero(free)[first]
            self.keys[slot[take]] = ids[take]
            self.vals[slot[take]] = rows[take]
            self.n += len(take)
            rest = np.ones(len(ids), bool)
            rest[take] = False
            ids, rows, slot = ids[rest], rows[rest], (slot[rest] + 1) & self.mask


def table_index(table: ItemVectors) -> IdHash:
    """The :class:`IdHash` of a table: item id -> row among the present rows (the order a GSU
    server packs them in), :data:`ABSENT` for items without a vector."""
    ids = np.asarray(table.item_ids, np.int64)
    present = np.asarray(table.present, bool)
    rows = np.where(present, np.cumsum(present) - 1, ABSENT).astype(np.int64)
    _, first = np.unique(ids, return_index=True)  # a repeated id keeps its first row
    index = IdHash(len(first))
    index.put(ids[first], rows[first])
    return index


def read_index(folder: Path, table: ItemVectors) -> IdHash | None:
    """The table's persisted index (read into RAM), or None when it is missing or belongs to other
    contents."""
    folder = Path(folder)
    try:
        doc = json.loads((folder / INDEX_FILE).read_text())
        if (doc.get("format"), doc.get("rows"), doc.get("present")) != (
                INDEX_FORMAT, len(table.item_ids), int(np.count_nonzero(table.present))):
            return None
        keys = open_array(folder / INDEX_KEYS, mmap=False)
        vals = open_array(folder / INDEX_ROWS, mmap=False)
        return IdHash.from_arrays(keys, vals, int(doc["distinct"]))
    except (OSError, ValueError, KeyError, MuseError):
        return None


def write_index(folder: Path, table: ItemVectors) -> IdHash:
    """Build the table's index and write it into ``folder`` (the arrays first, ``index.json`` last, each
    renamed into place, so a reader sees a whole index or none)."""
    folder = Path(folder)
    index = table_index(table)
    keys, vals = index.arrays()
    tag = f".tmp-{os.getpid()}"
    (folder / INDEX_FILE).unlink(missing_ok=True)
    for name, values in ((INDEX_KEYS, keys), (INDEX_ROWS, vals)):
        writer = ArrayWriter(folder / (name + tag), values.dtype)
        for lo in range(0, len(values), 1 << 22):  # bounded copies however large the hash
            writer.append(values[lo:lo + (1 << 22)])
        writer.close()
        os.replace(folder / (name + tag), folder / name)
    doc = {"format": INDEX_FORMAT, "rows": len(table.item_ids), "present": int(np.count_nonzero(table.present)),
           "distinct": len(index), "bits": index.bits}
    (folder / (INDEX_FILE + tag)).write_text(json.dumps(doc, sort_keys=True) + "\n")
    os.replace(folder / (INDEX_FILE + tag), folder / INDEX_FILE)
    return index


def ensure_index(folder: Path, table: ItemVectors) -> IdHash:
    """The table's index: read when written before, else built and written (built only, with a
    WARNING, where the folder is read-only)."""
    index = read_index(folder, table)
    if index is not None:
        return index
    t0 = time.perf_counter()
    try:
        index = write_index(folder, table)
    except OSError as e:
        log.warning("cannot write the index of %s (%s): built in memory only", folder, e)
        return table_index(table)
    log.info("indexed %s: %d items in %.1f s", folder, len(table.item_ids), time.perf_counter() - t0)
    return index


# -- the int8 form --------------------------------------------------------------------------------
INT8_FILE = "int8.json"
INT8_VECTORS = "int8_vectors.npy"
INT8_SCALE = "int8_scale.npy"


def quantise_rows(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantisation of float rows: ``(q int8 [n, d], scale float32 [n])`` with
    ``row ~= q * scale``, scale = max |row| / 127 (zero rows: scale 0); the numpy twin of
    ``retriever.kernels.quantise_int8``."""
    v = np.asarray(unit, np.float32)
    scale = (np.abs(v).max(axis=1) / np.float32(127.0)).astype(np.float32)  # [n]
    q = np.rint(v / np.maximum(scale, np.float32(1e-30))[:, None])
    return np.clip(q, -127, 127).astype(np.int8), scale


def int8_rows(folder: Path, table: ItemVectors) -> tuple[np.ndarray, np.ndarray]:
    """The table's rows as int8 with a per-row scale (cosine = (target . q) * scale), memory-mapped:
    what an int8 GSU table holds, a quarter of float32's bytes. Shipped int8 rows are used as they
    are, with scale 1 / norm (exact: no second rounding); float rows are quantised per row
    (:func:`quantise_rows` of the unit row). Written beside the table by the first reader that wants
    them (``int8_vectors.npy`` for float tables, ``int8_scale.npy``, then ``int8.json``), so later
    starts read 1 byte a component instead of converting 4; computed in memory where the folder is
    read-only."""
    folder = Path(folder)
    n = len(table.item_ids)
    shipped = table.vectors.dtype == np.int8
    try:
        doc = json.loads((folder / INT8_FILE).read_text())
        if doc.get("rows") == n and doc.get("shipped") == shipped:
            q = table.vectors if shipped else open_array(folder / INT8_VECTORS)
            return q, open_array(folder / INT8_SCALE)
    except (OSError, ValueError, MuseError):
        pass
    tag = f".tmp-{os.getpid()}"
    try:
        q_w = None if shipped else ArrayWriter(folder / (INT8_VECTORS + tag), np.int8, (table.dim,))
        s_w = ArrayWriter(folder / (INT8_SCALE + tag), np.float32)
    except OSError as e:
        log.warning("cannot write the int8 rows of %s (%s): converted in memory only", folder, e)
        q_w = s_w = None
    qs, ss = [], []
    for lo in range(0, n, BLOCK):
        raw = np.asarray(table.vectors[lo:lo + BLOCK])
        if shipped:
            norms = np.linalg.norm(raw.astype(np.float32), axis=1)
            q, scale = None, (1.0 / np.maximum(norms, np.float32(1e-30))).astype(np.float32)
        else:
            q, scale = quantise_rows(table.unit_rows(slice(lo, lo + BLOCK)))
        if s_w is None:
            qs.append(q)
            ss.append(scale)
            continue
        if q_w is not None:
            q_w.append(q)
        s_w.append(scale)
    if s_w is None:
        return (table.vectors if shipped else np.concatenate(qs)), np.concatenate(ss)
    for w, name in ((q_w, INT8_VECTORS), (s_w, INT8_SCALE)):
        if w is not None:
            w.close()
            os.replace(folder / (name + tag), folder / name)
    (folder / (INT8_FILE + tag)).write_text(json.dumps({"rows": n, "shipped": shipped}) + "\n")
    os.replace(folder / (INT8_FILE + tag), folder / INT8_FILE)
    return int8_rows(folder, table)


# -- writing a table from a vector store ---------------------------------------------------------
def export_key(dataset: str, source: str, version: int, dim: int, dataset_path: Path | None,
               collection: str) -> dict[str, Any]:
    """The key of a table exported from a Milvus item collection (see :func:`check_table`)."""
    meta = None if dataset_path is None else Path(dataset_path) / "meta.json"
    return {
        "source": {"name": source, "version": int(version), "dim": int(dim)},
        "dataset": {"name": dataset, "meta_mtime_ns": meta.stat().st_mtime_ns if meta and meta.exists() else None},
        "exported_from": collection,
    }


Fetch = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def export_table(folder: Path, item_ids: np.ndarray, fetch: Fetch, dim: int, key: dict[str, Any],
                 batch: int = 4096, parallel: int = 4) -> ItemVectors:
    """Write the table of ``item_ids`` (in that order) into ``folder`` from ``fetch`` (``ids ->
    (found_ids, vectors)``, e.g. ``VectorStore.get_item_vectors`` of one version), ``parallel``
    batches at a time, a block of items at a time; unit float32 rows. Written beside and renamed into
    place (a reader sees the old table or the new one), then indexed. Returns it, memory-mapped."""
    folder = Path(folder)
    ids = np.asarray(item_ids, np.int64)
    n = len(ids)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_array(tmp / "item_ids.npy", ids)
    vectors = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    present = np.lib.format.open_memmap(tmp / "present.npy", mode="w+", dtype=bool, shape=(n,))

    def one(lo: int) -> tuple[int, np.ndarray, np.ndarray]:
        block = ids[lo:lo + batch]
        found, vecs = fetch(block)
        out = np.zeros((len(block), dim), np.float32)
        has = np.zeros(len(block), bool)
        if len(found):
            at = {int(i): r for r, i in enumerate(block.tolist())}
            rows = np.fromiter((at[int(i)] for i in found), np.int64, len(found))
            out[rows] = l2_normalise(np.asarray(vecs, np.float32).reshape(len(found), dim))
            has[rows] = np.any(out[rows] != 0, axis=1)
        return lo, out, has

    with ThreadPoolExecutor(parallel, thread_name_prefix="muse-export") as pool:
        for start in range(0, n, BLOCK):
            for lo, out, has in pool.map(one, range(start, min(n, start + BLOCK), batch)):
                vectors[lo:lo + len(out)] = out
                present[lo:lo + len(out)] = has
    vectors.flush()
    present.flush()
    del vectors, present
    (tmp / KEY_FILE).write_text(json.dumps({"key": key, "scale": None, "normalised": True},
                                           sort_keys=True, indent=2) + "\n")
    table, _ = read_table(tmp)
    write_index(tmp, table)
    del table
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return read_table(folder)[0]


def export_from_store(store: Any, ref: Any, item_ids: np.ndarray, dataset_path: Path | None = None,
                      folder: Path | None = None) -> ItemVectors:
    """Write the item table of ``ref`` (a :class:`muse.vectorstore.CollectionRef`) from its Milvus item
    collection, for ``item_ids`` (the dataset's canonical order), into :func:`ref_table_dir` (or
    ``folder``). One scan of the collection: what a GSU server does once for a version written
    before tables were (see ``retriever.item_table``)."""
    dim = store.dim(ref)
    folder = folder or ref_table_dir(store.settings, ref)
    key = export_key(ref.dataset, ref.source, ref.version, dim, dataset_path, store.item_collection(ref))
    t0 = time.perf_counter()
    table = export_table(folder, item_ids, lambda ids: store.get_item_vectors(ref, ids), dim, key)
    log.info("%s: item table exported from %s to %s: %d items (%d with a vector) in %.1f s", ref,
             store.item_collection(ref), folder, len(item_ids), int(np.count_nonzero(table.present)),
             time.perf_counter() - t0)
    return table


__all__ = [
    "ABSENT",
    "IdHash",
    "ItemVectors",
    "check_table",
    "ensure_index",
    "int8_rows",
    "quantise_rows",
    "export_from_store",
    "export_key",
    "export_table",
    "read_index",
    "read_table",
    "ref_table_dir",
    "table_dir",
    "table_index",
    "write_index",
]
