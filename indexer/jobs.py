"""Backfill jobs: create a job and its chunk rows, enqueue chunks, follow progress, resume, cancel.

A job backfills one embedding source for one dataset. Its chunks are row ranges: ``items`` (or
``import`` for a source shipped with the data) over the dataset's items, then ``behaviours`` over
its users. Behaviour chunks read the item vectors back from Milvus, so they are enqueued only once
every item chunk has finished (:func:`advance_job`, called after each chunk). Enqueueing is
claimed with a conditional ``UPDATE ... WHERE status = 'pending'``, so two workers finishing the
last item chunks at once never enqueue a behaviour chunk twice.

Job statuses: ``pending`` -> ``running`` -> ``done`` | ``failed`` (a chunk exhausted its retries)
| ``cancelled``. Re-running or resuming a ``done`` job is a no-op.

A running chunk carries a lease (``worker``, ``lease_expires_at``) that its worker renews, also
while it waits for a backend that is down or for a retry of its own failure
(:mod:`indexer.outages`; the chunk's ``waiting_for``/``waiting_since`` say what for, the job's what
the job waits for). :func:`recover_jobs` (run by every worker's watchdog and by the foreground
``muse backfill``) re-sends chunks whose lease expired and queued chunks whose message was lost,
and finishes the bookkeeping a failed step left undone; ``resume`` never re-sends a chunk whose
lease is live. A broker outage seen by a worker's watchdog is recorded on the running jobs
(:func:`note_outage`), which fail past ``MUSE_BACKFILL_OUTAGE_S`` (:func:`fail_outlasted`).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func, select, update

from indexer.backfill import (
    BEHAVIOURS,
    DONE,
    FAILED,
    IMPORT,
    ITEMS,
    PENDING,
    QUEUED,
    RUNNING,
    expired_leases,
    lease_live,
)
from muse import models
from muse.db import session_scope
from muse.errors import ConfigurationError, NotFoundError
from muse.models import utcnow
from muse.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 512
DEFAULT_USER_CHUNK_SIZE = 64
JOB_TERMINAL = ("done", "failed", "cancelled")
#: Most failed items listed by :func:`job_progress` (the counts are always complete).
MAX_FAILED_LISTED = 1000


@dataclass
class JobProgress:
    """A job's state as read from the database (``to_dict`` for ``--json``)."""

    job_id: int
    status: str
    source: str
    dataset: str
    chunks: dict[str, int]  # status -> number of chunks
    items_total: int  # item rows to process
    items_processed: int  # item rows in finished chunks
    items_written: int
    items_failed: int
    users_total: int
    users_processed: int
    behaviours_written: int
    behaviours_skipped: int  # history entries whose item has no vector
    items_per_s: float | None
    behaviours_per_s: float | None
    elapsed_s: float | None
    failed_items: list[list[Any]] = field(default_factory=list)  # [[item_id, reason], ...]
    errors: list[str] = field(default_factory=list)  # errors of failed chunks
    # Workers holding running chunks: {"host:pid": "alive (lease 41 s left)" | "waiting for ..." | "dead (...)"}.
    workers: dict[str, str] = field(default_factory=dict)
    waiting_for: str | None = None  # the backend the job waits for (e.g. "Milvus at http://...")
    waiting_since: str | None = None  # since when (ISO 8601, UTC)
    waiting_s: float | None = None  # for how long so far
    outage_budget_s: float | None = None  # MUSE_BACKFILL_OUTAGE_S: the job fails past it

    @property
    def waiting(self) -> str | None:
        """One sentence saying what the job waits for and since when, or None."""
        if not self.waiting_for:
            return None
        since = (self.waiting_since or "?")[11:19]
        return (f"waiting for {self.waiting_for} since {since} UTC ({self.waiting_s or 0:.0f} s so far; the job "
                f"fails if it is down longer than MUSE_BACKFILL_OUTAGE_S = {self.outage_budget_s or 0:.0f} s)")

    @property
    def dead_workers(self) -> list[str]:
        return [w for w, state in self.workers.items() if state.startswith("dead")]

    @property
    def finished(self) -> bool:
        return self.status in JOB_TERMINAL

    @property
    def units_total(self) -> int:
        """Items plus users: the length of a progress bar."""
        return self.items_total + self.users_total

    @property
    def units_done(self) -> int:
        return self.items_processed + self.users_processed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- app and enqueueing ------------------------------------------------------------------------------
