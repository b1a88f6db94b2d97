"""Python client of the GSU retriever.

>>> with Retriever.from_settings(source="scl", dataset="demo-tiny-0") as r:  # doctest: +SKIP
...     r.prefetch([42])                                        # while the matching stage runs
...     res = r.search(42, [1001, 1002], k=50)
...     res.version, res[0].behaviour_item_ids, res[0].scores, res[0].simtier

A retriever reads one (dataset, source) pair. Without ``version`` it follows the *live* version
(the Milvus alias that ``muse source promote`` switches): a background thread checks the alias
every ``refresh_s`` seconds (or at once on :meth:`Retriever.refresh`) and, after a switch, drops
the cached histories and target vectors of the old version. Requests never wait for that check.
Every request runs on one version from start to end (target vectors and behaviours alike) and its
result says which (``result.version``).

Every call returns or raises within its deadline (``timeout_s``: the settings' search deadline for
searches, the Milvus call timeout for writes), whatever Milvus does: backend calls get only the time
left (:mod:`muse.deadlines`), so a frozen or unreachable Milvus gives
:class:`~muse.errors.BackendUnavailable` at the deadline, and a user already cached (with target
vectors already read) is answered from memory without touching Milvus at all. Input is checked
before any backend work (:func:`check_search_request`), the same checks as ``RemoteRetriever``'s.

Two backends with the same results: ``backend="cache"`` (default) keeps the version's item vectors once
on the device and users' histories as rows of that table in a cache
(:class:`retriever.cache.GatherCache`; per-user vectors with ``history_from="behaviours"``) and
runs a gather + one matrix product + topk;
``backend="milvus"`` runs a filtered vector search per request on the Milvus behaviour collection.
Target vectors come from the source's item collection.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from muse import deadlines
from muse.arrays import check_k, l2_normalise
from muse.errors import BackendUnavailable, ConfigurationError, MuseError, NotFoundError
from muse.settings import Settings, load_settings
from muse.simtier import N_TIERS
from muse.validation import (
    check_id,
    check_ids,
    check_positions,
    check_request_bytes,
    check_same_length,
    check_target_count,
    check_vectors,
)
from muse.vectorstore import MAX_QUERY_WINDOW
from retriever.cache import (
    CacheConfig,
    CacheStats,
    GatherCache,
    HistoryCache,
    ItemTable,
    encode_history,
    gather_history,
    sequence_loader,
    store_loader,
)
from retriever.item_table import TableLoad, load_item_table
from retriever.kernels import simtier_counts
from retriever.milvus_search import milvus_topk

log = logging.getLogger(__name__)

BACKENDS = ("cache", "milvus")
#: Seconds between checks of the live alias (a promote is followed at most this much later).
REFRESH_S = 2.0
#: Made-up history rows and target counts of a warm-up (:meth:`RetrieverView.warm_up`).
WARM_ROWS = 4096
WARM_TARGETS = (1, 16, 128)


@dataclass(frozen=True)
class TargetHits:
    """The top-K behaviours of one target, best first (fewer than K when the history is shorter)."""

    item_id: int | None  # the target item (None when searched by vector)
    behaviour_item_ids: np.ndarray  # int64 [n]
    positions: np.ndarray  # int64 [n], positions in the user's history
    scores: np.ndarray  # float32 [n], cosine
    simtier: np.ndarray  # float32 [22], SimTier counts of ``scores``

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "behaviour_item_ids": self.behaviour_item_ids.tolist(),
            "positions": self.positions.tolist(),
            "scores": [round(float(s), 6) for s in self.scores],
            "simtier": [int(c) for c in self.simtier],
        }


@dataclass(frozen=True)
class SearchResult:
    """Result of :meth:`Retriever.search`: one :class:`TargetHits` per target, in request order."""

    user_id: int
    found: bool  # False: the user has no behaviours in this source (every target list is empty)
    backend: str  # "cache" or "milvus"
    k: int
    targets: tuple[TargetHits, ...] = field(default_factory=tuple)
    history_length: int | None = None  # behaviours of the user (known on the cache backend)
    dataset: str = ""
    source: str = ""
    version: int = 0  # the source version every vector of this result came from

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> TargetHits:
        return self.targets[i]

    def __iter__(self) -> Iterator[TargetHits]:
        return iter(self.targets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "found": self.found,
            "backend": self.backend,
            "k": self.k,
            "history_length": self.history_length,
            "dataset": self.dataset,
            "source": self.source,
            "version": self.version,
            "targets": [t.to_dict() for t in self.targets],
        }


def _check_user(user_id: Any) -> int:
    return check_id(user_id, "user_id")


def _check_items(item_ids: Any) -> list[int]:
    if item_ids is None:
        raise ConfigurationError("target_item_ids is None: give at least one target item id")
    if hasattr(item_ids, "__len__") and not isinstance(item_ids, (str, bytes)):
        check_target_count(len(item_ids), "target items")  # before looking at 100,000 of them
    ids = check_ids(item_ids, "target item ids")
    if len(ids) == 0:
        raise ConfigurationError("target_item_ids is empty: give at least one target item")
    return ids.tolist()


def _check_target_vectors(targets: Any, dim: int | None) -> np.ndarray:
    shape = getattr(targets, "shape", None)
    if shape is not None and len(shape) == 2:
        check_target_count(int(shape[0]), "target vectors")
    t = check_vectors(targets, dim, "target vectors", allow_zero=False)  # [B, d]
    check_target_count(t.shape[0], "target vectors")
    return t


def check_search_request(
    user_id: Any, k: Any, target_item_ids: Any = None, targets: Any = None, dim: int | None = None
) -> tuple[int, int, list[int] | np.ndarray]:
    """The checks every search path runs before any backend work (in process, Milvus backend,
    ``RemoteRetriever`` before sending, the GSU service before searching): ``k`` in
    1..16384, an int64 user id, and either 1..:data:`~muse.validation.MAX_TARGETS` integer target
    item ids or a finite, non-zero ``[B, dim]`` array of at most that many target vectors.

    Returns ``(user_id, k, item ids | float32 vectors [B, d])``.

    Raises:
        ConfigurationError: naming the bad value.
    """
    k = check_k(k, MAX_QUERY_WINDOW)
    user = _check_user(user_id)
    if targets is not None:
        return user, k, _check_target_vectors(targets, dim)
    return user, k, _check_items(target_item_ids)


class RetrieverView:
    """Retrieval on one fixed version of a (dataset, source): its caches and its collections.

    :class:`Retriever` hands out the view of the live version (:meth:`Retriever.view`); a caller
    that makes several calls which must agree (target vectors, then a search) keeps one view.
    """

    def __init__(
        self,
        store: Any,
        ref: Any,
        backend: str,
        cache_config: CacheConfig | None,
        item_cache_items: int,
        consistency_level: str | None,
        timeout_s: float | None = None,
    ) -> None:
        self.store = store
        self.ref = ref
        self.backend = backend
        self.consistency_level = consistency_level
        # The deadline of one search (target vectors, history load, Milvus search, all together).
        self.timeout_s = timeout_s
        self.dim = int(store.open_collections(ref))  # NotFoundError for missing collections
        # Unit target vectors by item id (LRU, at most item_cache_items): item vectors change only
        # with the version, and a Milvus query per request would dominate the cache backend.
        self._items: OrderedDict[int, np.ndarray] = OrderedDict()
        self._items_lock = threading.Lock()
        self.item_cache_items = item_cache_items
        self.item_lookups = 0  # target vectors asked for
        self.item_fetches = 0  # of those, read from Milvus
        self.cache: HistoryCache | None = None
        self.item_table: ItemTable | None = None
        self.table_load: TableLoad | None = None  # how the item table was filled (retriever.item_table)
        if backend == "cache":
            config = cache_config or CacheConfig()
            if config.history_from == "items":
                self.item_table = ItemTable(self._fetch_items, self.dim, config.storage_dtype, config.device)
                if config.item_table_file:
                    self.table_load = load_item_table(self.item_table, store, ref)
                    self._targets_from_file()
                self.cache = GatherCache(sequence_loader(store, ref), self.item_table, config)
            else:
                self.cache = HistoryCache(store_loader(store, ref, config.load_batch_size), self.dim, config)

    @property
    def version(self) -> int:
        return int(self.ref.version)

    def _fetch_items(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The item table's reads: ``get_item_vectors``, whose exact float32 vectors also fill the
        target-vector LRU (a preloaded table then leaves no target to read from Milvus: the first
        requests after a start are as fast as later ones, whatever the table's storage dtype)."""
        found, vecs = self.store.get_item_vectors(self.ref, item_ids)
        if self.item_cache_items and len(found):
            has = np.any(vecs != 0, axis=1)
            unit = l2_normalise(vecs[has])  # [n, d]
            with self._items_lock:
                room = self.item_cache_items - len(self._items)
                if room > 0:
                    for i, v in zip(found[has][:room].tolist(), unit[:room], strict=True):
                        self._items.setdefault(int(i), v)
        return found, vecs

    def _targets_from_file(self) -> None:
        """After the item table came from its file: fill the target-vector LRU from the same file (unit
        float32 rows, what Milvus holds), so that the first requests read no target from Milvus either."""
        load = getattr(self, "table_load", None)
        if load is None or load.how not in ("file", "milvus") or not self.item_cache_items:
            return
        from muse.itemtable import read_table

        try:
            table, _ = read_table(load.folder)
        except MuseError as e:
            log.info("%s: target vectors stay on demand (%s)", self.ref, e)
            return
        rows = np.flatnonzero(np.asarray(table.present[: self.item_cache_items * 2]))[: self.item_cache_items]
        if len(rows) == 0:
            return
        unit = table.unit_rows(rows)
        ids = np.asarray(table.item_ids[rows])
        with self._items_lock:
            for i, v in zip(ids.tolist(), unit, strict=True):
                if len(self._items) >= self.item_cache_items:
                    break
                self._items.setdefault(int(i), v)

    def get_item_vectors(self, item_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``VectorStore.get_item_vectors`` on this view's version."""
        return self.store.get_item_vectors(self.ref, item_ids)

    def target_vectors(self, item_ids: Sequence[int], missing: str = "raise") -> np.ndarray:
        """float32 ``[B, d]`` unit vectors of the target items, in order.

        ``missing="zero"`` gives a zero row for an item missing from the collection or stored
        without a vector instead of raising (the ranker scores such a candidate without a search).

        Raises:
            NotFoundError: naming the items missing from the version's item collection or stored
            without a vector (``missing="raise"``).
        """
        if missing not in ("raise", "zero"):
            raise ConfigurationError(f"missing={missing!r}: valid: raise, zero")
        ids = _check_items(item_ids)
        with deadlines.deadline(self.timeout_s, "target vectors"):
            return self._target_vectors(ids, missing)

    def _target_vectors(self, ids: list[int], missing: str) -> np.ndarray:
        with self._items_lock:
            by_id = {i: self._items[i] for i in ids if i in self._items}
            for i in by_id:
                self._items.move_to_end(i)
            self.item_lookups += len(ids)
        wanted = [i for i in dict.fromkeys(ids) if i not in by_id]
        if wanted:
            found, vecs = self.store.get_item_vectors(self.ref, wanted)
            fetched = {int(i): v for i, v in zip(found, vecs, strict=True)}
            absent = [i for i in wanted if i not in fetched]
            if absent and missing == "raise":
                raise NotFoundError(f"target item(s) {absent[:20]} not found in the {self.ref} item collection")
            no_vector = [i for i in wanted if i in fetched and not np.any(fetched[i])]
            if no_vector and missing == "raise":
                raise NotFoundError(f"target item(s) {no_vector[:20]} have no {self.ref.source!r} vector")
            fetched = {i: l2_normalise(v) for i, v in fetched.items() if np.any(v)}
            by_id.update(fetched)
            with self._items_lock:
                self.item_fetches += len(wanted)
                if self.item_cache_items:
                    self._items.update(fetched)
                    while len(self._items) > self.item_cache_items:
                        self._items.popitem(last=False)
        zero = np.zeros(self.dim, np.float32)
        return np.stack([by_id.get(i, zero) for i in ids])  # [B, d]

    def search(self, user_id: int, target_item_ids: Sequence[int], k: int = 50) -> SearchResult:
        """As :meth:`Retriever.search`, on this view's version."""
        user, k, ids = check_search_request(user_id, k, target_item_ids)
        with deadlines.deadline(self.timeout_s, "search"):
            return self._search(user, self._target_vectors(ids, "raise"), k, ids)

    def search_vectors(self, user_id: int, targets: np.ndarray, k: int = 50) -> SearchResult:
        """As :meth:`Retriever.search_vectors`, on this view's version."""
        user, k, t = check_search_request(user_id, k, targets=targets, dim=self.dim)
        t = l2_normalise(t)  # [B, d]
        with deadlines.deadline(self.timeout_s, "search"):
            return self._search(user, t, k, [None] * t.shape[0])

    def _search(self, user: int, targets: np.ndarray, k: int, ids: Sequence[int | None]) -> SearchResult:
        if self.backend == "cache":
            return self._search_cache(user, targets, k, ids)
        return self._search_milvus(user, targets, k, ids)

    def _result(self, user: int, found: bool, k: int, hits: list[TargetHits], length: int | None) -> SearchResult:
        return SearchResult(
            user, found, self.backend, k, tuple(hits), length, self.ref.dataset, self.ref.source, self.version
        )

    def _search_cache(
        self, user: int, targets: np.ndarray, k: int, ids: Sequence[int | None]
    ) -> SearchResult:
        assert self.cache is not None
        history = self.cache.get(user)  # a miss waits for the load only until the deadline
        top = history.topk(torch.from_numpy(targets), k)  # [B, K]; targets are unit vectors
        tiers = simtier_counts(top.scores, top.valid).cpu().numpy()  # [B, 22]
        scores = top.scores.cpu().numpy()
        idx = top.indices.cpu().numpy()
        ok = top.valid.cpu().numpy()
        hits = []
        for b, item_id in enumerate(ids):
            rows = idx[b][ok[b]]
            hits.append(
                TargetHits(
                    item_id, history.item_ids[rows], history.positions[rows], scores[b][ok[b]], tiers[b]
                )
            )
        return self._result(user, len(history) > 0, k, hits, len(history))

    def _search_milvus(
        self, user: int, targets: np.ndarray, k: int, ids: Sequence[int | None]
    ) -> SearchResult:
        res = milvus_topk(self.store, self.ref, user, targets, k, self.consistency_level)
        hits = []
        for b, item_id in enumerate(ids):
            scores = res.scores[b]
            counts = simtier_counts(
                torch.from_numpy(scores).unsqueeze(0), torch.ones(1, len(scores), dtype=torch.bool)
            )[0].numpy()  # [22]
            hits.append(TargetHits(item_id, res.item_ids[b], res.positions[b], scores, counts))
        found = any(len(h) for h in hits) or self.store.count_behaviours(self.ref, user) > 0
        return self._result(user, found, k, hits, None)

    def warm_up(self, rows: int = WARM_ROWS, target_counts: Sequence[int] = WARM_TARGETS, k: int = 50) -> float:
        """Run this view's search kernels once, in this thread, on made-up data of the cache's dtype
        and device: torch's first calls, this thread's scratch buffers and the kernels' once-per-
        process choices are paid here instead of by the first requests. Touches no backend and no
        cached history; returns seconds (0 on the Milvus backend)."""
        if self.cache is None:
            return 0.0
        t0 = time.perf_counter()
        config = self.cache.config
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((rows, self.dim)).astype(np.float32)  # [rows, d]
        positions = np.arange(rows, dtype=np.int64)
        if self.item_table is not None:
            table = ItemTable(lambda ids: (np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)),
                              self.dim, self.item_table.storage_dtype, self.item_table.device, initial_rows=rows)
            table.add(positions, vectors)
            history: Any = gather_history(-1, positions, positions, table)
        else:
            history = encode_history(-1, positions, positions, vectors, config.storage_dtype, config.device)
        for b in target_counts:
            targets = torch.from_numpy(l2_normalise(rng.standard_normal((b, self.dim)).astype(np.float32)))
            top = history.topk(targets, min(k, rows))  # [b, k]
            simtier_counts(top.scores, top.valid).cpu().numpy()
            top.indices.cpu().numpy()
        return time.perf_counter() - t0

    def close(self) -> None:
        """Drop this version's cached histories and target vectors (the store stays open)."""
        if self.cache is not None:
            self.cache.close()
        with self._items_lock:
            self._items.clear()


