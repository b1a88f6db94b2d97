"""Milvus access: the one module that imports pymilvus.

Every (dataset, embedding source, source version), a :class:`CollectionRef`, has two collections:

* ``<prefix>_<dataset>_<source>_v<version>_items``: primary key ``item_id``, ``category``, ``vector``;
* ``<prefix>_<dataset>_<source>_v<version>_behaviours``: a deterministic int64 primary key per
  (user, position), ``user_id`` as the **partition key**, ``item_id``, ``position``, ``vector``.

Names are sanitised to Milvus' rules (letters, digits, ``_``; at most :data:`MAX_NAME_LENGTH`
characters, a :class:`ConfigurationError` otherwise). Sanitising can map two datasets to one name
(``a-b`` and ``a_b``), so each collection also carries its exact identity as collection properties
(``muse.dataset``, ``muse.source``, ``muse.version``, ``muse.kind``), checked before any read or
write: a collection of another dataset or version is never used by accident. Collections of the
old naming (``<prefix>_<source>_items``, no identity) are *legacy*: :meth:`VectorStore.legacy_collections`.

Primary keys are deterministic, so every write is an ``upsert`` and a retried task never
duplicates rows. A server also takes behaviour rows as files through its bulk import
(:meth:`VectorStore.start_import`, used by :mod:`indexer.bulk`, which keeps re-runs free of
duplicates by deleting by key first). Vectors are stored L2-normalised, so COSINE (CPU indexes) and IP (GPU indexes)
rank identically. Filters are built from typed ints, never from user text.

The same code runs against Milvus Lite (a local ``.db`` file), the Milvus 2.3 server of the
``milvus`` package and current 2.5/2.6 servers; it therefore avoids features that 2.3 lacks
(filter templates, the query iterator) and pages through a user's behaviours by position ranges.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from muse import deadlines
from muse.arrays import check_k, l2_normalise
from muse.errors import BackendUnavailable, ConfigurationError, NotFoundError
from muse.settings import CONSISTENCY_LEVELS, Settings
from muse.validation import MAX_NQ, check_id, check_ids, check_positions, check_vectors

log = logging.getLogger(__name__)

#: Largest ``limit`` (offset + limit) a Milvus query or search accepts.
MAX_QUERY_WINDOW = 16384
#: Rows per upsert request (keeps each gRPC message well under the 64 MB default).
UPSERT_BATCH = 2000
#: Behaviours fetched per query when paging through a user's history.
FETCH_BATCH = 8192
#: Pages of one history fetched concurrently.
FETCH_PARALLEL = 4
#: Partition-key buckets of a behaviour collection (Milvus' own default is 16 on 2.3).
NUM_PARTITIONS = 64

_SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,47}$")
_PREFIX_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
#: Longest collection or alias name Milvus accepts (``proxy.maxNameLength``, 255 by default).
MAX_NAME_LENGTH = 255
#: Collection kinds and their name suffixes.
ITEMS_KIND, BEHAVIOURS_KIND = "items", "behaviours"
#: Collection properties holding a collection's exact identity.
PROP_DATASET, PROP_SOURCE, PROP_VERSION, PROP_KIND = "muse.dataset", "muse.source", "muse.version", "muse.kind"
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
#: Fields of a behaviour collection in the order of its bulk-import files (``<field>.npy`` each).
BEHAVIOUR_FIELDS = ("pk", "user_id", "item_id", "position", "vector")
#: Import task states (pymilvus' names) after which a task changes no more.
IMPORT_COMPLETED = "Completed"
IMPORT_FAILED_STATES = ("Failed", "Failed and cleaned")
#: Primary keys per ``pk in [...]`` delete request.
DELETE_BATCH = 2000


class CollectionNotFound(NotFoundError):
    """A Milvus call named a collection that does not exist (any more): it was never created or it
    was dropped while this client held it. The store has forgotten what it cached about it."""

    def __init__(self, message: str, collection: str | None) -> None:
        super().__init__(message)
        self.collection = collection


#: Words in a Milvus or gRPC error that mean the server or the connection failed, not the request.
_TRANSPORT_WORDS = (
    "unavailable", "connect", "timeout", "timed out", "deadline", "retry", "socket", "closed channel",
    "connection reset", "refused", "broken pipe", "eof", "transport", "not ready", "stopping",
    "no available", "not serviceable", "shard delegator", "channel not", "node not", "offline",
)
#: Milvus 2.3 error codes that mean the server is not (yet) able to serve: retry later.
_TRANSIENT_CODES = frozenset({2, 3, 4, 5, 6, 7, 8, 9, 103, *range(500, 700), *range(900, 1100)})
#: Calls that may be re-sent at once after a reconnect (reads, and writes with deterministic keys).
_RETRY_SAFE = frozenset(
    {"search", "query", "has_collection", "describe_collection", "describe_index", "list_indexes",
     "list_collections", "get_server_version", "upsert", "delete", "load_collection", "flush"}
)


def classify_milvus_error(exc: BaseException) -> str:
    """``"not_loaded"``, ``"not_found"``, ``"transient"`` (server or transport), ``"input"`` (the
    request is wrong: retrying cannot help) or ``"other"`` (not a Milvus or gRPC error)."""
    import grpc
    from pymilvus.exceptions import (
        DataNotMatchException,
        DataTypeNotMatchException,
        MilvusException,
        ParamError,
        PrimaryKeyException,
    )

    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
            return "input"
        return "transient"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return "transient"
    if not isinstance(exc, MilvusException):
        return "other"
    code = getattr(exc, "code", None)
    msg = str(exc).lower()
    if code == 101 or "not loaded" in msg:
        return "not_loaded"
    if code == 100 or "can't find collection" in msg or "collection not found" in msg:
        return "not_found"
    if isinstance(exc, (ParamError, DataNotMatchException, DataTypeNotMatchException, PrimaryKeyException)):
        return "input"
    if code in _TRANSIENT_CODES or any(w in msg for w in _TRANSPORT_WORDS):
        return "transient"
    return "input"
@dataclass(frozen=True, order=True)
class CollectionRef:
    """One version of one embedding source's vectors for one dataset: what a pair of collections holds.

    ``version`` is the embedding source's version (``muse embed list``), so ``scl`` v2 of dataset
    ``demo-tiny-0`` is ``CollectionRef("demo-tiny-0", "scl", 2)``.
    """

    dataset: str
    source: str
    version: int

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset or len(self.dataset) > 128:
            raise ConfigurationError(f"dataset name {self.dataset!r} is invalid: give 1-128 characters")
        _check_source(self.source)
        if isinstance(self.version, bool) or not isinstance(self.version, (int, np.integer)) or self.version < 1:
            raise ConfigurationError(f"source version must be an integer >= 1, got {self.version!r}")
        object.__setattr__(self, "version", int(self.version))

    def __str__(self) -> str:
        return f"{self.dataset}/{self.source}/v{self.version}"


@dataclass(frozen=True)
class LegacyCollection:
    """A collection of the old naming (``<prefix>_<source>_items``), holding no dataset or version."""

    name: str
    source: str  # the source name as it appears in the collection name
    kind: str  # "items" | "behaviours"


def sanitise(part: str) -> str:
    """A name part in Milvus' alphabet: every character but ASCII letters, digits and ``_`` becomes ``_``."""
    return _UNSAFE.sub("_", part)


