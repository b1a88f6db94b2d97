"""Waiting out backend outages and retrying a chunk's own failures, while its worker holds the lease.

:func:`run_patiently` runs one chunk (any chunk runner: ``indexer.backfill.run_chunk``, or another
path's, e.g. a bulk import) until it succeeds, fails for good, or an outage outlasts its budget:

* a **retriable failure** (:func:`is_retriable`: ``BackendUnavailable``, connection and timeout
  errors, SQLAlchemy's and the broker's ``OperationalError``) is followed by a **probe** of the
  backends the chunk uses (:func:`down_backend`: Milvus, the database, the sequence store, the
  broker), each with a short deadline;
* a backend that does not answer is an **outage**, not the chunk's fault: the chunk waits for that
  backend (probing it every :data:`PROBE_PERIOD_S`) and runs again **without spending an
  attempt**, for up to ``MUSE_BACKFILL_OUTAGE_S`` (default 30 minutes) counted from when the job
  first found the backend down (``backfill_jobs.waiting_since``), so later chunks of the same
  outage do not restart the clock. Past it the chunk fails with :class:`OutageTooLong`, a sentence
  naming the backend and how long it was down, and the job fails with it;
* when every backend answers, the failure was the chunk's own: it spends an attempt and is
  retried after an exponential backoff (``MUSE_BACKFILL_RETRIES``, ``MUSE_BACKFILL_BACKOFF_S``),
  then fails.

Both waits happen in the worker process that holds the chunk, which keeps renewing the chunk's
lease meanwhile (:class:`indexer.backfill.LeaseKeeper`): a waiting worker is never taken for dead,
``resume`` never sends its chunk twice, and ``muse backfill status`` shows what each chunk waits for
and since when (``backfill_chunks.waiting_for`` / ``waiting_since``; the job's in
``backfill_jobs``). The database itself being down is waited out the same way; nothing can be
recorded meanwhile.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from muse.errors import BackendUnavailable
from muse.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Deadline of one probe of a backend (a frozen server counts as down after it).
PROBE_TIMEOUT_S = 5.0
#: Seconds between probes of a backend that is down.
PROBE_PERIOD_S = 1.0
#: Backoff of a chunk's own failures: base * 2**retry seconds, capped, +-25% jitter.
BACKOFF_BASE_S = 2.0
BACKOFF_MAX_S = 120.0
#: What a chunk waiting for a retry of its own failure records as ``waiting_for``.
RETRY = "a retry"


class OutageTooLong(BackendUnavailable):
    """A backend stayed down longer than ``MUSE_BACKFILL_OUTAGE_S``: the chunk (and its job) fails."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


@dataclass(frozen=True)
class Backend:
    """One backend a chunk uses: a label for people and a probe that raises when it is down."""

    label: str  # e.g. "Milvus at http://milvus:19530"
    probe: Callable[[], None]

    def answers(self) -> bool:
        """True when the probe succeeds within :data:`PROBE_TIMEOUT_S`."""
        from muse import deadlines

        try:
            with deadlines.deadline(PROBE_TIMEOUT_S, f"probe of {self.label}"):
                deadlines.call_within(self.probe, label=f"probe of {self.label}")
            return True
        except Exception as e:  # any failure of a probe means: down now
            log.debug("%s does not answer: %s", self.label, e)
            return False


def is_retriable(exc: BaseException) -> bool:
    """True for transient backend failures: worth waiting for or retrying."""
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import DisconnectionError
    from sqlalchemy.exc import OperationalError as DatabaseError

    if isinstance(exc, BackendUnavailable):
        return exc.retriable
    return isinstance(exc, (ConnectionError, TimeoutError, DatabaseError, DisconnectionError, BrokerError))


def backoff_s(retries: int, base_s: float = BACKOFF_BASE_S) -> float:
    """Seconds to wait before retry number ``retries + 1`` of a chunk's own failure."""
    delay = min(base_s * (2**retries), BACKOFF_MAX_S)
    return delay * random.uniform(0.75, 1.25)