def get_app(settings: Settings) -> Any:
    """A producer Celery app for ``settings`` (kept in the worker context per broker, database and
    queue prefix)."""
    from indexer.worker_context import current

    return current().app(settings)


def _send(app: Any, chunk_id: int, kind: str) -> None:
    from indexer.celery_app import BEHAVIOURS_TASK, ENCODE_TASK, IMPORT_TASK

    name = {ITEMS: ENCODE_TASK, IMPORT: IMPORT_TASK, BEHAVIOURS: BEHAVIOURS_TASK}[kind]
    app.send_task(name, args=[int(chunk_id)])


def _claim_and_send(settings: Settings, app: Any, chunks: list[tuple[int, str]], from_status: tuple[str, ...]) -> int:
    """Move each chunk from one of ``from_status`` to ``queued`` and send it if this call won the update."""
    sent = 0
    for chunk_id, kind in chunks:
        with session_scope(settings) as session:
            chunk = session.get(models.BackfillChunk, chunk_id)
            if chunk is None or chunk.status not in from_status or lease_live(chunk):
                continue  # finished meanwhile, or a live worker holds it: never sent twice
            previous = chunk.status
            res = session.execute(
                update(models.BackfillChunk)
                .where(models.BackfillChunk.id == chunk_id, models.BackfillChunk.status == previous)
                .values(status=QUEUED, error=None, queued_at=utcnow(), worker=None, lease_expires_at=None)
            )
            won = res.rowcount == 1
        if won:
            try:
                _send(app, chunk_id, kind)
            except Exception:
                # The broker is down: the chunk is not queued after all (recovery sends it later).
                with session_scope(settings) as session:
                    session.execute(
                        update(models.BackfillChunk)
                        .where(models.BackfillChunk.id == chunk_id, models.BackfillChunk.status == QUEUED)
                        .values(status=PENDING if previous == PENDING else previous)
                    )
                raise
            sent += 1
    return sent


# -- sources and datasets ---------------------------------------------------------------------------
def resolve_source(settings: Settings, name: str, dataset: Any, version: int | None = None) -> int:
    """The ``embedding_sources`` row id of version ``version`` of ``name`` (the newest when None); an
    imported source's versions are the dataset's own (numbered per dataset).

    An imported source (``scl-taobao``) is registered on first use from the dataset's
    ``embeddings/<name>.parquet`` (``indexer.encode.ensure_imported``).

    Raises:
        ConfigurationError: an unknown source name (the message lists the valid ones).
        NotFoundError: the source has no version yet (the message says how to make one).
    """
    from indexer.encode import ensure_imported
    from indexer.source_registry import IMPORTED_SOURCES, check_source, get_version

    check_source(name)
    if version is not None:
        return get_version(settings, name, version, dataset=getattr(dataset, "name", dataset)).id
    if name in IMPORTED_SOURCES:
        return ensure_imported(settings, name, dataset).id
    return get_version(settings, name).id


def _dataset_row(settings: Settings, name: str) -> tuple[Any, int]:
    """The dataset reader and its ``datasets`` row id (registering the dataset when needed)."""
    from muse.data.format import Dataset
    from muse.data.registry import register_dataset

    dataset = Dataset.open(settings, name)
    with session_scope(settings) as session:
        row = session.scalars(select(models.Dataset).where(models.Dataset.name == dataset.name)).first()
        if row is not None:
            return dataset, row.id
    return dataset, register_dataset(settings, dataset)


