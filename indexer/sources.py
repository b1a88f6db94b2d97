"""Embedding sources: the registry of trained/imported versions and the public encoding API.

Sources (see ``docs/embeddings.md``):

- ``scl``, ``i2i``, ``openclip``: open_clip encoders trained on different pairs (kind ``trained``);
- ``id``: learned item-ID embeddings, the no-multimodal baseline (kind ``id``);
- ``scl-taobao``: vectors shipped with a dataset in ``embeddings/scl-taobao.parquet`` (kind ``imported``).

Each training creates a new version (a row in ``embedding_sources``) with its checkpoint under
``settings.path("embeddings", name, f"v{version}")``; older versions stay usable. Public API
(``docs/contracts.md``): :func:`load_encoder`, :func:`encode_items`, :func:`item_vector_table`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import func, select

from indexer.encoders import (
    ClipEncoder,
    EncoderConfig,
    EncodeResult,
    ItemEncoder,
    build_clip_encoder,
    register_model_configs,
)
from muse import models
from muse.db import session_scope
from muse.errors import ConfigurationError, DataError, NotFoundError
from muse.settings import Settings

log = logging.getLogger(__name__)

TRAINED_SOURCES = ("scl", "i2i", "openclip")
ID_SOURCE = "id"
IMPORTED_SOURCES = ("scl-taobao",)
SOURCES = TRAINED_SOURCES + (ID_SOURCE,) + IMPORTED_SOURCES
CHECKPOINT_FILE = "encoder.pt"
CHECKPOINT_FORMAT = 1


def check_source(name: str) -> str:
    """Return ``name`` if it is a known source, else raise :class:`ConfigurationError` listing them."""
    if name not in SOURCES:
        raise ConfigurationError(f"embedding source {name!r} is unknown; valid: {', '.join(SOURCES)}")
    return name


def source_dir(settings: Settings, name: str, version: int) -> Path:
    """Folder of one source version (checkpoint and vector caches)."""
    return settings.path("embeddings", name, f"v{version}")


# --- registry (the embedding_sources table) ----------------------------------------------------


@dataclass(frozen=True)
class SourceVersion:
    """A detached copy of one ``embedding_sources`` row."""

    id: int
    name: str
    version: int
    kind: str
    dim: int
    dataset_id: int | None
    checkpoint_path: str | None
    config: dict[str, Any]
    metrics: dict[str, Any]

    @classmethod
    def from_row(cls, row: models.EmbeddingSource) -> SourceVersion:
        return cls(
            row.id, row.name, row.version, row.kind, row.dim, row.dataset_id,
            row.checkpoint_path, dict(row.config or {}), dict(row.metrics or {}),
        )


def check_registry(settings: Settings) -> None:
    """Raise :class:`ConfigurationError` unless the database has the ``embedding_sources`` table."""
    from sqlalchemy import inspect

    from muse.db import check_database, get_engine

    check_database(settings)
    if not inspect(get_engine(settings)).has_table("embedding_sources"):
        raise ConfigurationError(
            f"database {settings.database_url!r} has no embedding_sources table; run `muse db upgrade`"
        )


def next_version(settings: Settings, name: str) -> int:
    """The version number the next registration of ``name`` will get (1 for the first)."""
    with session_scope(settings) as s:
        current = s.scalar(select(func.max(models.EmbeddingSource.version)).where(models.EmbeddingSource.name == name))
    return int(current or 0) + 1


def dataset_row_id(settings: Settings, dataset_name: str) -> int | None:
    """Id of the ``datasets`` row of ``dataset_name`` (None when it is not registered)."""
    with session_scope(settings) as s:
        return s.scalar(select(models.Dataset.id).where(models.Dataset.name == dataset_name))


def register_version(
    settings: Settings,
    name: str,
    version: int,
    *,
    kind: str,
    dim: int,
    dataset_name: str | None,
    checkpoint_path: Path | None,
    config: dict[str, Any],
    metrics: dict[str, Any],
) -> SourceVersion:
    """Insert one ``embedding_sources`` row and return it."""
    check_source(name)
    dataset_id = dataset_row_id(settings, dataset_name) if dataset_name else None
    with session_scope(settings) as s:
        row = models.EmbeddingSource(
            name=name, version=version, kind=kind, dim=dim, dataset_id=dataset_id,
            checkpoint_path=str(checkpoint_path) if checkpoint_path else None,
            config=config, metrics=metrics,
        )
        s.add(row)
        s.flush()
        out = SourceVersion.from_row(row)
    log.info("registered embedding source %s v%d (%s)", name, version, kind)
    return out


def list_versions(settings: Settings, name: str | None = None) -> list[SourceVersion]:
    """Every registered version (of one source when ``name`` is given), by name then version."""
    with session_scope(settings) as s:
        q = select(models.EmbeddingSource).order_by(models.EmbeddingSource.name, models.EmbeddingSource.version)
        if name is not None:
            q = q.where(models.EmbeddingSource.name == name)
        return [SourceVersion.from_row(r) for r in s.scalars(q)]


def get_version(settings: Settings, name: str, version: int | None = None) -> SourceVersion:
    """One version of a source (the latest when ``version`` is None).

    Raises:
        NotFoundError: the source has no such version (the message says how to create one).
    """
    check_source(name)
    versions = list_versions(settings, name)
    if not versions:
        hint = (
            "it is imported on first use from a dataset that ships embeddings/scl-taobao.parquet"
            if name in IMPORTED_SOURCES
            else f"train one with `muse embed train --source {name} --dataset NAME`"
        )
        raise NotFoundError(f"embedding source {name!r} has no version yet; {hint}")
    if version is None:
        return versions[-1]
    for v in versions:
        if v.version == version:
            return v
    raise NotFoundError(
        f"embedding source {name!r} has no version {version}; available: {[v.version for v in versions]}"
    )


def update_metrics(settings: Settings, source_id: int, key: str, value: Any) -> None:
    """Set ``metrics[key] = value`` on one source row (other keys kept)."""
    with session_scope(settings) as s:
        row = s.get(models.EmbeddingSource, source_id)
        if row is None:
            raise NotFoundError(f"embedding source row id {source_id} does not exist")
        metrics = dict(row.metrics or {})
        metrics[key] = value
        row.metrics = metrics  # reassign: JSON columns do not track in-place changes


# --- checkpoints -------------------------------------------------------------------------------


class IdEmbedding(torch.nn.Module):
    """Learned item-ID vectors: one row per item of the training dataset, unit-normalised on output."""

    def __init__(self, item_ids: np.ndarray, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("item_ids", torch.as_tensor(np.asarray(item_ids, dtype=np.int64)))  # [n] sorted
        self.table = torch.nn.Embedding(len(item_ids), dim)
        torch.nn.init.normal_(self.table.weight, std=0.01)  # small: early updates move directions fast

    def rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row index int64 [n], known bool [n]) of ``item_ids`` in the table."""
        ids = np.asarray(item_ids, dtype=np.int64)
        known_ids = self.item_ids.cpu().numpy()
        pos = np.clip(np.searchsorted(known_ids, ids), 0, max(len(known_ids) - 1, 0))
        known = (known_ids[pos] == ids) if len(known_ids) else np.zeros(len(ids), bool)
        return pos.astype(np.int64), known

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """rows ``[B]`` int64 -> ``[B, dim]`` unit vectors."""
        return torch.nn.functional.normalize(self.table(rows), dim=-1)


