"""The work of one backfill chunk, as plain functions (the Celery tasks only call these).

Three kinds of chunk, each a row range in the dataset's canonical order:

* ``items``: encode the images of items ``[start, stop)`` with the job's source and upsert the
  vectors into the item collection of (dataset, source, source version). An unreadable (or missing) image fails that item only;
  it is recorded with its reason and the rest of the chunk is written.
* ``import``: upsert precomputed vectors, rows ``[start, stop)`` of ``embeddings/<source>.parquet``.
* ``behaviours``: for users ``[start, stop)`` copy each history entry's item vector into the
  behaviour collection (primary key = ``behaviour_pk(user, position)``); entries whose item has
  no vector are skipped and counted in ``n_failed``, but only items the job's item stage did not
  write (not in the dataset's item table or shipped vectors, or a failed item): an item the job
  wrote that Milvus does not return (a server recovering from a restart) fails the run with
  :class:`RowsMissing`, retried, never a silent skip. After writing, the chunk reads back how many
  rows its users have and fails the same way when fewer than written are there
  (:func:`check_behaviours_visible`). In a bulk job (``options["bulk"]``) the same rows go through
  a Milvus bulk import instead (:mod:`indexer.bulk`).

Every write is an upsert with a deterministic primary key, so re-running a chunk (a retry, a
redelivery after a worker died, a ``resume``) never duplicates rows. Each function records its
chunk row: status, attempts, ``n_written``, failed items with reasons, timings.

What a worker keeps between chunks (the encoder, loaded once per process after the fork, the
Milvus clients, the datasets with their image index and item table) lives in the process's
:class:`indexer.worker_context.WorkerContext`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import and_, func, or_, select, update

from indexer.worker_context import current
from muse import models
from muse.arrays import lookup, lookup_sorted
from muse.db import session_scope
from muse.errors import BackendUnavailable, DataError, NotFoundError
from muse.models import utcnow
from muse.settings import Settings

log = logging.getLogger(__name__)

#: Chunk kinds.
ITEMS, IMPORT, BEHAVIOURS = "items", "import", "behaviours"
CHUNK_KINDS = (ITEMS, IMPORT, BEHAVIOURS)
#: Chunk statuses; the last two are terminal.
PENDING, QUEUED, RUNNING, DONE, FAILED = "pending", "queued", "running", "done", "failed"
#: Users read from the history shards per batch inside a behaviour chunk.
HISTORY_BATCH = 256
#: Behaviour rows per upsert call inside a behaviour chunk.
BEHAVIOUR_UPSERT_ROWS = 8192
#: Items encoded per encoder call inside an items chunk (bounds memory for large chunks).
ENCODE_BATCH = 256
#: Longest reason text kept per failed item.
MAX_REASON_CHARS = 300


class RowsMissing(BackendUnavailable):
    """Milvus answered without rows this job wrote: item vectors a behaviour chunk needs, or the
    chunk's own behaviour rows read back after writing them (e.g. a server that restarted and has
    not recovered everything yet, or lost an acknowledged write). Retriable: the chunk runs again
    (its writes are idempotent) instead of being recorded ``done`` short of rows."""


@dataclass(frozen=True)
class ChunkSpec:
    """What a worker needs to run one chunk (read from the database)."""

    chunk_id: int
    job_id: int
    kind: str
    start: int
    stop: int
    source: str
    source_version: int
    source_kind: str
    dim: int
    dataset_location: str
    dataset: str  # dataset name (collections are per dataset)
    bulk: bool = False  # the job writes behaviours through Milvus bulk import (indexer.bulk)
    attempt: int = 1  # this run's number among the chunk's claims (1 = the first)

    @property
    def ref(self) -> Any:
        """The :class:`muse.vectorstore.CollectionRef` this chunk writes: (dataset, source, source version)."""
        from muse.vectorstore import CollectionRef

        return CollectionRef(self.dataset, self.source, self.source_version)


@dataclass
class ChunkResult:
    """Outcome of one chunk run."""

    n_written: int = 0
    n_failed: int = 0
    failed_items: list[list[Any]] = field(default_factory=list)  # [[item_id, reason], ...]
    duration_s: float = 0.0


# -- process state (indexer.worker_context) --------------------------------------------------------
def get_encoder(settings: Settings, source: str, version: int | None = None) -> Any:
    """The source's encoder, loaded once per process (``indexer.encode.load_encoder``)."""
    from indexer.encode import load_encoder

    return load_encoder(settings, source, version)


