"""Device cache of user behaviour histories: byte-bounded LRU, asynchronous single-flight prefetch.

Two ways to build a history (``CacheConfig.history_from``):

* ``"items"`` (default, the serving path): the source's item vectors are held **once** on the
  device in an :class:`ItemTable` (L2-normalised, in the storage dtype), and a user's history is
  only the rows of that table its item-id sequence points to (int32 on the device, 4 bytes a
  behaviour; positions and item ids on the host). The sequence comes from the sequence store
  (:mod:`muse.sequences`, milliseconds for 100K behaviours), so a prefetch reads no vectors. A
  search gathers the rows and runs the same :func:`retriever.kernels.gsu_topk`
  (:class:`GatheredHistory`, :class:`GatherCache`).
* ``"behaviours"`` (the original path): the user's behaviour vectors are read from the Milvus
  behaviour collection and kept per user (:class:`CachedHistory`).

A cached history holds the user's behaviour vectors on the cache's device, L2-normalised once at
load time and stored as float32 or a compressed dtype (bfloat16, float16, or int8 with a per-row
scale), beside the positions and item ids (on the host) and a mask of behaviours that have a
vector. A GSU search on a cached history is then one matrix product + ``topk``
(:func:`retriever.kernels.gsu_topk`).

Histories are loaded through a *loader*: a callable ``user_id -> iterable of batches`` with
``positions``, ``item_ids`` and ``vectors`` arrays, e.g.
``lambda u: store.iter_user_behaviours(ref, u, batch_size=...)`` (see
:func:`store_loader`). The cache reflects the store at load time: writes made through
:meth:`HistoryCache.append_behaviours` are applied to a cached history at once; for writes made
elsewhere call :meth:`HistoryCache.invalidate`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from muse import deadlines
from muse.configs import config_from_dict
from muse.errors import ConfigurationError
from muse.itemtable import ABSENT, IdHash
from retriever.kernels import TopK, gsu_topk, l2_normalise, quantise_int8

log = logging.getLogger(__name__)

#: Storage dtypes by name.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}

#: How a cache builds a history: a gather from the item table, or the behaviour collection's vectors.
HISTORY_FROM = ("items", "behaviours")


class BatchLike(Protocol):
    positions: np.ndarray
    item_ids: np.ndarray
    vectors: np.ndarray


Loader = Callable[[int], Iterable[BatchLike]]


@dataclass(frozen=True)
class CacheConfig:
    """Capacity and layout of a :class:`HistoryCache`."""

    capacity_bytes: int = 4 << 30  # bytes of cached histories (vectors + ids + masks) before LRU eviction
    storage_dtype: str = "float32"  # float32 | bfloat16 | float16 | int8 (per-row scale)
    device: str = "cpu"  # torch device of the cached vectors (settings.resolve_device())
    load_batch_size: int = 8192  # behaviours per store query when loading a history
    prefetch_workers: int = 2  # threads that load histories in the background
    history_from: str = "items"  # items: gather from the shared item table | behaviours: per-user vectors
    item_table_file: bool = True  # items: fill the item table from the version's table file at start-up

    def __post_init__(self) -> None:
        if self.storage_dtype not in DTYPES:
            raise ConfigurationError(
                f"storage_dtype {self.storage_dtype!r} is unknown; valid: {', '.join(DTYPES)}"
            )
        if self.capacity_bytes <= 0:
            raise ConfigurationError(f"capacity_bytes must be positive, got {self.capacity_bytes}")
        if self.load_batch_size <= 0:
            raise ConfigurationError(f"load_batch_size must be positive, got {self.load_batch_size}")
        if self.history_from not in HISTORY_FROM:
            raise ConfigurationError(
                f"history_from {self.history_from!r} is unknown; valid: {', '.join(HISTORY_FROM)}"
            )
        if self.prefetch_workers <= 0:
            raise ConfigurationError(f"prefetch_workers must be positive, got {self.prefetch_workers}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CacheConfig:
        """Build from a mapping, rejecting unknown keys (naming them and the valid ones)."""
        return config_from_dict(cls, values, "cache options")



def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by ``tensors`` (None entries, e.g. no int8 scales, count 0)."""
    return int(sum(t.element_size() * t.nelement() for t in tensors if t is not None))