class Retriever:
    """GSU retrieval over users' lifelong histories for one (dataset, embedding source).

    Args:
        store: a :class:`muse.vectorstore.VectorStore`.
        source: embedding source name.
        dataset: the dataset whose collections are read.
        version: a fixed source version; None follows the live version (the live alias), checked
            every ``refresh_s`` seconds and at once by :meth:`refresh`.
        backend: ``"cache"`` (device cache, the serving hot path) or ``"milvus"`` (filtered search).
        cache_config: the cache's capacity, storage dtype and device (cache backend only).
        item_cache_items: target item vectors kept (LRU) between requests; 0 reads them every time.
        consistency_level: Milvus backend only: None = the settings' ``search_consistency``
            (default ``Bounded``: 187 against 35 req/s for ``Strong`` on a 2.3 server; a search may
            miss writes of the last few seconds). ``Strong`` sees every finished write (read your
            writes; each search first waits 200-400 ms for the time tick).
        refresh_s: seconds between checks of the live alias (following the live version only).

    Raises:
        NotFoundError: the version's collections do not exist, or (without ``version``) the
        (dataset, source) has no live version yet.
    """

    def __init__(
        self,
        store: Any,
        source: str,
        *,
        dataset: str,
        version: int | None = None,
        backend: str = "cache",
        cache_config: CacheConfig | None = None,
        item_cache_items: int = 100_000,
        consistency_level: str | None = None,
        refresh_s: float = REFRESH_S,
        timeout_s: float | None = None,
    ) -> None:
        from muse.vectorstore import CONSISTENCY_LEVELS, CollectionRef

        if backend not in BACKENDS:
            raise ConfigurationError(f"retriever backend {backend!r} is unknown; valid: {', '.join(BACKENDS)}")
        if consistency_level is not None and consistency_level not in CONSISTENCY_LEVELS:
            raise ConfigurationError(
                f"consistency_level {consistency_level!r} is unknown; valid: {', '.join(CONSISTENCY_LEVELS)}"
            )
        if item_cache_items < 0:
            raise ConfigurationError(f"item_cache_items must be >= 0, got {item_cache_items}")
        if refresh_s <= 0:
            raise ConfigurationError(f"refresh_s must be > 0, got {refresh_s}")
        if timeout_s is not None and timeout_s <= 0:
            raise ConfigurationError(f"timeout_s must be > 0, got {timeout_s}")
        self.store = store
        self.source = source
        self.dataset = dataset
        self.backend = backend
        settings = getattr(store, "settings", None)
        self.consistency_level = consistency_level or getattr(settings, "search_consistency", None)
        # Deadlines: a search (its settings' MUSE_MILVUS_SEARCH_TIMEOUT_S) and a write or admin call.
        self.timeout_s = float(timeout_s or getattr(settings, "milvus_search_timeout_s", 0) or 5.0)
        self.write_timeout_s = float(getattr(settings, "milvus_timeout_s", 0) or 30.0)
        self.item_cache_items = item_cache_items
        self.refresh_s = float(refresh_s)
        self.pinned = version is not None
        self._cache_config = cache_config
        self._switch_lock = threading.Lock()
        self._checked = time.monotonic()  # when the live alias was last read
        self.switches = 0  # version changes followed since construction
        self.refresh_failures = 0  # background checks that failed (Milvus unreachable)
        self._stop = threading.Event()
        with deadlines.deadline(self.write_timeout_s, "opening the retriever"):
            ref = CollectionRef(dataset, source, version if version is not None else self._live_version())
            self._view = self._open(ref)
        if not self.pinned:
            _start_refresher(self)
        log.info("retriever on %s (%s)", ref, "pinned" if self.pinned else "following the live alias")

    @classmethod
    def from_settings(
        cls,
        source: str,
        settings: Settings | None = None,
        *,
        dataset: str,
        version: int | None = None,
        backend: str = "cache",
        cache: CacheConfig | dict[str, Any] | None = None,
        item_cache_items: int = 100_000,
        consistency_level: str | None = None,
        refresh_s: float = REFRESH_S,
        timeout_s: float | None = None,
    ) -> Retriever:
        """Connect to the settings' Milvus; the cache lives on ``settings.resolve_device()``.

        Args:
            source: embedding source name, e.g. ``"scl"``.
            settings: default :func:`muse.settings.load_settings`.
            dataset: dataset name, e.g. ``"demo-tiny-0"``.
            version: a fixed source version; None follows the live one.
            backend: ``"cache"`` or ``"milvus"``.
            cache: cache options (a :class:`CacheConfig` or a dict of its fields; unknown keys rejected).
                The device defaults to the settings' device.
            item_cache_items: target item vectors kept in memory between requests (0: none).
            consistency_level: Milvus backend: None (the settings' ``search_consistency``, default
                ``Bounded``), ``Strong``, ``Session`` or ``Eventually``.
            refresh_s: seconds between checks of the live alias.
            timeout_s: the deadline of one search (default: the settings' ``milvus_search_timeout_s``).

        Raises:
            ConfigurationError: unknown backend or cache option. NotFoundError: no such collections,
            or no live version.
        """
        from muse.vectorstore import VectorStore

        settings = settings or load_settings()
        if isinstance(cache, dict):
            cache = CacheConfig.from_dict({"device": settings.resolve_device(), **cache})
        elif cache is None:
            cache = CacheConfig(device=settings.resolve_device())
        store = VectorStore(settings)
        try:
            return cls(
                store,
                source,
                dataset=dataset,
                version=version,
                backend=backend,
                cache_config=cache,
                item_cache_items=item_cache_items,
                consistency_level=consistency_level,
                refresh_s=refresh_s,
                timeout_s=timeout_s,
            )
        except BaseException:
            store.close()
            raise

    # -- versions ------------------------------------------------------------------------------
    def _live_version(self) -> int:
        version = self.store.live_version(self.dataset, self.source)
        if version is None:
            from muse.versions import legacy_report

            legacy = legacy_report(self.store.settings, self.store, self.source)
            raise NotFoundError(
                f"{self.dataset}/{self.source} has no live version: run `muse backfill --source {self.source} "
                f"--dataset {self.dataset}` (the first backfill becomes live) or `muse source promote "
                f"{self.dataset} {self.source} VERSION`; `muse source list` shows the versions"
                + (f". {legacy[0]}" if legacy else "")
            )
        return int(version)

    def _open(self, ref: Any) -> RetrieverView:
        return RetrieverView(
            self.store, ref, self.backend, self._cache_config, self.item_cache_items, self.consistency_level,
            self.timeout_s,
        )

    def refresh(self) -> bool:
        """Check the live alias now and switch to its version if it changed (a no-op when pinned).

        The new version's view is opened before it replaces the old one, so requests keep being
        served throughout; the old version's cached histories and target vectors are dropped.
        Returns True when the version changed.

        Raises:
            NotFoundError: the live alias is gone. BackendUnavailable: Milvus does not answer.
        """
        with self._switch_lock, deadlines.deadline(self.write_timeout_s, "live version check"):
            return self._refresh_locked()

    def _refresh_in_background(self) -> None:
        """One check of the live alias by the refresher thread; a failure keeps the current version."""
        if self._stop.is_set() or not self._switch_lock.acquire(blocking=False):
            return  # closed, or a refresh() is running
        try:
            with deadlines.deadline(self.write_timeout_s, "live version check"):
                self._refresh_locked()
        except MuseError as e:
            self.refresh_failures += 1
            log.warning("retriever %s/%s: live version check failed, staying on v%d: %s",
                        self.dataset, self.source, self._view.version, e)
        finally:
            self._switch_lock.release()

    def _refresh_locked(self) -> bool:
        from muse.vectorstore import CollectionRef

        self._checked = time.monotonic()
        if self.pinned:
            return False
        live = self._live_version()
        old = self._view
        if live == old.version:
            return False
        self._view = self._open(CollectionRef(self.dataset, self.source, live))
        self.switches += 1
        log.info("retriever switched %s -> v%d", old.ref, live)
        # In-flight requests may still hold the old view: close it off the request path.
        threading.Thread(target=old.close, name="muse-retriever-close", daemon=True).start()
        return True

    def view(self) -> RetrieverView:
        """The view of the current version. Never waits: the live alias is read by a background
        thread every ``refresh_s`` (a failed check keeps the current version and is logged)."""
        return self._view

    @property
    def staleness_s(self) -> float:
        """Seconds since the live alias was last read (the most a promote can be missed by, plus
        ``refresh_s`` until the next check); 0 when pinned."""
        return 0.0 if self.pinned else time.monotonic() - self._checked

    @property
    def ref(self) -> Any:
        """The :class:`muse.vectorstore.CollectionRef` requests use now."""
        return self._view.ref

    @property
    def version(self) -> int:
        return self._view.version

    @property
    def dim(self) -> int:
        return self._view.dim

    @property
    def cache(self) -> HistoryCache | None:
        return self._view.cache

    @property
    def item_lookups(self) -> int:
        return self._view.item_lookups

    @property
    def item_table(self) -> ItemTable | None:
        """The current version's item table (cache backend, ``history_from="items"``)."""
        return self._view.item_table

    @property
    def item_fetches(self) -> int:
        return self._view.item_fetches

    # -- searching -----------------------------------------------------------------------------
    def target_vectors(self, item_ids: Sequence[int], missing: str = "raise") -> np.ndarray:
        """float32 ``[B, d]`` unit vectors of the target items, in order (current version); see
        :meth:`RetrieverView.target_vectors` for ``missing``.

        Raises:
            NotFoundError: naming the items missing from the item collection or stored without a vector.
        """
        return self.view().target_vectors(item_ids, missing)

    def search(self, user_id: int, target_item_ids: Sequence[int], k: int = 50) -> SearchResult:
        """Top-``k`` behaviours of ``user_id`` for each target item, with SimTier counts, all from
        one version (``result.version``).

        Raises:
            ValueError: ``k`` is not an integer in 1..16384 (a ConfigurationError, which is a ValueError).
            NotFoundError: a target item is unknown or has no vector (named in the message).
            ConfigurationError: ``user_id`` or an item id is not an integer.
        """
        return self.view().search(user_id, target_item_ids, k)

    def search_vectors(self, user_id: int, targets: np.ndarray, k: int = 50) -> SearchResult:
        """As :meth:`search`, with target vectors ``[B, d]`` given directly."""
        return self.view().search_vectors(user_id, targets, k)

    # -- cache management ---------------------------------------------------------------------
    def prefetch(self, user_ids: Sequence[int]) -> Future:
        """Load the users' histories into the cache in the background (a done Future on the Milvus
        backend). The Future resolves to ``{user_id: history length}``."""
        users = [_check_user(u) for u in user_ids]
        for _ in range(3):
            view = self.view()
            if view.cache is None:
                done: Future = Future()
                done.set_result({})
                return done
            try:
                return view.cache.prefetch(users)
            except RuntimeError:  # that version's cache was closed by a switch a moment ago
                continue
        raise BackendUnavailable(f"retriever {self.dataset}/{self.source}: the cache kept switching versions")

    def preload_items(self, item_ids: Sequence[int]) -> int:
        """Read these items' vectors into the current version's item table now (e.g. a dataset's
        items at start-up), so that no prefetch waits for them; returns the table's rows (0 without one)."""
        table = self._view.item_table
        if table is None:
            return 0
        return table.load(np.asarray(item_ids, dtype=np.int64))

    def append_behaviours(
        self,
        user_id: int,
        positions: Sequence[int],
        item_ids: Sequence[int],
        vectors: np.ndarray | None = None,
    ) -> int:
        """Write new behaviours of one user to Milvus (current version: rows and sequence) and to a
        cached history; returns rows written. ``vectors`` default to the items' vectors.

        Raises:
            ConfigurationError: positions and item ids are not integers of the same length, or a
                negative position. NotFoundError: ``vectors`` omitted and an item has no vector.
        """
        user = _check_user(user_id)
        view = self.view()
        pos = check_positions(positions)
        items = check_ids(item_ids, "item_ids")
        vecs = None if vectors is None else check_vectors(vectors, view.dim, "behaviour vectors", allow_empty=True)
        if vecs is None:
            check_same_length("append_behaviours", positions=pos, item_ids=items)
        else:
            check_same_length("append_behaviours", positions=pos, item_ids=items, vectors=vecs)
        check_request_bytes(pos.nbytes + items.nbytes + (vecs.nbytes if vecs is not None else 0),
                            "append_behaviours request")
        if len(pos) == 0:
            return 0
        with deadlines.deadline(self.write_timeout_s, "append_behaviours"):
            return self._append(view, user, pos, items, vecs)

    def _append(self, view: RetrieverView, user: int, pos: np.ndarray, items: np.ndarray,
                vecs: np.ndarray | None) -> int:
        if vecs is None:
            found, vecs_found = view.get_item_vectors(np.unique(items))
            by_id = {int(i): v for i, v in zip(found, vecs_found, strict=True) if np.any(v)}
            missing = [int(i) for i in items if int(i) not in by_id]
            if missing:
                raise NotFoundError(f"item(s) {missing[:20]} have no {self.source!r} vector to append")
            vecs = np.stack([by_id[int(i)] for i in items]).astype(np.float32)
        written = self.store.upsert_behaviours(view.ref, np.full(len(pos), user), pos, items, vecs)
        if view.cache is not None:
            view.cache.append_behaviours(user, pos, items, vecs)
        return written

    def warm_up(self) -> float:
        """Run the current version's search kernels once in this thread on made-up data (see
        :meth:`RetrieverView.warm_up`; ``muse serve`` does it on every RPC thread before reporting
        SERVING); returns seconds."""
        return self._view.warm_up()

    def load_item_table(self, scan_milvus: bool = True) -> TableLoad | None:
        """Fill the current version's item table now (``muse serve`` does at start-up): from the
        version's table file, else, with ``scan_milvus``, from one Milvus scan written to that file
        (see :func:`retriever.item_table.load_item_table`). None without an item table (Milvus
        backend, or per-user vectors)."""
        view = self._view
        if view.item_table is None:
            return None
        if view.table_load is not None and view.table_load.how == "file":
            return view.table_load
        view.table_load = load_item_table(view.item_table, self.store, view.ref, scan_milvus=scan_milvus)
        view._targets_from_file()
        return view.table_load

    def forget_item_vectors(self) -> None:
        """Drop the cached target vectors (after the version's items were re-encoded) and the item
        table's record of items without a vector."""
        view = self._view
        with view._items_lock:
            view._items.clear()
        if view.item_table is not None:
            view.item_table.forget_absent()

    def invalidate(self, user_id: int) -> None:
        """Forget a cached history after behaviours were written elsewhere (e.g. by a backfill)."""
        if self._view.cache is not None:
            self._view.cache.invalidate(_check_user(user_id))

    def stats(self) -> CacheStats | None:
        """Cache hit/miss/byte counters of the current version (None on the Milvus backend)."""
        return self._view.cache.stats() if self._view.cache is not None else None

    def close(self) -> None:
        self._stop.set()
        self._view.close()
        self.store.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_refresher(retriever: Retriever) -> threading.Thread:
    """The thread that reads the live alias every ``refresh_s`` (holding the retriever weakly, so
    an unclosed retriever can still be collected; it stops on ``close()``)."""
    ref = weakref.ref(retriever)
    stop, period = retriever._stop, retriever.refresh_s

    def loop() -> None:
        while not stop.wait(period):
            r = ref()
            if r is None:
                return
            r._refresh_in_background()
            del r

    thread = threading.Thread(target=loop, name="muse-retriever-refresh", daemon=True)
    thread.start()
    return thread


__all__ = [
    "BACKENDS", "N_TIERS", "Retriever", "RetrieverView", "SearchResult", "TargetHits", "check_search_request",
]