def get_store(settings: Settings) -> Any:
    """A :class:`muse.vectorstore.VectorStore` per (Milvus URI, prefix), kept for the process."""
    return current().store(settings)


def close_stores() -> None:
    """Close the process's Milvus clients (a Milvus Lite file is released only when closed)."""
    current().close_stores()


def _ensure_collections(settings: Settings, ref: Any, dim: int) -> Any:
    return current().ensure_collections(settings, ref, dim)


def forget_collections(settings: Settings) -> None:
    """Forget which collections this process created or loaded (they were dropped under it)."""
    current().forget_collections()


# -- chunk bookkeeping ------------------------------------------------------------------------------
def worker_id() -> str:
    """This process as a chunk's lease holder: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def lease_live(chunk: models.BackfillChunk, now: dt.datetime | None = None) -> bool:
    """True while the chunk's lease has not expired (its worker renews it while running it)."""
    if chunk.lease_expires_at is None:
        return False
    expires = chunk.lease_expires_at
    expires = expires if expires.tzinfo is not None else expires.replace(tzinfo=dt.timezone.utc)
    return expires > (now or utcnow())


def _lease_until(settings: Settings, extra_s: float = 0.0) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=settings.backfill_lease_s + extra_s)


def begin_chunk(
    settings: Settings, chunk_id: int, worker: str | None = None, count_attempt: bool = True
) -> ChunkSpec | None:
    """Claim a chunk for this worker (status running, attempts + 1, a lease of
    ``settings.backfill_lease_s``) and return what is needed to run it.

    ``count_attempt=False`` claims it without adding an attempt: the run that follows a wait for a
    backend that was down (an outage is not the chunk's failure, :mod:`indexer.outages`).

    Returns None when there is nothing to do: the chunk is already done (a duplicate delivery),
    another live worker holds its lease, its job was cancelled, or it is a behaviour chunk whose
    item chunks are not finished (it goes back to ``pending``) or failed (it is marked failed:
    its vectors would be missing).

    Raises:
        NotFoundError: no chunk with this id.
    """
    worker = worker or worker_id()
    with session_scope(settings) as session:
        chunk = session.get(models.BackfillChunk, int(chunk_id))
        if chunk is None:
            raise NotFoundError(f"backfill chunk {chunk_id} does not exist")
        job = chunk.job
        if chunk.status == DONE:
            log.info("chunk %d of job %d is already done; skipping", chunk.id, job.id)
            return None
        if job.status in ("cancelled", "failed"):  # failed: e.g. a backend was down past the outage budget
            log.info("job %d is %s; skipping chunk %d (`muse backfill resume %d` continues it)", job.id, job.status,
                     chunk.id, job.id)
            return None
        if chunk.status in (RUNNING, QUEUED) and chunk.worker not in (None, worker) and lease_live(chunk):
            log.info("chunk %d is held by %s (lease live); skipping this delivery", chunk.id, chunk.worker)
            return None
        if chunk.kind == BEHAVIOURS:
            items = [c for c in job.chunks if c.kind != BEHAVIOURS]
            failed = [c for c in items if c.status == FAILED]
            if failed:
                chunk.status = FAILED
                chunk.error = (f"not run: {len(failed)} item chunk(s) failed, so item vectors are missing "
                               f"(first: {failed[0].kind}#{failed[0].index}: {failed[0].error})")[:2000]
                chunk.finished_at = utcnow()
                chunk.worker = chunk.lease_expires_at = None
                log.warning("job %d: behaviour chunk %d not run: item chunks failed", job.id, chunk.id)
                return None
            if any(c.status != DONE for c in items):
                chunk.status = PENDING
                chunk.worker = chunk.lease_expires_at = None
                log.info("job %d: behaviour chunk %d waits for its item chunks", job.id, chunk.id)
                return None
        source = session.get(models.EmbeddingSource, job.source_id)
        dataset = session.get(models.Dataset, job.dataset_id)
        if source is None or dataset is None:
            raise NotFoundError(f"job {job.id}: its embedding source or dataset row was deleted")
        # The claim: only if nobody else took a live lease since we read the row.
        now = utcnow()
        claim = session.execute(
            update(models.BackfillChunk)
            .where(
                models.BackfillChunk.id == chunk.id,
                models.BackfillChunk.status != DONE,
                or_(
                    models.BackfillChunk.worker.is_(None),
                    models.BackfillChunk.worker == worker,
                    models.BackfillChunk.lease_expires_at.is_(None),
                    models.BackfillChunk.lease_expires_at <= now,
                    models.BackfillChunk.status.notin_((RUNNING, QUEUED)),
                ),
            )
            .values(
                status=RUNNING, attempts=models.BackfillChunk.attempts + (1 if count_attempt else 0),
                started_at=now, error=None, worker=worker, lease_expires_at=_lease_until(settings),
            )
            .execution_options(synchronize_session=False)
        )
        if claim.rowcount != 1:
            log.info("chunk %d was claimed by another worker; skipping this delivery", chunk.id)
            return None
        attempt = int(chunk.attempts or 0) + 1  # the claim above incremented it in the database
        if job.status == "pending":
            job.status = "running"
            job.started_at = job.started_at or utcnow()
        return ChunkSpec(
            chunk_id=chunk.id,
            job_id=job.id,
            kind=chunk.kind,
            start=int(chunk.start),
            stop=int(chunk.stop),
            source=source.name,
            source_version=int(source.version),
            source_kind=source.kind,
            dim=int(source.dim),
            dataset_location=dataset.location,
            dataset=dataset.name,
            bulk=bool((job.options or {}).get("bulk")),
            attempt=attempt,
        )