@dataclass
class CachedHistory:
    """One user's history as stored in the cache, sorted by position.

    Only behaviours that have a vector are kept on the device (``n`` of them): the others can never
    be retrieved ahead of a real one, so they need neither memory nor a mask in the hot path. Their
    positions are kept on the host so that ``len()`` is the full history length.
    """

    user_id: int
    positions: np.ndarray  # int64 [n], host
    item_ids: np.ndarray  # int64 [n], host
    vectors: torch.Tensor  # [n, d] storage dtype, device; L2-normalised
    scale: torch.Tensor | None  # float32 [n] per-row scale for int8 storage, else None
    missing_positions: np.ndarray  # int64 [m], host: behaviours without a vector

    def __len__(self) -> int:
        return int(self.positions.shape[0] + self.missing_positions.shape[0])

    @property
    def device_bytes(self) -> int:
        """Bytes of the tensors on the cache's device (vectors and int8 scales)."""
        return tensor_bytes(self.vectors, self.scale)

    @property
    def nbytes(self) -> int:
        """Bytes the entry holds in all (device tensors + host ids); what the capacity bounds."""
        return self.device_bytes + int(
            self.positions.nbytes + self.item_ids.nbytes + self.missing_positions.nbytes
        )

    def topk(self, targets: torch.Tensor, k: int) -> TopK:
        """GSU top-``k`` of L2-normalised ``targets [B, d]`` over this history (see :func:`gsu_topk`);
        indices point into :attr:`positions` / :attr:`item_ids`."""
        if targets.device != self.vectors.device:
            targets = targets.to(self.vectors.device)
        return gsu_topk(targets, self.vectors, k, None, normalised=True, history_scale=self.scale)


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`HistoryCache` (``misses`` count lookups that had to load)."""

    hits: int
    misses: int
    loads: int
    evictions: int
    entries: int
    bytes: int
    capacity_bytes: int


def encode_history(
    user_id: int,
    positions: np.ndarray,
    item_ids: np.ndarray,
    vectors: np.ndarray,
    storage_dtype: str = "float32",
    device: str = "cpu",
) -> CachedHistory:
    """Turn host arrays into a :class:`CachedHistory`: sort by position, normalise, compress, move.

    Raises:
        ConfigurationError: the arrays differ in length or ``vectors`` is not 2-D.
    """
    pos = np.asarray(positions, dtype=np.int64)
    items = np.asarray(item_ids, dtype=np.int64)
    vecs = np.asarray(vectors, dtype=np.float32)
    if vecs.ndim != 2 or not (len(pos) == len(items) == len(vecs)):
        raise ConfigurationError(
            f"history of user {user_id}: {len(pos)} positions, {len(items)} item ids and vectors of "
            f"shape {vecs.shape} do not match"
        )
    order = np.argsort(pos, kind="stable")
    pos, items, vecs = pos[order], items[order], vecs[order]
    has_vector = np.any(vecs != 0, axis=1)  # [L]
    v = torch.from_numpy(np.ascontiguousarray(vecs[has_vector])).to(device)  # [n, d] float32
    v = l2_normalise(v)  # [n, d]
    scale = None
    dtype = DTYPES[storage_dtype]
    if dtype == torch.int8:
        v, scale = quantise_int8(v)  # [n, d] int8, [n]
    elif dtype != torch.float32:
        v = v.to(dtype)
    return CachedHistory(
        int(user_id), pos[has_vector], items[has_vector], v.contiguous(), scale, pos[~has_vector]
    )


def _concat(a: CachedHistory, b: CachedHistory) -> CachedHistory:
    pos = np.concatenate([a.positions, b.positions])
    order = np.argsort(pos, kind="stable")
    order_t = torch.from_numpy(order).to(a.vectors.device)
    scale = None
    if a.scale is not None and b.scale is not None:
        scale = torch.cat([a.scale, b.scale])[order_t]
    return CachedHistory(
        user_id=a.user_id,
        positions=pos[order],
        item_ids=np.concatenate([a.item_ids, b.item_ids])[order],
        vectors=torch.cat([a.vectors, b.vectors])[order_t].contiguous(),
        scale=scale,
        missing_positions=np.sort(np.concatenate([a.missing_positions, b.missing_positions])),
    )


def store_loader(store: Any, ref: Any, batch_size: int) -> Loader:
    """A loader reading histories of one :class:`muse.vectorstore.CollectionRef` through
    ``VectorStore.iter_user_behaviours``."""

    def load(user_id: int) -> Iterable[BatchLike]:
        return store.iter_user_behaviours(ref, int(user_id), batch_size=batch_size)

    return load


def _gather(futures: Sequence[Future]) -> Future:
    """A future resolving to the list of results of ``futures`` (or the first exception)."""
    out: Future = Future()
    if not futures:
        out.set_result([])
        return out
    remaining = [len(futures)]
    lock = threading.Lock()

    def done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            for f in futures:
                if f.cancelled():
                    out.set_exception(CancelledError("prefetch cancelled: the history cache was closed"))
                    return
                if f.exception() is not None:
                    out.set_exception(f.exception())
                    return
            out.set_result([f.result() for f in futures])

    for f in futures:
        f.add_done_callback(done)
    return out


class HistoryCache:
    """Byte-bounded LRU cache of user histories on a device, with asynchronous single-flight loads.

    Args:
        loader: ``user_id -> iterable of batches`` (see :func:`store_loader`).
        dim: vector dimension of the histories (used for empty histories).
        config: capacity, storage dtype, device; see :class:`CacheConfig`.

    Thread-safe: searches, prefetches and appends may come from any thread. Concurrent requests
    for a user that is being loaded wait for that one load ("single flight").
    """

    def __init__(self, loader: Loader, dim: int, config: CacheConfig | None = None) -> None:
        self.config = config or CacheConfig()
        self.dim = int(dim)
        self._loader = loader
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, CachedHistory] = OrderedDict()
        self._inflight: dict[int, Future] = {}
        self._generation: dict[int, int] = {}
        self._bytes = 0
        self._hits = self._misses = self._loads = self._evictions = 0
        self._pool = ThreadPoolExecutor(self.config.prefetch_workers, thread_name_prefix="muse-prefetch")
        self._closed = False

    # -- lookups -------------------------------------------------------------------------------
    def get(self, user_id: int) -> CachedHistory:
        """The user's history, loading it (and counting a miss) when not cached. Unknown users
        give an empty history, which is not kept.

        Under a request deadline (:mod:`muse.deadlines`) a miss is loaded on the prefetch pool and
        waited for only until the deadline (:class:`~muse.deadlines.DeadlineExceeded` then); the
        load goes on, with the store's own timeouts, and serves the next request.
        """
        user = int(user_id)
        with self._lock:
            entry = self._entries.get(user)
            if entry is not None:
                self._entries.move_to_end(user)
                self._hits += 1
                return entry
            self._misses += 1
        if deadlines.remaining() is None or self._closed:
            return self._ensure(user)
        return deadlines.wait_for(self._pool.submit(self._ensure, user), f"loading the history of user {user}")

    def prefetch(self, user_ids: Iterable[int]) -> Future:
        """Load the users' histories in the background; cached users are only marked recently used.

        Returns:
            a Future resolving to ``{user_id: history length}`` once every user is loaded.
        """
        if self._closed:
            raise RuntimeError("the history cache is closed")
        users = list(dict.fromkeys(int(u) for u in user_ids))
        futures = [self._pool.submit(self._ensure, u) for u in users]
        gathered = _gather(futures)
        result: Future = Future()

        def finish(f: Future) -> None:
            if f.exception() is not None:
                result.set_exception(f.exception())
            else:
                result.set_result({u: len(h) for u, h in zip(users, f.result(), strict=True)})

        gathered.add_done_callback(finish)
        return result

    def contains(self, user_id: int) -> bool:
        with self._lock:
            return int(user_id) in self._entries

    def _ensure(self, user: int) -> CachedHistory:
        """Return the cached history or load it once, however many threads ask at the same time."""
        while True:
            with self._lock:
                entry = self._entries.get(user)
                if entry is not None:
                    self._entries.move_to_end(user)
                    return entry
                flight = self._inflight.get(user)
                owner = flight is None
                if owner:
                    flight = Future()
                    self._inflight[user] = flight
                    generation = self._generation.get(user, 0)
            if not owner:
                entry = flight.result()
                if entry is not None:
                    return entry
                continue  # the load was invalidated by an append meanwhile: load again
            try:
                entry = self._load(user)
            except BaseException as e:
                with self._lock:
                    self._inflight.pop(user, None)
                flight.set_exception(e)
                raise
            with self._lock:
                self._inflight.pop(user, None)
                stale = self._generation.get(user, 0) != generation
                if not stale:
                    self._insert(entry)
            flight.set_result(None if stale else entry)
            if not stale:
                return entry

    def _load(self, user: int) -> CachedHistory:
        positions, items, vectors = [], [], []
        for batch in self._loader(user):
            positions.append(np.asarray(batch.positions, dtype=np.int64))
            items.append(np.asarray(batch.item_ids, dtype=np.int64))
            vectors.append(np.asarray(batch.vectors, dtype=np.float32).reshape(len(batch.positions), -1))
        with self._lock:
            self._loads += 1
        if not positions:
            positions, items = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
            vectors = [np.zeros((0, self.dim), np.float32)]
        entry = encode_history(
            user,
            np.concatenate(positions),
            np.concatenate(items),
            np.concatenate(vectors),
            self.config.storage_dtype,
            self.config.device,
        )
        log.debug("loaded user %d: %d behaviours, %d bytes", user, len(entry), entry.nbytes)
        return entry

    def _insert(self, entry: CachedHistory) -> None:
        """Add under the lock, then evict least recently used entries beyond the capacity."""
        if len(entry) == 0:
            return  # unknown users are not cached: the indexer may write them later
        if entry.nbytes > self.config.capacity_bytes:
            log.warning(
                "history of user %d (%d bytes) exceeds the cache capacity %d: served uncached",
                entry.user_id,
                entry.nbytes,
                self.config.capacity_bytes,
            )
            return
        old = self._entries.pop(entry.user_id, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[entry.user_id] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.config.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
            self._evictions += 1

    # -- writes --------------------------------------------------------------------------------
    def append_behaviours(
        self, user_id: int, positions: np.ndarray, item_ids: np.ndarray, vectors: np.ndarray
    ) -> None:
        """Apply behaviours just written to the store: extend a cached history in place (or drop it
        when a position is rewritten), and make any load in flight reload."""
        user = int(user_id)
        new = encode_history(
            user, positions, item_ids, vectors, self.config.storage_dtype, self.config.device
        )
        self._extend(user, new, _concat)

    def _extend(self, user: int, new: Any, concat: Callable[[Any, Any], Any]) -> None:
        """Append entry ``new`` to the cached history of ``user`` with ``concat`` (or drop the cached
        one when ``new`` rewrites a position: the next use reloads it); loads in flight reload."""
        with self._lock:
            self._generation[user] = self._generation.get(user, 0) + 1
            old = self._entries.pop(user, None)
            if old is None:
                return
            self._bytes -= old.nbytes
            old_all = np.concatenate([old.positions, old.missing_positions])
            new_all = np.concatenate([new.positions, new.missing_positions])
            if np.isin(new_all, old_all).any() or len(np.unique(new_all)) < len(new):
                log.debug("user %d: rewritten positions, history dropped from the cache", user)
                return
            self._insert(concat(old, new))

    def put(
        self, user_id: int, positions: np.ndarray, item_ids: np.ndarray, vectors: np.ndarray
    ) -> CachedHistory:
        """Insert a whole history directly (e.g. warmed from another copy), replacing any cached one."""
        entry = encode_history(
            user_id, positions, item_ids, vectors, self.config.storage_dtype, self.config.device
        )
        with self._lock:
            self._generation[entry.user_id] = self._generation.get(entry.user_id, 0) + 1
            self._insert(entry)
        return entry

    def invalidate(self, user_id: int) -> None:
        """Forget a user's cached history (the next lookup reloads it)."""
        user = int(user_id)
        with self._lock:
            self._generation[user] = self._generation.get(user, 0) + 1
            old = self._entries.pop(user, None)
            if old is not None:
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            for user in self._entries:
                self._generation[user] = self._generation.get(user, 0) + 1
            self._entries.clear()
            self._bytes = 0

    # -- bookkeeping ---------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                loads=self._loads,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=self._bytes,
                capacity_bytes=self.config.capacity_bytes,
            )

    def close(self) -> None:
        """Stop the prefetch threads (waiting for running loads) and drop every entry."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.clear()

    def __enter__(self) -> HistoryCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the item-table path ---------------------------------------------------------------------------
#: Item id -> row hash of an :class:`ItemTable` (kept under its old name; the class lives in core,
#: which writes it beside a table file so that a server loads it instead of building it).
IdIndex = IdHash

ItemFetcher = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
SequenceLoader = Callable[[int], tuple[np.ndarray, np.ndarray]]
#: Rows an :class:`ItemTable` adds at once when it grows past this size (below it, it doubles):
#: a table loaded from a file is exactly full, and doubling 35M rows for one new item would not fit.
GROW_ROWS = 1 << 20


class ItemTable:
    """A source's item vectors, once, on the device: L2-normalised, in the storage dtype (int8 with a
    per-row scale). Filled at start-up from the version's table file (:meth:`load_file`, see
    :mod:`retriever.item_table`), and grows on demand: rows are looked up by item id and items not
    seen yet are read through ``fetch`` (``ids -> (found_ids, vectors)``, e.g.
    ``VectorStore.get_item_vectors``) and appended. Items without a vector are remembered as absent
    until :meth:`forget_absent`.

    Thread-safe; rows never move, so a history's rows stay valid while the table grows.
    """

    def __init__(
        self,
        fetch: ItemFetcher,
        dim: int,
        storage_dtype: str = "float32",
        device: str = "cpu",
        initial_rows: int = 1024,
    ) -> None:
        if storage_dtype not in DTYPES:
            raise ConfigurationError(f"storage_dtype {storage_dtype!r} is unknown; valid: {', '.join(DTYPES)}")
        self.dim = int(dim)
        self.storage_dtype = storage_dtype
        self.device = device
        self._fetch = fetch
        self._lock = threading.Lock()
        self._dtype = DTYPES[storage_dtype]
        self.vectors = torch.zeros((initial_rows, self.dim), dtype=self._dtype, device=device)
        self.scale: torch.Tensor | None = (
            torch.zeros(initial_rows, dtype=torch.float32, device=device) if self._dtype == torch.int8 else None
        )
        self.rows = 0
        self._index = IdHash(initial_rows)  # item id -> row (ABSENT: known, no vector)
        self._absent: set[int] = set()
        self.fetched = 0  # items read through fetch
        self.file_rows = 0  # rows loaded from a table file

    def __len__(self) -> int:
        return self.rows

    @property
    def device_bytes(self) -> int:
        """Bytes the table holds on the device (allocated rows, vectors and int8 scales)."""
        return tensor_bytes(self.vectors, self.scale)

    @property
    def index_bytes(self) -> int:
        """Host bytes of the id -> row index."""
        return self._index.nbytes

    def _encode(self, vectors: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        v = l2_normalise(torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device))
        if self._dtype == torch.int8:
            return quantise_int8(v)
        return v.to(self._dtype), None

    def _store_rows(self, raw: np.ndarray, normalised: bool, out: torch.Tensor, out_scale: torch.Tensor | None,
                    row_scale: np.ndarray | None) -> None:
        """Write rows of a table file (``[n, d]``, non-zero) into ``out`` (and ``out_scale``) in this
        table's dtype. Int8 rows as shipped stay as they are in an int8 table, with the per-row scale
        1 / norm (``row_scale`` when given), so the scores are exactly the unit vectors'; in a float
        table they are converted in place and multiplied by that scale. Unit float32 rows are cast;
        other float rows are normalised first; an int8 table quantises float rows per row."""
        t = torch.from_numpy(np.ascontiguousarray(raw)).to(self.device)  # [n, d]
        if t.dtype == torch.int8:
            s = (torch.from_numpy(row_scale).to(self.device) if row_scale is not None
                 else 1.0 / torch.linalg.vector_norm(t.float(), dim=1).clamp_min(1e-30))  # [n]
            if out_scale is not None:
                out.copy_(t)
                out_scale.copy_(s)
            elif out.dtype == torch.float32:
                out.copy_(t)  # int8 -> float32 is exact
                out.mul_(s.unsqueeze(1))
            else:  # one rounding to the half dtype, of the float32 unit row
                out.copy_(t.float().mul_(s.unsqueeze(1)))
            return
        if t.dtype != torch.float32 or not normalised:
            t = l2_normalise(t.float())
        if out_scale is not None:
            q, s = quantise_int8(t)
            out.copy_(q)
            out_scale.copy_(s)
        else:
            out.copy_(t)

    def load_file(self, table: Any, index: IdHash | None = None, block_rows: int = 1 << 16,
                  int8_rows: tuple[np.ndarray, np.ndarray] | None = None) -> int:
        """Fill this (empty) table with every row of a table file that has a vector, in file order.

        Args:
            table: a :class:`muse.itemtable.ItemVectors` (memory-mapped ``item_ids``, ``vectors``,
                ``present``, ``scale``, ``normalised``), e.g. from :func:`muse.itemtable.read_table`.
            index: its id -> row hash (:func:`muse.itemtable.ensure_index`); built here when None.
            block_rows: file rows read per step (bounds the host memory of the copy).
            int8_rows: the file's rows as int8 with their per-row scales (:func:`muse.itemtable.int8_rows`):
                an int8 table copies them as they are instead of quantising; a float table of shipped
                int8 rows takes their scales instead of computing norms.

        Returns:
            the rows loaded. Raises ConfigurationError when the table is not empty or the widths differ.
        """
        from muse.itemtable import table_index

        if table.vectors.shape[1] != self.dim:
            raise ConfigurationError(f"the table file holds {table.vectors.shape[1]}-d vectors, this table {self.dim}-d")
        present = np.asarray(table.present, bool)
        n, m = len(present), int(np.count_nonzero(present))
        index = index if index is not None else table_index(table)
        int8 = self._dtype == torch.int8
        src, row_scale = table.vectors, None
        if int8_rows is not None and (int8 or table.vectors.dtype == np.int8):
            src, row_scale = int8_rows
        # Rows already in the table's form are read straight into it on the CPU (unit float32 rows
        # into a float32 table, int8 rows with their scales into an int8 table); others go through a
        # reused block buffer and are converted (and moved to the device).
        ready = (int8 and row_scale is not None) or (
            src.dtype == np.float32 and table.normalised and self._dtype == torch.float32)
        with self._lock:
            if self.rows:
                raise ConfigurationError(f"load_file needs an empty item table, this one holds {self.rows} rows")
            vectors = torch.empty((m, self.dim), dtype=self._dtype, device=self.device)
            scale = torch.empty(m, dtype=torch.float32, device=self.device) if int8 else None
            if scale is not None and ready:
                scale.copy_(torch.from_numpy(np.compress(present, row_scale)))
            dest = vectors.numpy() if ready and self.device == "cpu" else None
            at = 0
            with _RowReader(src, block_rows) as reader:
                for lo in range(0, n, block_rows):
                    keep = present[lo:lo + block_rows]
                    k = int(np.count_nonzero(keep))
                    if k == 0:
                        continue
                    if dest is not None and k == len(keep):  # every row present: one read, no copy
                        reader.read_into(lo, dest[at:at + k])
                        at += k
                        continue
                    raw = reader.read(lo, len(keep))
                    raw = raw if k == len(keep) else raw[keep]  # [k, d]
                    if dest is not None:
                        dest[at:at + k] = raw
                    elif ready:
                        vectors[at:at + k] = torch.from_numpy(raw)
                    else:
                        rs = None if row_scale is None else np.compress(keep, row_scale[lo:lo + block_rows])
                        self._store_rows(raw, table.normalised, vectors[at:at + k],
                                         None if scale is None else scale[at:at + k], rs)
                    at += k
            self.vectors, self.scale = vectors, scale
            self.rows = self.file_rows = m
            self._index = index
            self._absent.clear()
        return m

    def add(self, item_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or overwrite items (all-zero vectors are recorded as absent)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        vecs = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        if len(ids) == 0:
            return
        ids, first = np.unique(ids[::-1], return_index=True)  # last occurrence wins
        vecs = vecs[::-1][first]
        has = np.any(vecs != 0, axis=1)
        q, scale = self._encode(vecs[has])
        with self._lock:
            self._absent.update(ids[~has].tolist())
            ids = ids[has]
            if self._absent:
                self._absent.difference_update(ids.tolist())
            known = self._index.get(ids)
            new = known < 0  # unknown, or known without a vector (ABSENT): a new row
            n_new = int(new.sum())
            if self.rows + n_new > self.vectors.shape[0]:
                cap = self.vectors.shape[0]
                cap = max(self.rows + n_new, cap + (cap if cap < GROW_ROWS else GROW_ROWS))
                grown = torch.zeros((cap, self.dim), dtype=self._dtype, device=self.device)
                grown[: self.rows] = self.vectors[: self.rows]
                self.vectors = grown
                if self.scale is not None:
                    gs = torch.zeros(cap, dtype=torch.float32, device=self.device)
                    gs[: self.rows] = self.scale[: self.rows]
                    self.scale = gs
            rows = known.copy()
            rows[new] = np.arange(self.rows, self.rows + n_new)
            self.rows += n_new
            idx = torch.from_numpy(rows).to(self.device)
            self.vectors.index_copy_(0, idx, q)
            if self.scale is not None and scale is not None:
                self.scale.index_copy_(0, idx, scale)
            if n_new:
                self._index.put(ids[new], rows[new])

    def _lookup(self, item_ids: np.ndarray) -> np.ndarray:
        """Rows of ``item_ids``: -1 where not in the table, ABSENT where known without a vector."""
        with self._lock:  # not during a put
            return self._index.get(item_ids)

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """int64 rows of ``item_ids`` in the table, -1 for items without a vector; items not seen
        before are fetched first."""
        items = np.asarray(item_ids, dtype=np.int64)
        rows = self._lookup(items)
        unknown = np.unique(items[rows == -1])
        if len(unknown):
            with self._lock:
                unknown = np.asarray([i for i in unknown.tolist() if i not in self._absent], np.int64)
            if len(unknown):
                found, vecs = self._fetch(unknown)
                self.fetched += len(unknown)
                self.add(found, vecs)
                with self._lock:
                    self._absent.update(set(unknown.tolist()) - set(np.asarray(found).tolist()))
                rows = self._lookup(items)
        rows[rows < 0] = -1
        return rows

    def load(self, item_ids: np.ndarray, batch: int = 4096, parallel: int = 4) -> int:
        """Read the given items into the table (e.g. every item of a dataset at start-up), ``parallel``
        batches at a time; returns rows."""
        ids = np.unique(np.asarray(item_ids, dtype=np.int64))
        batches = [ids[start : start + batch] for start in range(0, len(ids), batch)]
        with ThreadPoolExecutor(parallel, thread_name_prefix="muse-items") as pool:
            list(pool.map(self.rows_of, batches))
        return self.rows

    def forget_absent(self) -> None:
        """Forget which items had no vector (after a backfill wrote more items): they are fetched
        again on their next use, those the table file marked absent included."""
        with self._lock:
            self._absent.clear()
            self._index.vals[self._index.vals == ABSENT] = -1


class _RowReader:
    """Reads row blocks of a memory-mapped ``.npy`` array with plain ``read`` calls (one copy from the
    page cache, no page faults on a mapping); arrays that are not mapped files are sliced."""

    def __init__(self, array: np.ndarray, block_rows: int) -> None:
        self.array = array
        self.row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
        path, offset = getattr(array, "filename", None), getattr(array, "offset", None)
        self._fh = open(path, "rb", buffering=0) if path is not None and offset is not None else None
        self._offset = int(offset or 0)
        self._buf = np.empty((block_rows, *array.shape[1:]), array.dtype) if self._fh is not None else None

    def read_into(self, lo: int, out: np.ndarray) -> None:
        """Rows ``lo : lo + len(out)`` into ``out`` (C-contiguous)."""
        if self._fh is None:
            out[...] = self.array[lo:lo + len(out)]
            return
        view = memoryview(out).cast("B")
        self._fh.seek(self._offset + lo * self.row_bytes)
        done = 0
        while done < len(view):
            got = self._fh.readinto(view[done:])
            if not got:
                raise ConfigurationError(f"{self.array.filename} ends before row {lo + len(out)}")
            done += got

    def read(self, lo: int, n: int) -> np.ndarray:
        """Rows ``lo : lo + n`` (a view of the reused buffer: valid until the next read)."""
        if self._buf is None:
            return np.asarray(self.array[lo:lo + n])
        out = self._buf[:n]
        self.read_into(lo, out)
        return out

    def __enter__(self) -> _RowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()


@dataclass
class GatheredHistory:
    """One user's history as rows of the shared :class:`ItemTable`, sorted by position.

    Only behaviours whose item has a vector are kept as rows (``n``); the others are counted in
    ``missing_positions`` (they never rank ahead of a real behaviour). The device holds only the
    int32 rows: 4 bytes a behaviour.
    """

    user_id: int
    positions: np.ndarray  # int64 [n], host
    item_ids: np.ndarray  # int64 [n], host
    rows: torch.Tensor  # int32 [n], device: rows of table.vectors
    missing_positions: np.ndarray  # int64 [m], host
    table: ItemTable

    def __len__(self) -> int:
        return int(self.positions.shape[0] + self.missing_positions.shape[0])

    @property
    def device_bytes(self) -> int:
        return tensor_bytes(self.rows)

    @property
    def nbytes(self) -> int:
        return self.device_bytes + int(
            self.positions.nbytes + self.item_ids.nbytes + self.missing_positions.nbytes
        )

    @property
    def vectors(self) -> torch.Tensor:
        """``[n, d]`` storage-dtype vectors (a gather from the table)."""
        return self.table.vectors.index_select(0, self.rows)

    @property
    def scale(self) -> torch.Tensor | None:
        return None if self.table.scale is None else self.table.scale.index_select(0, self.rows)

    def topk(self, targets: torch.Tensor, k: int) -> TopK:
        """As :meth:`CachedHistory.topk`: gather the rows into this thread's scratch buffer (a fresh
        allocation of 100K rows costs more in page faults than the gather), then :func:`gsu_topk`."""
        if targets.device != self.rows.device:
            targets = targets.to(self.rows.device)
        table = self.table
        vectors = torch.index_select(table.vectors, 0, self.rows, out=_scratch(table.vectors, len(self.rows), 0))
        scale = None
        if table.scale is not None:
            scale = torch.index_select(table.scale, 0, self.rows, out=_scratch(table.scale, len(self.rows), 1))
        return gsu_topk(targets, vectors, k, None, normalised=True, history_scale=scale)


_SCRATCH = threading.local()


def _scratch(like: torch.Tensor, n: int, slot: int) -> torch.Tensor:
    """This thread's reusable ``[n, *like.shape[1:]]`` buffer of ``like``'s dtype and device."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    key = (slot, like.dtype, like.device, tuple(like.shape[1:]))
    buf = bufs.get(key)
    if buf is None or buf.shape[0] < n:
        buf = torch.empty((max(n, 1024), *like.shape[1:]), dtype=like.dtype, device=like.device)
        bufs[key] = buf
    return buf[:n]