def _as_ref(ref: Any) -> CollectionRef:
    if not isinstance(ref, CollectionRef):
        raise ConfigurationError(
            f"expected a muse.vectorstore.CollectionRef(dataset, source, version), got {ref!r}: "
            "collections are per dataset and source version"
        )
    return ref


@dataclass(frozen=True)
class BehaviourBatch:
    """Behaviours of one user: ``positions`` int64[n], ``item_ids`` int64[n], ``vectors`` float32[n, d]."""

    positions: np.ndarray
    item_ids: np.ndarray
    vectors: np.ndarray

    def __len__(self) -> int:
        return int(self.positions.shape[0])


@dataclass(frozen=True)
class ItemHit:
    """One item-collection search result: the item and its cosine score."""

    item_id: int
    score: float


@dataclass(frozen=True)
class Hit:
    """One search result: the behaviour's position in the user's history, its item and cosine score."""

    position: int
    item_id: int
    score: float


@dataclass(frozen=True)
class ImportTask:
    """One Milvus bulk-import task as the server reports it."""

    task_id: int
    state: str  # Pending, Started, Persisted, Completed, Failed, ... (Milvus' names)
    row_count: int  # rows the task persisted
    files: tuple[str, ...]  # the paths it was given
    reason: str  # why it failed ("" otherwise)
    progress: int  # percent, as reported

    @property
    def completed(self) -> bool:
        return self.state == IMPORT_COMPLETED

    @property
    def failed(self) -> bool:
        return self.state in IMPORT_FAILED_STATES

    @property
    def finished(self) -> bool:
        return self.completed or self.failed


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (SplitMix64 finaliser) on uint64 arrays."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def behaviour_pk(user_ids: np.ndarray | Sequence[int], positions: np.ndarray | Sequence[int]) -> np.ndarray:
    """Deterministic int64 primary keys for (user, position) pairs.

    A 64-bit mix of the user id, combined with the position and mixed again, then folded to a
    non-negative int64. The same pair always gives the same key, so re-written behaviours replace
    themselves instead of adding rows.
    """
    users = np.asarray(user_ids, dtype=np.int64).astype(np.uint64)
    pos = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = _splitmix64(_splitmix64(users) ^ pos)
    return (mixed >> np.uint64(1)).astype(np.int64)


def _check_source(source: str) -> str:
    if not _SOURCE_NAME.match(source):
        raise ConfigurationError(
            f"embedding source name {source!r} is invalid: use lower-case letters, digits, '-' or '_'"
        )
    return source.replace("-", "_")


def _int_list(values: np.ndarray | Sequence[int], what: str) -> list[int]:
    return check_ids(values, what).tolist()


class StoreLocked(BackendUnavailable):
    """The embedded Milvus Lite store is open in another process (Milvus Lite admits one at a time).

    Attributes:
        uri: the store; pid: the process holding it (None when the system does not say);
        argv: that process's command line (empty when unknown).
    """

    def __init__(self, uri: str, pid: int | None, argv: list[str]) -> None:
        self.uri, self.pid, self.argv = uri, pid, list(argv)
        who = "another process" if pid is None else f"process {pid}"
        command = f" (`{' '.join(argv)}`)" if argv else ""
        stop = "stop that process" if pid is None else f"stop that process (`kill {pid}`)"
        super().__init__(
            f"the embedded Milvus Lite store {uri} is open in {who}{command}, and Milvus Lite lets one process "
            f"open it at a time: {stop} and run this again; while a `muse serve` holds it, `muse retrieve search` "
            "goes through that service, and for several processes at once use a Milvus server "
            "(MUSE_MILVUS_URI=http://HOST:19530)",
            retriable=False,
        )


def lite_holder(data_dir: Path) -> tuple[int | None, list[str]] | None:
    """``(pid, command line)`` of the other process holding Milvus Lite's lock on ``data_dir`` (its
    ``LOCK`` file, an exclusive ``flock``), or None when no other process holds it. The pid comes from
    ``/proc/locks`` (Linux; None elsewhere), the command line from ``/proc/<pid>/cmdline``."""
    lock = Path(data_dir) / "LOCK"
    if not lock.exists():
        return None
    pids = _flock_pids(lock)
    if os.getpid() in pids:
        return None  # this process holds it: its own Milvus Lite server
    try:
        import fcntl
    except ImportError:  # Windows: Milvus Lite's own error will say it
        return None
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        pid = next(iter(sorted(pids)), None)
        return pid, _cmdline(pid)
    finally:
        os.close(fd)


def _flock_pids(path: Path) -> set[int]:
    """Pids holding a ``flock`` on ``path`` according to ``/proc/locks`` (empty when unknown)."""
    try:
        inode = path.stat().st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return set()
    pids = set()
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2326710 0 EOF" (a "->" marks a waiting request)
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        try:
            if int(parts[5].rsplit(":", 1)[-1]) == inode and int(parts[4]) > 0:
                pids.add(int(parts[4]))
        except ValueError:
            continue
    return pids


def _cmdline(pid: int | None) -> list[str]:
    """The command line of process ``pid`` (empty when unknown)."""
    if pid is None:
        return []
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


#: gRPC channel options of the connection to Milvus Lite. Milvus Lite serves gRPC from a thread of
#: this very process with grpcio's server defaults, which accept a client ping at most every 5
#: minutes without data; pymilvus' channels ping every 10 s, so during a long call (a flush, an index
#: build) the server answers GOAWAY "too_many_pings" and grpc logs it. A loopback connection to its
#: own process cannot die silently, so keepalive pings are switched off for it (not for servers).
LITE_GRPC_OPTIONS: dict[str, Any] = {
    "grpc.keepalive_time_ms": 2**31 - 1,  # gRPC's "never"
    "grpc.keepalive_permit_without_calls": 0,
}


