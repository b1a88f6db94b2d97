"""The embedding-source registry: source names and the ``embedding_sources`` rows of their versions.

Sources (see ``docs/embeddings.md``):

- ``scl``, ``i2i``, ``openclip``: open_clip encoders trained on different pairs (kind ``trained``);
- ``id``: learned item-ID embeddings, the no-multimodal baseline (kind ``id``);
- ``scl-taobao``: vectors shipped with a dataset in ``embeddings/scl-taobao.parquet`` (kind ``imported``).

Each training creates a new version (a row in ``embedding_sources``) with its checkpoint under
``settings.path("embeddings", name, f"v{version}")`` (:func:`source_dir`); older versions stay usable.

Version numbers of a trained source (and ``id``) count over the whole database: one model serves
every dataset. An imported source's vectors belong to one dataset, so its versions are numbered per
dataset: ``scl-taobao`` v1 of dataset ``a`` and v1 of dataset ``b`` are two rows, and every lookup of an
imported version (:func:`get_version`, :func:`list_versions`, :func:`next_version`) names the dataset.
(Rows registered before migration 0005 keep the global numbers they were given: their Milvus
collections carry them.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from muse import models
from muse.db import session_scope
from muse.errors import ConfigurationError, NotFoundError
from muse.settings import Settings

log = logging.getLogger(__name__)

TRAINED_SOURCES = ("scl", "i2i", "openclip")
ID_SOURCE = "id"
IMPORTED_SOURCES = ("scl-taobao",)
SOURCES = TRAINED_SOURCES + (ID_SOURCE,) + IMPORTED_SOURCES


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


def next_version(settings: Settings, name: str, dataset: str | None = None) -> int:
    """The version number the next registration of ``name`` will get (1 for the first): over every
    dataset for a trained source, over ``dataset``'s versions for an imported one.

    Raises:
        ConfigurationError: an imported source without a dataset.
    """
    if name in IMPORTED_SOURCES:
        if dataset is None:
            raise ConfigurationError(f"the versions of imported source {name!r} are numbered per dataset: "
                                     "name the dataset")
        return max((v.version for v in list_versions(settings, name, dataset=dataset)), default=0) + 1
    with session_scope(settings) as s:
        current = s.scalar(select(func.max(models.EmbeddingSource.version)).where(models.EmbeddingSource.name == name))
    return int(current or 0) + 1


def dataset_row_id(settings: Settings, dataset_name: str) -> int | None:
    """Id of the ``datasets`` row of ``dataset_name`` (None when it is not registered)."""
    with session_scope(settings) as s:
        return s.scalar(select(models.Dataset.id).where(models.Dataset.name == dataset_name))


def dataset_names(settings: Settings) -> dict[int, str]:
    """``datasets`` row id -> name."""
    with session_scope(settings) as s:
        return dict(s.execute(select(models.Dataset.id, models.Dataset.name)).all())


def _belongs_to(row: SourceVersion, dataset_id: int | None, dataset: str) -> bool:
    """Whether an imported version ``row`` is ``dataset``'s: by the dataset row, or by the dataset
    name it was registered with (kept in its config, so that it survives the dataset row)."""
    return (dataset_id is not None and row.dataset_id == dataset_id) or row.config.get("dataset") == dataset


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


def list_versions(settings: Settings, name: str | None = None, dataset: str | None = None) -> list[SourceVersion]:
    """Every registered version (of one source when ``name`` is given), by name then version (then
    row). ``dataset``: only the imported versions of that dataset (trained versions are kept: they
    serve every dataset)."""
    with session_scope(settings) as s:
        q = select(models.EmbeddingSource).order_by(models.EmbeddingSource.name, models.EmbeddingSource.version,
                                                    models.EmbeddingSource.id)
        if name is not None:
            q = q.where(models.EmbeddingSource.name == name)
        rows = [SourceVersion.from_row(r) for r in s.scalars(q)]
        dataset_id = None if dataset is None else s.scalar(select(models.Dataset.id).where(models.Dataset.name == dataset))
    if dataset is None:
        return rows
    return [v for v in rows if v.name not in IMPORTED_SOURCES or _belongs_to(v, dataset_id, dataset)]


def get_version(settings: Settings, name: str, version: int | None = None, dataset: str | None = None) -> SourceVersion:
    """One version of a source (the latest when ``version`` is None). An imported source's versions
    are the ``dataset``'s (see the module docstring); without a dataset its version must be unique.

    Raises:
        NotFoundError: the source has no such version (the message says how to create one).
        ConfigurationError: an imported source's version that several datasets have, and no dataset.
    """
    check_source(name)
    versions = list_versions(settings, name, dataset=dataset)
    where = f" for dataset {dataset!r}" if dataset is not None and name in IMPORTED_SOURCES else ""
    if not versions:
        hint = (
            "it is imported on first use from a dataset that ships its vectors (`muse data taobao-mm` writes embeddings/scl-taobao/)"
            if name in IMPORTED_SOURCES
            else f"train one with `muse embed train --source {name} --dataset NAME`"
        )
        raise NotFoundError(f"embedding source {name!r} has no version{where} yet; {hint}")
    if name in IMPORTED_SOURCES and dataset is None and (version is not None or len(versions) > 1):
        matching = [v for v in versions if version is None or v.version == version]
        if len({v.dataset_id for v in matching}) > 1:
            raise ConfigurationError(
                f"imported source {name!r} has versions for several datasets (numbered per dataset): "
                "name the dataset"
            )
    if version is None:
        return versions[-1]
    for v in reversed(versions):
        if v.version == version:
            return v
    raise NotFoundError(
        f"embedding source {name!r} has no version {version}{where}; available: {[v.version for v in versions]}"
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