# -- jobs ---------------------------------------------------------------------------------------------
def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def create_job(
    settings: Settings,
    source: str,
    dataset: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    user_chunk_size: int = DEFAULT_USER_CHUNK_SIZE,
    behaviours: bool = True,
    version: int | None = None,
    max_users: int | None = None,
) -> int:
    """Create a job and its chunk rows (all ``pending``; nothing is enqueued). Returns the job id.

    The job writes the collections of (dataset, source, ``version``), the newest source version
    when None, beside any other version of the pair (see :mod:`muse.versions`). With
    ``max_users`` only the first ``max_users`` users (canonical order) get behaviour chunks: a
    slice for trials and benchmarks (such a version is short of the dataset's behaviours, so
    ``promote`` refuses it without ``force``).

    Raises:
        ConfigurationError: a chunk size or ``max_users`` below 1.
        NotFoundError: unknown dataset or source.
    """
    if chunk_size < 1 or user_chunk_size < 1:
        raise ConfigurationError(f"chunk sizes must be >= 1, got {chunk_size} and {user_chunk_size}")
    if max_users is not None and max_users < 1:
        raise ConfigurationError(f"max_users must be >= 1, got {max_users}")
    ds, dataset_id = _dataset_row(settings, dataset)
    source_id = resolve_source(settings, source, ds, version)
    with session_scope(settings) as session:
        src = session.get(models.EmbeddingSource, source_id)
        job = models.BackfillJob(
            source_id=src.id, dataset_id=dataset_id, status="pending", chunk_size=int(chunk_size),
            options={"user_chunk_size": int(user_chunk_size), "behaviours": bool(behaviours),
                     "source": src.name, "source_version": src.version, "dataset": ds.name,
                     "naming": "per-version",  # jobs without it wrote the legacy per-source collections
                     **({"max_users": int(max_users)} if max_users is not None else {})},
        )
        session.add(job)
        session.flush()
        if src.kind == "imported":
            import pyarrow.parquet as pq

            path = ds.embeddings_path(src.name)
            if path is None:
                raise NotFoundError(f"imported source {src.name!r}: dataset {ds.name!r} ships no vectors for it")
            # embeddings/<source>/ (memory-mapped: only its ids' length is read) or an older .parquet
            n_rows = len(ds.embeddings(src.name).item_ids) if path.is_dir() else pq.ParquetFile(path).metadata.num_rows
            item_kind = IMPORT
        else:
            item_kind, n_rows = ITEMS, ds.n_items
        chunks = [(item_kind, lo, hi) for lo, hi in _ranges(n_rows, chunk_size)]
        if behaviours:
            n_users = ds.n_users if max_users is None else min(ds.n_users, int(max_users))
            chunks += [(BEHAVIOURS, lo, hi) for lo, hi in _ranges(n_users, user_chunk_size)]
        counters: dict[str, int] = {}
        for kind, lo, hi in chunks:
            index = counters.get(kind, 0)
            counters[kind] = index + 1
            session.add(models.BackfillChunk(job_id=job.id, kind=kind, index=index, start=lo, stop=hi))
        job_id = job.id
    log.info("created backfill job %d: %s on %s, %d chunks", job_id, source, dataset, len(chunks))
    return job_id


def find_job(settings: Settings, source: str, dataset: str, version: int | None = None) -> int | None:
    """The newest job for (source name, dataset name), of source version ``version`` when given, or None."""
    with session_scope(settings) as session:
        q = (
            select(models.BackfillJob.id)
            .join(models.EmbeddingSource, models.EmbeddingSource.id == models.BackfillJob.source_id)
            .join(models.Dataset, models.Dataset.id == models.BackfillJob.dataset_id)
            .where(models.EmbeddingSource.name == source, models.Dataset.name == dataset)
        )
        if version is not None:
            q = q.where(models.EmbeddingSource.version == int(version))
        return session.scalars(q.order_by(models.BackfillJob.id.desc())).first()


def _job(session: Any, job_id: int) -> models.BackfillJob:
    job = session.get(models.BackfillJob, int(job_id))
    if job is None:
        raise NotFoundError(f"backfill job {job_id} does not exist")
    return job


def enqueue_job(settings: Settings, job_id: int, app: Any = None) -> int:
    """Start (or resume) a job: every chunk not done is (re-)enqueued, behaviour chunks once the
    item chunks are finished. A ``done`` job is left alone. Returns the number of chunks sent.
    """
    app = get_app(settings) if app is None else app
    with session_scope(settings) as session:
        job = _job(session, job_id)
        if job.status == "done":
            log.info("job %d is already done; nothing to do", job_id)
            return 0
        job.status = "running"
        job.error = None
        job.finished_at = None
        job.started_at = job.started_at or utcnow()
        if (job.options or {}).get("behaviours_recopied"):  # a resume gets the closing check's re-sends afresh
            job.options = {**job.options, "behaviours_recopied": 0}
        item_chunks = [(c.id, c.kind) for c in job.chunks if c.kind != BEHAVIOURS and c.status != DONE]
        if item_chunks:
            # Behaviour chunks run again after the items: the vectors they copy may change.
            for c in job.chunks:
                if c.kind == BEHAVIOURS and (c.status != DONE or c.n_failed) and not lease_live(c):
                    c.status = PENDING
    # Chunks left queued/running by a dead worker are sent again; a duplicate delivery is skipped
    # (done) or rewrites the same rows (idempotent upserts).
    sent = _claim_and_send(settings, app, item_chunks, (PENDING, QUEUED, RUNNING, FAILED))
    if not item_chunks:
        sent += _enqueue_behaviours(settings, job_id, app, (PENDING, QUEUED, RUNNING, FAILED))
    _update_job_status(settings, job_id)
    return sent