def gather_history(
    user_id: int, positions: np.ndarray, item_ids: np.ndarray, table: ItemTable
) -> GatheredHistory:
    """A :class:`GatheredHistory` from a sequence (positions need not be sorted)."""
    pos = np.asarray(positions, dtype=np.int64)
    items = np.asarray(item_ids, dtype=np.int64)
    if len(pos) != len(items):
        raise ConfigurationError(
            f"history of user {user_id}: {len(pos)} positions and {len(items)} item ids do not match"
        )
    if len(pos) > 1 and np.any(pos[1:] < pos[:-1]):
        order = np.argsort(pos, kind="stable")
        pos, items = pos[order], items[order]
    rows = table.rows_of(items)
    has = rows >= 0
    missing = pos[~has]
    if not has.all():
        pos, items, rows = pos[has], items[has], rows[has]
    return _by_row(int(user_id), pos, items, rows, missing, table)


def _by_row(
    user: int, pos: np.ndarray, items: np.ndarray, rows: np.ndarray, missing: np.ndarray, table: ItemTable
) -> GatheredHistory:
    """A :class:`GatheredHistory` of behaviours already in position order. (Row order would make the
    gather walk the table forwards, ~1.5x faster on CPU, but then equal scores, a repeated item,
    would be ordered by the table's fill order, which differs between processes.)"""
    return GatheredHistory(user, pos, items, torch.from_numpy(rows.astype(np.int32)).to(table.device), missing, table)