def redact(url: str) -> str:
    """``url`` without its password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# -- the backends -------------------------------------------------------------------------------
def database(settings: Settings) -> Backend:
    from muse.db import check_database

    return Backend(f"the database at {redact(settings.database_url)}", lambda: check_database(settings))


def milvus(settings: Settings) -> Backend:
    def probe() -> None:
        from muse.vectorstore import VectorStore

        with VectorStore(settings) as store:
            store.check(timeout_s=PROBE_TIMEOUT_S)

    return Backend(f"Milvus at {redact(settings.milvus_uri)}", probe)


def _redis_probe(url: str) -> Callable[[], None]:
    def probe() -> None:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()

    return probe


def broker(settings: Settings) -> Backend:
    url = settings.broker_url

    def probe() -> None:
        if url.startswith(("redis://", "rediss://")):
            _redis_probe(url)()
            return
        from kombu import Connection

        with Connection(url, connect_timeout=PROBE_TIMEOUT_S) as conn:
            conn.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT_S)

    return Backend(f"the broker at {redact(url)}", probe)


def sequence_store(settings: Settings) -> Backend | None:
    url = getattr(settings, "sequence_url", "") or ""
    if not url.startswith(("redis://", "rediss://")):
        return None  # file and milvus sequences fail with their own backend
    return Backend(f"the sequence store at {redact(url)}", _redis_probe(url))


def backends_of(settings: Settings, exc: BaseException) -> list[Backend]:
    """The backends a failure may come from, the likeliest first."""
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import DBAPIError, DisconnectionError

    out: list[Backend] = [database(settings)]
    if not settings.embedded_milvus:  # Milvus Lite lives in this process: it has no outages to wait out
        out.append(milvus(settings))
    seq = sequence_store(settings)
    if seq is not None:
        out.append(seq)
    is_db = isinstance(exc, (DBAPIError, DisconnectionError)) or str(exc).startswith(("the database", "MUSE_DATABASE_URL"))
    if isinstance(exc, BrokerError) and not settings.broker_url.startswith("filesystem://"):
        out.insert(0, broker(settings))
    elif not is_db and len(out) > 1:
        out.insert(0, out.pop(1))  # Milvus first
    return out


def down_backend(settings: Settings, exc: BaseException) -> Backend | None:
    """The first backend (of :func:`backends_of`) that does not answer now, or None when all do
    (then the failure was the chunk's own)."""
    for backend in backends_of(settings, exc):
        if not backend.answers():
            return backend
    return None


def wait_until_up(backend: Backend, until: float, period_s: float = PROBE_PERIOD_S) -> bool:
    """Probe ``backend`` every ``period_s`` until it answers (True) or ``time.monotonic()`` passes
    ``until`` (False)."""
    while True:
        if backend.answers():
            return True
        if time.monotonic() >= until:
            return False
        time.sleep(max(0.0, min(period_s, until - time.monotonic())))


# -- recording what a chunk waits for -----------------------------------------------------------------
def note_wait(settings: Settings, chunk_id: int, what: str, error: str, outage: bool) -> dt.datetime | None:
    """Record that chunk ``chunk_id`` waits for ``what`` (a backend's label, or :data:`RETRY`).

    For an outage the job records it too (since when: the first chunk's report; later reports keep
    it). Returns the job's ``waiting_since`` for an outage, or None (a retry, or the database is the
    one down: nothing can be recorded).
    """
    from sqlalchemy import update

    from muse import models
    from muse.db import session_scope
    from muse.models import utcnow

    try:
        with session_scope(settings) as session:
            chunk = session.get(models.BackfillChunk, int(chunk_id))
            if chunk is None:
                return None
            now = utcnow()
            if chunk.waiting_for != what:
                chunk.waiting_since = now
            chunk.waiting_for = what[:255]
            chunk.error = error[:2000]
            if not outage:
                return None
            job_id = chunk.job_id
            session.execute(
                update(models.BackfillJob)
                .where(models.BackfillJob.id == job_id, models.BackfillJob.waiting_since.is_(None))
                .values(waiting_since=now)
            )
            session.execute(update(models.BackfillJob).where(models.BackfillJob.id == job_id)
                            .values(waiting_for=what[:255]))
            session.flush()
            since = session.get(models.BackfillJob, job_id).waiting_since
            return since if since.tzinfo is not None else since.replace(tzinfo=dt.timezone.utc)
    except Exception as e:  # the database may be the backend that is down
        log.debug("chunk %d: cannot record that it waits for %s: %s", chunk_id, what, e)
        return None


# -- the runner ---------------------------------------------------------------------------------------
def run_patiently(settings: Settings, chunk_id: int, attempt: Callable[[bool], T]) -> T:
    """Run ``attempt(count_attempt)`` until it returns, waiting out outages and retrying the chunk's
    own failures (see the module docstring). ``count_attempt`` is False for a run that follows an
    outage (the chunk's ``attempts`` must not grow) and True otherwise.

    Raises:
        The attempt's exception when it is not retriable or the chunk's own retries are spent;
        :class:`OutageTooLong` when a backend stayed down past ``MUSE_BACKFILL_OUTAGE_S``.
    """
    from indexer.backfill import LeaseKeeper
    from muse.models import utcnow

    budget = float(settings.backfill_outage_s)
    own = 0
    count = True
    first_seen: float | None = None  # this process's first sight of the current outage (monotonic)
    while True:
        try:
            result = attempt(count)
        except Exception as exc:
            if not is_retriable(exc):
                raise
            # From the failure on, through the probes (a frozen backend takes up to PROBE_TIMEOUT_S to
            # answer) and the waits, the worker keeps renewing the chunk's lease: it is never taken for dead.
            with LeaseKeeper(settings, chunk_id):
                backend = down_backend(settings, exc)
                if backend is None:  # every backend answers: the chunk's own failure
                    own += 1
                    first_seen = None
                    if own > int(settings.backfill_retries):
                        raise
                    delay = backoff_s(own - 1, settings.backfill_backoff_s)
                    log.warning("chunk %d: %s; retry %d/%d in %.1f s", chunk_id, exc, own, settings.backfill_retries, delay)
                    note_wait(settings, chunk_id, RETRY,
                              f"retrying (retry {own} of {settings.backfill_retries}) in {delay:.1f} s after: {exc}", False)
                    time.sleep(delay)
                    count = True
                    continue
                first_seen = first_seen if first_seen is not None else time.monotonic()
                since = note_wait(settings, chunk_id, backend.label,
                                  f"waiting for {backend.label} (it does not answer): {exc}", True)
                waited = (utcnow() - since).total_seconds() if since is not None else time.monotonic() - first_seen
                left = budget - waited
                if left <= 0:
                    raise OutageTooLong(
                        f"{backend.label} was unavailable for {waited:.0f} s, longer than MUSE_BACKFILL_OUTAGE_S "
                        f"({budget:.0f} s); last error: {exc}"
                    ) from exc
                log.warning("chunk %d: %s does not answer (%s); waiting for it, up to %.0f s more, without spending "
                            "an attempt", chunk_id, backend.label, exc, left)
                if wait_until_up(backend, time.monotonic() + left):
                    log.warning("chunk %d: %s answers again after %.0f s; running the chunk again", chunk_id,
                                backend.label, time.monotonic() - first_seen)
                count = False
                continue
        return result  # the chunk's record (done) clears what it waited for


__all__ = [
    "Backend", "OutageTooLong", "PROBE_PERIOD_S", "PROBE_TIMEOUT_S", "RETRY", "backends_of", "backoff_s",
    "down_backend", "is_retriable", "note_wait", "run_patiently", "wait_until_up",
]