def _enqueue_behaviours(settings: Settings, job_id: int, app: Any, from_status: tuple[str, ...]) -> int:
    """Send the job's behaviour chunks, once every item chunk is done. When an item chunk failed,
    its items have no vectors to copy: the behaviour chunks are marked failed with that reason
    instead of being sent (``resume`` re-runs the failed item chunks, then the behaviours)."""
    with session_scope(settings) as session:
        job = _job(session, job_id)
        items = [c for c in job.chunks if c.kind != BEHAVIOURS]
        if any(c.status not in (DONE, FAILED) for c in items):
            return 0
        failed = [c for c in items if c.status == FAILED]
        if failed:
            reason = (f"not run: {len(failed)} item chunk(s) failed, so item vectors are missing "
                      f"(first: {failed[0].kind}#{failed[0].index}: {failed[0].error})")[:2000]
            session.execute(
                update(models.BackfillChunk)
                .where(models.BackfillChunk.job_id == job.id, models.BackfillChunk.kind == BEHAVIOURS,
                       models.BackfillChunk.status.in_(from_status))
                .values(status=FAILED, error=reason, finished_at=utcnow())
            )
            return 0
        chunks = [(c.id, c.kind) for c in job.chunks if c.kind == BEHAVIOURS and c.status != DONE]
    return _claim_and_send(settings, app, chunks, from_status)


def advance_job(settings: Settings, job_id: int, app: Any = None) -> None:
    """After a chunk finished: enqueue the behaviour chunks once all item chunks are finished, and
    close the job when every chunk is."""
    with session_scope(settings) as session:
        job = _job(session, job_id)
        if job.status in JOB_TERMINAL:
            return
        items_finished = all(c.status in (DONE, FAILED) for c in job.chunks if c.kind != BEHAVIOURS)
    if items_finished:
        _enqueue_behaviours(settings, job_id, get_app(settings) if app is None else app, (PENDING,))
    _update_job_status(settings, job_id)


def _update_job_status(settings: Settings, job_id: int) -> None:
    """Close a running job whose chunks are all finished: ``failed`` when one failed, else ``done``
    once its behaviour rows are checked to be in Milvus (:func:`_behaviours_complete`)."""
    with session_scope(settings) as session:
        job = _job(session, job_id)
        if job.status != "running":
            return
        statuses = [c.status for c in job.chunks]
        if not all(s in (DONE, FAILED) for s in statuses):
            return
        failed = [c for c in job.chunks if c.status == FAILED]
        check = not failed and not (job.options or {}).get("bulk") and any(c.kind == BEHAVIOURS for c in job.chunks)
    if check and not _behaviours_complete(settings, job_id):
        return
    with session_scope(settings) as session:
        job = _job(session, job_id)
        if job.status != "running" or not all(c.status in (DONE, FAILED) for c in job.chunks):
            return  # closed, or a chunk re-sent, by another process meanwhile
        failed = [c for c in job.chunks if c.status == FAILED]
        final = "failed" if failed else "done"
        closed = session.execute(
            update(models.BackfillJob)
            .where(models.BackfillJob.id == job.id, models.BackfillJob.status == "running")
            .values(
                status=final,
                finished_at=utcnow(),
                error=f"{len(failed)} chunk(s) failed: {failed[0].error}" if failed else None,
            )
        ).rowcount == 1
    if not closed:
        return
    log.info("job %d finished: %s", job_id, final)
    if final == "done":
        from indexer.backfill import get_store
        from muse.versions import on_backfill_done

        try:
            on_backfill_done(settings, job_id, get_store(settings))
        except Exception as e:  # the job's rows are written; only making it live failed
            log.error("job %d is done but recording its version failed: %s; run `muse source list`, then "
                      "`muse source promote DATASET SOURCE VERSION`", job_id, e)
        publish_job_table(settings, job_id)


