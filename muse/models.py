"""Metadata models (SQLAlchemy 2.x): datasets, items, users, embedding sources, backfill jobs and
their chunks, source versions and the live one per (dataset, source), ranker runs.

Behaviour sequences are too large for relational rows; they live in parquet shards and Milvus.
The naming convention gives every constraint a stable name so Alembic migrations stay reproducible.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Dataset(Base):
    """A dataset in the project's format (see ``muse.data.format``)."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(32))  # "taobao-mm" | "simworld"
    location: Mapped[str] = mapped_column(Text)  # folder holding the shards
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Item(Base):
    """An item of a dataset. Ids are the dataset's own (anonymised int64 on Taobao-MM)."""

    __tablename__ = "items"

    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    item_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    category: Mapped[int] = mapped_column(BigInteger)
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    title: Mapped[str | None] = mapped_column(Text)
    image_location: Mapped[str | None] = mapped_column(Text)  # "shard.parquet#row" or a path


class User(Base):
    """A user of a dataset with its profile features."""

    __tablename__ = "users"

    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    features: Mapped[dict[str, Any]] = mapped_column(default=dict)


class EmbeddingSource(Base):
    """One version of an embedding source (``scl``, ``i2i``, ``openclip``, ``id``, ``scl-taobao``).

    A trained source's versions are numbered over the whole database; an imported source's per
    dataset (``dataset_id``; migration 0005), hence the key (name, dataset, version).
    """

    __tablename__ = "embedding_sources"
    __table_args__ = (UniqueConstraint("name", "dataset_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))  # "trained" | "imported" | "id"
    dim: Mapped[int] = mapped_column(Integer)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    checkpoint_path: Mapped[str | None] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BackfillJob(Base):
    """A backfill of one source's vectors for one dataset into Milvus."""

    __tablename__ = "backfill_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("embedding_sources.id", ondelete="CASCADE"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(
        String(16), default="pending"
    )  # pending|running|done|failed|cancelled
    chunk_size: Mapped[int] = mapped_column(Integer)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # The backend the job waits for (e.g. "Milvus at http://milvus:19530") and since when: set by
    # the first chunk that finds it down, cleared when a chunk finishes (migration 0006).
    waiting_for: Mapped[str | None] = mapped_column(String(255))
    waiting_since: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    chunks: Mapped[list[BackfillChunk]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="BackfillChunk.id"
    )


class BackfillChunk(Base):
    """One unit of backfill work: a range of items to encode or of users whose behaviours to copy."""

    __tablename__ = "backfill_chunks"
    __table_args__ = (UniqueConstraint("job_id", "kind", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("backfill_jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "items" | "behaviours" | "import"
    index: Mapped[int] = mapped_column(Integer)
    start: Mapped[int] = mapped_column(BigInteger)  # first row (inclusive) in the dataset's order
    stop: Mapped[int] = mapped_column(BigInteger)  # last row (exclusive)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|queued|running|done|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    n_written: Mapped[int] = mapped_column(BigInteger, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    failed_items: Mapped[list[Any]] = mapped_column(default=list)  # [[item_id, reason], ...]
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    duration_s: Mapped[float | None] = mapped_column(Float)
    # The worker process ("host:pid") holding the chunk and until when: it renews the lease while
    # the chunk runs; an expired lease on a running chunk means its worker died (migration 0004).
    worker: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    queued_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Set while the chunk's worker waits, holding the lease, for a backend that is down
    # ("Milvus at ...") or for a retry of its own failure ("retry"); migration 0006.
    waiting_for: Mapped[str | None] = mapped_column(String(255))
    waiting_since: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    job: Mapped[BackfillJob] = relationship(back_populates="chunks")


class SourceVersionRecord(Base):
    """One version of an embedding source's collections for one dataset (``muse source list``).

    Written when a backfill of the version finishes, when a version is promoted and when legacy
    collections are adopted; the collections themselves live in Milvus.
    """

    __tablename__ = "source_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "source_name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    source_name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("backfill_jobs.id", ondelete="SET NULL"))
    items_collection: Mapped[str] = mapped_column(String(255))
    behaviours_collection: Mapped[str] = mapped_column(String(255))
    adopted_from: Mapped[str | None] = mapped_column(Text)  # legacy collection names, when adopted
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    promoted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))  # last time it became live


class LiveVersion(Base):
    """The live version of one (dataset, source), mirrored by the Milvus aliases, and the versions
    that were live before it (newest last), which ``muse source rollback`` returns to."""

    __tablename__ = "live_versions"

    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    source_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    previous: Mapped[list[Any]] = mapped_column(default=list)
    promoted_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RankerRun(Base):
    """One training run of a CTR model, with its evaluation metrics and checkpoint."""

    __tablename__ = "ranker_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(32))  # din | sim-hard | sim-soft | twin | muse
    esu: Mapped[str | None] = mapped_column(String(32))  # ESU variant for muse
    source_id: Mapped[int | None] = mapped_column(ForeignKey("embedding_sources.id", ondelete="SET NULL"))
    source_name: Mapped[str | None] = mapped_column(String(64))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    seed: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|done|failed
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    checkpoint_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Comparison(Base):
    """A stored source x model comparison (``muse compare``): what was asked and the aggregated result."""

    __tablename__ = "comparisons"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)  # models, sources, esus, seeds, train config
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)  # cells with mean/std per metric, intrinsic metrics
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ComparisonRun(Base):
    """A ranker run that a comparison used (trained for it, or reused)."""

    __tablename__ = "comparison_runs"

    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id", ondelete="CASCADE"), primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("ranker_runs.id", ondelete="CASCADE"), primary_key=True)
    reused: Mapped[bool] = mapped_column(Boolean, default=False)