def finish_chunk(settings: Settings, chunk_id: int, result: ChunkResult) -> None:
    """Record a chunk as done with its counts, failed items and duration; the job no longer waits
    for a backend (a chunk got through)."""
    with session_scope(settings) as session:
        session.execute(
            update(models.BackfillChunk)
            .where(models.BackfillChunk.id == int(chunk_id))
            .values(
                status=DONE,
                n_written=int(result.n_written),
                n_failed=int(result.n_failed),
                failed_items=result.failed_items,
                error=None,
                finished_at=utcnow(),
                duration_s=float(result.duration_s),
                lease_expires_at=None,
                waiting_for=None,
                waiting_since=None,
            )
        )
        job_id = select(models.BackfillChunk.job_id).where(models.BackfillChunk.id == int(chunk_id)).scalar_subquery()
        session.execute(
            update(models.BackfillJob)
            .where(models.BackfillJob.id == job_id, models.BackfillJob.waiting_since.is_not(None))
            .values(waiting_for=None, waiting_since=None)
        )


def mark_chunk(
    settings: Settings, chunk_id: int, status: str, error: str | None = None, hold_s: float | None = None
) -> None:
    """Set a chunk's status (``queued`` before a retry, ``failed`` when retries are exhausted).

    ``hold_s``: for a retry, this worker keeps the chunk's lease that much longer than the retry's
    countdown, so neither ``resume`` nor recovery sends the chunk again meanwhile.
    """
    values: dict[str, Any] = {"status": status, "error": error[:2000] if error else error}
    if status == FAILED:
        values["finished_at"] = utcnow()
        values["lease_expires_at"] = None
        values["waiting_for"] = values["waiting_since"] = None
    elif hold_s is not None:
        values["lease_expires_at"] = _lease_until(settings, hold_s)  # held for the retry message
        values["worker"] = None  # whichever worker takes the retry message may claim it
        values["queued_at"] = utcnow()
    with session_scope(settings) as session:
        session.execute(
            update(models.BackfillChunk)
            .where(models.BackfillChunk.id == int(chunk_id), models.BackfillChunk.status != DONE)
            .values(**values)
        )