#: Times a job sends behaviour chunks again because their rows went missing before it fails instead.
MAX_RECOPIES = 3


def _behaviours_complete(settings: Settings, job_id: int) -> bool:
    """True when every done behaviour chunk's rows are in Milvus (:func:`indexer.backfill.short_behaviour_chunks`).

    Otherwise the short chunks go back to ``pending`` and are sent again (the job stays running),
    at most :data:`MAX_RECOPIES` times a job; past that the job fails with a sentence saying which
    chunks lost rows. While Milvus does not answer, False: the job stays running and the next
    pass (a worker's watchdog, the next finished chunk) checks again.
    """
    from indexer.backfill import short_behaviour_chunks

    try:
        short = short_behaviour_chunks(settings, job_id)
    except Exception as e:  # Milvus (or the database) is down: the job is not closed on a guess
        log.warning("job %d: cannot check its behaviour rows in Milvus (%s); the job stays running and is "
                    "checked again", job_id, e)
        return False
    if not short:
        return True
    described = "; ".join(f"chunk {cid}: wrote {w}, found {f}" for cid, w, f in short[:5])
    with session_scope(settings) as session:
        job = _job(session, job_id)
        recopies = int((job.options or {}).get("behaviours_recopied", 0))
        if recopies >= MAX_RECOPIES:
            job.status = "failed"
            job.finished_at = utcnow()
            job.error = (f"{len(short)} behaviour chunk(s) have fewer rows in Milvus than they wrote, after being "
                         f"written again {recopies} times ({described}); Milvus loses acknowledged writes: check "
                         f"its log, then `muse backfill resume {job_id}`")[:4000]
            log.error("job %d failed: %s", job_id, job.error)
            return False
        resent = []
        for cid, written, found in short:
            res = session.execute(
                update(models.BackfillChunk)
                .where(models.BackfillChunk.id == cid, models.BackfillChunk.status == DONE)
                .values(status=PENDING, worker=None, lease_expires_at=None,
                        error=f"re-sent: wrote {written} behaviour rows, Milvus showed {found} when the job closed")
            )
            if res.rowcount == 1:
                resent.append((cid, BEHAVIOURS))
        if resent:
            job.options = {**(job.options or {}), "behaviours_recopied": recopies + 1,
                           "behaviours_recopied_why": described[:1000]}
    if resent:
        log.warning("job %d: %d behaviour chunk(s) have fewer rows in Milvus than they wrote (%s); sending them "
                    "again (%d of %d)", job_id, len(resent), described, recopies + 1, MAX_RECOPIES)
        try:
            _claim_and_send(settings, get_app(settings), resent, (PENDING,))
        except Exception as e:  # the broker is down: recovery sends the pending chunks later
            log.warning("job %d: sending the short behaviour chunks failed (%s); recovery sends them", job_id, e)
    return False


def publish_job_table(settings: Settings, job_id: int) -> None:
    """Write the item table of a done job's version for the GSU servers
    (:func:`indexer.item_vectors.publish_item_table`); a failure is logged, never the job's: a GSU
    server then reads the version's items from Milvus once and writes the table itself."""
    from indexer.backfill import get_store
    from indexer.item_vectors import publish_item_table
    from muse.versions import job_ref

    try:
        publish_item_table(settings, job_ref(settings, job_id), get_store(settings), compute=True)
    except Exception as e:
        log.error("job %d is done but writing its item table failed: %s; `muse serve` reads the items from "
                  "Milvus once instead (or run `muse source promote`)", job_id, e)


def _queue_sizes(app: Any) -> dict[str, int] | None:
    """Messages waiting in each of the app's queues, or None when the broker cannot say."""
    try:
        sizes = {}
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            for queue in app.conf.task_queues:
                if hasattr(channel, "_size"):  # kombu's virtual transports (Redis, filesystem): an empty
                    sizes[queue.name] = int(channel._size(queue.name))  # Redis list does not exist at all
                else:
                    sizes[queue.name] = int(channel.queue_declare(queue=queue.name, passive=True).message_count)
        return sizes
    except Exception as e:  # the broker may be down: no stale-queue recovery this pass
        log.debug("cannot read queue sizes: %s", e)
        return None


