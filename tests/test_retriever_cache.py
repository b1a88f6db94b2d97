"""Device cache mechanics on in-memory histories (CPU, no server): LRU by bytes, single-flight
prefetch, appends, stats, storage dtypes. The loader here is a plain function over NumPy arrays,
the cache's injection point; the Milvus-backed loader is exercised in test_retriever_client.py."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from muse.errors import ConfigurationError
from retriever.cache import CacheConfig, HistoryCache, encode_history

DIM = 8


@dataclass(frozen=True)
class Batch:
    positions: np.ndarray
    item_ids: np.ndarray
    vectors: np.ndarray


class ArrayLoader:
    """Serves generated histories in batches and counts how often each user is loaded."""

    def __init__(self, lengths: dict[int, int], delay: float = 0.0, batch: int = 7) -> None:
        rng = np.random.default_rng(0)
        self.data = {
            u: (
                np.arange(n, dtype=np.int64),
                rng.integers(1, 10**6, n),
                rng.normal(size=(n, DIM)).astype(np.float32),
            )
            for u, n in lengths.items()
        }
        self.delay = delay
        self.batch = batch
        self.calls: dict[int, int] = {}
        self._lock = threading.Lock()

    def __call__(self, user: int):
        with self._lock:
            self.calls[user] = self.calls.get(user, 0) + 1
        time.sleep(self.delay)
        if user not in self.data:
            return
        pos, items, vecs = self.data[user]
        for s in range(0, len(pos), self.batch):
            yield Batch(pos[s : s + self.batch], items[s : s + self.batch], vecs[s : s + self.batch])


def _bytes_of(n: int) -> int:
    return encode_history(0, np.arange(n), np.arange(n), np.ones((n, DIM), np.float32)).nbytes


def test_search_loads_on_miss_then_hits() -> None:
    loader = ArrayLoader({1: 30})
    with HistoryCache(loader, DIM) as cache:
        h = cache.get(1)
        assert len(h) == 30 and h.vectors.dtype == torch.float32
        assert cache.get(1) is h
        st = cache.stats()
        assert (st.hits, st.misses, st.loads, st.entries, st.bytes) == (1, 1, 1, 1, h.nbytes)
        # The cached history ranks like the kernel over the raw vectors.
        pos, _, vecs = loader.data[1]
        t = torch.nn.functional.normalize(torch.from_numpy(vecs[[4]] + 0.01), dim=1)
        assert h.topk(t, 3).indices[0, 0].item() == 4


def test_eviction_by_bytes_is_lru() -> None:
    per_user = _bytes_of(20)
    loader = ArrayLoader({u: 20 for u in range(1, 6)})
    with HistoryCache(loader, DIM, CacheConfig(capacity_bytes=3 * per_user)) as cache:
        for u in (1, 2, 3):
            cache.get(u)
        cache.get(1)  # 1 becomes most recently used; 2 is now the oldest
        cache.get(4)
        assert not cache.contains(2) and all(cache.contains(u) for u in (1, 3, 4))
        st = cache.stats()
        assert st.evictions == 1 and st.bytes == 3 * per_user <= st.capacity_bytes
        cache.get(2)  # reloads and evicts 3
        assert loader.calls[2] == 2 and not cache.contains(3)


def test_history_larger_than_capacity_is_served_uncached() -> None:
    loader = ArrayLoader({1: 50})
    with HistoryCache(loader, DIM, CacheConfig(capacity_bytes=_bytes_of(10))) as cache:
        assert len(cache.get(1)) == 50
        assert cache.stats().entries == 0 and cache.stats().bytes == 0


def test_concurrent_prefetch_of_one_user_loads_once() -> None:
    loader = ArrayLoader({7: 40, 8: 5}, delay=0.2)
    with HistoryCache(loader, DIM, CacheConfig(prefetch_workers=4)) as cache:
        futures = [cache.prefetch([7]) for _ in range(3)] + [cache.prefetch([7, 8])]
        got = [None] * 3

        def search(i: int) -> None:
            got[i] = cache.get(7)

        threads = [threading.Thread(target=search, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        results = [f.result(timeout=10) for f in futures]
        assert results[-1] == {7: 40, 8: 5}
        assert loader.calls == {7: 1, 8: 1}
        assert got[0] is got[1] is got[2]
        assert cache.stats().loads == 2


def test_prefetch_future_carries_loader_errors() -> None:
    def broken(user: int):
        raise ConnectionError(f"store down for {user}")
        yield  # pragma: no cover

    with HistoryCache(broken, DIM) as cache:
        with pytest.raises(ConnectionError, match="store down for 3"):
            cache.prefetch([3]).result(timeout=5)
        assert cache.stats().entries == 0


def test_unknown_user_is_empty_and_not_cached() -> None:
    loader = ArrayLoader({1: 3})
    with HistoryCache(loader, DIM) as cache:
        h = cache.get(99)
        assert len(h) == 0 and h.vectors.shape == (0, DIM)
        assert not cache.contains(99)
        assert h.topk(torch.ones(2, DIM), 5).valid.sum() == 0


def test_append_extends_a_cached_history_and_reaches_search() -> None:
    loader = ArrayLoader({1: 10})
    with HistoryCache(loader, DIM) as cache:
        before = cache.get(1)
        new_vec = np.full((1, DIM), 3.0, dtype=np.float32)
        cache.append_behaviours(1, np.array([10]), np.array([4242]), new_vec)
        after = cache.get(1)
        assert len(after) == 11 and after.item_ids[-1] == 4242
        assert cache.stats().bytes == after.nbytes > before.nbytes
        top = after.topk(torch.nn.functional.normalize(torch.from_numpy(new_vec), dim=1), 1)
        assert after.item_ids[top.indices[0, 0].item()] == 4242
        assert loader.calls[1] == 1
        # Rewriting an existing position drops the entry: the next lookup reloads from the store.
        cache.append_behaviours(1, np.array([0]), np.array([5]), new_vec)
        assert not cache.contains(1)


def test_append_during_a_load_forces_a_reload() -> None:
    loader = ArrayLoader({1: 10}, delay=0.3)
    with HistoryCache(loader, DIM) as cache:
        fut = cache.prefetch([1])
        time.sleep(0.1)
        cache.append_behaviours(1, np.array([10]), np.array([1]), np.ones((1, DIM), np.float32))
        fut.result(timeout=10)
        assert loader.calls[1] == 2  # the first load was stale, so it was redone


@pytest.mark.parametrize(
    "dtype,ratio", [("bfloat16", 0.5), ("float16", 0.5), ("int8", (DIM + 4) / (4 * DIM))]
)
def test_compressed_storage_saves_memory_and_keeps_ranking(dtype: str, ratio: float) -> None:
    loader = ArrayLoader({1: 500})
    with (
        HistoryCache(loader, DIM) as full,
        HistoryCache(loader, DIM, CacheConfig(storage_dtype=dtype)) as small,
    ):
        a, b = full.get(1), small.get(1)
        assert b.device_bytes <= ratio * a.device_bytes
        assert b.nbytes < a.nbytes
        t = torch.nn.functional.normalize(torch.randn(4, DIM), dim=1)
        ta, tb = a.topk(t, 10), b.topk(t, 10)
        np.testing.assert_allclose(tb.scores.numpy(), ta.scores.numpy(), atol=2e-2)


def test_missing_vectors_in_a_history_never_come_first() -> None:
    with HistoryCache(
        lambda u: [
            Batch(np.arange(3), np.arange(3), np.array([[0.0] * DIM, [1.0] * DIM, [-1.0] * DIM], np.float32))
        ],
        DIM,
    ) as cache:
        h = cache.get(1)
        assert len(h) == 3 and h.positions.tolist() == [1, 2] and h.missing_positions.tolist() == [0]
        top = h.topk(torch.full((1, DIM), -(DIM**-0.5)), 3)
        assert h.positions[top.indices[0, :2].numpy()].tolist() == [2, 1]
        assert top.valid[0].tolist() == [True, True, False]
        assert top.scores[0, :2].tolist() == pytest.approx([1.0, -1.0], abs=1e-6)


def test_config_rejects_unknown_and_bad_values() -> None:
    with pytest.raises(ConfigurationError, match="unknown cache options \\['capacity'\\]"):
        CacheConfig.from_dict({"capacity": 5})
    with pytest.raises(ConfigurationError, match="storage_dtype 'fp8'"):
        CacheConfig(storage_dtype="fp8")
    with pytest.raises(ConfigurationError, match="capacity_bytes"):
        CacheConfig(capacity_bytes=0)
    assert CacheConfig.from_dict({"storage_dtype": "int8"}).storage_dtype == "int8"


def test_close_cancels_pending_prefetches() -> None:
    from concurrent.futures import CancelledError

    loader = ArrayLoader({1: 5, 2: 5, 3: 5}, delay=0.2)
    cache = HistoryCache(loader, DIM, CacheConfig(prefetch_workers=1))
    fut = cache.prefetch([1, 2, 3])
    cache.close()
    with pytest.raises(CancelledError, match="closed"):
        fut.result(timeout=5)
    assert sum(loader.calls.values()) < 3 and cache.stats().entries == 0
    with pytest.raises(RuntimeError, match="closed"):
        cache.prefetch([1])