def save_checkpoint(path: Path, *, source: str, model: torch.nn.Module, encoder: EncoderConfig | None) -> None:
    """Write a source checkpoint (plain tensors and primitives: loads with ``weights_only=True``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "source": source,
        "encoder": encoder.to_dict() if encoder else None,
        "dim": int(model.dim),
        "state_dict": model.state_dict(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a checkpoint


def register_untrained_encoder(
    settings: Settings, name: str, *, seed: int = 0, metrics: dict[str, Any] | None = None
) -> SourceVersion:
    """Save a seeded, randomly initialised default encoder as the next version of source ``name``.

    A baseline for evaluation and a stand-in where the weights do not matter (queue throughput,
    tests of the backfill mechanics).
    """
    register_model_configs()
    config = EncoderConfig()
    torch.manual_seed(seed)
    model = build_clip_encoder(config)
    version = next_version(settings, name)
    path = source_dir(settings, name, version) / CHECKPOINT_FILE
    save_checkpoint(path, source=name, model=model, encoder=config)
    return register_version(
        settings, name, version, kind="trained", dim=model.dim, dataset_name=None,
        checkpoint_path=path, config=config.to_dict(), metrics=metrics or {"note": "random init"},
    )


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"checkpoint {p} does not exist")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as e:
        raise DataError(f"checkpoint {p} cannot be read: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"checkpoint {p} is not a MUSE encoder checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def load_clip_checkpoint(path: str | Path) -> tuple[ClipEncoder, EncoderConfig]:
    """Rebuild a trained :class:`ClipEncoder` from its checkpoint (no pretrained file needed)."""
    payload = _read_checkpoint(path)
    cfg = EncoderConfig.from_dict({**payload["encoder"], "pretrained": None})
    model = build_clip_encoder(cfg)
    model.load_state_dict(payload["state_dict"])
    return model, cfg


def load_id_checkpoint(path: str | Path) -> IdEmbedding:
    payload = _read_checkpoint(path)
    state = payload["state_dict"]
    model = IdEmbedding(state["item_ids"].numpy(), int(payload["dim"]))
    model.load_state_dict(state)
    return model.eval()


# --- public API --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _cached_encoder(checkpoint: str, device: str) -> ItemEncoder:
    model, cfg = load_clip_checkpoint(checkpoint)
    return ItemEncoder(model, cfg.model, device=device)


def load_encoder(settings: Settings, name: str, version: int | None = None) -> ItemEncoder:
    """The trained encoder of source ``name`` (latest version when ``version`` is None), in eval mode
    on ``settings.resolve_device()``. Cached per checkpoint within the process.

    Raises:
        ConfigurationError: ``name`` is not an encoder source (``id``/``scl-taobao`` are lookups:
            use :func:`encode_items` or :func:`item_vector_table`).
        NotFoundError: no such version.
    """
    check_source(name)
    if name not in TRAINED_SOURCES:
        raise ConfigurationError(
            f"source {name!r} has no encoder (it is a lookup table); use encode_items or item_vector_table. "
            f"Encoder sources: {', '.join(TRAINED_SOURCES)}"
        )
    register_model_configs()
    row = get_version(settings, name, version)
    assert row.checkpoint_path is not None  # trained rows always have one
    return _cached_encoder(row.checkpoint_path, settings.resolve_device())


def open_dataset(settings: Settings, dataset: Any) -> Any:
    if isinstance(dataset, str):
        from muse.data.format import Dataset

        return Dataset.open(settings, dataset)
    return dataset


def _imported_vectors(dataset: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(item_ids int64 [m], vectors float32 [m, d]) of a dataset's shipped ``embeddings/<name>.parquet``."""
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
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return ids, vectors / np.maximum(norms, 1e-12)


