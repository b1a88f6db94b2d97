"""The vectors of every item of a dataset under one source version: the one function training
reads them through (:func:`item_vectors`), cached on disk.

Serving reads the same vectors from Milvus (written by the backfill, see :mod:`indexer.backfill`);
both come from the same checkpoint (or shipped file) through :mod:`indexer.encode`, so they agree
to float32 rounding (``tests/test_embed_sources.py`` checks it against a backfilled collection).

The table is a folder ``<source dir>/items-<dataset>/`` of memory-mapped arrays
(:mod:`muse.itemtable`, which owns the layout, the path rule and the reader): ``item_ids.npy`` (the
dataset's canonical order), ``vectors.npy`` in the source's storage dtype (unit float32 rows for
encoder and ``id`` sources; int8 as shipped for Taobao-MM's ``scl-taobao``, with its scale),
``present.npy``, ``key.json``, and the id -> row index the GSU servers load. It is written once,
a block of items at a time (bounded memory whatever the catalogue), and opened without loading:
readers touch only the rows they use. The key holds the source version's identity (row id,
version, kind, dim, checkpoint path with its size and modification time) and the dataset's (its name
and ``meta.json`` stamp); the table is used only when that key and the dataset's item ids equal the
current ones. A stale table is rebuilt, with a WARNING saying what changed; it is never read
silently.

:func:`publish_item_table` puts a version's table on disk for the GSU servers when its backfill is
done and when it is promoted (``retriever.item_table`` loads it at start-up).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from indexer.encode import (
    encode_items,
    encoder_of,
    ensure_imported,
    id_lookup,
    imported_vectors,
    open_dataset,
)
from indexer.source_registry import (
    ID_SOURCE,
    IMPORTED_SOURCES,
    TRAINED_SOURCES,
    SourceVersion,
    check_source,
    get_version,
)
from muse.arrays import l2_normalise
from muse.data.format import IdIndex
from muse.errors import MuseError
from muse.itemtable import (
    ItemVectors,
    check_table,
    ensure_index,
    export_from_store,
    read_table,
    table_dir,
    write_index,
)
from muse.ondisk import ArrayWriter, release, write_array
from muse.settings import Settings

log = logging.getLogger(__name__)

#: Bumped when the cache's layout or the way its vectors are computed changes.
CACHE_FORMAT = 3
#: Items encoded (or copied) per block while the table is written.
BLOCK = 65_536


def _file_stamp(path: str | None) -> dict[str, Any]:
    if not path:
        return {"path": None}
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p), "missing": True}
    return {"path": str(p.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(row: SourceVersion, dataset: Any) -> dict[str, Any]:
    """What the vectors of ``dataset`` under ``row`` depend on (besides the item ids)."""
    meta = Path(dataset.path) / "meta.json"
    return {
        "format": CACHE_FORMAT,
        "source": {"id": row.id, "name": row.name, "version": row.version, "kind": row.kind, "dim": row.dim,
                   "checkpoint": _file_stamp(row.checkpoint_path)},
        "dataset": {"name": dataset.name, "meta_mtime_ns": meta.stat().st_mtime_ns if meta.exists() else None},
    }


def cache_path(settings: Settings, row: SourceVersion, dataset: Any) -> Path:
    """Where the vectors of ``dataset`` under source version ``row`` are kept (a folder: the rule of
    :func:`muse.itemtable.table_dir`)."""
    return table_dir(settings, dataset.name, row.name, row.version)


def _read_cache(cache: Path, key: dict[str, Any], item_ids: np.ndarray) -> tuple[ItemVectors | None, str]:
    """The table in ``cache`` (memory-mapped) when it holds exactly ``key`` and ``item_ids``, else
    ``(None, why not)``."""
    try:
        table, doc = read_table(cache)
        if doc.get("key") != json.loads(json.dumps(key)):
            old = doc.get("key") or {}
            if "exported_from" in old:
                return None, f"it was exported from {old['exported_from']}, not computed from the source"
            changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            return None, f"its key changed ({', '.join(changed)}: {old} -> {key})"
        if not np.array_equal(table.item_ids, item_ids):
            return None, "the dataset's item ids changed"
        return table, ""
    except (OSError, ValueError, KeyError, MuseError) as e:
        return None, f"it cannot be read ({e})"


def _resolve(settings: Settings, source: Any, dataset: Any, version: int | None) -> tuple[SourceVersion, Any]:
    """The source version row and the opened dataset of an :func:`item_vectors` call."""
    if not isinstance(source, str):  # a CollectionRef
        source, dataset, version = source.source, source.dataset, source.version
    if dataset is None:
        from muse.errors import ConfigurationError

        raise ConfigurationError("item_vectors needs a dataset (a Dataset, its name, or a CollectionRef)")
    check_source(source)
    dataset = open_dataset(settings, dataset)
    if source in IMPORTED_SOURCES and version is None:
        return ensure_imported(settings, source, dataset), dataset
    return get_version(settings, source, version), dataset


def item_vectors(
    settings: Settings, source: Any, dataset: Any = None, version: int | None = None, *, batch_size: int = 512
) -> ItemVectors:
    """Vectors of every item of ``dataset`` under ``source`` version ``version`` (the newest when None;
    for an imported source, the one shipped with the dataset), kept on disk per source version and
    returned memory-mapped.

    ``source`` may also be a :class:`muse.vectorstore.CollectionRef` (then ``dataset`` and ``version``
    come from it): the (dataset, source, version) whose Milvus collections serving reads.

    Raises:
        ConfigurationError: an unknown source.
        NotFoundError: no such source version or dataset.
    """
    row, dataset = _resolve(settings, source, dataset, version)
    source = row.name
    cache = cache_path(settings, row, dataset)
    key = cache_key(row, dataset)
    item_ids = dataset.item_ids()
    if (cache / "key.json").exists():
        cached, reason = _read_cache(cache, key, item_ids)
        if cached is not None:
            return cached
        if reason.startswith("it was exported"):  # a GSU server's copy of the Milvus collection
            log.info("%s v%d: the vector table %s: %s; computing it", source, row.version, cache, reason)
        else:
            log.warning("%s v%d: the vector table %s is stale: %s; rebuilding it", source, row.version, cache, reason)
    else:
        log.info("%s v%d: no vector table for %s yet; computing it", source, row.version, dataset.name)
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    scale, normalised = _compute(settings, row, dataset, item_ids, batch_size, tmp)
    (tmp / "key.json").write_text(json.dumps({"key": key, "scale": scale, "normalised": normalised},
                                             sort_keys=True, indent=2) + "\n")
    written, _ = read_table(tmp)
    write_index(tmp, written)  # the GSU servers' id -> row hash, so that none of them builds it
    del written
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    table, _ = _read_cache(cache, key, item_ids)
    assert table is not None  # just written
    log.info("%s v%d: %d of %d items have a vector", source, row.version, int(np.count_nonzero(table.present)),
             len(item_ids))
    return table


def publish_item_table(settings: Settings, ref: Any, store: Any, compute: bool = False) -> Path:
    """Put the item table of ``ref`` (a :class:`muse.vectorstore.CollectionRef`) on disk with its
    index, where GSU servers load it (:func:`muse.itemtable.table_dir`); returns the folder. Called
    when a backfill job is done (``compute=True``) and when a version is promoted or rolled back to.

    What a GSU server must hold is what the version's Milvus item collection holds, so:

    * a table already in the folder for this (dataset, source, version), computed for training or
      written before, is kept (indexed if it was not);
    * else, right after the backfill (``compute``), an imported or ``id`` source computes it (a copy
      of the shipped file or a lookup: what the backfill has just written);
    * else it is exported from the Milvus item collection (a trained source's vectors without
      encoding every image again; an imported source whose shipped file may have changed since).

    Raises:
        ConfigurationError / NotFoundError: as :func:`item_vectors`. BackendUnavailable: Milvus.
    """
    row, dataset = _resolve(settings, ref, None, None)
    folder = cache_path(settings, row, dataset)
    table, _ = check_table(folder, ref.dataset, ref.source, ref.version, row.dim, Path(dataset.path))
    if table is None and compute and row.name not in TRAINED_SOURCES:
        table = item_vectors(settings, ref)
    elif table is None:
        table = export_from_store(store, ref, dataset.item_ids(), Path(dataset.path), folder)
    ensure_index(folder, table)
    log.info("%s: item table for the GSU servers in %s (%d items, %d with a vector)", ref, folder,
             len(table.item_ids), int(np.count_nonzero(table.present)))
    return folder


def _compute(settings: Settings, row: SourceVersion, dataset: Any, item_ids: np.ndarray,
             batch_size: int, folder: Path) -> tuple[float | None, bool]:
    """Write ``item_ids.npy``, ``vectors.npy`` and ``present.npy`` into ``folder``; returns (scale,
    normalised)."""
    n = len(item_ids)
    write_array(folder / "item_ids.npy", item_ids)
    if row.name in IMPORTED_SOURCES:  # as shipped: int8 stays int8, copied in canonical order a block at a time
        # Appended with writes, the shipped file's pages dropped as it is read: a mapping written or
        # read whole would count the table twice in this process's resident size (2 x 4.5 GB at 35M).
        shipped = imported_vectors(dataset, row.name)
        vectors_w = ArrayWriter(folder / "vectors.npy", shipped.vectors.dtype, (shipped.dim,))
        present_w = ArrayWriter(folder / "present.npy", bool)
        index = IdIndex(np.asarray(shipped.item_ids))
        for lo in range(0, n, BLOCK):
            rows = index.find(item_ids[lo:lo + BLOCK])
            ok = rows >= 0
            block = np.zeros((len(rows), shipped.dim), shipped.vectors.dtype)
            block[ok] = shipped.vectors[rows[ok]]
            vectors_w.append(block)
            present_w.append(ok & np.any(block != 0, axis=1))
            release(shipped.vectors)
        vectors_w.close()
        present_w.close()
        return shipped.scale, False
    present = np.lib.format.open_memmap(folder / "present.npy", mode="w+", dtype=bool, shape=(n,))
    vectors = np.lib.format.open_memmap(folder / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, row.dim))
    if row.name in TRAINED_SOURCES:
        encoder = encoder_of(settings, row)
        n_failed = 0
        index = IdIndex(item_ids)
        for batch in dataset.iter_images(batch_size=batch_size):
            ids = batch.column("item_id").to_numpy().astype(np.int64)
            res = encoder.encode_images(batch.column("image").to_pylist())
            rows = index.find(ids[res.ok_index])  # -1: an image of an item not in the table
            keep = rows >= 0
            vectors[rows[keep]] = l2_normalise(res.vectors[keep])
            present[rows[keep]] = True
            n_failed += len(res.failed)
        if n_failed:
            log.warning("%s: %d images could not be encoded; those items are absent", row.name, n_failed)
    else:  # the id source: its learned table (held by the model anyway), written a block at a time
        res = id_lookup(row, item_ids) if row.name == ID_SOURCE else encode_items(settings, row.name, dataset, item_ids)
        for lo in range(0, len(res.ok_index), BLOCK):
            rows = res.ok_index[lo:lo + BLOCK]
            vectors[rows] = l2_normalise(res.vectors[lo:lo + BLOCK])
            present[rows] = True
    vectors.flush()
    present.flush()
    return None, True