def _concat_gathered(a: GatheredHistory, b: GatheredHistory) -> GatheredHistory:
    pos = np.concatenate([a.positions, b.positions])
    order = np.argsort(pos, kind="stable")
    rows = np.concatenate([a.rows.cpu().numpy(), b.rows.cpu().numpy()]).astype(np.int64)
    return _by_row(
        a.user_id,
        pos[order],
        np.concatenate([a.item_ids, b.item_ids])[order],
        rows[order],
        np.sort(np.concatenate([a.missing_positions, b.missing_positions])),
        a.table,
    )


def sequence_loader(store: Any, ref: Any) -> SequenceLoader:
    """A loader of ``(positions, item_ids)`` of one :class:`muse.vectorstore.CollectionRef` through
    ``VectorStore.user_sequence``."""

    def load(user_id: int) -> tuple[np.ndarray, np.ndarray]:
        return store.user_sequence(ref, int(user_id))

    return load


class GatherCache(HistoryCache):
    """:class:`HistoryCache` whose histories are gathers from a shared :class:`ItemTable`.

    Args:
        sequences: ``user_id -> (positions, item_ids)`` (see :func:`sequence_loader`).
        table: the item table (its dtype and device are the cache's).
        config: capacity and prefetch workers; ``storage_dtype``/``device`` must match the table.
    """

    def __init__(self, sequences: SequenceLoader, table: ItemTable, config: CacheConfig | None = None) -> None:
        config = config or CacheConfig(storage_dtype=table.storage_dtype, device=table.device)
        super().__init__(lambda u: (), table.dim, config)
        self.table = table
        self._sequences = sequences

    def _load(self, user: int) -> GatheredHistory:  # type: ignore[override]
        positions, items = self._sequences(user)
        entry = gather_history(user, positions, items, self.table)
        with self._lock:
            self._loads += 1
        log.debug("gathered user %d: %d behaviours, %d bytes", user, len(entry), entry.nbytes)
        return entry

    def append_behaviours(  # type: ignore[override]
        self, user_id: int, positions: np.ndarray, item_ids: np.ndarray, vectors: np.ndarray | None = None
    ) -> None:
        """Apply behaviours just written to the sequence store (``vectors`` is ignored: the item
        table holds them)."""
        user = int(user_id)
        self._extend(user, gather_history(user, positions, item_ids, self.table), _concat_gathered)

    def put(  # type: ignore[override]
        self, user_id: int, positions: np.ndarray, item_ids: np.ndarray, vectors: np.ndarray | None = None
    ) -> GatheredHistory:
        entry = gather_history(user_id, positions, item_ids, self.table)
        with self._lock:
            self._generation[entry.user_id] = self._generation.get(entry.user_id, 0) + 1
            self._insert(entry)  # type: ignore[arg-type]
        return entry