def ensure_imported(settings: Settings, name: str, dataset: Any) -> SourceVersion:
    """The registered version of imported source ``name`` for ``dataset``, registering it if new."""
    dataset = open_dataset(settings, dataset)
    path = dataset.embeddings_path(name)
    if path is None:
        raise NotFoundError(f"dataset {dataset.name!r} ships no embeddings/{name}.parquet")
    for v in list_versions(settings, name):
        if v.checkpoint_path == str(path):
            return v
    ids, vectors = _imported_vectors(dataset, name)
    return register_version(
        settings, name, next_version(settings, name), kind="imported", dim=int(vectors.shape[1]),
        dataset_name=dataset.name, checkpoint_path=path, config={"file": str(path)},
        metrics={"n_items_with_vector": int(len(ids))},
    )


def _lookup(known_ids: np.ndarray, vectors: np.ndarray, item_ids: np.ndarray, reason: str) -> EncodeResult:
    order = np.argsort(known_ids, kind="stable")
    sorted_ids = known_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, item_ids), 0, max(len(sorted_ids) - 1, 0))
    found = sorted_ids[pos] == item_ids if len(sorted_ids) else np.zeros(len(item_ids), bool)
    ok = np.flatnonzero(found)
    failed = {int(i): reason for i in np.flatnonzero(~found)}
    return EncodeResult(vectors[order[pos[ok]]].astype(np.float32), ok.astype(np.int64), failed)


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
        known, vectors = _imported_vectors(dataset, source)
        return _lookup(known, vectors, ids, f"no {source} vector shipped for this item")
    if source == ID_SOURCE:
        return _id_lookup(get_version(settings, source), ids)
    encoder = load_encoder(settings, source)
    images = dataset.load_images(ids)
    return encoder.encode_images([images.get(int(i)) for i in ids])