def renew_lease(settings: Settings, chunk_id: int, worker: str | None = None) -> bool:
    """Extend this worker's lease on a running chunk; False when the chunk is no longer ours."""
    with session_scope(settings) as session:
        res = session.execute(
            update(models.BackfillChunk)
            .where(
                models.BackfillChunk.id == int(chunk_id),
                models.BackfillChunk.status == RUNNING,
                models.BackfillChunk.worker == (worker or worker_id()),
            )
            .values(lease_expires_at=_lease_until(settings))
        )
        return res.rowcount == 1


class LeaseKeeper:
    """Renews a chunk's lease every third of ``settings.backfill_lease_s`` while the chunk runs
    (a thread; a failed renewal, e.g. while the database is down, is logged and tried again)."""

    def __init__(self, settings: Settings, chunk_id: int) -> None:
        self.settings, self.chunk_id, self.worker = settings, int(chunk_id), worker_id()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{chunk_id}", daemon=True)

    def _run(self) -> None:
        period = max(0.2, self.settings.backfill_lease_s / 3)
        while True:  # renewed at once (a keeper taking over from another leaves no gap), then every period
            try:
                if not renew_lease(self.settings, self.chunk_id, self.worker):
                    return
            except Exception as e:  # the database may be down; the lease then lapses, as it should
                log.warning("cannot renew the lease of chunk %d: %s", self.chunk_id, e)
            if self._stop.wait(period):
                return

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def expired_leases(settings: Settings, job_id: int | None = None) -> list[tuple[int, int, str, str | None]]:
    """Chunks ``running`` (or held for a retry) whose lease expired: ``(chunk_id, job_id, kind, worker)``."""
    now = utcnow()
    with session_scope(settings) as session:
        q = (
            select(models.BackfillChunk.id, models.BackfillChunk.job_id, models.BackfillChunk.kind,
                   models.BackfillChunk.worker)
            .join(models.BackfillJob, models.BackfillJob.id == models.BackfillChunk.job_id)
            .where(
                models.BackfillJob.status == "running",
                or_(
                    and_(models.BackfillChunk.status == RUNNING,
                         or_(models.BackfillChunk.lease_expires_at.is_(None),
                             models.BackfillChunk.lease_expires_at <= now)),
                    and_(models.BackfillChunk.status == QUEUED, models.BackfillChunk.lease_expires_at <= now),
                ),
            )
        )
        if job_id is not None:
            q = q.where(models.BackfillChunk.job_id == int(job_id))
        return [tuple(r) for r in session.execute(q).all()]


# -- the work ------------------------------------------------------------------------------------
def run_chunk(settings: Settings, chunk_id: int, count_attempt: bool = True) -> ChunkResult | None:
    """Run one chunk end to end: begin, do the work of its kind, record the result.

    Returns the result, or None when the chunk was skipped (already done, job cancelled).
    Exceptions propagate (the caller decides on waits and retries: :mod:`indexer.outages`) and
    leave the chunk ``running`` (``count_attempt``: see :func:`begin_chunk`).
    """
    from muse.vectorstore import CollectionNotFound

    spec = begin_chunk(settings, chunk_id, count_attempt=count_attempt)
    if spec is None:
        return None
    t0 = time.perf_counter()
    work = {ITEMS: encode_items_chunk, IMPORT: import_vectors_chunk, BEHAVIOURS: copy_behaviours_chunk}.get(spec.kind)
    if spec.kind == BEHAVIOURS and spec.bulk:
        from indexer.bulk import import_behaviours_chunk

        work = import_behaviours_chunk
    if work is None:
        raise DataError(f"chunk {chunk_id} has unknown kind {spec.kind!r}; valid: {', '.join(CHUNK_KINDS)}")
    with LeaseKeeper(settings, chunk_id):
        try:
            result = work(settings, spec)
        except CollectionNotFound as e:
            # Dropped under this long-lived worker: forget the cached state, create them again, and
            # run the chunk once more (its upserts are idempotent).
            log.warning("chunk %d: %s; re-creating the collections and running it again", chunk_id, e)
            forget_collections(settings)
            result = work(settings, spec)
    result.duration_s = time.perf_counter() - t0
    finish_chunk(settings, chunk_id, result)
    log.info(
        "job %d chunk %d (%s %d:%d): %d written, %d failed in %.2fs",
        spec.job_id, spec.chunk_id, spec.kind, spec.start, spec.stop,
        result.n_written, result.n_failed, result.duration_s,
    )
    return result


