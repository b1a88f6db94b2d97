"""The public encoding API of the embedding sources: an encoder, or the vectors of given items.

:func:`load_encoder` gives a trained source's :class:`ItemEncoder`; :func:`encode_items` the vectors
of some items under any source (encoding their images, looking up learned ID vectors, or reading
the vectors a dataset ships). Every item of a dataset at once, cached: :mod:`indexer.item_vectors`.
"""

from __future__ import annotations

import logging
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
from muse.arrays import l2_normalise, lookup
from muse.errors import ConfigurationError, DataError, NotFoundError
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


def imported_vectors(dataset: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(item_ids int64 [m], unit vectors float32 [m, d]) of a dataset's shipped ``embeddings/<name>.parquet``."""
    import pyarrow.parquet as pq

    path = dataset.embeddings_path(name)
    if path is None:
        raise NotFoundError(f"dataset {dataset.name!r} ships no embeddings/{name}.parquet")
    table = pq.read_table(path)
    ids = table.column("item_id").to_numpy().astype(np.int64)
    col = table.column("vector").combine_chunks()
    flat = col.values.to_numpy(zero_copy_only=False).astype(np.float32)
    if len(ids) and len(flat) % len(ids):
        raise DataError(f"{path}: vectors have unequal lengths")
    vectors = flat.reshape(len(ids), -1) if len(ids) else np.zeros((0, 0), np.float32)  # [m, d]
    return ids, l2_normalise(vectors)


def ensure_imported(settings: Settings, name: str, dataset: Any) -> SourceVersion:
    """The newest registered version of imported source ``name`` for ``dataset`` (its shipped file),
    registering it as the dataset's next version (1 for the first: versions are numbered per dataset)
    when there is none."""
    dataset = open_dataset(settings, dataset)
    path = dataset.embeddings_path(name)
    if path is None:
        raise NotFoundError(f"dataset {dataset.name!r} ships no embeddings/{name}.parquet")
    for v in reversed(list_versions(settings, name, dataset=dataset.name)):
        if v.checkpoint_path == str(path):
            return v
    ids, vectors = imported_vectors(dataset, name)
    return register_version(
        settings, name, next_version(settings, name, dataset.name), kind="imported", dim=int(vectors.shape[1]),
        dataset_name=dataset.name, checkpoint_path=path, config={"file": str(path), "dataset": dataset.name},
        metrics={"n_items_with_vector": int(len(ids))},
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
        known, vectors = imported_vectors(dataset, source)
        return lookup_vectors(known, vectors, ids, f"no {source} vector shipped for this item")
    if source == ID_SOURCE:
        return id_lookup(get_version(settings, source), ids)
    encoder = load_encoder(settings, source)
    images = dataset.load_images(ids)
    return encoder.encode_images([images.get(int(i)) for i in ids])
