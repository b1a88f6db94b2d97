"""Celery tasks of the indexer: thin wrappers around :mod:`indexer.backfill` and :mod:`indexer.jobs`.

Each task takes a chunk id, runs the chunk, then advances its job (enqueueing behaviour chunks
once the items are done, closing the job at the end). Connection errors (Milvus, database,
broker: :class:`muse.errors.BackendUnavailable`, ``ConnectionError``, SQLAlchemy's
``OperationalError``) are retried with exponential backoff; when retries run out, or on any other
error, the chunk is marked ``failed`` with the error text. Tasks are idempotent, as ``acks_late``
requires: a chunk already done is skipped, and every write is an upsert.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_process_init, worker_process_shutdown, worker_shutdown

from indexer import backfill, jobs
from indexer.celery_app import BEHAVIOURS_TASK, ENCODE_TASK, IMPORT_TASK
from muse.errors import BackendUnavailable
from muse.settings import Settings, load_settings

log = logging.getLogger(__name__)

#: Retries of a chunk on connection errors, and the backoff: base * 2**retry seconds, capped, +-25% jitter.
MAX_RETRIES = 6
BACKOFF_BASE_S = 2.0
BACKOFF_MAX_S = 120.0


def is_retriable(exc: BaseException) -> bool:
    """True for transient backend failures: worth retrying with backoff."""
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import DisconnectionError
    from sqlalchemy.exc import OperationalError as DatabaseError

    if isinstance(exc, BackendUnavailable):
        return exc.retriable
    return isinstance(exc, (ConnectionError, TimeoutError, DatabaseError, DisconnectionError, BrokerError))


def backoff_s(retries: int) -> float:
    """Seconds to wait before retry number ``retries + 1``."""
    delay = min(BACKOFF_BASE_S * (2**retries), BACKOFF_MAX_S)
    return delay * random.uniform(0.75, 1.25)


class ChunkTask(Task):
    """Base of the chunk tasks: settings from the app, failure bookkeeping in the database."""

    acks_late = True
    reject_on_worker_lost = True
    max_retries = MAX_RETRIES

    @property
    def settings(self) -> Settings:
        settings = getattr(self.app, "muse_settings", None)
        return settings if settings is not None else load_settings()

    def run_chunk(self, chunk_id: int) -> dict[str, Any]:
        """Run the chunk and advance its job; retry on transient errors."""
        settings = self.settings
        try:
            result = backfill.run_chunk(settings, chunk_id)
        except Exception as exc:
            if is_retriable(exc) and self.request.retries < self.max_retries:
                delay = backoff_s(self.request.retries)
                log.warning("chunk %d: %s; retry %d in %.1fs", chunk_id, exc, self.request.retries + 1, delay)
                _record(settings, chunk_id, backfill.QUEUED, f"retrying: {exc}")
                raise self.retry(exc=exc, countdown=delay) from exc
            log.exception("chunk %d failed", chunk_id)
            _record(settings, chunk_id, backfill.FAILED, f"{type(exc).__name__}: {exc}")
            _advance_chunk_job(settings, chunk_id, self.app)
            raise
        _advance_chunk_job(settings, chunk_id, self.app)
        if result is None:
            return {"chunk_id": chunk_id, "skipped": True}
        return {"chunk_id": chunk_id, "n_written": result.n_written, "n_failed": result.n_failed}


def _record(settings: Settings, chunk_id: int, status: str, error: str) -> None:
    try:
        backfill.mark_chunk(settings, chunk_id, status, error)
    except Exception as e:  # the database itself may be what failed; the message stays the record
        log.error("cannot record chunk %d as %s: %s", chunk_id, status, e)


def _advance_chunk_job(settings: Settings, chunk_id: int, app: Any) -> None:
    from muse import models
    from muse.db import session_scope

    with session_scope(settings) as session:
        chunk = session.get(models.BackfillChunk, int(chunk_id))
        job_id = chunk.job_id if chunk is not None else None
    if job_id is not None:
        jobs.advance_job(settings, job_id, app)


@shared_task(bind=True, base=ChunkTask, name=ENCODE_TASK)
def encode_items_chunk(self: ChunkTask, chunk_id: int) -> dict[str, Any]:
    """Encode a chunk of items with the job's source and upsert them (``gpu`` queue)."""
    return self.run_chunk(chunk_id)


@shared_task(bind=True, base=ChunkTask, name=BEHAVIOURS_TASK)
def copy_behaviours_chunk(self: ChunkTask, chunk_id: int) -> dict[str, Any]:
    """Copy item vectors into the behaviour collection for a chunk of users (``cpu`` queue)."""
    return self.run_chunk(chunk_id)


@shared_task(bind=True, base=ChunkTask, name=IMPORT_TASK)
def import_vectors_chunk(self: ChunkTask, chunk_id: int) -> dict[str, Any]:
    """Upsert a chunk of precomputed vectors (``cpu`` queue)."""
    return self.run_chunk(chunk_id)


@worker_process_init.connect
def _fresh_process(**_: Any) -> None:
    """A forked pool process must not reuse the parent's clients or models: load its own lazily.
    (The parent process never runs chunks, so it holds no database connection to inherit.)"""
    backfill.reset_process_caches()


@worker_process_shutdown.connect
@worker_shutdown.connect
def _release(**_: Any) -> None:
    """Close Milvus clients so a Milvus Lite file is released when the worker stops."""
    backfill.close_stores()
