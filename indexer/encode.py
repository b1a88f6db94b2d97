"""The public encoding API of the embedding sources: an encoder, or the vectors of given items.

:func:`load_encoder` gives a trained source's :class:`ItemEncoder`; :func:`encode_items` the vectors
of some items under any source (encoding their images, looking up learned ID vectors, or reading
the vectors a dataset ships). Every item of a dataset at once, cached: :mod:`indexer.item_vectors`.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer.checkpoints import checkpoint_of, load_id_checkpoint
from indexer.encoders import EncodeResult, ItemEncoder, register_model_configs
from indexer.source_registry import (
    ID_SOURCE,
    IMPORTED_SOURCES,
    TRAINED_SOURCES,
    SourceVersion,
    check_source,
    get_version,
    list_versions,
    next_version,
    register_version,
)
from indexer.worker_context import current
from muse.arrays import l2_normalise, lookup, lookup_sorted
from muse.errors import ConfigurationError, NotFoundError
from muse.settings import Settings

log = logging.getLogger(__name__)


def load_encoder(settings: Settings, name: str, version: int | None = None) -> ItemEncoder:
    """The trained encoder of source ``name`` (latest version when ``version`` is None), in eval mode
    on ``settings.resolve_device()``. Loaded once per checkpoint and process (the worker context).

    Raises:
        ConfigurationError: ``name`` is not an encoder source (``id``/``scl-taobao`` are lookups:
            use :func:`encode_items` or :func:`indexer.item_vectors.item_vectors`).
        NotFoundError: no such version.
    """
    check_source(name)
    if name not in TRAINED_SOURCES:
        raise ConfigurationError(
            f"source {name!r} has no encoder (it is a lookup table); use encode_items or item_vectors. "
            f"Encoder sources: {', '.join(TRAINED_SOURCES)}"
        )
    return encoder_of(settings, get_version(settings, name, version))


def encoder_of(settings: Settings, row: SourceVersion) -> ItemEncoder:
    """The encoder of one registered trained version (loaded once per process)."""
    register_model_configs()
    return current().encoder(checkpoint_of(row), settings.resolve_device())


def open_dataset(settings: Settings, dataset: Any) -> Any:
    """``dataset`` as a :class:`muse.data.format.Dataset` (opened by name when it is a string)."""
    if isinstance(dataset, str):
        from muse.data.format import Dataset

        return Dataset.open(settings, dataset)
    return dataset


def imported_vectors(dataset: Any, name: str) -> Any:
    """The vectors shipped with a dataset for imported source ``name`` (``Dataset.embeddings``: item ids,
    memory-mapped vectors in their storage dtype, and the scale)."""
    shipped = dataset.embeddings(name)
    if shipped is None:
        raise NotFoundError(f"dataset {dataset.name!r} ships no embeddings/{name}")
    return shipped


@functools.lru_cache(maxsize=4)
def _shipped_order(path: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted item ids, their rows) of a shipped vector file: built once per process and file."""
    from muse.data.format import Dataset

    ds = Dataset(Path(path).parents[1])  # <dataset>/embeddings/<source>[.parquet]
    ids = np.asarray(ds.embeddings(Path(path).name.removesuffix(".parquet")).item_ids)
    order = np.argsort(ids, kind="stable")
    return ids[order], order


def shipped_lookup(dataset: Any, name: str, item_ids: np.ndarray) -> EncodeResult:
    """Unit vectors of ``item_ids`` from the vectors shipped for ``name`` (only those rows are read)."""
    shipped = imported_vectors(dataset, name)
    path = dataset.embeddings_path(name)
    sorted_ids, order = _shipped_order(str(path), path.stat().st_mtime_ns)
    pos, found = lookup_sorted(sorted_ids, item_ids)
    ok = np.flatnonzero(found)
    rows = order[pos[ok]]
    vectors = l2_normalise(shipped.float_rows(rows)) if len(ok) else np.zeros((0, shipped.dim), np.float32)
    failed = {int(i): f"no {name} vector shipped for this item" for i in np.flatnonzero(~found)}
    return EncodeResult(vectors, ok.astype(np.int64), failed)


def ensure_imported(settings: Settings, name: str, dataset: Any) -> SourceVersion:
    """The newest registered version of imported source ``name`` for ``dataset`` (its shipped file),
    registering it as the dataset's next version (1 for the first: versions are numbered per dataset)
    when there is none."""
    dataset = open_dataset(settings, dataset)
    path = dataset.embeddings_path(name)
    if path is None:
        raise NotFoundError(f"dataset {dataset.name!r} ships no embeddings/{name}/ (nor embeddings/{name}.parquet)")
    for v in reversed(list_versions(settings, name, dataset=dataset.name)):
        if v.checkpoint_path == str(path):
            return v
    shipped = imported_vectors(dataset, name)
    return register_version(
        settings, name, next_version(settings, name, dataset.name), kind="imported", dim=shipped.dim,
        dataset_name=dataset.name, checkpoint_path=path, config={"file": str(path), "dataset": dataset.name},
        metrics={"n_items_with_vector": int(len(shipped.item_ids))},
    )


def lookup_vectors(known_ids: np.ndarray, vectors: np.ndarray, item_ids: np.ndarray, reason: str) -> EncodeResult:
    """``item_ids`` looked up in a table ``(known_ids [m], vectors [m, d])``; unknown ones fail with ``reason``."""
    rows = lookup(known_ids, item_ids)  # [n], -1 = unknown
    ok = np.flatnonzero(rows >= 0)
    failed = {int(i): reason for i in np.flatnonzero(rows < 0)}
    return EncodeResult(vectors[rows[ok]].astype(np.float32), ok.astype(np.int64), failed)


def id_lookup(row: SourceVersion, ids: np.ndarray) -> EncodeResult:
    """Vectors of ``ids`` under an ``id`` source version (its learned table)."""
    model = load_id_checkpoint(checkpoint_of(row))
    with torch.no_grad():
        vectors = model(torch.arange(len(model.item_ids))).numpy()  # [n_known, d]
    return lookup_vectors(model.item_ids.numpy(), vectors, ids, "item has no learned ID embedding")


def encode_items(settings: Settings, source: str, dataset: Any, item_ids: Any) -> EncodeResult:
    """Vectors of ``item_ids`` of ``dataset`` (a Dataset or its name) under ``source`` (latest version).

    Items without a vector are reported in ``failed`` (position in ``item_ids`` -> reason): a missing
    or unreadable image for encoder sources, an unknown item for ``id``, no shipped vector for
    ``scl-taobao``. Never silently zero.
    """
    check_source(source)
    dataset = open_dataset(settings, dataset)
    ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
    if source in IMPORTED_SOURCES:
        ensure_imported(settings, source, dataset)
        return shipped_lookup(dataset, source, ids)
    if source == ID_SOURCE:
        return id_lookup(get_version(settings, source), ids)
    encoder = load_encoder(settings, source)
    images = dataset.load_images(ids)
    return encoder.encode_images([images.get(int(i)) for i in ids])
