"""Python client of the GSU retriever.

>>> with Retriever.from_settings(source="scl") as r:            # doctest: +SKIP
...     r.prefetch([42])                                        # while the matching stage runs
...     res = r.search(42, [1001, 1002], k=50)
...     res[0].behaviour_item_ids, res[0].scores, res[0].simtier

Two paths with the same results: ``path="cache"`` (default) keeps users' histories in a device
cache (:class:`retriever.cache.HistoryCache`) and runs one matrix product + topk;
``path="milvus"`` runs a filtered vector search per request on the Milvus behaviour collection.
Target vectors come from the source's item collection.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from muse.errors import ConfigurationError, NotFoundError
from muse.settings import Settings, load_settings
from retriever.cache import (
    CacheConfig,
    CacheStats,
    GatherCache,
    HistoryCache,
    ItemTable,
    sequence_loader,
    store_loader,
)
from retriever.kernels import N_TIERS, simtier_counts
from retriever.milvus_search import milvus_topk

log = logging.getLogger(__name__)

PATHS = ("cache", "milvus")


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
    path: str  # "cache" or "milvus"
    k: int
    targets: tuple[TargetHits, ...] = field(default_factory=tuple)
    history_length: int | None = None  # behaviours of the user (known on the cache path)

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
            "path": self.path,
            "k": self.k,
            "history_length": self.history_length,
            "targets": [t.to_dict() for t in self.targets],
        }


def _check_k(k: Any) -> int:
    from muse.vectorstore import MAX_QUERY_WINDOW

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_QUERY_WINDOW:
        raise ConfigurationError(f"k must be an integer in 1..{MAX_QUERY_WINDOW}, got {k!r}")  # a ValueError
    return int(k)


def _check_user(user_id: Any) -> int:
    if isinstance(user_id, bool) or not isinstance(user_id, (int, np.integer)):
        raise ConfigurationError(f"user_id must be an integer, got {user_id!r}")
    return int(user_id)


def _int_array(values: Any, what: str) -> np.ndarray:
    vals = list(values) if not isinstance(values, (int, np.integer)) else [values]
    bad = [v for v in vals if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
    if bad:
        raise ConfigurationError(f"{what} must be integers, got {bad[:5]!r}")
    return np.asarray(vals, dtype=np.int64)


def _check_items(item_ids: Any) -> list[int]:
    ids = list(item_ids) if not isinstance(item_ids, (int, np.integer)) else [item_ids]
    if not ids:
        raise ConfigurationError("target_item_ids is empty: give at least one target item")
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if bad:
        raise ConfigurationError(f"target item ids must be integers, got {bad[:5]!r}")
    return [int(i) for i in ids]


class Retriever:
    """GSU retrieval over users' lifelong histories for one embedding source.

    Args:
        store: a :class:`muse.vectorstore.VectorStore`.
        source: embedding source name (its item and behaviour collections must exist).
        path: ``"cache"`` (device cache, the serving hot path) or ``"milvus"`` (filtered search).
        cache_config: the cache's capacity, storage dtype and device (cache path only).
        item_cache_items: target item vectors kept (LRU) between requests; 0 reads them every time.
        consistency_level: Milvus path only: None = the collections' ``Strong`` (every finished
            write is visible; on a server each search first waits 200-400 ms for the time tick);
            ``Bounded`` or ``Eventually`` for serving without that wait (writes of the last few
            seconds may be missed).
    """

    def __init__(
        self,
        store: Any,
        source: str,
        path: str = "cache",
        cache_config: CacheConfig | None = None,
        item_cache_items: int = 100_000,
        consistency_level: str | None = None,
    ) -> None:
        from muse.vectorstore import CONSISTENCY_LEVELS

        if path not in PATHS:
            raise ConfigurationError(f"retriever path {path!r} is unknown; valid: {', '.join(PATHS)}")
        if consistency_level is not None and consistency_level not in CONSISTENCY_LEVELS:
            raise ConfigurationError(
                f"consistency_level {consistency_level!r} is unknown; valid: {', '.join(CONSISTENCY_LEVELS)}"
            )
        self.consistency_level = consistency_level
        if item_cache_items < 0:
            raise ConfigurationError(f"item_cache_items must be >= 0, got {item_cache_items}")
        self.store = store
        # Unit target vectors by item id (LRU, at most item_cache_items): item vectors change only
        # when a source is re-encoded, and a Milvus query per request would dominate the cache path.
        self._items: OrderedDict[int, np.ndarray] = OrderedDict()
        self._items_lock = threading.Lock()
        self.item_cache_items = item_cache_items
        self.item_lookups = 0  # target vectors asked for
        self.item_fetches = 0  # of those, read from Milvus
        self.source = source
        self.path = path
        self.dim = int(store.describe(source)["behaviours"]["dim"])  # NotFoundError for an unknown source
        self.cache: HistoryCache | None = None
        self.item_table: ItemTable | None = None
        if path == "cache":
            config = cache_config or CacheConfig()
            if config.history_from == "items":
                self.item_table = ItemTable(
                    lambda ids: store.get_item_vectors(source, ids), self.dim, config.storage_dtype, config.device
                )
                self.cache = GatherCache(sequence_loader(store, source), self.item_table, config)
            else:
                self.cache = HistoryCache(store_loader(store, source, config.load_batch_size), self.dim, config)

    @classmethod
    def from_settings(
        cls,
        source: str,
        settings: Settings | None = None,
        path: str = "cache",
        cache: CacheConfig | dict[str, Any] | None = None,
        item_cache_items: int = 100_000,
        consistency_level: str | None = None,
    ) -> Retriever:
        """Connect to the settings' Milvus; the cache lives on ``settings.resolve_device()``.

        Args:
            source: embedding source name, e.g. ``"scl"``.
            settings: default :func:`muse.settings.load_settings`.
            path: ``"cache"`` or ``"milvus"``.
            cache: cache options (a :class:`CacheConfig` or a dict of its fields; unknown keys rejected).
                The device defaults to the settings' device.
            item_cache_items: target item vectors kept in memory between requests (0: none).
            consistency_level: Milvus path: None (``Strong``), ``Bounded``, ``Session`` or ``Eventually``.

        Raises:
            ConfigurationError: unknown path or cache option. NotFoundError: the source has no collections.
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
                path=path,
                cache_config=cache,
                item_cache_items=item_cache_items,
                consistency_level=consistency_level,
            )
        except BaseException:
            store.close()
            raise

    # -- searching -----------------------------------------------------------------------------
    def target_vectors(self, item_ids: Sequence[int]) -> np.ndarray:
        """float32 ``[B, d]`` vectors of the target items, in order.

        Raises:
            NotFoundError: naming the items missing from the source's item collection or stored
            without a vector.
        """
        ids = _check_items(item_ids)
        with self._items_lock:
            by_id = {i: self._items[i] for i in ids if i in self._items}
            for i in by_id:
                self._items.move_to_end(i)
            self.item_lookups += len(ids)
        wanted = [i for i in dict.fromkeys(ids) if i not in by_id]
        if wanted:
            found, vecs = self.store.get_item_vectors(self.source, wanted)
            fetched = {int(i): v for i, v in zip(found, vecs, strict=True)}
            missing = [i for i in wanted if i not in fetched]
            if missing:
                raise NotFoundError(
                    f"target item(s) {missing[:20]} not found in the {self.source!r} item collection"
                )
            no_vector = [i for i in wanted if not np.any(fetched[i])]
            if no_vector:
                raise NotFoundError(f"target item(s) {no_vector[:20]} have no {self.source!r} vector")
            fetched = {i: (v / np.linalg.norm(v)).astype(np.float32) for i, v in fetched.items()}
            by_id.update(fetched)
            with self._items_lock:
                self.item_fetches += len(wanted)
                if self.item_cache_items:
                    self._items.update(fetched)
                    while len(self._items) > self.item_cache_items:
                        self._items.popitem(last=False)
        return np.stack([by_id[i] for i in ids])  # [B, d]

    def search(self, user_id: int, target_item_ids: Sequence[int], k: int = 50) -> SearchResult:
        """Top-``k`` behaviours of ``user_id`` for each target item, with SimTier counts.

        Raises:
            ValueError: ``k`` is not an integer in 1..16384 (a ConfigurationError, which is a ValueError).
            NotFoundError: a target item is unknown or has no vector (named in the message).
            ConfigurationError: ``user_id`` or an item id is not an integer.
        """
        k = _check_k(k)
        user = _check_user(user_id)
        ids = _check_items(target_item_ids)
        return self._search(user, self.target_vectors(ids), k, ids)

    def search_vectors(self, user_id: int, targets: np.ndarray, k: int = 50) -> SearchResult:
        """As :meth:`search`, with target vectors ``[B, d]`` given directly."""
        k = _check_k(k)
        user = _check_user(user_id)
        t = np.atleast_2d(np.asarray(targets, dtype=np.float32))
        if t.ndim != 2 or t.shape[1] != self.dim:
            raise ConfigurationError(f"targets must be [B, {self.dim}], got shape {t.shape}")
        if not np.all(np.isfinite(t)):
            bad = np.flatnonzero(~np.all(np.isfinite(t), axis=1)).tolist()
            raise ConfigurationError(f"target vectors {bad[:20]} contain NaN or infinity")
        norms = np.linalg.norm(t, axis=1, keepdims=True)  # [B, 1]
        if np.any(norms == 0):
            raise ConfigurationError(
                f"target vectors {np.flatnonzero(norms[:, 0] == 0).tolist()} are all zero"
            )
        t = t / norms
        return self._search(user, t, k, [None] * t.shape[0])

    def _search(self, user: int, targets: np.ndarray, k: int, ids: Sequence[int | None]) -> SearchResult:
        if self.path == "cache":
            return self._search_cache(user, targets, k, ids)
        return self._search_milvus(user, targets, k, ids)

    def _search_cache(
        self, user: int, targets: np.ndarray, k: int, ids: Sequence[int | None]
    ) -> SearchResult:
        assert self.cache is not None
        history = self.cache.get(user)
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
        return SearchResult(user, len(history) > 0, "cache", k, tuple(hits), len(history))

    def _search_milvus(
        self, user: int, targets: np.ndarray, k: int, ids: Sequence[int | None]
    ) -> SearchResult:
        res = milvus_topk(self.store, self.source, user, targets, k, self.consistency_level)
        hits = []
        for b, item_id in enumerate(ids):
            scores = res.scores[b]
            counts = simtier_counts(
                torch.from_numpy(scores).unsqueeze(0), torch.ones(1, len(scores), dtype=torch.bool)
            )[0].numpy()  # [22]
            hits.append(TargetHits(item_id, res.item_ids[b], res.positions[b], scores, counts))
        found = any(len(h) for h in hits) or self.store.count_behaviours(self.source, user) > 0
        return SearchResult(user, found, "milvus", k, tuple(hits), None)

    # -- cache management ---------------------------------------------------------------------
    def prefetch(self, user_ids: Sequence[int]) -> Future:
        """Load the users' histories into the cache in the background (a done Future on the Milvus
        path). The Future resolves to ``{user_id: history length}``."""
        users = [_check_user(u) for u in user_ids]
        if self.cache is None:
            done: Future = Future()
            done.set_result({})
            return done
        return self.cache.prefetch(users)

    def preload_items(self, item_ids: Sequence[int]) -> int:
        """Read these items' vectors into the cache's item table now (e.g. a dataset's items at
        start-up), so that no prefetch waits for them; returns the table's rows (0 without one)."""
        if self.item_table is None:
            return 0
        return self.item_table.load(np.asarray(item_ids, dtype=np.int64))

    def append_behaviours(
        self,
        user_id: int,
        positions: Sequence[int],
        item_ids: Sequence[int],
        vectors: np.ndarray | None = None,
    ) -> int:
        """Write new behaviours of one user to Milvus (rows and sequence) and to a cached history;
        returns rows written. ``vectors`` default to the items' vectors in the item collection.

        Raises:
            ConfigurationError: positions and item ids are not integers of the same length, or a
                negative position. NotFoundError: ``vectors`` omitted and an item has no vector.
        """
        user = _check_user(user_id)
        pos = _int_array(positions, "positions")
        items = _int_array(item_ids, "item_ids")
        if len(pos) != len(items) or len(pos) == 0:
            raise ConfigurationError(
                f"append_behaviours: {len(pos)} positions and {len(items)} item ids (need the same, at least one)"
            )
        if pos.min() < 0:
            raise ConfigurationError(f"append_behaviours: negative position {int(pos.min())}")
        if vectors is None:
            found, vecs_found = self.store.get_item_vectors(self.source, np.unique(items))
            by_id = {int(i): v for i, v in zip(found, vecs_found, strict=True) if np.any(v)}
            missing = [int(i) for i in items if int(i) not in by_id]
            if missing:
                raise NotFoundError(f"item(s) {missing[:20]} have no {self.source!r} vector to append")
            vecs = np.stack([by_id[int(i)] for i in items]).astype(np.float32)
        else:
            vecs = np.asarray(vectors, dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape != (len(pos), self.dim):
                raise ConfigurationError(
                    f"append_behaviours: vectors must be [{len(pos)}, {self.dim}], got shape {vecs.shape}"
                )
        written = self.store.upsert_behaviours(self.source, np.full(len(pos), user), pos, items, vecs)
        if self.cache is not None:
            self.cache.append_behaviours(user, pos, items, vecs)
        return written

    def forget_item_vectors(self) -> None:
        """Drop the cached target vectors (after the source's items were re-encoded) and the item
        table's record of items without a vector."""
        with self._items_lock:
            self._items.clear()
        if self.item_table is not None:
            self.item_table.forget_absent()

    def invalidate(self, user_id: int) -> None:
        """Forget a cached history after behaviours were written elsewhere (e.g. by a backfill)."""
        if self.cache is not None:
            self.cache.invalidate(_check_user(user_id))

    def stats(self) -> CacheStats | None:
        """Cache hit/miss/byte counters (None on the Milvus path)."""
        return self.cache.stats() if self.cache is not None else None

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.store.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["N_TIERS", "PATHS", "Retriever", "SearchResult", "TargetHits"]