def recover_jobs(
    settings: Settings, app: Any = None, job_id: int | None = None, judge_leases: bool = True
) -> dict[str, int]:
    """Make running jobs progress without a person; safe to run from any number of processes.

    * a chunk whose lease expired (its worker died, or a retry message was lost) is re-sent
      (not with ``judge_leases=False``: right after a database outage, during which no worker
      could renew its leases, the callers give them one lease to catch up);
    * a chunk ``queued`` for longer than a lease while the broker's queues are empty (its message
      was lost, e.g. in a broker restart without persistence) is re-sent;
    * a job whose item chunks are all finished gets its behaviour chunks enqueued, and a job whose
      chunks are all finished is closed (when the worker's own bookkeeping step failed).

    Returns counts: ``{"expired": n, "lost": n, "closed": n}``.
    """
    app = get_app(settings) if app is None else app
    out = {"expired": 0, "lost": 0, "closed": 0}
    for chunk_id, _job_id, kind, worker in expired_leases(settings, job_id) if judge_leases else []:
        with session_scope(settings) as session:
            res = session.execute(
                update(models.BackfillChunk)
                .where(models.BackfillChunk.id == chunk_id, models.BackfillChunk.status.in_((RUNNING, QUEUED)),
                       models.BackfillChunk.worker.is_(worker) if worker is None
                       else models.BackfillChunk.worker == worker)
                .values(status=PENDING, worker=None, lease_expires_at=None,
                        error=f"re-sent: worker {worker or '?'} stopped renewing its lease")
            )
            won = res.rowcount == 1
        if won:
            log.warning("chunk %d: the lease of worker %s expired; sending it again", chunk_id, worker)
            if worker:
                _note_dead_worker(settings, _job_id, worker, f"{kind} chunk {chunk_id}")
            out["expired"] += _claim_and_send(settings, app, [(chunk_id, kind)], (PENDING,))
    with session_scope(settings) as session:
        q = select(models.BackfillJob.id).where(models.BackfillJob.status == "running")
        if job_id is not None:
            q = q.where(models.BackfillJob.id == int(job_id))
        running = list(session.scalars(q))
    stale_before = utcnow() - dt.timedelta(seconds=max(settings.backfill_lease_s, 1.0))
    sizes: dict[str, int] | None = None
    for jid in running:
        with session_scope(settings) as session:
            job = _job(session, jid)
            chunks = list(job.chunks)
            items_finished = all(c.status in (DONE, FAILED) for c in chunks if c.kind != BEHAVIOURS)
            lost = [
                (c.id, c.kind) for c in chunks
                if c.status == QUEUED and c.lease_expires_at is None and c.queued_at is not None
                and _aware(c.queued_at) < stale_before
            ]
        if lost:
            sizes = _queue_sizes(app) if sizes is None else sizes
            if sizes is not None and not any(sizes.values()):
                log.warning("job %d: %d queued chunk(s) have no message left in the broker; re-sending", jid, len(lost))
                out["lost"] += _claim_and_send(settings, app, lost, (QUEUED,))
        if items_finished:
            _enqueue_behaviours(settings, jid, app, (PENDING,))
        before = _status_of(settings, jid)
        _update_job_status(settings, jid)
        if before == "running" and _status_of(settings, jid) != "running":
            out["closed"] += 1
    return out


def fail_job(settings: Settings, job_id: int, error: str) -> bool:
    """Fail a running job at once with ``error`` (e.g. a backend down past ``MUSE_BACKFILL_OUTAGE_S``):
    its chunks still queued are skipped by the workers and ``resume`` continues it. True when it was
    running."""
    with session_scope(settings) as session:
        res = session.execute(
            update(models.BackfillJob)
            .where(models.BackfillJob.id == int(job_id), models.BackfillJob.status == "running")
            .values(status="failed", error=error[:4000], finished_at=utcnow(), waiting_for=None, waiting_since=None)
        )
        failed = res.rowcount == 1
    if failed:
        log.error("job %d failed: %s", job_id, error)
    return failed


def note_outage(settings: Settings, backend: str) -> int:
    """Record on every running job that it waits for ``backend`` (since now, unless it already
    waited); returns the jobs marked."""
    with session_scope(settings) as session:
        running = models.BackfillJob.status == "running"
        session.execute(update(models.BackfillJob).where(running, models.BackfillJob.waiting_since.is_(None))
                        .values(waiting_since=utcnow()))
        res = session.execute(update(models.BackfillJob).where(running).values(waiting_for=backend[:255]))
        return int(res.rowcount or 0)