def _id_lookup(row: SourceVersion, ids: np.ndarray) -> EncodeResult:
    model = load_id_checkpoint(_checkpoint_of(row))
    with torch.no_grad():
        vectors = model(torch.arange(len(model.item_ids))).numpy()  # [n_known, d]
    return _lookup(model.item_ids.numpy(), vectors, ids, "item has no learned ID embedding")


def _checkpoint_of(row: SourceVersion) -> str:
    if not row.checkpoint_path:
        raise DataError(f"embedding source {row.name} v{row.version} has no checkpoint path")
    return row.checkpoint_path


def _dataset_stamp(dataset: Any) -> str:
    """Changes when the dataset is rewritten (its meta.json is written last), invalidating caches."""
    meta = Path(dataset.path) / "meta.json"
    return f"{dataset.name}:{meta.stat().st_mtime_ns}"


@dataclass(frozen=True)
class ItemVectors:
    """Every item of a dataset under one source version."""

    item_ids: np.ndarray  # int64 [n], the dataset's canonical item order
    vectors: np.ndarray  # float32 [n, d]; rows of absent items are zero
    present: np.ndarray  # bool [n]: False where the item has no vector (no image, unknown, not shipped)


def item_vector_table(
    settings: Settings, source: str, dataset: Any, version: int | None = None, batch_size: int = 512
) -> ItemVectors:
    """Vectors of every item of ``dataset`` for ``source``, cached on disk per source version.

    The cache is ``<source dir>/items-<dataset>.npz``; it is rebuilt when missing or when the
    dataset was rewritten since (its ``meta.json`` changed).
    """
    check_source(source)
    dataset = open_dataset(settings, dataset)
    if source in IMPORTED_SOURCES and version is None:
        row = ensure_imported(settings, source, dataset)
    else:
        row = get_version(settings, source, version)
    cache = source_dir(settings, source, row.version) / f"items-{dataset.name}.npz"
    stamp = _dataset_stamp(dataset)
    if cache.exists():
        with np.load(cache) as z:
            if "stamp" in z.files and str(z["stamp"]) == stamp:
                return ItemVectors(z["item_ids"], z["vectors"], z["present"])
        log.info("%s: dataset %s changed since %s was written; rebuilding", source, dataset.name, cache)
    item_ids = dataset.item_ids()
    vectors = np.zeros((len(item_ids), row.dim), np.float32)
    present = np.zeros(len(item_ids), bool)
    if source in TRAINED_SOURCES:
        encoder = _cached_encoder(_checkpoint_of(row), settings.resolve_device())
        position = {int(i): k for k, i in enumerate(item_ids.tolist())}
        n_failed = 0
        for batch in dataset.iter_images(batch_size=batch_size):
            ids = batch.column("item_id").to_numpy().astype(np.int64)
            res = encoder.encode_images(batch.column("image").to_pylist())
            rows = np.asarray([position.get(int(i), -1) for i in ids[res.ok_index]], dtype=np.int64)
            keep = rows >= 0
            vectors[rows[keep]] = res.vectors[keep]
            present[rows[keep]] = True
            n_failed += len(res.failed)
        if n_failed:
            log.warning("%s: %d images could not be encoded; those items are absent", source, n_failed)
    else:
        res = _id_lookup(row, item_ids) if source == ID_SOURCE else encode_items(settings, source, dataset, item_ids)
        vectors[res.ok_index] = res.vectors
        present[res.ok_index] = True
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, item_ids=item_ids, vectors=vectors, present=present, stamp=np.array(stamp))
    tmp.replace(cache)
    log.info("%s v%d: %d of %d items have a vector", source, row.version, int(present.sum()), len(item_ids))
    return ItemVectors(item_ids, vectors, present)