class VectorStore:
    """Typed access to the item and behaviour collections of each :class:`CollectionRef`.

    Args:
        settings: supplies ``milvus_uri``/``milvus_token``, the collection prefix and the index type.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Any = None
        self._lock = threading.Lock()
        self._connecting: Future | None = None  # the connect in progress (one at a time)
        self._epoch = 0  # bumped by close() and by dropping a failed client
        self._loaded: set[str] = set()
        self._server_version: tuple[int, int] | None = None
        self._dims: dict[str, int] = {}
        self._sequences: Any = None

    # -- connection ---------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The pymilvus ``MilvusClient``, connected on first use.

        One connect runs at a time; other threads wait for it. Under a request deadline
        (:mod:`muse.deadlines`) the connect gets only the time left and the caller stops waiting
        at the deadline (the connect goes on in the background and serves the next call).
        """
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is not None:
                return self._client
            flight = self._connecting
            owner = flight is None
            if owner:
                flight = self._connecting = Future()
                epoch = self._epoch
        if owner:
            left = deadlines.remaining()
            if left is None:
                self._connect_into(flight, epoch, None)
            else:
                timeout = max(0.5, left)
                threading.Thread(target=self._connect_into, args=(flight, epoch, timeout),
                                 name="muse-milvus-connect", daemon=True).start()
        return deadlines.wait_for(flight, "Milvus (connecting)", self.settings.milvus_uri)

    def _connect_into(self, flight: Future, epoch: int, timeout_s: float | None) -> None:
        """Connect and publish the client (unless the store was closed or reset meanwhile)."""
        try:
            client = self._connect(timeout_s)
        except BaseException as e:
            with self._lock:
                self._connecting = None
            flight.set_exception(e)
            return
        with self._lock:
            self._connecting = None
            stale = epoch != self._epoch
            if not stale:
                self._client = client
        if stale:  # closed while connecting: nobody will use this client
            _close_quietly(client)
            flight.set_exception(BackendUnavailable(f"Milvus at {self.settings.milvus_uri!r}: the store was closed"))
        else:
            flight.set_result(client)

    def _connect(self, timeout_s: float | None = None) -> Any:
        from pymilvus import MilvusClient

        uri = self.settings.milvus_uri
        if self.settings.embedded_milvus:
            from pathlib import Path

            holder = lite_holder(Path(uri))
            if holder is not None:
                raise StoreLocked(uri, *holder)
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            # Milvus Lite serves gRPC in-process and answers pymilvus' timestamp probe with "Method
            # not implemented", which grpc logs as an error with a traceback on every session.
            logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
        try:
            kwargs: dict[str, Any] = {"uri": uri}
            if self.settings.milvus_token:
                kwargs["token"] = self.settings.milvus_token
            if self.settings.embedded_milvus:
                kwargs["grpc_options"] = dict(LITE_GRPC_OPTIONS)
            else:
                # Under a deadline the connect gets the time left; otherwise at most 10 s.
                kwargs["timeout"] = timeout_s or min(10.0, self.settings.milvus_timeout_s or 10.0)
            return MilvusClient(**kwargs)
        except Exception as e:  # pymilvus raises several unrelated types on connect failure
            raise BackendUnavailable(f"MUSE_MILVUS_URI={uri!r}: cannot connect to Milvus: {e}") from e

    @property
    def sequences(self) -> Any:
        """The users' item-id sequences (:mod:`muse.sequences`), written with every behaviour."""
        with self._lock:
            if self._sequences is None:
                from muse.sequences import open_sequences

                self._sequences = open_sequences(self.settings, self)
            return self._sequences

    def close(self) -> None:
        with self._lock:
            self._epoch += 1
            if self._sequences is not None:
                self._sequences.close()
                self._sequences = None
            if self._client is not None:
                try:
                    self._client.close()
                finally:
                    self._client = None
                    self._loaded.clear()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deadline(self, what: str) -> float | None:
        """Seconds one call may take (``milvus_search_timeout_s`` for searches); None = no deadline."""
        s = self.settings
        if what == "search":
            return s.milvus_search_timeout_s or None
        if what in ("load_collection", "flush", "create_collection"):
            return 4 * s.milvus_timeout_s if s.milvus_timeout_s else None
        return s.milvus_timeout_s or None

    def _reset_client(self, client: Any) -> None:
        """Forget a client whose connection failed; the next call connects afresh. The old client is
        closed on a thread of its own (closing a channel to a frozen server must not hold a request)."""
        with self._lock:
            if self._client is not client or client is None:
                return
            self._client = None
            self._epoch += 1
        threading.Thread(target=_close_quietly, args=(client,), name="muse-milvus-close", daemon=True).start()

    def forget(self, name: str | None = None) -> None:
        """Drop what this store cached about collection ``name`` (all collections when None)."""
        if name is None:
            self._loaded.clear()
            self._dims.clear()
        else:
            self._loaded.discard(name)
            self._dims.pop(name, None)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one client call with a deadline and sort its failures (see :meth:`_call_now`).

        Under a request deadline (:mod:`muse.deadlines`, e.g. a retriever search) the call gets only
        the time left, runs on a helper thread and is given up at the deadline with a
        :class:`~muse.deadlines.DeadlineExceeded` (a ``BackendUnavailable``): a frozen server or a
        reconnect never holds the caller longer. The client is then dropped, so the next call
        connects afresh.
        """
        if deadlines.remaining() is None:
            return self._call_now(what, fn, *args, **kwargs)
        try:
            return deadlines.call_within(self._call_now, what, fn, *args, label=f"Milvus {what}",
                                         where=repr(self.settings.milvus_uri), **kwargs)
        except deadlines.DeadlineExceeded:
            self._reset_client(fn.__self__)
            raise

    def _call_now(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one client call with its timeout and sort its failures.

        * collection not loaded (code 101, e.g. after a server restart): load it and call again once;
        * collection gone (code 100): the store's caches about it are dropped, :class:`CollectionNotFound`;
        * server or transport failure (gRPC UNAVAILABLE/DEADLINE_EXCEEDED, connect errors, 2.3's
          not-ready codes): the client is dropped (the next call reconnects; a fast failure of a
          stale connection is retried once at once), :class:`BackendUnavailable` (retriable);
        * anything else Milvus rejects is the request's fault: :class:`ConfigurationError`.
        """
        method, client = fn.__name__, fn.__self__  # fn is always a bound method of the client
        default_timeout = kwargs.pop("timeout", None) or self._deadline(what)
        if what == "search" and deadlines.remaining() is not None:
            default_timeout = None  # a request's deadline (the retriever's timeout_s) is the search's deadline
        name = args[0] if args and isinstance(args[0], str) else None
        reloaded = reconnected = False
        while True:
            deadlines.check(f"Milvus {what}", repr(self.settings.milvus_uri))
            t0 = time.monotonic()
            try:
                return fn(*args, timeout=deadlines.timeout_for(default_timeout), **kwargs)
            except Exception as e:
                kind = classify_milvus_error(e)
                if kind == "other":
                    raise
                if kind == "not_loaded" and name and not reloaded and what != "load_collection":
                    reloaded = True
                    log.warning("Milvus collection %s is not loaded (server restarted?); loading it again", name)
                    self._loaded.discard(name)
                    self._ensure_loaded(name)
                elif kind == "not_found":
                    self.forget(name)
                    raise CollectionNotFound(
                        f"Milvus collection {name!r} does not exist (dropped?); run a backfill for its source",
                        name,
                    ) from e
                elif kind in ("transient", "not_loaded"):
                    self._reset_client(client)
                    fast = time.monotonic() - t0 < 1.0
                    if reconnected or not fast or method not in _RETRY_SAFE or what != method:
                        raise BackendUnavailable(
                            f"Milvus {what} failed at {self.settings.milvus_uri!r}: {_short(e)}"
                        ) from e
                    reconnected = True
                    log.info("Milvus %s failed on a stale connection (%s); reconnecting", what, _short(e))
                else:
                    raise ConfigurationError(f"Milvus rejected the {what} request: {_short(e)}") from e
                fn = getattr(self.client, method)
                client = self.client

    # -- names and collections ---------------------------------------------------------------
    def _check_name(self, name: str) -> str:
        if not _PREFIX_NAME.match(self.settings.milvus_prefix):
            raise ConfigurationError(
                f"MUSE_MILVUS_PREFIX={self.settings.milvus_prefix!r} is invalid: start with a letter or '_', "
                "then letters, digits or '_'"
            )
        if len(name) > MAX_NAME_LENGTH:
            raise ConfigurationError(
                f"Milvus collection name {name!r} has {len(name)} characters, more than Milvus' "
                f"{MAX_NAME_LENGTH}; use a shorter dataset name or MUSE_MILVUS_PREFIX"
            )
        return name

    def base_name(self, dataset: str, source: str) -> str:
        """``<prefix>_<dataset>_<source>`` (sanitised): the stem of every version's names and of the live aliases."""
        _check_source(source)
        return f"{self.settings.milvus_prefix}_{sanitise(dataset)}_{sanitise(source)}"

    def collection_name(self, ref: CollectionRef, kind: str) -> str:
        """The collection of ``ref`` holding ``kind`` (``"items"`` or ``"behaviours"``)."""
        ref = _as_ref(ref)
        if kind not in (ITEMS_KIND, BEHAVIOURS_KIND):
            raise ConfigurationError(f"collection kind {kind!r} is unknown; valid: items, behaviours")
        return self._check_name(f"{self.base_name(ref.dataset, ref.source)}_v{ref.version}_{kind}")

    def item_collection(self, ref: CollectionRef) -> str:
        return self.collection_name(ref, ITEMS_KIND)

    def behaviour_collection(self, ref: CollectionRef) -> str:
        return self.collection_name(ref, BEHAVIOURS_KIND)

    def _identity(self, ref: CollectionRef, kind: str) -> dict[str, str]:
        return {PROP_DATASET: ref.dataset, PROP_SOURCE: ref.source, PROP_VERSION: str(ref.version), PROP_KIND: kind}

    def _check_identity(self, name: str, ref: CollectionRef, kind: str) -> None:
        """Raise unless collection ``name`` holds exactly ``ref``'s ``kind`` (its identity properties)."""
        desc = self._call("describe_collection", self.client.describe_collection, name)
        props = {str(k): str(v) for k, v in (desc.get("properties") or {}).items()}
        want = self._identity(ref, kind)
        have = {k: props.get(k) for k in want}
        if have == want:
            return
        if have[PROP_DATASET] is None:
            raise ConfigurationError(
                f"Milvus collection {name!r} exists but carries no dataset/source/version identity; "
                f"it was not created by this version of muse; drop or rename it"
            )
        raise ConfigurationError(
            f"Milvus collection {name!r} holds dataset {have[PROP_DATASET]!r}, source {have[PROP_SOURCE]!r} "
            f"v{have[PROP_VERSION]} ({have[PROP_KIND]}), not {ref} ({kind}): the names collide after "
            "sanitising; rename one dataset or use another MUSE_MILVUS_PREFIX"
        )

    def _index_params(self) -> Any:
        from pymilvus import MilvusClient

        params = MilvusClient.prepare_index_params()
        params.add_index(
            field_name="vector",
            index_type=self.settings.index_type,
            metric_type=self.settings.metric_type,
            params=dict(self.settings.index_params),
        )
        return params

    def ensure_collections(self, ref: CollectionRef, dim: int) -> None:
        """Create (if missing) and load the item and behaviour collections of ``ref``.

        Raises:
            ConfigurationError: an existing collection has another vector dimension, or belongs to
            another dataset, source or version (names that collide after sanitising).
        """
        from pymilvus import DataType, MilvusClient

        ref = _as_ref(ref)
        if dim <= 0:
            raise ConfigurationError(f"vector dim must be positive, got {dim}")
        for kind in (ITEMS_KIND, BEHAVIOURS_KIND):
            name = self.collection_name(ref, kind)
            if self._call("has_collection", self.client.has_collection, name):
                self._check_identity(name, ref, kind)
                existing = self._vector_dim(name)
                if existing != dim:
                    raise ConfigurationError(
                        f"collection {name!r} holds {existing}-d vectors, {ref} gives {dim}-d; "
                        "drop it first (`muse source drop`)"
                    )
                self._ensure_loaded(name)
                continue
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            if kind == ITEMS_KIND:
                schema.add_field("item_id", DataType.INT64, is_primary=True)
                schema.add_field("category", DataType.INT64)
                extra: dict[str, Any] = {}
            else:
                schema.add_field("pk", DataType.INT64, is_primary=True)
                schema.add_field("user_id", DataType.INT64, is_partition_key=True)
                schema.add_field("item_id", DataType.INT64)
                schema.add_field("position", DataType.INT64)
                extra = {"num_partitions": NUM_PARTITIONS}
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            self._call(
                "create_collection",
                self.client.create_collection,
                name,
                schema=schema,
                index_params=self._index_params(),
                consistency_level="Strong",
                properties=self._identity(ref, kind),
                **extra,
            )
            log.info("created collection %s (%s, dim %d, index %s)", name, ref, dim, self.settings.index_type)
            self._ensure_loaded(name)

    def _ensure_loaded(self, name: str) -> None:
        if name not in self._loaded:
            self._call("load_collection", self.client.load_collection, name)
            self._loaded.add(name)

    def _vector_dim(self, name: str) -> int:
        desc = self._call("describe_collection", self.client.describe_collection, name)
        for f in desc["fields"]:
            if f["name"] == "vector":
                return int(f["params"]["dim"])
        raise ConfigurationError(f"collection {name!r} has no 'vector' field")

    def _require(self, ref: CollectionRef, kind: str) -> str:
        """The name of ``ref``'s ``kind`` collection, checked (exists, right identity) and loaded."""
        name = self.collection_name(ref, kind)
        if name in self._loaded:  # checked and loaded by this store already: no round trip
            return name
        if not self._call("has_collection", self.client.has_collection, name):
            raise NotFoundError(
                f"Milvus collection {name!r} ({ref}) does not exist; run "
                f"`muse backfill --source {ref.source} --dataset {ref.dataset}` first"
            )
        self._check_identity(name, ref, kind)
        self._ensure_loaded(name)
        return name

    def _check_dim(self, name: str, width: int) -> None:
        """ConfigurationError when vectors of ``width`` do not fit collection ``name`` (cached dim)."""
        if name not in self._dims:
            self._dims[name] = self._vector_dim(name)
        if width != self._dims[name]:
            raise ConfigurationError(f"collection {name!r} holds {self._dims[name]}-d vectors, got {width}-d")

    def dim(self, ref: CollectionRef) -> int:
        """Vector dimension of ``ref``'s item collection (cached after the first call)."""
        name = self._require(ref, ITEMS_KIND)
        if name not in self._dims:
            self._dims[name] = self._vector_dim(name)
        return self._dims[name]

    def open_collections(self, ref: CollectionRef) -> int:
        """Check that both collections of ``ref`` exist and hold ``ref``, load them; returns the dim.

        Raises:
            NotFoundError: a collection is missing. ConfigurationError: it belongs to something else.
        """
        self._require(ref, BEHAVIOURS_KIND)
        return self.dim(ref)

    def has_collections(self, ref: CollectionRef) -> bool:
        """True when both collections of ``ref`` exist."""
        return all(
            self._call("has_collection", self.client.has_collection, self.collection_name(ref, kind))
            for kind in (ITEMS_KIND, BEHAVIOURS_KIND)
        )

    def drop_collections(self, ref: CollectionRef) -> None:
        """Drop both collections of ``ref`` (those that exist) and its users' sequences."""
        self.sequences.drop(self.collection_name(ref, BEHAVIOURS_KIND))
        for kind in (ITEMS_KIND, BEHAVIOURS_KIND):
            name = self.collection_name(ref, kind)
            if self._call("has_collection", self.client.has_collection, name):
                self._call("drop_collection", self.client.drop_collection, name)
                self._loaded.discard(name)
                self._dims.pop(name, None)
                log.info("dropped collection %s (%s)", name, ref)

    def list_collections(self) -> list[str]:
        """Every collection name on the server whose name starts with this store's prefix."""
        names = self._call("list_collections", self.client.list_collections)
        return sorted(n for n in names if n.startswith(self.settings.milvus_prefix + "_"))

    def versions(self, dataset: str, source: str) -> list[int]:
        """Versions of (dataset, source) whose item and behaviour collections both exist, ascending."""
        base = self.base_name(dataset, source)
        pattern = re.compile(rf"^{re.escape(base)}_v(\d+)_({ITEMS_KIND}|{BEHAVIOURS_KIND})$")
        kinds: dict[int, set[str]] = {}
        for name in self.list_collections():
            m = pattern.match(name)
            if m:
                kinds.setdefault(int(m.group(1)), set()).add(m.group(2))
        return sorted(v for v, k in kinds.items() if len(k) == 2)

    def legacy_collections(self) -> list[LegacyCollection]:
        """Collections of the old naming ``<prefix>_<source>_items|_behaviours``: no identity properties."""
        prefix = self.settings.milvus_prefix + "_"
        out = []
        for name in self.list_collections():
            m = re.match(rf"^{re.escape(prefix)}(.+)_({ITEMS_KIND}|{BEHAVIOURS_KIND})$", name)
            if not m:
                continue
            desc = self._call("describe_collection", self.client.describe_collection, name)
            if PROP_DATASET in (desc.get("properties") or {}):
                continue
            out.append(LegacyCollection(name=name, source=m.group(1), kind=m.group(2)))
        return out

    def adopt_legacy(self, legacy: Sequence[LegacyCollection], ref: CollectionRef) -> None:
        """Rename legacy collections to ``ref``'s names and give them ``ref``'s identity.

        Raises:
            ConfigurationError: ``ref``'s collections exist already.
        """
        ref = _as_ref(ref)
        for c in legacy:
            target = self.collection_name(ref, c.kind)
            if self._call("has_collection", self.client.has_collection, target):
                raise ConfigurationError(f"cannot adopt {c.name!r} as {ref}: collection {target!r} exists already")
        for c in legacy:
            target = self.collection_name(ref, c.kind)
            self._call("rename_collection", self.client.rename_collection, c.name, target)
            self._call(
                "alter_collection_properties", self.client.alter_collection_properties, target,
                properties=self._identity(ref, c.kind),
            )
            self._loaded.discard(c.name)
            log.info("adopted legacy collection %s as %s (%s)", c.name, target, ref)

    def drop_legacy(self, legacy: Sequence[LegacyCollection]) -> None:
        """Drop legacy collections (as listed by :meth:`legacy_collections`)."""
        for c in legacy:
            self._call("drop_collection", self.client.drop_collection, c.name)
            self._loaded.discard(c.name)

    # -- live aliases ---------------------------------------------------------------------------
    def alias_name(self, dataset: str, source: str, kind: str) -> str:
        """The live alias ``<prefix>_<dataset>_<source>_items|_behaviours`` (an alias names one collection)."""
        if kind not in (ITEMS_KIND, BEHAVIOURS_KIND):
            raise ConfigurationError(f"collection kind {kind!r} is unknown; valid: items, behaviours")
        return self._check_name(f"{self.base_name(dataset, source)}_{kind}")

    def _alias_target(self, alias: str) -> str | None:
        """The collection an alias points to, or None when the alias does not exist."""
        # has_collection answers True for an alias; asking describe_alias about a missing one
        # would make pymilvus log an RPC error.
        if not self._call("has_collection", self.client.has_collection, alias):
            return None
        info = self._call("describe_alias", self.client.describe_alias, alias)
        return str(info.get("collection_name") or "") or None

    def live_version(self, dataset: str, source: str) -> int | None:
        """The version the live alias of (dataset, source) points to (its behaviour alias), or None."""
        target = self._alias_target(self.alias_name(dataset, source, BEHAVIOURS_KIND))
        if target is None:
            return None
        m = re.match(rf"^{re.escape(self.base_name(dataset, source))}_v(\d+)_{BEHAVIOURS_KIND}$", target)
        if not m:
            raise ConfigurationError(
                f"Milvus alias {self.alias_name(dataset, source, BEHAVIOURS_KIND)!r} points to {target!r}, "
                f"which is not a version of {dataset}/{source}"
            )
        return int(m.group(1))

    def set_live(self, ref: CollectionRef) -> None:
        """Point both live aliases of (dataset, source) at ``ref``'s collections (create or alter them).

        Each alias switches atomically on the server; readers that resolve the version once per
        request (the retriever) never mix the two versions.
        """
        ref = _as_ref(ref)
        for kind in (ITEMS_KIND, BEHAVIOURS_KIND):
            name = self._require(ref, kind)
            alias = self.alias_name(ref.dataset, ref.source, kind)
            current = self._alias_target(alias)
            if current == name:
                continue
            if current is None:
                self._call("create_alias", self.client.create_alias, name, alias)
            else:
                self._call("alter_alias", self.client.alter_alias, name, alias)
            log.info("alias %s -> %s", alias, name)

    def drop_live(self, dataset: str, source: str) -> None:
        """Remove both live aliases of (dataset, source) (those that exist)."""
        for kind in (ITEMS_KIND, BEHAVIOURS_KIND):
            alias = self.alias_name(dataset, source, kind)
            if self._alias_target(alias) is not None:
                self._call("drop_alias", self.client.drop_alias, alias)

    def flush(self, ref: CollectionRef, reload: bool = False, timeout_s: float = 300.0) -> None:
        """Seal the rows written so far into persisted, indexed segments (both collections of ``ref``).

        A server searches freshly written rows in growing segments by brute force, several times
        slower than sealed, indexed ones (see docs/retriever.md, GSU timings). This flushes, then waits until the index covers every row. With ``reload`` the collections are
        then released and loaded again, so the query nodes serve the sealed segments at once
        instead of switching over on their own a little later (searches fail while it reloads:
        for benchmarks and bulk loads, not for a serving deployment).

        Raises:
            NotFoundError: ``ref`` has no collections. BackendUnavailable: the index did not
            catch up within ``timeout_s``.
        """
        names = tuple(self._require(ref, kind) for kind in (ITEMS_KIND, BEHAVIOURS_KIND))
        for name in names:
            self._call("flush", self.client.flush, name)
        deadline = time.monotonic() + timeout_s
        for name in names:
            while True:
                info = self._call("describe_index", self.client.describe_index, name, "vector") or {}
                pending = int(info.get("pending_index_rows", 0) or 0)
                if pending == 0 and int(info.get("indexed_rows", 0) or 0) >= int(info.get("total_rows", 0) or 0):
                    break
                if time.monotonic() > deadline:
                    raise BackendUnavailable(
                        f"Milvus at {self.settings.milvus_uri!r}: the index of {name} still has {pending} rows "
                        f"pending after {timeout_s:.0f} s"
                    )
                time.sleep(0.5)
            if reload:
                self._call("release_collection", self.client.release_collection, name)
                self._call("load_collection", self.client.load_collection, name)
        log.info("flushed %s%s", ", ".join(names), " and reloaded them" if reload else "")

    def describe(self, ref: CollectionRef) -> dict[str, Any]:
        """Names, dimension, index and row counts of ``ref``'s collections."""
        ref = _as_ref(ref)
        out: dict[str, Any] = {"dataset": ref.dataset, "source": ref.source, "version": ref.version}
        for key in (ITEMS_KIND, BEHAVIOURS_KIND):
            name = self._require(ref, key)
            indexes = self._call("list_indexes", self.client.list_indexes, name)
            index = (
                self._call("describe_index", self.client.describe_index, name, indexes[0]) if indexes else {}
            )
            count = self.count_items(ref) if key == ITEMS_KIND else self.count_behaviours(ref)
            out[key] = {
                "collection": name,
                "dim": self._vector_dim(name),
                "index_type": index.get("index_type"),
                "metric_type": index.get("metric_type"),
                "rows": count,
            }
        return out

    # -- writes --------------------------------------------------------------------------------
    def _upsert(self, name: str, rows: list[dict[str, Any]]) -> int:
        written = 0
        for start in range(0, len(rows), UPSERT_BATCH):
            batch = rows[start : start + UPSERT_BATCH]
            res = self._call("upsert", self.client.upsert, name, batch)
            written += int(res.get("upsert_count", len(batch)) if isinstance(res, dict) else len(batch))
        return written

    def upsert_items(
        self,
        ref: CollectionRef,
        item_ids: np.ndarray | Sequence[int],
        vectors: np.ndarray,
        categories: np.ndarray | Sequence[int],
    ) -> int:
        """Write item vectors (L2-normalised here); duplicate ids keep their last row. Returns rows written."""
        ids = check_ids(item_ids, "item_ids")
        cats = check_ids(categories, "categories")
        vecs = l2_normalise(check_vectors(vectors, what="item vectors", allow_empty=True))
        if not (len(ids) == len(cats) == len(vecs)):
            raise ConfigurationError(
                f"upsert_items: {len(ids)} ids, {len(cats)} categories and {len(vecs)} vectors differ in length"
            )
        if len(ids) == 0:
            return 0
        keep = _last_occurrence(ids)
        name = self._require(ref, ITEMS_KIND)
        self._check_dim(name, vecs.shape[1])
        rows = [{"item_id": int(ids[i]), "category": int(cats[i]), "vector": vecs[i].tolist()} for i in keep]
        return self._upsert(name, rows)

    def upsert_behaviours(
        self,
        ref: CollectionRef,
        user_ids: np.ndarray | Sequence[int],
        positions: np.ndarray | Sequence[int],
        item_ids: np.ndarray | Sequence[int],
        vectors: np.ndarray,
    ) -> int:
        """Write behaviour rows keyed by :func:`behaviour_pk`; a repeated (user, position) keeps its last row."""
        users = check_ids(user_ids, "user_ids")
        pos = check_positions(positions)
        items = check_ids(item_ids, "item_ids")
        vecs = l2_normalise(check_vectors(vectors, what="behaviour vectors", allow_empty=True))
        if not (len(users) == len(pos) == len(items) == len(vecs)):
            raise ConfigurationError(
                f"upsert_behaviours: {len(users)} user_ids, {len(pos)} positions, {len(items)} item_ids and "
                f"{len(vecs)} vectors differ in length"
            )
        if len(pos) == 0:
            return 0
        pks = behaviour_pk(users, pos)
        keep = _last_occurrence(pks)
        name = self._require(ref, BEHAVIOURS_KIND)
        self._check_dim(name, vecs.shape[1])
        rows = [
            {
                "pk": int(pks[i]),
                "user_id": int(users[i]),
                "item_id": int(items[i]),
                "position": int(pos[i]),
                "vector": vecs[i].tolist(),
            }
            for i in keep
        ]
        if self._upsert_misroutes_partition_keys():
            written = self._replace(name, rows)
        else:
            written = self._upsert(name, rows)
        # The same rows go to the sequence store, after Milvus: a retried write repeats both.
        self.sequences.write(name, users[keep], pos[keep], items[keep])
        return written

    def _upsert_misroutes_partition_keys(self) -> bool:
        """Milvus 2.3 servers route upserted rows to the wrong partition-key bucket, so a filtered
        read then misses them; there a delete + insert of the same primary keys stands in for upsert."""
        if self._server_version is None:
            if self.settings.embedded_milvus:
                self._server_version = (99, 0)
            else:
                raw = str(self._call("get_server_version", self.client.get_server_version))
                m = re.match(r"v?(\d+)\.(\d+)", raw)
                self._server_version = (int(m.group(1)), int(m.group(2))) if m else (99, 0)
                log.debug("Milvus server version %s", raw)
        return self._server_version < (2, 4)

    def _replace(self, name: str, rows: list[dict[str, Any]]) -> int:
        """Delete then insert rows by primary key (idempotent when retried as a whole)."""
        written = 0
        for start in range(0, len(rows), UPSERT_BATCH):
            batch = rows[start : start + UPSERT_BATCH]
            keys = ", ".join(str(r["pk"]) for r in batch)
            self._call("delete", self.client.delete, name, filter=f"pk in [{keys}]")
            res = self._call("insert", self.client.insert, name, batch)
            written += int(res.get("insert_count", len(batch)) if isinstance(res, dict) else len(batch))
        return written

    def delete_user_behaviours(self, ref: CollectionRef, user_id: int) -> None:
        name = self._require(ref, BEHAVIOURS_KIND)
        self._call("delete", self.client.delete, name, filter=f"user_id == {check_id(user_id, 'user_id')}")
        self.sequences.delete_user(name, int(user_id))

    # -- bulk import ---------------------------------------------------------------------------
    @property
    def supports_bulk_import(self) -> bool:
        """False on Milvus Lite, which has no import; True on a server (2.3 and later)."""
        return not self.settings.embedded_milvus

    def _import_call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """One call of the import API (the gRPC handler under ``MilvusClient``: the 2.3 server has
        only the gRPC ``Import``, which ``MilvusClient`` does not wrap), with a deadline; failures
        sorted like :meth:`_call`'s, without its automatic retry."""
        if not self.supports_bulk_import:
            raise ConfigurationError("Milvus Lite has no bulk import; write with upserts")
        client = self.client
        kwargs.setdefault("timeout", self._deadline(what))
        try:
            return getattr(client._get_connection(), method)(*args, **kwargs)
        except Exception as e:
            kind = classify_milvus_error(e)
            if kind == "other":
                raise
            if kind == "not_found":
                raise CollectionNotFound(f"Milvus {what}: collection does not exist: {_short(e)}", None) from e
            if kind in ("transient", "not_loaded"):
                self._reset_client(client)
                raise BackendUnavailable(f"Milvus {what} failed at {self.settings.milvus_uri!r}: {_short(e)}") from e
            raise ConfigurationError(f"Milvus rejected the {what} request: {_short(e)}") from e

    def start_import(self, ref: CollectionRef, kind: str, files: Sequence[str]) -> int:
        """Start a bulk import of ``files`` (paths the server reads: absolute paths on a server with
        local storage, object keys in its bucket with MinIO/S3) into ``ref``'s ``kind`` collection.
        Returns the task id; :meth:`import_task` follows it."""
        name = self._require(ref, kind)
        task_id = self._import_call("import", "do_bulk_insert", collection_name=name, partition_name="",
                                    files=list(files))
        log.info("import task %s started: %d file(s) into %s", task_id, len(files), name)
        return int(task_id)

    @staticmethod
    def _import_task(state: Any) -> ImportTask:
        infos = dict(getattr(state, "infos", None) or {})
        files = tuple(f for f in str(infos.get("files", "")).split(",") if f)
        try:
            progress = int(float(infos.get("progress_percent") or getattr(state, "progress", 0) or 0))
        except (TypeError, ValueError):
            progress = 0
        return ImportTask(
            task_id=int(state.task_id), state=str(state.state_name), row_count=int(state.row_count or 0),
            files=files, reason=str(infos.get("failed_reason") or getattr(state, "failed_reason", "") or ""),
            progress=progress,
        )

    def import_task(self, task_id: int) -> ImportTask:
        """The state of one import task."""
        return self._import_task(self._import_call("import state", "get_bulk_insert_state", int(task_id)))

    def import_tasks(self, ref: CollectionRef, kind: str) -> list[ImportTask]:
        """Every import task the server still remembers for ``ref``'s ``kind`` collection (Milvus keeps
        them for ``rootCoord.importTaskRetention``, a day by default), oldest first."""
        name = self.collection_name(ref, kind)
        states = self._import_call("import list", "list_bulk_insert_tasks", limit=0, collection_name=name)
        return sorted((self._import_task(s) for s in states), key=lambda t: t.task_id)

    def delete_behaviours_by_pk(self, ref: CollectionRef, pks: np.ndarray | Sequence[int]) -> None:
        """Delete behaviour rows by primary key (``pk in [...]``, :data:`DELETE_BATCH` a request).

        A delete by primary key needs no query first, so it also removes rows of an import that
        completed but is not yet visible to queries."""
        name = self._require(ref, BEHAVIOURS_KIND)
        keys = check_ids(pks, "pks")
        for lo in range(0, len(keys), DELETE_BATCH):
            expr = f"pk in [{', '.join(str(k) for k in keys[lo : lo + DELETE_BATCH].tolist())}]"
            self._call("delete", self.client.delete, name, filter=expr)

    def count_behaviours_of(self, ref: CollectionRef, user_ids: np.ndarray | Sequence[int]) -> int:
        """Behaviour rows (visible to queries) of the given users."""
        name = self._require(ref, BEHAVIOURS_KIND)
        users = _int_list(user_ids, "user_ids")
        total = 0
        for lo in range(0, len(users), DELETE_BATCH):
            total += self._count(name, f"user_id in [{', '.join(str(u) for u in users[lo : lo + DELETE_BATCH])}]")
        return total

    def write_sequences(self, ref: CollectionRef, user_ids: np.ndarray, positions: np.ndarray,
                        item_ids: np.ndarray) -> None:
        """Write behaviours to the users' sequence store only (rows that reached Milvus another way,
        e.g. a bulk import); :meth:`upsert_behaviours` does this itself."""
        self.sequences.write(self.behaviour_collection(ref), np.asarray(user_ids, np.int64),
                             np.asarray(positions, np.int64), np.asarray(item_ids, np.int64))

    # -- reads -----------------------------------------------------------------------------------
    def _query(self, name: str, filter_expr: str, fields: list[str], limit: int) -> Any:
        """Rows of ``name`` matching ``filter_expr`` (at most ``limit``), with ``fields``."""
        return self._call("query", self.client.query, name, filter=filter_expr, output_fields=fields, limit=limit)

    def _count(self, name: str, filter_expr: str) -> int:
        res = self._call("query", self.client.query, name, filter=filter_expr, output_fields=["count(*)"])
        return int(res[0]["count(*)"]) if res else 0

    def count_items(self, ref: CollectionRef) -> int:
        name = self._require(ref, ITEMS_KIND)
        return self._count(name, "")

    def count_behaviours(self, ref: CollectionRef, user_id: int | None = None) -> int:
        name = self._require(ref, BEHAVIOURS_KIND)
        return self._count(name, "" if user_id is None else f"user_id == {check_id(user_id, 'user_id')}")

    def get_item_vectors(
        self, ref: CollectionRef, item_ids: np.ndarray | Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of the given items that exist: ``(found_ids int64[n], vectors float32[n, d])``,
        in the order of ``item_ids`` (missing ids are left out)."""
        ids = _int_list(item_ids, "item_ids")
        name = self._require(ref, ITEMS_KIND)
        dim = self.dim(ref)
        unique = list(dict.fromkeys(ids))
        slot = {i: k for k, i in enumerate(unique)}
        # each page's rows go into one float32 array at once: holding every row's vector as a list
        # of Python floats until the end cost ~1 KB an item (0.8 GB for a batch of 256 long histories)
        vectors = np.zeros((len(unique), dim), np.float32)
        have = np.zeros(len(unique), bool)
        for start in range(0, len(unique), 1000):
            chunk = unique[start : start + 1000]
            expr = f"item_id in [{', '.join(str(i) for i in chunk)}]"
            rows = self._query(name, expr, ["item_id", "vector"], len(chunk))
            if rows:
                at = np.fromiter((slot[int(r["item_id"])] for r in rows), np.int64, len(rows))
                vectors[at] = np.asarray([r["vector"] for r in rows], dtype=np.float32).reshape(len(rows), dim)
                have[at] = True
        where = np.fromiter((slot[i] for i in ids), np.int64, len(ids))
        keep = have[where]
        return np.asarray(ids, dtype=np.int64)[keep], vectors[where[keep]]

    def iter_user_behaviours(
        self, ref: CollectionRef, user_id: int, batch_size: int = FETCH_BATCH
    ) -> Iterator[BehaviourBatch]:
        """Page through one user's behaviours in position order, ``batch_size`` positions a page.

        Counts the user's rows first and pages by position ranges until all are read, so gaps in
        positions are handled and no server-side iterator is needed. Up to :data:`FETCH_PARALLEL`
        pages are in flight at once (each query on a server waits for its time tick first, so
        one page at a time would spend most of a long history's load waiting); pages are yielded
        in position order.
        """
        if not 0 < batch_size <= MAX_QUERY_WINDOW:
            raise ConfigurationError(f"batch_size must be in 1..{MAX_QUERY_WINDOW}, got {batch_size}")
        name = self._require(ref, BEHAVIOURS_KIND)
        user = check_id(user_id, "user_id")
        total = self._count(name, f"user_id == {user}")
        if total == 0:
            return
        seen, next_low = 0, 0
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(FETCH_PARALLEL, thread_name_prefix="muse-fetch") as pool:
            while seen < total:
                # Pages still needed if the positions are dense; never more in flight than that.
                wanted = min(FETCH_PARALLEL, max(1, -(-(total - seen) // batch_size)))
                while len(pending) < wanted:
                    pending.append(pool.submit(contextvars.copy_context().run, self._behaviour_page, name, user,
                                               next_low, batch_size))
                    next_low += batch_size
                rows = pending.popleft().result()
                if not rows:
                    if next_low > (1 << 40):  # positions never get this large: the count was stale
                        break
                    continue
                seen += len(rows)
                yield BehaviourBatch(
                    positions=np.fromiter((r["position"] for r in rows), dtype=np.int64, count=len(rows)),
                    item_ids=np.fromiter((r["item_id"] for r in rows), dtype=np.int64, count=len(rows)),
                    vectors=np.asarray([r["vector"] for r in rows], dtype=np.float32),
                )
            for f in pending:  # pages beyond the last row (positions were sparse at the end)
                f.cancel()

    def _behaviour_page(self, name: str, user: int, low: int, batch_size: int) -> list[dict[str, Any]]:
        """The user's rows with ``low <= position < low + batch_size``, sorted by position."""
        expr = f"user_id == {user} and position >= {low} and position < {low + batch_size}"
        rows = self._query(name, expr, ["position", "item_id", "vector"], batch_size)
        # sorted() materialises pymilvus' lazy result list; sorting it in place would detach the
        # vectors from their rows.
        return sorted(rows, key=lambda r: r["position"])

    def query_sequence(self, collection: str, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        """One user's ``(positions, item_ids)`` from a behaviour collection's scalar fields (no
        vectors), sorted by position: pages of :data:`MAX_QUERY_WINDOW` positions, up to
        :data:`FETCH_PARALLEL` at once."""
        user = int(user_id)
        self._ensure_loaded(collection)
        total = self._count(collection, f"user_id == {user}")
        pos_parts: list[np.ndarray] = []
        item_parts: list[np.ndarray] = []
        seen, low, size = 0, 0, MAX_QUERY_WINDOW

        def page(lo: int) -> list[dict[str, Any]]:
            expr = f"user_id == {user} and position >= {lo} and position < {lo + size}"
            return self._query(collection, expr, ["position", "item_id"], size)

        with ThreadPoolExecutor(FETCH_PARALLEL, thread_name_prefix="muse-seq") as pool:
            while seen < total and low < (1 << 40):
                n_pages = min(FETCH_PARALLEL, max(1, -(-(total - seen) // size)))
                pages = [pool.submit(contextvars.copy_context().run, page, low + i * size) for i in range(n_pages)]
                for rows in (p.result() for p in pages):
                    seen += len(rows)
                    pos_parts.append(np.fromiter((r["position"] for r in rows), np.int64, len(rows)))
                    item_parts.append(np.fromiter((r["item_id"] for r in rows), np.int64, len(rows)))
                low += n_pages * size
        if not pos_parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        pos, items = np.concatenate(pos_parts), np.concatenate(item_parts)
        order = np.argsort(pos, kind="stable")
        return pos[order], items[order]

    def user_sequence(self, ref: CollectionRef, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        """One user's ``(positions, item_ids)`` from the sequence store, sorted by position. A user
        whose behaviours predate the sequence store (none there, rows in Milvus) is rebuilt from
        the behaviour collection's scalar fields once and written back."""
        name = self._require(ref, BEHAVIOURS_KIND)
        pos, items = self.sequences.get(name, int(user_id))
        from muse.sequences import MilvusSequences

        if len(pos) == 0 and not isinstance(self.sequences, MilvusSequences):
            pos, items = self.query_sequence(name, int(user_id))
            if len(pos):
                log.info("user %d: sequence rebuilt from %s (%d behaviours)", int(user_id), name, len(pos))
                self.sequences.write(name, np.full(len(pos), int(user_id)), pos, items)
        return pos, items

    def fetch_user_behaviours(
        self, ref: CollectionRef, user_id: int, batch_size: int = FETCH_BATCH
    ) -> BehaviourBatch:
        """All behaviours of one user, sorted by position (empty arrays for an unknown user)."""
        batches = list(self.iter_user_behaviours(ref, user_id, batch_size))
        if not batches:
            dim = self._vector_dim(self._require(ref, BEHAVIOURS_KIND))
            empty = np.zeros(0, dtype=np.int64)
            return BehaviourBatch(empty, empty.copy(), np.zeros((0, dim), dtype=np.float32))
        return BehaviourBatch(
            positions=np.concatenate([b.positions for b in batches]),
            item_ids=np.concatenate([b.item_ids for b in batches]),
            vectors=np.concatenate([b.vectors for b in batches]),
        )

    def search_behaviours(
        self, ref: CollectionRef, user_id: int, targets: np.ndarray, k: int, consistency_level: str | None = None
    ) -> list[list[Hit]]:
        """Cosine top-``k`` of each target over one user's behaviours, all targets in one request.

        ``consistency_level`` overrides the collection's ``Strong`` (read-your-writes: on a server
        the search first waits for the data nodes' time tick, up to ~200-400 ms on Milvus 2.3);
        ``Bounded`` or ``Eventually`` skip that wait and may miss writes of the last few seconds.

        Returns one list of hits per target, best first.
        """
        k = check_k(k, MAX_QUERY_WINDOW)
        user = check_id(user_id, "user_id")
        res = self._search(self._require(ref, BEHAVIOURS_KIND), targets, k, consistency_level,
                           ["position", "item_id"], filter=f"user_id == {user}")
        return [
            [Hit(position=int(h["entity"]["position"]), item_id=int(h["entity"]["item_id"]), score=float(h["distance"]))
             for h in hits]
            for hits in res
        ]

    def search_items(
        self, ref: CollectionRef, targets: np.ndarray, k: int, consistency_level: str | None = None
    ) -> list[list[ItemHit]]:
        """Cosine top-``k`` items of the version's item collection for each target vector (its
        nearest neighbours; an item's own vector finds the item itself first).

        Returns one list of hits per target, best first. Items stored without a vector never match.
        """
        k = check_k(k, MAX_QUERY_WINDOW)
        res = self._search(self._require(ref, ITEMS_KIND), targets, k, consistency_level, ["item_id"])
        return [
            [ItemHit(item_id=int(h["entity"]["item_id"]), score=float(h["distance"]))
             for h in hits if np.isfinite(h["distance"])]
            for hits in res
        ]

    def _search(self, name: str, targets: np.ndarray, k: int, consistency_level: str | None,
                output_fields: list[str], **filters: Any) -> list[Any]:
        """One vector search of collection ``name`` (targets checked and L2-normalised, at most
        ``MAX_NQ`` per request: Milvus's limit), with an optional consistency level."""
        extra: dict[str, Any] = dict(filters)
        if consistency_level is not None:
            if consistency_level not in CONSISTENCY_LEVELS:
                raise ConfigurationError(
                    f"consistency_level {consistency_level!r} is unknown; valid: {', '.join(CONSISTENCY_LEVELS)}"
                )
            extra["consistency_level"] = consistency_level
        if name not in self._dims:
            self._dims[name] = self._vector_dim(name)
        t = l2_normalise(check_vectors(targets, self._dims[name], "target vectors", allow_zero=False))
        res: list[Any] = []
        for lo in range(0, t.shape[0], MAX_NQ):
            res.extend(self._call("search", self.client.search, name, data=t[lo : lo + MAX_NQ].tolist(),
                                  limit=int(k), output_fields=output_fields,
                                  search_params={"metric_type": self.settings.metric_type,
                                                 "params": dict(self.settings.search_params)},
                                  **extra))
        return res

    def check(self, timeout_s: float | None = None) -> None:
        """Connect and list collections; raise :class:`BackendUnavailable` naming ``MUSE_MILVUS_URI``.

        ``timeout_s`` bounds the whole check (connect included); None: the per-call timeouts.
        """
        try:
            with deadlines.deadline(timeout_s, "Milvus check"):
                self._call("list_collections", self.client.list_collections, timeout=timeout_s)
        except BackendUnavailable:
            raise
        except Exception as e:
            raise BackendUnavailable(
                f"MUSE_MILVUS_URI={self.settings.milvus_uri!r}: Milvus does not answer: {e}"
            ) from e


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception as e:  # a broken channel may fail to close; it is dropped anyway
        log.debug("closing a failed Milvus client: %s", e)


def _short(exc: BaseException) -> str:
    """One line of an exception's text (gRPC errors carry a multi-line debug string)."""
    import grpc

    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return f"{exc.code().name}: {exc.details() if callable(getattr(exc, 'details', None)) else ''}"
    text = " ".join(str(exc).split())
    return text[:500]


def _last_occurrence(keys: np.ndarray) -> list[int]:
    """Indexes of the last occurrence of each key, in first-seen order of the kept rows."""
    last: dict[int, int] = {}
    for i, k in enumerate(keys.tolist()):
        last[k] = i
    return sorted(last.values())