def end_outage(settings: Settings, backend: str) -> None:
    """``backend`` answers again: no job waits for it any more."""
    with session_scope(settings) as session:
        session.execute(update(models.BackfillJob).where(models.BackfillJob.waiting_for == backend[:255])
                        .values(waiting_for=None, waiting_since=None))


def fail_outlasted(settings: Settings, backend: str, budget_s: float) -> list[int]:
    """Fail the running jobs that have waited for ``backend`` longer than ``budget_s``, with a
    sentence naming it and how long; returns their ids (``resume`` continues them)."""
    now = utcnow()
    failed = []
    with session_scope(settings) as session:
        jobs = session.scalars(select(models.BackfillJob).where(
            models.BackfillJob.status == "running", models.BackfillJob.waiting_for == backend[:255],
            models.BackfillJob.waiting_since <= now - dt.timedelta(seconds=budget_s)))
        for job in jobs:
            waited = (now - _aware(job.waiting_since)).total_seconds()
            job.status = "failed"
            job.finished_at = now
            job.error = (f"{backend} was unavailable for {waited:.0f} s, longer than MUSE_BACKFILL_OUTAGE_S "
                         f"({budget_s:.0f} s); `muse backfill resume {job.id}` continues the job")
            failed.append(job.id)
    for job_id in failed:
        log.error("job %d failed: %s did not come back within %.0f s", job_id, backend, budget_s)
    return failed


def _note_dead_worker(settings: Settings, job_id: int, worker: str, what: str) -> None:
    """Remember on the job that ``worker`` died holding ``what`` (``status`` shows it as dead)."""
    with session_scope(settings) as session:
        job = _job(session, job_id)
        dead = dict((job.options or {}).get("dead_workers", {}))
        dead[worker] = f"dead (its lease on {what} expired at {utcnow():%H:%M:%S} UTC; the chunk was re-sent)"
        job.options = {**(job.options or {}), "dead_workers": dead}


def _status_of(settings: Settings, job_id: int) -> str:
    with session_scope(settings) as session:
        return _job(session, job_id).status


def cancel_job(settings: Settings, job_id: int) -> None:
    """Cancel a job: queued chunks go back to ``pending`` and workers skip their messages.
    A chunk already running finishes. ``resume`` continues a cancelled job."""
    with session_scope(settings) as session:
        job = _job(session, job_id)
        if job.status == "done":
            log.info("job %d is done; nothing to cancel", job_id)
            return
        job.status = "cancelled"
        job.finished_at = utcnow()
        session.execute(
            update(models.BackfillChunk)
            .where(models.BackfillChunk.job_id == job.id, models.BackfillChunk.status == QUEUED)
            .values(status=PENDING)
        )


