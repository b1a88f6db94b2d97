"""Celery tasks of the indexer: thin wrappers around :mod:`indexer.backfill` and :mod:`indexer.jobs`.

Each task takes a chunk id, runs the chunk, then advances its job (enqueueing behaviour chunks
once the items are done, closing the job at the end). The chunk runs under
:func:`indexer.outages.run_patiently`: a backend that does not answer (Milvus, the database, the
broker) is waited for without spending an attempt, up to ``MUSE_BACKFILL_OUTAGE_S``; a failure of
the chunk's own (the backends answer) is retried with exponential backoff; both waits happen in the
worker, which keeps the chunk's lease meanwhile. When its retries run out, the outage budget is
spent, or on any other error, the chunk is marked ``failed`` with the error text. Tasks are
idempotent, as ``acks_late`` requires: a chunk already done is skipped, and every write is an upsert.

When the failure cannot be recorded (the database itself is down) the task is retried again
instead of being dropped, so the message outlives the outage. While a chunk runs its worker renews
the chunk's lease (``indexer.backfill.LeaseKeeper``); every worker runs a watchdog thread
(:func:`start_watchdog`) that re-sends chunks whose lease expired (their worker died), closes jobs
whose last bookkeeping step was lost and, under the supervisor, records a broker outage on the
running jobs (failing them past ``MUSE_BACKFILL_OUTAGE_S``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

from indexer import backfill, jobs, outages
from indexer.celery_app import BEHAVIOURS_TASK, ENCODE_TASK, IMPORT_TASK
from indexer.outages import backoff_s, is_retriable
from muse.settings import Settings, load_settings

log = logging.getLogger(__name__)

#: Celery retries of a task whose failure could not be recorded (the database is down).
MAX_RETRIES = 6


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
        """Run the chunk (waiting out outages, retrying its own failures) and advance its job."""
        settings = self.settings
        retries = self.request.retries
        try:
            result = outages.run_patiently(
                settings, chunk_id, lambda count: backfill.run_chunk(settings, chunk_id, count_attempt=count)
            )
        except Exception as exc:
            if not _record(settings, chunk_id, backfill.FAILED, f"{type(exc).__name__}: {exc}"):
                # The failure cannot be written (the database is down): keep the message alive
                # instead of dropping the chunk's only record; once the database is back the chunk
                # runs again (and usually succeeds: the outage was the cause).
                delay = backoff_s(min(retries, 6), settings.backfill_backoff_s)
                log.warning("chunk %d: cannot record its failure; trying again in %.1fs", chunk_id, delay)
                raise self.retry(exc=exc, countdown=delay, max_retries=retries + 1) from exc
            log.error("chunk %d failed: %s", chunk_id, exc, exc_info=not is_retriable(exc))
            if isinstance(exc, outages.OutageTooLong):  # the job fails now, naming the backend and how long
                _fail_chunk_job(settings, chunk_id, str(exc))
            _advance_safely(settings, chunk_id, self.app)
            raise
        _advance_safely(settings, chunk_id, self.app)
        if result is None:
            return {"chunk_id": chunk_id, "skipped": True}
        return {"chunk_id": chunk_id, "n_written": result.n_written, "n_failed": result.n_failed}


def _record(settings: Settings, chunk_id: int, status: str, error: str, hold_s: float | None = None) -> bool:
    try:
        backfill.mark_chunk(settings, chunk_id, status, error, hold_s=hold_s)
        return True
    except Exception as e:  # the database itself may be what failed; the message stays the record
        log.error("cannot record chunk %d as %s: %s", chunk_id, status, e)
        return False


def _advance_safely(settings: Settings, chunk_id: int, app: Any) -> None:
    """Advance the chunk's job; if that fails (database or broker down) the watchdog of some
    worker finishes the step later (:func:`indexer.jobs.recover_jobs`), so the chunk is not redone."""
    try:
        _advance_chunk_job(settings, chunk_id, app)
    except Exception as e:
        log.warning("chunk %d: advancing its job failed (%s); the watchdog will do it", chunk_id, e)


def _fail_chunk_job(settings: Settings, chunk_id: int, error: str) -> None:
    from muse import models
    from muse.db import session_scope

    try:
        with session_scope(settings) as session:
            chunk = session.get(models.BackfillChunk, int(chunk_id))
            job_id = chunk.job_id if chunk is not None else None
        if job_id is not None:
            jobs.fail_job(settings, job_id, error)
    except Exception as e:  # the chunk's failure is recorded; the job then fails when its chunks finish
        log.warning("chunk %d: cannot fail its job: %s", chunk_id, e)


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
    """A forked pool process must not reuse the parent's clients, models or database connections
    (the parent's watchdog thread holds some): load its own lazily."""
    from indexer import worker_context
    from muse.db import dispose_engines

    worker_context.start()
    dispose_engines()


_watchdog: threading.Thread | None = None
_watchdog_stop = threading.Event()
#: Set by the watchdog when this worker should stop warmly so its supervisor starts it afresh.
restart_requested = threading.Event()
#: Seconds between broker reachability checks of the watchdog.
BROKER_CHECK_S = 2.0
#: Seconds a warm shutdown asked for by the watchdog may take before the process exits anyway.
RESTART_GRACE_S = 60.0


def broker_reachable(app: Any, timeout_s: float = 3.0) -> bool:
    """True when a fresh connection to the app's broker can be made now."""
    url = str(app.conf.broker_url)
    try:
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
            try:
                return bool(client.ping())
            finally:
                client.close()
        with app.connection_for_write() as conn:  # AMQP connects eagerly
            conn.ensure_connection(max_retries=1, timeout=timeout_s)
        return True
    except Exception as e:  # any failure means: not reachable now
        log.debug("broker not reachable: %s", e)
        return False


def watchdog_loop(settings: Settings, app: Any, stop: threading.Event, supervised: bool = False) -> None:
    """Every half lease :func:`indexer.jobs.recover_jobs` (errors are logged, never fatal).

    After a failed pass (the database was down, so no worker could renew its leases) the next
    passes give leases one lease period to be renewed before judging any worker dead.

    Under a supervisor (``muse worker`` with a server broker) it also checks the broker every
    ``BROKER_CHECK_S``: while the broker is unreachable the running jobs say they wait for it (and
    fail past ``MUSE_BACKFILL_OUTAGE_S``); once it answers again, the worker stops warmly
    (running chunks finish) and the supervisor starts a fresh one, because Celery's Redis consumer
    may never resume consuming after a broker restart.
    """
    import os
    import signal
    import time

    period = max(0.5, settings.backfill_lease_s / 2)
    last_recover = 0.0
    failed_at = -float("inf")  # monotonic time of the last failed recovery pass
    broker_lost = False
    broker = outages.broker(settings).label
    while not stop.wait(min(period, BROKER_CHECK_S) if supervised else period):
        if supervised:
            up = broker_reachable(app)
            if not up:
                if not broker_lost:
                    log.warning("watchdog: the broker %s is unreachable", settings.broker_url)
                broker_lost = True
                try:
                    jobs.note_outage(settings, broker)
                    jobs.fail_outlasted(settings, broker, settings.backfill_outage_s)
                except Exception as e:  # the database may be down too
                    log.warning("watchdog: cannot record the broker outage: %s", e)
            elif broker_lost:
                log.warning("watchdog: the broker is back; restarting this worker so it consumes again")
                try:
                    jobs.end_outage(settings, broker)
                except Exception as e:
                    log.warning("watchdog: cannot record the end of the broker outage: %s", e)
                restart_requested.set()
                os.kill(os.getpid(), signal.SIGTERM)
                # A consumer wedged beyond a warm shutdown: leave anyway (the leases cover the rest).
                threading.Timer(RESTART_GRACE_S, os._exit, (75,)).start()
                return
        if time.monotonic() - last_recover < period:
            continue
        last_recover = time.monotonic()
        try:
            jobs.recover_jobs(settings, app, judge_leases=last_recover - failed_at > settings.backfill_lease_s)
        except Exception as e:  # a backend may be down; try again next period
            failed_at = time.monotonic()
            log.warning("watchdog: recovery pass failed: %s", e)


#: Set (to "1") by the ``muse worker`` supervisor in its Celery child's environment.
SUPERVISED_ENV = "MUSE_WORKER_SUPERVISED"


def start_watchdog(settings: Settings, app: Any) -> threading.Thread:
    """Start this worker's watchdog thread once per process."""
    import os

    global _watchdog
    if _watchdog is None or not _watchdog.is_alive():
        _watchdog_stop.clear()
        supervised = os.environ.get(SUPERVISED_ENV) == "1"
        _watchdog = threading.Thread(
            target=watchdog_loop, args=(settings, app, _watchdog_stop, supervised), name="muse-watchdog",
            daemon=True,
        )
        _watchdog.start()
        log.info("watchdog started: recovery every %.1f s%s", max(0.5, settings.backfill_lease_s / 2),
                 ", broker checks (supervised)" if supervised else "")
    return _watchdog


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    settings = getattr(app, "muse_settings", None) or load_settings()
    start_watchdog(settings, jobs.get_app(settings))


@worker_process_shutdown.connect
@worker_shutdown.connect
def _release(**_: Any) -> None:
    """Close Milvus clients so a Milvus Lite file is released when the worker stops."""
    _watchdog_stop.set()
    backfill.close_stores()