def encode_items_chunk(settings: Settings, spec: ChunkSpec) -> ChunkResult:
    """Encode items ``[spec.start, spec.stop)`` with the job's source and upsert their vectors.

    Trained sources encode the item images with the encoder cached in this process; lookup
    sources (``id``) go through ``indexer.encode.encode_items``. Items without an image, or whose
    image cannot be decoded, or without a vector, are reported in ``failed_items`` with the reason.
    """
    context = current()
    ids_all, cats_all = context.item_table(spec.dataset_location)
    ids = ids_all[spec.start : spec.stop]  # int64[n]
    cats = cats_all[spec.start : spec.stop]  # int64[n]
    dataset = context.dataset(spec.dataset_location)
    result = ChunkResult()
    if spec.source_kind == "trained":
        encoder = get_encoder(settings, spec.source, spec.source_version)
        store = _ensure_collections(settings, spec.ref, int(encoder.dim))
        images = dataset.load_images(ids)  # the Dataset's image index, built once per process
        encode = encoder.encode_images
        inputs: Any = None
    else:
        from indexer.encode import encode_items

        store = _ensure_collections(settings, spec.ref, spec.dim)

        def encode(batch_ids: Any) -> Any:
            return encode_items(settings, spec.source, dataset, batch_ids)

    for lo in range(0, len(ids), ENCODE_BATCH):
        batch_ids, batch_cats = ids[lo : lo + ENCODE_BATCH], cats[lo : lo + ENCODE_BATCH]
        if spec.source_kind == "trained":
            inputs = [images.get(int(i)) for i in batch_ids.tolist()]
        else:
            inputs = batch_ids
        encoded = encode(inputs)
        for local, reason in sorted(encoded.failed.items()):
            result.failed_items.append([int(batch_ids[local]), str(reason)[:MAX_REASON_CHARS]])
        ok = np.asarray(encoded.ok_index, dtype=np.int64)  # [n_ok] positions within the batch
        if len(ok):
            vectors = np.asarray(encoded.vectors, dtype=np.float32)  # [n_ok, d]
            result.n_written += store.upsert_items(spec.ref, batch_ids[ok], vectors, batch_cats[ok])
    result.n_failed = len(result.failed_items)
    return result


def import_vectors_chunk(settings: Settings, spec: ChunkSpec) -> ChunkResult:
    """Upsert rows ``[spec.start, spec.stop)`` of the vectors the dataset ships for the source:
    ``embeddings/<source>/`` (memory-mapped, in its storage dtype, e.g. Taobao-MM's int8 SCL,
    de-quantised here) or an older ``embeddings/<source>.parquet`` (only the overlapping row groups
    are read).

    Items not in the dataset's item table get category -1.
    """
    ids, vectors = shipped_rows(spec.dataset_location, spec.source, spec.start, spec.stop)
    if len(ids) and vectors.shape[1] != spec.dim:
        raise DataError(f"the {spec.source} vectors of {spec.dataset_location} are {vectors.shape[1]}-d, "
                        f"the source version is {spec.dim}-d")
    cats = categories_of(spec.dataset_location, ids)  # int64[n]
    store = _ensure_collections(settings, spec.ref, spec.dim)
    written = store.upsert_items(spec.ref, ids, vectors, cats) if len(ids) else 0
    return ChunkResult(n_written=written)