def _rate(n: int, start: dt.datetime | None, stop: dt.datetime | None) -> float | None:
    if not n or start is None or stop is None:
        return None
    seconds = (_aware(stop) - _aware(start)).total_seconds()
    return n / seconds if seconds > 0 else None


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def job_progress(settings: Settings, job_id: int) -> JobProgress:
    """Read a job's progress from the database (no broker, no Milvus).

    Rates are rows written per second of wall time, from the first chunk's start to the last
    chunk's end of each phase.

    Raises:
        NotFoundError: no such job.
    """
    with session_scope(settings) as session:
        job = _job(session, job_id)
        source = session.get(models.EmbeddingSource, job.source_id)
        dataset = session.get(models.Dataset, job.dataset_id)
        counts = dict(
            session.execute(
                select(models.BackfillChunk.status, func.count())
                .where(models.BackfillChunk.job_id == job.id)
                .group_by(models.BackfillChunk.status)
            ).all()
        )
        item_chunks = [c for c in job.chunks if c.kind != BEHAVIOURS]
        user_chunks = [c for c in job.chunks if c.kind == BEHAVIOURS]

        def finished(cs: list[models.BackfillChunk]) -> list[models.BackfillChunk]:
            return [c for c in cs if c.status == DONE]

        def span(cs: list[models.BackfillChunk]) -> tuple[dt.datetime | None, dt.datetime | None]:
            starts = [_aware(c.started_at) for c in cs if c.started_at is not None]
            stops = [_aware(c.finished_at) for c in cs if c.finished_at is not None]
            return (min(starts) if starts else None, max(stops) if stops else None)

        items_written = sum(c.n_written for c in finished(item_chunks))
        behaviours_written = sum(c.n_written for c in finished(user_chunks))
        failed_items = [fi for c in finished(item_chunks) for fi in (c.failed_items or [])]
        start = _aware(job.started_at) if job.started_at else None
        end = _aware(job.finished_at) if job.finished_at else (utcnow() if start else None)
        return JobProgress(
            job_id=job.id,
            status=job.status,
            source=source.name if source else "?",
            dataset=dataset.name if dataset else "?",
            chunks={str(k): int(v) for k, v in counts.items()},
            items_total=sum(int(c.stop - c.start) for c in item_chunks),
            items_processed=sum(int(c.stop - c.start) for c in finished(item_chunks)),
            items_written=items_written,
            items_failed=sum(c.n_failed for c in finished(item_chunks)),
            users_total=sum(int(c.stop - c.start) for c in user_chunks),
            users_processed=sum(int(c.stop - c.start) for c in finished(user_chunks)),
            behaviours_written=behaviours_written,
            behaviours_skipped=sum(c.n_failed for c in finished(user_chunks)),
            items_per_s=_rate(items_written, *span(item_chunks)),
            behaviours_per_s=_rate(behaviours_written, *span(user_chunks)),
            elapsed_s=(end - start).total_seconds() if start and end else None,
            failed_items=failed_items[:MAX_FAILED_LISTED],
            errors=[f"chunk {c.kind}#{c.index}: {c.error}" for c in job.chunks if c.status == FAILED and c.error]
            + ([job.error] if job.status == "failed" and job.error and not any(c.status == FAILED for c in job.chunks)
               else []),
            workers={**dict((job.options or {}).get("dead_workers", {})), **_worker_states(job.chunks)},
            waiting_for=job.waiting_for if job.status == "running" else None,
            waiting_since=_aware(job.waiting_since).isoformat() if job.waiting_since and job.status == "running" else None,
            waiting_s=(utcnow() - _aware(job.waiting_since)).total_seconds()
            if job.waiting_since and job.status == "running" else None,
            outage_budget_s=float(settings.backfill_outage_s),
        )


def _worker_states(chunks: list[models.BackfillChunk]) -> dict[str, str]:
    now = utcnow()
    out: dict[str, str] = {}
    for c in chunks:
        if c.status != RUNNING or not c.worker:
            continue
        left = (_aware(c.lease_expires_at) - now).total_seconds() if c.lease_expires_at else None
        if left is not None and left > 0 and c.waiting_for:
            since = f"{_aware(c.waiting_since):%H:%M:%S} UTC" if c.waiting_since else "?"
            state = f"alive, waiting for {c.waiting_for} since {since} (holding {c.kind}#{c.index}, lease {left:.0f} s left)"
        elif left is not None and left > 0:
            state = f"alive (running {c.kind}#{c.index}, lease {left:.0f} s left)"
        else:
            ago = f"{-left:.0f} s ago" if left is not None else "never renewed"
            state = f"dead (no lease renewal on {c.kind}#{c.index}: expired {ago}; its chunk is re-sent)"
        if not out.get(c.worker, "").startswith("alive"):
            out[c.worker] = state
    return out


def list_jobs(settings: Settings, limit: int = 20) -> list[dict[str, Any]]:
    """The newest jobs with their source, dataset and status.

    Raises:
        ConfigurationError: ``limit`` below 1.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigurationError(f"--limit must be a whole number >= 1, got {limit!r}")
    with session_scope(settings) as session:
        rows = session.execute(
            select(models.BackfillJob, models.EmbeddingSource.name, models.Dataset.name)
            .join(models.EmbeddingSource, models.EmbeddingSource.id == models.BackfillJob.source_id)
            .join(models.Dataset, models.Dataset.id == models.BackfillJob.dataset_id)
            .order_by(models.BackfillJob.id.desc())
            .limit(limit)
        ).all()
        return [
            {"job_id": j.id, "source": s, "dataset": d, "status": j.status, "created_at": j.created_at.isoformat()}
            for j, s, d in rows
        ]
