"""The vectors of every item of a dataset under one source version: the one function training
reads them through (:func:`item_vectors`), cached on disk.

Serving reads the same vectors from Milvus (written by the backfill, see :mod:`indexer.backfill`);
both come from the same checkpoint (or shipped file) through :mod:`indexer.encode`, so they agree
to float32 rounding (``tests/test_embed_sources.py`` checks it against a backfilled collection).

The cache is ``<source dir>/items-<dataset>.npz``. It carries its key: the source version's
identity (row id, version, kind, dim, checkpoint path with its size and modification time) and the
dataset's (its name and ``meta.json`` stamp) and is used only when that key and the dataset's item
ids equal the current ones. A stale cache is rebuilt, with a WARNING saying what changed; it is
never read silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.encode import encode_items, encoder_of, ensure_imported, id_lookup, open_dataset
from indexer.source_registry import (
    ID_SOURCE,
    IMPORTED_SOURCES,
    TRAINED_SOURCES,
    SourceVersion,
    check_source,
    get_version,
    source_dir,
)
from muse.arrays import lookup
from muse.settings import Settings

log = logging.getLogger(__name__)

#: Bumped when the cache's layout or the way its vectors are computed changes.
CACHE_FORMAT = 2


@dataclass(frozen=True)
class ItemVectors:
    """Every item of a dataset under one source version (``ranker.data.ItemVectorsLike``)."""

    item_ids: np.ndarray  # int64 [n], the dataset's canonical item order
    vectors: np.ndarray  # float32 [n, d]; rows of absent items are zero
    present: np.ndarray  # bool [n]: False where the item has no vector (no image, unknown, not shipped)


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
    """Where the vectors of ``dataset`` under source version ``row`` are cached."""
    return source_dir(settings, row.name, row.version) / f"items-{dataset.name}.npz"


def _read_cache(cache: Path, key: dict[str, Any], item_ids: np.ndarray) -> tuple[ItemVectors | None, str]:
    """The vectors in ``cache`` when it holds exactly ``key`` and ``item_ids`` (read once), else
    ``(None, why not)``."""
    try:
        with np.load(cache) as z:
            if "key" not in z.files:
                return None, "it has no key (written by an older version)"
            old = json.loads(str(z["key"]))
            if old != key:
                changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
                return None, f"its key changed ({', '.join(changed)}: {old} -> {key})"
            if not np.array_equal(z["item_ids"], item_ids):
                return None, "the dataset's item ids changed"
            return ItemVectors(z["item_ids"], z["vectors"], z["present"]), ""
    except (OSError, ValueError, KeyError) as e:
        return None, f"it cannot be read ({e})"


def item_vectors(
    settings: Settings, source: Any, dataset: Any = None, version: int | None = None, *, batch_size: int = 512
) -> ItemVectors:
    """Vectors of every item of ``dataset`` under ``source`` version ``version`` (the newest when None;
    for an imported source, the one shipped with the dataset), cached on disk per source version.

    ``source`` may also be a :class:`muse.vectorstore.CollectionRef` (then ``dataset`` and ``version``
    come from it): the (dataset, source, version) whose Milvus collections serving reads.

    Raises:
        ConfigurationError: an unknown source.
        NotFoundError: no such source version or dataset.
    """
    if not isinstance(source, str):  # a CollectionRef
        source, dataset, version = source.source, source.dataset, source.version
    if dataset is None:
        from muse.errors import ConfigurationError

        raise ConfigurationError("item_vectors needs a dataset (a Dataset, its name, or a CollectionRef)")
    check_source(source)
    dataset = open_dataset(settings, dataset)
    if source in IMPORTED_SOURCES and version is None:
        row = ensure_imported(settings, source, dataset)
    else:
        row = get_version(settings, source, version, dataset=dataset.name)
    cache = cache_path(settings, row, dataset)
    key = cache_key(row, dataset)
    item_ids = dataset.item_ids()
    if cache.exists():
        cached, reason = _read_cache(cache, key, item_ids)
        if cached is not None:
            return cached
        log.warning("%s v%d: the vector cache %s is stale: %s; rebuilding it", source, row.version, cache, reason)
    else:
        log.info("%s v%d: no vector cache for %s yet; computing it", source, row.version, dataset.name)
    table = _compute(settings, row, dataset, item_ids, batch_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, item_ids=table.item_ids, vectors=table.vectors, present=table.present,
             key=np.array(json.dumps(key, sort_keys=True)))
    tmp.replace(cache)
    log.info("%s v%d: %d of %d items have a vector", source, row.version, int(table.present.sum()), len(item_ids))
    return table


def _compute(settings: Settings, row: SourceVersion, dataset: Any, item_ids: np.ndarray,
             batch_size: int) -> ItemVectors:
    vectors = np.zeros((len(item_ids), row.dim), np.float32)
    present = np.zeros(len(item_ids), bool)
    if row.name in TRAINED_SOURCES:
        encoder = encoder_of(settings, row)
        n_failed = 0
        for batch in dataset.iter_images(batch_size=batch_size):
            ids = batch.column("item_id").to_numpy().astype(np.int64)
            res = encoder.encode_images(batch.column("image").to_pylist())
            rows = lookup(item_ids, ids[res.ok_index])  # -1: an image of an item not in the table
            keep = rows >= 0
            vectors[rows[keep]] = res.vectors[keep]
            present[rows[keep]] = True
            n_failed += len(res.failed)
        if n_failed:
            log.warning("%s: %d images could not be encoded; those items are absent", row.name, n_failed)
    else:
        res = id_lookup(row, item_ids) if row.name == ID_SOURCE else encode_items(settings, row.name, dataset, item_ids)
        vectors[res.ok_index] = res.vectors
        present[res.ok_index] = True
    return ItemVectors(item_ids, vectors, present)
