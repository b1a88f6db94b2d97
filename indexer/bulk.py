"""Behaviour backfill through Milvus bulk import: files the server imports instead of upserts.

A *bulk job* is an ordinary backfill job (same ``backfill_jobs`` / ``backfill_chunks`` rows, same
phases, ``status``, ``resume``, ``cancel`` and recovery, see :mod:`indexer.jobs`) whose options say
``"bulk": true``. Its item chunks run as usual (encoding, or the upsert of shipped vectors); each of
its ``behaviours`` chunks, instead of upserting, runs :func:`import_behaviours_chunk`:

1. read the chunk's users' histories and the item vectors of the items they hold (from the item
   collection, as the upsert path does), and compute the deterministic primary keys
   (:func:`muse.vectorstore.behaviour_pk`);
2. write one numpy file per field (``pk.npy``, ``user_id.npy``, ``item_id.npy``, ``position.npy``,
   ``vector.npy``: the column layout every Milvus server from 2.3 imports) under
   ``<collection>/job<J>/chunk<C>/a<attempt>/`` of the bulk storage (:class:`BulkStorage`:
   a folder the server reads by absolute path, or an S3/MinIO bucket);
3. start one import task, wait for it, and check that the server persisted exactly the rows written;
4. write the users' sequences (:mod:`muse.sequences`), remove the files.

**No duplicates on a re-run.** An import is an insert: importing a chunk twice would double its
rows. A re-run of a chunk (a retry after an outage, a worker killed mid-import, ``resume``) first
asks the server for every import task whose files lie under the chunk's folder (any attempt) and
waits until none of them is still running: a task outlives the worker that started it. Then:

* if any of them completed, the chunk's primary keys are deleted (by key, which needs no query
  and so also reaches imported rows not yet visible to queries), then the chunk is imported once;
* if none completed (a task fails when the server restarts under it), it is imported once.

Rows of the chunk's users already visible (an earlier job into the same collection) are deleted
the same way first. Deleting and importing again is always right, where adopting an earlier
task's rows would not be (an attempt may have deleted them before dying). The one case this does
not cover: a worker that stops (frozen, not dead) for longer than its lease between its last
check and starting its import while another worker re-runs the chunk; the lease check just
before starting keeps that window to milliseconds.

Milvus Lite has no import: :func:`choose` says so in one sentence and the job upserts instead.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from sqlalchemy import select

from indexer.backfill import (
    BEHAVIOURS,
    DONE,
    HISTORY_BATCH,
    ChunkResult,
    ChunkSpec,
    _ensure_collections,
    check_missing_items,
    copy_behaviours_chunk,
    history_entries,
    renew_lease,
)
from indexer.worker_context import current
from muse import models
from muse.arrays import l2_normalise, lookup
from muse.db import session_scope
from muse.errors import BackendUnavailable, ConfigurationError, DataError
from muse.settings import Settings

log = logging.getLogger(__name__)

#: Behaviour rows aimed at per bulk chunk (sets the default users per chunk from the mean history
#: length): the server's fixed cost per import task (a segment per partition-key bucket) is
#: amortised over this many rows, and one chunk's index arrays stay about 50 MB (the vectors are
#: gathered into a memory-mapped file, ``WRITE_ROWS`` at a time).
BULK_CHUNK_ROWS = 1_000_000
#: Seconds a chunk waits for an import task (its own, or one an earlier attempt left running)
#: before giving up; Milvus itself kills a task after ``rootCoord.importTaskExpiration`` (900 s).
IMPORT_WAIT_S = 1800.0
#: Seconds between polls of an import task.
POLL_S = 0.25
#: Rows gathered into the vector file per step (bounds the memory of one chunk's vectors).
WRITE_ROWS = 65_536
#: Seconds :func:`verify_job` waits for imported rows to become visible to queries (the query
#: nodes pick imported segments up some seconds after the task completes).
VISIBLE_WAIT_S = 300.0
#: Seconds a count above the written rows may last before :func:`verify_job` calls it duplicates
#: (a deleted segment and its replacement can both be visible for a moment).
OVERCOUNT_GRACE_S = 20.0
#: Words in a failed task's reason that mean the server, not the files, was at fault.
_TRANSIENT_REASONS = ("restart", "timeout", "timed out", "unavailable", "not ready", "cancel", "expire", "stopping")


# -- where the files go -------------------------------------------------------------------------
class BulkStorage:
    """Where a chunk's import files are written and the paths the Milvus server reads them by.

    * ``file:///DIR``: the files are written under ``DIR`` and the server is given their absolute
      paths. Right for a Milvus server with local storage (``common.storageType: local``, the
      ``milvus`` package's ``milvus-server``) on this host, or with ``DIR`` mounted at the same path.
    * ``s3://BUCKET/PREFIX``: the files are written to a local staging folder, uploaded to
      ``BUCKET`` at ``MUSE_BULK_S3_ENDPOINT`` (the ``minio`` client) and the server is given the
      object keys. ``BUCKET`` must be the bucket the Milvus server stores its data in
      (``minio.bucketName``), since Milvus imports from its own bucket.
    """

    def __init__(self, settings: Settings) -> None:
        url = urlparse(settings.bulk_url)
        self.settings = settings
        self.scheme = url.scheme
        if self.scheme == "file":
            self.root = Path(unquote(url.path))
            self.bucket = ""
            self.prefix = str(self.root)
        elif self.scheme == "s3":
            self.bucket = url.netloc
            self.prefix = url.path.strip("/")
            self.root = settings.path("bulk-staging")
        else:
            raise ConfigurationError(f"MUSE_BULK_URL={settings.bulk_url!r}: unknown scheme; valid: file, s3")
        self._client: Any = None

    def local_dir(self, key: str) -> Path:
        """The local folder the files of ``key`` are written to (created)."""
        path = self.root / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def server_path(self, key: str, name: str = "") -> str:
        """What the server is given for file ``name`` of ``key`` (with ``name`` empty: the prefix
        every such path starts with, ending in ``/``)."""
        if self.scheme == "file":
            return str(self.root / key / name) if name else f"{self.root / key}/"
        return "/".join(p for p in (self.prefix, key, name) if p) + ("" if name else "/")

    def publish(self, key: str, names: list[str]) -> list[str]:
        """Make the written files of ``key`` readable by the server; returns their server paths."""
        if self.scheme == "s3":
            client = self._s3()
            for name in names:
                local = self.root / key / name
                try:
                    client.fput_object(self.bucket, self.server_path(key, name), str(local))
                except Exception as e:  # network, credentials or a missing bucket: say which
                    raise BackendUnavailable(
                        f"cannot upload {local} to s3://{self.bucket}/{self.server_path(key, name)} at "
                        f"MUSE_BULK_S3_ENDPOINT={self.settings.bulk_s3_endpoint!r}: {e}"
                    ) from e
            shutil.rmtree(self.root / key, ignore_errors=True)
        return [self.server_path(key, name) for name in names]

    def remove(self, key: str) -> None:
        """Remove every file under ``key`` (all attempts), locally and in the bucket."""
        shutil.rmtree(self.root / key, ignore_errors=True)
        if self.scheme == "s3":
            from minio.deleteobjects import DeleteObject

            client = self._s3()
            objects = client.list_objects(self.bucket, prefix=self.server_path(key), recursive=True)
            errors = list(client.remove_objects(self.bucket, (DeleteObject(o.object_name) for o in objects)))
            for err in errors:
                log.warning("could not remove s3://%s/%s: %s", self.bucket, err.name, err)

    def _s3(self) -> Any:
        if self._client is None:
            try:
                from minio import Minio
            except ImportError as e:
                raise ConfigurationError(
                    "MUSE_BULK_URL is s3://...: install the S3 client with `pip install 'muse-retrieval[bulk]'` (minio)"
                ) from e
            endpoint = self.settings.bulk_s3_endpoint
            secure = endpoint.startswith("https://")
            host = endpoint.split("://", 1)[-1].rstrip("/")
            self._client = Minio(host, access_key=self.settings.bulk_s3_access_key or None,
                                 secret_key=self.settings.bulk_s3_secret_key or None, secure=secure)
        return self._client


# -- choosing the path --------------------------------------------------------------------------
@dataclass(frozen=True)
class BulkChoice:
    """Whether a backfill imports its behaviours in bulk, and the sentence to tell the user (or None)."""

    bulk: bool
    note: str | None


def choose(settings: Settings, n_behaviours: int, requested: bool | None = None) -> BulkChoice:
    """Bulk import or upserts for a backfill of ``n_behaviours`` behaviour rows.

    ``requested``: True (``--bulk``), False (``--no-bulk``) or None (automatic: bulk on a Milvus
    server from ``settings.bulk_min_rows`` rows on). Milvus Lite always upserts; when bulk was
    asked for, or the size would have chosen it, the note says so.
    """
    threshold = int(settings.bulk_min_rows)
    wanted = requested if requested is not None else n_behaviours >= threshold
    if not wanted:
        return BulkChoice(False, None)
    if settings.embedded_milvus:
        why = "--bulk" if requested else f"{n_behaviours:,} behaviours (>= MUSE_BULK_MIN_ROWS={threshold:,})"
        return BulkChoice(False, f"Milvus Lite has no bulk import, so the behaviours are written with upserts "
                                 f"despite {why}.")
    if requested is None:
        return BulkChoice(True, f"{n_behaviours:,} behaviours (>= MUSE_BULK_MIN_ROWS={threshold:,}): importing them "
                                f"through Milvus bulk import (--no-bulk to upsert).")
    return BulkChoice(True, None)


def bulk_user_chunk_size(dataset: Any, rows: int = BULK_CHUNK_ROWS) -> int:
    """Users per bulk chunk so that a chunk holds about ``rows`` behaviours (from the dataset's mean
    history length)."""
    n_users = max(1, int(dataset.n_users))
    n_behaviours = int(dataset.meta.get("n_behaviours") or 0) or n_users
    return max(1, int(rows * n_users / max(1, n_behaviours)))


def create_job(settings: Settings, source: str, dataset: str, *, user_chunk_size: int | None = None,
               **kwargs: Any) -> int:
    """:func:`indexer.jobs.create_job` for a bulk job: the same job and chunk rows, marked ``bulk``,
    with behaviour chunks of about :data:`BULK_CHUNK_ROWS` rows unless ``user_chunk_size`` is given.
    Nothing is enqueued yet, so marking it after creation is safe."""
    from indexer import jobs
    from muse.data.format import Dataset

    size = bulk_user_chunk_size(Dataset.open(settings, dataset)) if user_chunk_size is None else user_chunk_size
    job_id = jobs.create_job(settings, source, dataset, user_chunk_size=size, **kwargs)
    with session_scope(settings) as session:
        job = session.get(models.BackfillJob, job_id)
        job.options = {**(job.options or {}), "bulk": True}
    log.info("job %d imports its behaviours in bulk (%d users per chunk)", job_id, size)
    return job_id


def is_bulk_job(settings: Settings, job_id: int) -> bool:
    """True when job ``job_id`` imports its behaviours in bulk."""
    with session_scope(settings) as session:
        job = session.get(models.BackfillJob, int(job_id))
        return bool(job is not None and (job.options or {}).get("bulk"))


# -- one chunk ------------------------------------------------------------------------------------
@dataclass
class ChunkRows:
    """The behaviour rows of one chunk that have an item vector (int64 arrays of one length) and
    the unit vectors of their distinct items (``item_rows`` indexes ``vectors``)."""

    users: np.ndarray
    positions: np.ndarray
    items: np.ndarray
    item_rows: np.ndarray  # int64 [n], row of each behaviour's item in ``vectors``
    vectors: np.ndarray  # float32 [k, d], L2-normalised
    skipped: int  # history entries whose item has no vector
    # int64 [s] the distinct items of those entries
    missing: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def pks(self) -> np.ndarray:
        from muse.vectorstore import behaviour_pk

        return behaviour_pk(self.users, self.positions)

    def __len__(self) -> int:
        return int(self.users.shape[0])


def read_chunk_rows(store: Any, spec: ChunkSpec) -> ChunkRows:
    """Users ``[spec.start, spec.stop)``'s history entries, with the vectors of their items read
    from the item collection (entries whose item has none are counted in ``skipped``)."""
    dataset = current().dataset(spec.dataset_location)
    users, positions, items = [], [], []
    for batch in dataset.iter_histories(HISTORY_BATCH, spec.start, spec.stop, columns=["user_id", "item_ids"]):
        batch_users, batch_positions, batch_items = history_entries(batch)
        if len(batch_items) == 0:
            continue
        users.append(batch_users)
        positions.append(batch_positions)
        items.append(batch_items)
    if not users:
        empty = np.zeros(0, np.int64)
        return ChunkRows(empty, empty, empty, empty, np.zeros((0, spec.dim), np.float32), 0)
    u, p, i = np.concatenate(users), np.concatenate(positions), np.concatenate(items)
    found, vectors = store.get_item_vectors(spec.ref, np.unique(i))  # int64[k], float32[k, d]
    rows = lookup(found, i) if len(found) else np.full(len(i), -1, np.int64)  # [n], -1 = no vector
    has = rows >= 0
    return ChunkRows(u[has], p[has], i[has], rows[has], l2_normalise(vectors), int((~has).sum()),
                     np.unique(i[~has]))


def write_files(directory: Path, rows: ChunkRows) -> list[str]:
    """One ``<field>.npy`` per behaviour field in ``directory``; returns the file names in field order.
    The vector file is filled ``WRITE_ROWS`` rows at a time through a memory map."""
    from muse.vectorstore import BEHAVIOUR_FIELDS

    columns = {"pk": rows.pks, "user_id": rows.users, "item_id": rows.items, "position": rows.positions}
    names = []
    for field in BEHAVIOUR_FIELDS:
        path = directory / f"{field}.npy"
        if field == "vector":
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                            shape=(len(rows), rows.vectors.shape[1]))
            for lo in range(0, len(rows), WRITE_ROWS):
                out[lo : lo + WRITE_ROWS] = rows.vectors[rows.item_rows[lo : lo + WRITE_ROWS]]
            out.flush()
            del out
        else:
            np.save(path, np.ascontiguousarray(columns[field], dtype=np.int64))
        names.append(path.name)
    return names


def chunk_key(store: Any, spec: ChunkSpec) -> str:
    """The storage folder of a chunk's files (every attempt lies below it)."""
    return f"{store.behaviour_collection(spec.ref)}/job{spec.job_id}/chunk{spec.chunk_id}"


def chunk_tasks(store: Any, storage: BulkStorage, spec: ChunkSpec) -> list[Any]:
    """Import tasks the server remembers whose files lie under this chunk's folder (any attempt),
    plus every unfinished task that does not say which files it reads (a server that lists tasks
    without their files): those might be this chunk's."""
    from muse.vectorstore import BEHAVIOURS_KIND

    prefix = storage.server_path(chunk_key(store, spec))
    return [t for t in store.import_tasks(spec.ref, BEHAVIOURS_KIND)
            if (t.files and t.files[0].startswith(prefix)) or (not t.files and not t.finished)]


def wait_for_task(store: Any, task_id: int, timeout_s: float = IMPORT_WAIT_S) -> Any:
    """Poll an import task until it completes or fails.

    Raises:
        BackendUnavailable: still running after ``timeout_s`` (retriable: the chunk runs again later).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        task = store.import_task(task_id)
        if task.finished:
            return task
        if time.monotonic() > deadline:
            raise BackendUnavailable(
                f"Milvus import task {task_id} is still {task.state} ({task.progress}%) after {timeout_s:.0f} s"
            )
        time.sleep(POLL_S)


def import_behaviours_chunk(settings: Settings, spec: ChunkSpec) -> ChunkResult:
    """Write the behaviour rows of users ``[spec.start, spec.stop)`` through one bulk import (see
    the module's docstring for how a re-run avoids duplicates). On Milvus Lite: the upsert path.

    Raises:
        BackendUnavailable: Milvus or the storage is unreachable, or the import failed for a
        server-side reason (a restart): the chunk is retried.
        DataError: the server rejected the files, or persisted another number of rows than written.
    """
    from muse.vectorstore import BEHAVIOURS_KIND

    store = _ensure_collections(settings, spec.ref, spec.dim)
    if not store.supports_bulk_import:
        log.warning("job %d: Milvus Lite has no bulk import; chunk %d is written with upserts", spec.job_id,
                    spec.chunk_id)
        return copy_behaviours_chunk(settings, spec)
    storage = BulkStorage(settings)
    key = chunk_key(store, spec)
    rows = read_chunk_rows(store, spec)
    if rows.skipped:
        check_missing_items(settings, spec, rows.missing)  # an item the job wrote, not returned: retried
    n = len(rows)
    result = ChunkResult(n_written=n, n_failed=rows.skipped)
    if n == 0:
        return result

    # Import tasks of earlier attempts outlive the workers that started them: wait for them, then
    # delete whatever they (or an earlier job) wrote under the chunk's keys before importing once.
    earlier = chunk_tasks(store, storage, spec)  # any run may follow one that died mid-import
    earlier = [t if t.finished else wait_for_task(store, t.task_id) for t in earlier]
    completed = [t for t in earlier if t.completed or not t.files]
    if completed:
        log.warning("chunk %d: earlier import tasks %s may have written rows (%s); deleting the chunk's keys before "
                    "importing it again", spec.chunk_id, [t.task_id for t in completed],
                    [f"{t.state}, {t.row_count} rows" for t in completed])
        store.delete_behaviours_by_pk(spec.ref, rows.pks)
    elif store.count_behaviours_of(spec.ref, np.unique(rows.users)) > 0:
        log.info("chunk %d: its users already have rows (an earlier job); replacing them", spec.chunk_id)
        store.delete_behaviours_by_pk(spec.ref, rows.pks)
    attempt_key = f"{key}/a{spec.attempt}"
    names = write_files(storage.local_dir(attempt_key), rows)
    files = storage.publish(attempt_key, names)
    if not renew_lease(settings, spec.chunk_id):
        raise BackendUnavailable(f"chunk {spec.chunk_id}: this worker lost its lease before importing; "
                                 "another worker runs the chunk")
    task = wait_for_task(store, store.start_import(spec.ref, BEHAVIOURS_KIND, files))
    if task.failed:
        message = f"Milvus import task {task.task_id} of chunk {spec.chunk_id} failed: {task.reason}"
        if any(w in task.reason.lower() for w in _TRANSIENT_REASONS):
            raise BackendUnavailable(message)
        raise DataError(message)
    if task.row_count != n:
        raise DataError(f"Milvus import task {task.task_id} of chunk {spec.chunk_id} persisted "
                        f"{task.row_count} rows, {n} were written")
    store.write_sequences(spec.ref, rows.users, rows.positions, rows.items)
    storage.remove(key)
    return result


# -- the whole job ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verified:
    """What :func:`verify_job` found: rows visible in the behaviour collection against the job's."""

    collection: str
    expected: int  # behaviour rows the job's chunks wrote
    found: int  # count(*) of the collection
    waited_s: float


def verify_job(settings: Settings, job_id: int, timeout_s: float = VISIBLE_WAIT_S) -> Verified:
    """Wait until ``count(*)`` of a done job's behaviour collection equals the rows its chunks
    wrote. Imported segments become visible to queries some seconds after their task completes
    (15-45 s on the 2.3 server, which picks new segments up periodically); releasing and loading
    the collection instead takes longer (a minute on 2 CPUs: one segment per partition-key bucket).

    Raises:
        DataError: more rows than written (duplicates), or still a different number after ``timeout_s``.
    """
    from indexer.backfill import get_store
    from muse.versions import job_ref

    with session_scope(settings) as session:
        expected = int(sum(
            session.scalars(
                select(models.BackfillChunk.n_written).where(
                    models.BackfillChunk.job_id == int(job_id), models.BackfillChunk.kind == BEHAVIOURS,
                    models.BackfillChunk.status == DONE,
                )
            )
        ))
    ref = job_ref(settings, job_id)
    store = get_store(settings)
    name = store.behaviour_collection(ref)
    t0 = time.monotonic()
    over_since: float | None = None
    while True:
        found = store.count_behaviours(ref)
        waited = time.monotonic() - t0
        if found == expected:
            return Verified(name, expected, found, waited)
        over_since = (over_since or waited) if found > expected else None
        if over_since is not None and waited - over_since > OVERCOUNT_GRACE_S:
            raise DataError(f"{name} holds {found:,} behaviour rows, job {job_id} wrote {expected:,}: "
                            f"{found - expected:,} more than written (duplicate primary keys)")
        if waited > timeout_s:
            raise DataError(f"{name} shows {found:,} behaviour rows {timeout_s:.0f} s after job {job_id} "
                            f"finished, which wrote {expected:,}")
        time.sleep(1.0)