def shipped_rows(location: str, source: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of the vectors shipped for ``source`` with the dataset at ``location``:
    ``(item ids int64 [n], vectors float32 [n, d])``.

    Raises:
        NotFoundError: the dataset ships no vectors for ``source``.
        DataError: a parquet file whose vectors have unequal lengths.
    """
    dataset = current().dataset(location)
    path = dataset.embeddings_path(source)
    if path is None:
        raise NotFoundError(f"source {source!r} has no precomputed vectors in {location}/embeddings/")
    if path.is_dir():
        shipped = dataset.embeddings(source)
        ids = np.asarray(shipped.item_ids[start:stop], dtype=np.int64)
        return ids, shipped.float_rows(slice(start, stop))
    table = _read_rows(path, start, stop)
    ids = table.column("item_id").to_numpy().astype(np.int64)  # [n]
    flat = pc.list_flatten(table.column("vector")).to_numpy().astype(np.float32)
    if len(ids) and flat.size % len(ids):
        raise DataError(f"{path}: rows {start}:{stop} are not vectors of one length")
    return ids, flat.reshape(len(ids), -1) if len(ids) else np.zeros((0, 0), np.float32)


def categories_of(location: str, item_ids: np.ndarray) -> np.ndarray:
    """Categories of ``item_ids`` from the dataset's item table; -1 for ids it does not hold."""
    ids_all, cats_all = current().item_table(location)
    rows = lookup(ids_all, item_ids)  # [n], -1 = not in the item table
    return np.where(rows >= 0, cats_all[np.maximum(rows, 0)] if len(cats_all) else -1, -1).astype(np.int64)


def _read_rows(path: Path, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
    """Rows ``[start, stop)`` of a parquet file (``columns`` of it, or all), reading only the row
    groups that overlap."""
    pf = pq.ParquetFile(path)
    parts, offset = [], 0
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            parts.append(pf.read_row_group(rg, columns=columns).slice(lo - offset, hi - lo))
        offset += n
        if offset >= stop:
            break
    if parts:
        return pa.concat_tables(parts)
    schema = pf.schema_arrow
    return (schema if columns is None else pa.schema([schema.field(c) for c in columns])).empty_table()


def history_entries(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every entry of a batch of histories (``user_id``, ``item_ids`` list): ``(user ids, positions in
    the user's history, item ids)``, int64 ``[m]`` each."""
    lists = batch.column("item_ids")
    items = pc.list_flatten(lists).to_numpy().astype(np.int64)  # [m] all entries of the batch
    if len(items) == 0:
        return items, items, items
    parents = pc.list_parent_indices(lists).to_numpy()  # [m] row of each entry
    offsets = lists.offsets.to_numpy()[:-1] - lists.offsets[0].as_py()  # [rows] first entry of each row
    positions = np.arange(len(items), dtype=np.int64) - offsets[parents]  # [m] index within the history
    users = batch.column("user_id").to_numpy().astype(np.int64)[parents]  # [m]
    return users, positions, items


def copy_behaviours_chunk(settings: Settings, spec: ChunkSpec) -> ChunkResult:
    """Copy item vectors into the behaviour collection for users ``[spec.start, spec.stop)``.

    Raises:
        RowsMissing: Milvus did not return the vector of an item the job wrote, or fewer of the
        chunk's rows are visible after writing than were written (the chunk is retried).
    """
    dataset = current().dataset(spec.dataset_location)
    store = _ensure_collections(settings, spec.ref, spec.dim)
    result = ChunkResult()
    buffer: list[tuple[np.ndarray, ...]] = []
    buffered = 0
    chunk_users: list[np.ndarray] = []
    batches = dataset.iter_histories(HISTORY_BATCH, spec.start, spec.stop, columns=["user_id", "item_ids"])
    for batch in batches:
        users, positions, items = history_entries(batch)
        if len(items) == 0:
            continue
        unique = np.unique(items)
        found, vectors = store.get_item_vectors(spec.ref, unique)  # int64[k], float32[k, d]
        rows = lookup(found, items) if len(found) else np.full(len(items), -1, np.int64)  # [m] -1 = none
        has = rows >= 0  # [m] entry's item has a vector
        if not has.all():
            check_missing_items(settings, spec, np.unique(items[~has]))
        result.n_failed += int((~has).sum())
        if not has.any():
            continue
        chunk_users.append(np.unique(users[has]))
        buffer.append((users[has], positions[has], items[has], vectors[rows[has]]))
        buffered += int(has.sum())
        if buffered >= BEHAVIOUR_UPSERT_ROWS:
            result.n_written += _flush_behaviours(store, spec.ref, buffer)
            buffer, buffered = [], 0
    result.n_written += _flush_behaviours(store, spec.ref, buffer)
    if chunk_users:
        check_behaviours_visible(store, spec, np.unique(np.concatenate(chunk_users)), result.n_written)
    return result


def check_missing_items(settings: Settings, spec: ChunkSpec, missing: np.ndarray) -> None:
    """Raise :class:`RowsMissing` when any of ``missing`` (items of the chunk's history entries that
    the item collection did not return) was written by the job's item stage: an item in the
    dataset's item table (``items`` chunks) that no item chunk reported as failed, or an item of
    the shipped vectors (``import`` chunks). Entries of other items are rightly skipped."""
    written = _written_among(settings, spec, np.asarray(missing, np.int64))
    if len(written):
        shown = ", ".join(str(int(i)) for i in written[:10])
        raise RowsMissing(
            f"Milvus at {settings.milvus_uri!r} returned no vector for {len(written)} item(s) that job "
            f"{spec.job_id} wrote (e.g. {shown}); the item collection is not complete yet (a server "
            "recovering from a restart?): the chunk runs again instead of skipping their behaviours"
        )


#: The items the last job asked about wrote, per process: ``(job_id, chunks fingerprint, sorted ids)``.
_written_cache: dict[str, Any] = {}
_written_lock = threading.Lock()


def _written_among(settings: Settings, spec: ChunkSpec, ids: np.ndarray) -> np.ndarray:
    """Those of ``ids`` the job's item stage wrote (see :func:`check_missing_items`)."""
    with session_scope(settings) as session:
        fingerprint = tuple(session.execute(
            select(func.count(), func.coalesce(func.sum(models.BackfillChunk.n_failed), 0))
            .where(models.BackfillChunk.job_id == spec.job_id, models.BackfillChunk.kind != BEHAVIOURS,
                   models.BackfillChunk.status == DONE)
        ).one())
    with _written_lock:
        cached = _written_cache.get("job")
        if cached is None or cached[:2] != (spec.job_id, fingerprint):
            cached = (spec.job_id, fingerprint, _written_items(settings, spec))
            _written_cache["job"] = cached  # one job at a time: a worker runs one chunk at a time
    written = cached[2]
    _, found = lookup_sorted(written, ids)
    return ids[found]


def _written_items(settings: Settings, spec: ChunkSpec) -> np.ndarray:
    """Sorted ids of the items the job's finished item chunks wrote: their rows of the item table
    (``items``) or of the shipped vectors (``import``), less the items they reported as failed."""
    with session_scope(settings) as session:
        chunks = session.execute(
            select(models.BackfillChunk.kind, models.BackfillChunk.start, models.BackfillChunk.stop,
                   models.BackfillChunk.n_failed, models.BackfillChunk.failed_items)
            .where(models.BackfillChunk.job_id == spec.job_id, models.BackfillChunk.kind != BEHAVIOURS,
                   models.BackfillChunk.status == DONE)
        ).all()
    parts, failed = [], []
    for kind, start, stop, n_failed, failed_items in chunks:
        if kind == ITEMS:
            parts.append(current().item_table(spec.dataset_location)[0][int(start) : int(stop)])
        else:
            parts.append(_shipped_ids(spec.dataset_location, spec.source, int(start), int(stop)))
        if n_failed:
            failed += [int(i) for i, *_ in (failed_items or [])]
    ids = np.unique(np.concatenate(parts).astype(np.int64)) if parts else np.zeros(0, np.int64)
    if failed:
        ids = ids[~np.isin(ids, np.asarray(failed, np.int64))]
    return ids


def _shipped_ids(location: str, source: str, start: int, stop: int) -> np.ndarray:
    """Item ids of rows ``[start, stop)`` of the vectors shipped for ``source`` (empty when none)."""
    dataset = current().dataset(location)
    path = dataset.embeddings_path(source)
    if path is None:
        return np.zeros(0, np.int64)
    if path.is_dir():
        return np.asarray(dataset.embeddings(source).item_ids[start:stop], dtype=np.int64)
    return _read_rows(path, start, stop, ["item_id"]).column("item_id").to_numpy().astype(np.int64)


def check_behaviours_visible(store: Any, spec: ChunkSpec, users: np.ndarray, written: int) -> None:
    """Read back how many behaviour rows ``users`` (the chunk's users that got rows) have, and raise
    :class:`RowsMissing` when fewer than the ``written`` distinct rows this run wrote are there (a
    write Milvus acknowledged but does not show: the chunk runs again rather than being recorded
    ``done``). More rows are fine: an earlier job may have written other positions of these users."""
    if written <= 0 or len(users) == 0:
        return
    found = store.count_behaviours_of(spec.ref, users)
    if found < written:
        raise RowsMissing(
            f"chunk {spec.chunk_id} (users {spec.start}:{spec.stop}) wrote {written} behaviour rows but Milvus at "
            f"{store.settings.milvus_uri!r} shows {found} for its {len(users)} users; writing the chunk again"
        )


def _flush_behaviours(store: Any, ref: Any, buffer: list[tuple[np.ndarray, ...]]) -> int:
    if not buffer:
        return 0
    users, positions, items, vectors = (np.concatenate(parts) for parts in zip(*buffer, strict=True))
    return int(store.upsert_behaviours(ref, users, positions, items, vectors))


# -- the job's closing check -----------------------------------------------------------------------
#: Users per count query of :func:`short_behaviour_chunks` (chunks are counted together up to this).
VERIFY_USERS = 2000


def short_behaviour_chunks(settings: Settings, job_id: int) -> list[tuple[int, int, int]]:
    """The job's ``done`` behaviour chunks whose users show fewer rows in Milvus than the chunk
    wrote: ``[(chunk_id, written, found), ...]`` (empty when every chunk's rows are there).

    Run when every chunk of a job is done, before the job is recorded ``done``: a write Milvus
    acknowledged and lost later (a server killed soon after), or rows deleted by a run of the same
    chunk that another worker finished meanwhile, would otherwise go unnoticed. Chunks are counted
    together (``count(*)`` per :data:`VERIFY_USERS` users) and one by one only where a group is short.

    Raises:
        BackendUnavailable: Milvus does not answer (the caller checks again later).
    """
    from muse.versions import job_ref

    with session_scope(settings) as session:
        job = session.get(models.BackfillJob, int(job_id))
        if job is None:
            raise NotFoundError(f"backfill job {job_id} does not exist")
        dataset = session.get(models.Dataset, job.dataset_id)
        chunks = sorted(
            ((c.id, int(c.start), int(c.stop), int(c.n_written)) for c in job.chunks
             if c.kind == BEHAVIOURS and c.status == DONE and c.n_written),
            key=lambda c: c[1],
        )
        location = dataset.location if dataset is not None else None
    if not chunks or location is None:
        return []
    ref = job_ref(settings, job_id)
    store = get_store(settings)
    dataset = current().dataset(location)

    def users_of(group: list[tuple[int, int, int, int]]) -> np.ndarray:
        """Distinct user ids of the group's chunks, read from the dataset chunk by chunk (a group
        holds at most about VERIFY_USERS users: nothing here grows with the data set)."""
        lo, hi = group[0][1], max(c[2] for c in group)
        contiguous = sum(c[2] - c[1] for c in group) == hi - lo  # chunks cover lo..hi: one read
        ranges = [(lo, hi)] if contiguous else [(start, stop) for _, start, stop, _ in group]
        parts = [b.column("user_id").to_numpy().astype(np.int64)
                 for start, stop in ranges
                 for b in dataset.iter_histories(65_536, start, stop, columns=["user_id"])]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    short: list[tuple[int, int, int]] = []
    group: list[tuple[int, int, int, int]] = []
    n_users = 0

    def check(group: list[tuple[int, int, int, int]]) -> None:
        written = sum(c[3] for c in group)
        found = store.count_behaviours_of(ref, users_of(group))
        if found >= written:
            return
        if len(group) == 1:
            short.append((group[0][0], written, found))
            return
        for c in group:
            check([c])

    for chunk in chunks:
        if group and n_users + (chunk[2] - chunk[1]) > VERIFY_USERS:
            check(group)
            group, n_users = [], 0
        group.append(chunk)
        n_users += chunk[2] - chunk[1]
    if group:
        check(group)
    return short
