"""GSU latency: Milvus filtered search vs the device cache vs a bare torch floor.

For history length L in {1K, 10K, 100K} and 1 or 100 targets per request, K = 50:

* ``milvus``: ``VectorStore.search_behaviours`` (filtered search, all targets in one call) on the
  Milvus server (``--milvus-uri``, default the local 2.3 server) with ``Bounded`` consistency: the
  search itself. The ratios use it. ``milvus strong`` is the same search at the collections'
  ``Strong`` level (read-your-writes), which first waits for the server's time tick (about
  200-400 ms on Milvus 2.3 standalone): what a caller that needs its latest writes pays;
* ``cache``: a cached history (loaded from Milvus through the cache's loader) searched with
  :func:`retriever.kernels.gsu_topk`, in float32 and in a compressed storage dtype;
* ``floor``: a bare ``torch`` matrix product + ``topk`` on the same stored tensor, same dtype,
  measured in the same run;
* ratios cache/floor and milvus/cache, recall@50 of the compressed cache against float32, and the
  bytes a 100K-behaviour user takes in the cache.

The behaviours (random unit vectors, 128-d) are written once under the prefix ``musebench`` and
reused by later runs; a run that writes them flushes (seals) them before measuring, so Milvus
searches its steady state, not freshly written growing segments.

The **prefetch table** (``--tables prefetch``) measures loading a user *cold* (not cached) into the
cache, for 1K, 10K and 100K-behaviour users whose behaviours are items of a 100K-item source:

* ``old``: the user's behaviour vectors read from the Milvus behaviour collection;
* ``new/<store>``: the user's item-id sequence read from a sequence store, then a gather from the
  item table already on the device. Stores: ``milvus`` (a query of the behaviour collection's scalar
  fields), ``postgres`` (one row per user with ``bigint[]`` position and item columns), ``redis``
  (packed int64 chunks, the server deployment) and ``file`` (a local file, the embedded one);

p50/p99 over repeated cold loads, the search time of a cached 100K user on both layouts, and the
device bytes per cached user beyond the shared item table. Usage:
``python bench/gsu.py --milvus-uri http://127.0.0.1:PORT [--tables search,prefetch] [--device cpu|cuda] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from muse.arrays import l2_normalise
from muse.settings import load_settings
from muse.vectorstore import CollectionRef, VectorStore
from retriever.cache import CacheConfig, HistoryCache, store_loader
from retriever.kernels import simtier_counts

SOURCE = "gsubench"
REF = CollectionRef("gsubench", SOURCE, 1)  # the bench's own collections
DIM = 128
K = 50
LENGTHS = (1_000, 10_000, 100_000)
N_TARGETS = (1, 100)
USER_OF = {n: 900_000 + n for n in LENGTHS}  # one user per history length
COMPRESSED = ("bfloat16", "float16", "int8")
MIN_RECALL = 0.99  # the compressed dtype is the fastest one whose recall@50 against float32 reaches this


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(
    fns: dict[str, Callable[[], Any]],
    device: str,
    budget_s: float = 2.0,
    min_reps: int = 3,
    max_reps: int = 300,
) -> dict[str, float]:
    """Median wall time in milliseconds of each function, run in interleaved rounds in a shuffled
    order (so that load from other processes on a shared machine, and cache warmth left by the
    previous call, hit all of them alike), after two warm-up rounds."""
    for _ in range(2):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    order = list(fns)
    shuffle = random.Random(0).shuffle
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < budget_s):
        shuffle(order)
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


def populate(store: VectorStore, lengths: tuple[int, ...], progress: Callable[[str], None]) -> None:
    """Write the bench users once (reused when their row counts already match)."""
    store.ensure_collections(REF, DIM)
    wrote = False
    for n in lengths:
        user = USER_OF[n]
        rng = np.random.default_rng(n)
        if store.count_behaviours(REF, user) == n:
            continue
        progress(f"writing {n} behaviours of user {user} ...")
        store.delete_user_behaviours(REF, user)
        wrote = True
        for start in range(0, n, 20_000):
            m = min(20_000, n - start)
            vecs = rng.normal(size=(m, DIM)).astype(np.float32)
            store.upsert_behaviours(
                REF, np.full(m, user), np.arange(start, start + m), rng.integers(1, 10**9, m), vecs
            )
    # Seal, index and reload what was written: freshly written rows sit in growing segments, which the
    # server searches by brute force (~1 s vs ~0.2 s at 100K x 100 here) until it seals them on its own
    # minutes later. Reused users were sealed by the run that wrote them.
    if wrote:
        store.flush(REF, reload=True)


def recall(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean overlap of two index sets ``[B, K]`` (order-free)."""
    hits = [len(set(x.tolist()) & set(y.tolist())) / a.shape[1] for x, y in zip(a, b, strict=True)]
    return float(np.mean(hits))


def run(
    device: str, milvus_uri: str, progress: Callable[[str], None], lengths: tuple[int, ...] = LENGTHS
) -> dict[str, Any]:
    data_dir = tempfile.mkdtemp(prefix="musebench-")
    settings = load_settings(
        env={}, data_dir=data_dir, milvus_uri=milvus_uri, milvus_prefix="musebench", device=device
    )
    store = VectorStore(settings)
    populate(store, lengths, progress)
    rng = np.random.default_rng(1)
    targets_np = l2_normalise(rng.normal(size=(max(N_TARGETS), DIM)).astype(np.float32))
    targets = torch.from_numpy(targets_np).to(device)

    caches = {
        dt: HistoryCache(store_loader(store, REF, 8192), DIM, CacheConfig(storage_dtype=dt, device=device))
        for dt in ("float32", *COMPRESSED)
    }
    users = {n: USER_OF[n] for n in lengths}
    load_ms: dict[int, float] = {}
    for n, user in users.items():
        progress(f"loading user {user} ({n} behaviours) into the caches ...")
        t0 = time.perf_counter()
        caches["float32"].prefetch([user]).result()
        load_ms[n] = (time.perf_counter() - t0) * 1e3
        full = caches["float32"].get(user)
        for dt in COMPRESSED:  # re-encode the same rows instead of reading Milvus again
            caches[dt].put(user, full.positions, full.item_ids, full.vectors.float().cpu().numpy())

    def cache_fn(dt: str, user: int, b: int) -> Callable[[], Any]:
        t = targets[:b]
        return lambda: caches[dt].get(user).topk(t, K)

    def floor_fn(dt: str, user: int, b: int) -> Callable[[], Any]:
        h = caches[dt].get(user).vectors
        if dt == "int8":  # int8 has no bare matmul on every device: the floor is the float32 one
            h = caches["float32"].get(user).vectors
        t = targets[:b].to(h.dtype)
        return lambda: torch.topk(t @ h.T, K, dim=1)

    # Pick the fastest compressed dtype on the largest request among those keeping recall@50 >= MIN_RECALL.
    big = users[max(lengths)]
    b_max = max(N_TARGETS)
    choose = timeit({dt: cache_fn(dt, big, b_max) for dt in COMPRESSED}, device, budget_s=4)
    ref_big = caches["float32"].get(big).topk(targets, K).indices.cpu()
    choice_recall = {
        dt: recall(ref_big, caches[dt].get(big).topk(targets, K).indices.cpu()) for dt in COMPRESSED
    }
    eligible = [dt for dt in COMPRESSED if choice_recall[dt] >= MIN_RECALL] or list(COMPRESSED)
    compressed = min(eligible, key=choose.get)
    progress(
        f"compressed dtypes at {max(lengths)} x {b_max}: {choose}, recall {choice_recall} -> {compressed}"
    )

    rows = []
    for n, user in users.items():
        for b in N_TARGETS:
            progress(f"L={n} targets={b} ...")
            row: dict[str, Any] = {"L": n, "targets": b}
            milvus = timeit(
                {
                    level: lambda b=b, user=user, level=level: store.search_behaviours(
                        REF, user, targets_np[:b], K, consistency_level=level
                    )
                    for level in ("Bounded", "Strong")
                },
                "cpu",
                budget_s=4,
            )
            row["milvus_ms"] = milvus["Bounded"]
            row["milvus_strong_ms"] = milvus["Strong"]
            ms = timeit(
                {
                    "cache_f32": cache_fn("float32", user, b),
                    "floor_f32": floor_fn("float32", user, b),
                    "cache_cmp": cache_fn(compressed, user, b),
                    "floor_cmp": floor_fn(compressed, user, b),
                },
                device,
            )
            for key in ("f32", "cmp"):
                row[f"cache_{key}_ms"] = ms[f"cache_{key}"]
                row[f"floor_{key}_ms"] = ms[f"floor_{key}"]
                row[f"cache/floor_{key}"] = ms[f"cache_{key}"] / ms[f"floor_{key}"]
            row["milvus/cache_f32"] = row["milvus_ms"] / row["cache_f32_ms"]
            row["milvus/cache_cmp"] = row["milvus_ms"] / row["cache_cmp_ms"]
            ref = caches["float32"].get(user).topk(targets[:b], K)
            got = caches[compressed].get(user).topk(targets[:b], K)
            row["recall@50_cmp"] = recall(ref.indices.cpu(), got.indices.cpu())
            # Share of targets for which Milvus and the float32 cache return the same ids in the same order.
            hits = store.search_behaviours(REF, user, targets_np[:b], K)
            positions = caches["float32"].get(user).positions[ref.indices.cpu().numpy()]  # [b, K]
            same = [[h.position for h in hs] == p.tolist() for hs, p in zip(hits, positions, strict=True)]
            row["milvus_same_ids"] = float(np.mean(same))
            assert simtier_counts(ref.scores, ref.valid).sum().item() == b * min(K, n)
            rows.append(row)

    big_full = caches["float32"].get(big)
    memory = {dt: caches[dt].get(big).nbytes for dt in ("float32", *COMPRESSED)}
    device_memory = {dt: caches[dt].get(big).device_bytes for dt in ("float32", *COMPRESSED)}
    store.close()
    for c in caches.values():
        c.close()
    return {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "milvus_uri": milvus_uri,
        "k": K,
        "compressed_dtype": compressed,
        "compressed_choice_ms": choose,
        "compressed_choice_recall": choice_recall,
        "load_ms": load_ms,
        "bytes_per_longest_user": memory,
        "device_bytes_per_longest_user": device_memory,
        "longest_history": len(big_full),
        "rows": rows,
    }


# -- prefetch ------------------------------------------------------------------------------------
PREFETCH_SOURCE = "gsuprefetch"
PREFETCH_REF = CollectionRef("gsuprefetch", PREFETCH_SOURCE, 1)  # also live, for `muse serve` (bench/serve.py)
N_ITEMS = 100_000
PREFETCH_USER_OF = {n: 910_000 + n for n in LENGTHS}
STORES = ("milvus", "postgres", "redis", "file")


class PostgresSequences:
    """The PostgreSQL candidate: one row per user, positions and item ids as ``bigint[]`` columns."""

    def __init__(self, url: str, table: str = "musebench_sequences") -> None:
        import psycopg2

        self.table = table
        self.conn = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://"))
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (collection text, user_id bigint, positions bigint[], "
                "item_ids bigint[], PRIMARY KEY (collection, user_id))"
            )

    def put(self, collection: str, user: int, positions: np.ndarray, items: np.ndarray) -> None:
        with self.conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO {self.table} VALUES (%s, %s, %s, %s) ON CONFLICT (collection, user_id) "
                "DO UPDATE SET positions = EXCLUDED.positions, item_ids = EXCLUDED.item_ids",
                (collection, int(user), positions.tolist(), items.tolist()),
            )

    def get(self, collection: str, user: int) -> tuple[np.ndarray, np.ndarray]:
        with self.conn.cursor() as cur:
            cur.execute(
                f"SELECT positions, item_ids FROM {self.table} WHERE collection = %s AND user_id = %s",
                (collection, int(user)),
            )
            row = cur.fetchone()
        if row is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.asarray(row[0], np.int64), np.asarray(row[1], np.int64)

    def drop(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {self.table}")
        self.conn.close()


def percentiles(fn: Callable[[], Any], reps: int, budget_s: float, device: str) -> tuple[float, float, int]:
    """p50 and p99 wall time (ms) of ``fn`` over up to ``reps`` runs within ``budget_s``."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99)), len(times)


def populate_items(store: VectorStore, progress: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray, bool]:
    """The prefetch bench's item collection (written once, reused): ``(item_ids, vectors, wrote)``."""
    store.ensure_collections(PREFETCH_REF, DIM)
    if store.live_version(PREFETCH_REF.dataset, PREFETCH_SOURCE) is None:
        store.set_live(PREFETCH_REF)
    rng = np.random.default_rng(5)
    item_ids = np.arange(1, N_ITEMS + 1, dtype=np.int64) * 13
    item_vecs = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    wrote = False
    if store.count_items(PREFETCH_REF) != N_ITEMS:
        progress(f"writing {N_ITEMS} items ...")
        for start in range(0, N_ITEMS, 20_000):
            sl = slice(start, start + 20_000)
            store.upsert_items(PREFETCH_REF, item_ids[sl], item_vecs[sl], np.zeros(len(item_ids[sl]), np.int64))
        wrote = True
    return item_ids, item_vecs, wrote


def populate_users(store: VectorStore, item_ids: np.ndarray, item_vecs: np.ndarray, lengths: tuple[int, ...],
                   progress: Callable[[str], None]) -> tuple[dict[int, int], bool]:
    """The prefetch bench's users (behaviours = items of the bench source, written once):
    ``({length: user_id}, wrote)``."""
    users = {n: PREFETCH_USER_OF[n] for n in lengths}
    wrote = False
    for n, user in users.items():
        urng = np.random.default_rng(n + 1)
        seq_items = item_ids[urng.integers(0, N_ITEMS, n)]
        if store.count_behaviours(PREFETCH_REF, user) != n:
            progress(f"writing {n} behaviours of user {user} ...")
            store.delete_user_behaviours(PREFETCH_REF, user)
            for start in range(0, n, 20_000):
                sl = slice(start, min(n, start + 20_000))
                store.upsert_behaviours(
                    PREFETCH_REF, np.full(sl.stop - sl.start, user), np.arange(sl.start, sl.stop),
                    seq_items[sl], item_vecs[(seq_items[sl] // 13) - 1],
                )
            wrote = True
    return users, wrote


def run_prefetch(
    device: str,
    milvus_uri: str,
    redis_url: str,
    postgres_url: str,
    progress: Callable[[str], None],
    lengths: tuple[int, ...] = LENGTHS,
    storage_dtype: str = "float32",
) -> dict[str, Any]:
    from muse.sequences import FileSequences
    from retriever.cache import GatherCache, ItemTable

    data_dir = tempfile.mkdtemp(prefix="musebench-")
    settings = load_settings(
        env={}, data_dir=data_dir, milvus_uri=milvus_uri, milvus_prefix="musebench", device=device,
        sequence_url=redis_url,
    )
    store = VectorStore(settings)
    item_ids, item_vecs, wrote = populate_items(store, progress)
    collection = store.behaviour_collection(PREFETCH_REF)
    redis_seq = store.sequences
    file_seq = FileSequences(settings.path("sequences"))
    pg = PostgresSequences(postgres_url)
    users, wrote_users = populate_users(store, item_ids, item_vecs, lengths, progress)
    wrote = wrote or wrote_users
    for n, user in users.items():
        pos, items = store.query_sequence(collection, user)
        assert len(pos) == n
        if len(redis_seq.get(collection, user)[0]) != n:  # behaviours written by an older run
            redis_seq.delete_user(collection, user)
            redis_seq.write(collection, np.full(n, user), pos, items)
        file_seq.write(collection, np.full(n, user), pos, items)
        pg.put(collection, user, pos, items)
    if wrote:
        store.flush(PREFETCH_REF, reload=True)

    loaders: dict[str, Callable[[int], tuple[np.ndarray, np.ndarray]]] = {
        "milvus": lambda u: store.query_sequence(collection, u),
        "postgres": lambda u: pg.get(collection, u),
        "redis": lambda u: redis_seq.get(collection, u),
        "file": lambda u: file_seq.get(collection, u),
    }
    progress("loading the item table ...")
    table_t0 = time.perf_counter()
    table = ItemTable(lambda ids: store.get_item_vectors(PREFETCH_REF, ids), DIM, storage_dtype, device)
    table.load(item_ids)
    table_s = time.perf_counter() - table_t0
    cfg = CacheConfig(storage_dtype=storage_dtype, device=device)
    new = {name: GatherCache(fn, table, cfg) for name, fn in loaders.items()}
    old = HistoryCache(store_loader(store, PREFETCH_REF, 8192), DIM, CacheConfig(storage_dtype=storage_dtype, device=device))

    def cold(cache: HistoryCache, user: int) -> Callable[[], Any]:
        def fn() -> Any:
            cache.invalidate(user)
            return cache.prefetch([user]).result()

        return fn

    rows = []
    for n, user in users.items():
        progress(f"prefetch L={n} ...")
        row: dict[str, Any] = {"L": n}
        row["old"] = percentiles(cold(old, user), 5 if n >= 100_000 else 10, 20, device)
        for name, cache in new.items():
            row[name] = percentiles(cold(cache, user), 30, 8, device)
        ref = old.get(user)
        got = new["redis"].get(user)
        assert np.array_equal(ref.positions, got.positions)
        rows.append(row)
    # Search on a cached longest user: per-user vectors (old) vs a gather from the table (new).
    big = users[max(lengths)]
    rng = np.random.default_rng(1)
    targets = torch.from_numpy(l2_normalise(rng.normal(size=(100, DIM)).astype(np.float32))).to(device)
    search = {}
    for b in N_TARGETS:
        t = targets[:b]
        ms = timeit({"old": lambda t=t: old.get(big).topk(t, K), "new": lambda t=t: new["redis"].get(big).topk(t, K)}, device)
        search[b] = ms
        a, g = old.get(big).topk(t, K), new["redis"].get(big).topk(t, K)
        assert recall(a.indices.cpu(), g.indices.cpu()) == 1.0
    result = {
        "device": device,
        "storage_dtype": storage_dtype,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "search_ms": search,
        "old_device_bytes": old.get(big).device_bytes,
        "new_device_bytes": new["redis"].get(big).device_bytes,
        "new_host_bytes": new["redis"].get(big).nbytes - new["redis"].get(big).device_bytes,
        "item_table_bytes": table.device_bytes,
        "item_table_rows": len(table),
        "item_table_load_s": table_s,
        "longest": max(lengths),
        "milvus_uri": milvus_uri,
        "redis_url": redis_url,
    }
    for c in (*new.values(), old):
        c.close()
    pg.drop()
    store.close()
    return result


def prefetch_table(res: dict[str, Any]) -> str:
    head = f"{'L':>7} " + " ".join(f"{name:>21}" for name in ("old: milvus vectors", *(f"new: {s}" for s in STORES)))
    sub = f"{'':>7} " + " ".join(f"{'p50 / p99 ms':>21}" for _ in range(1 + len(STORES)))
    lines = ["cold prefetch of one user (ms)", head, sub, "-" * len(head)]
    for r in res["rows"]:
        cells = [f"{r[k][0]:>9.1f} / {r[k][1]:>9.1f}" for k in ("old", *STORES)]
        lines.append(f"{r['L']:>7} " + " ".join(cells))
    lines.append("")
    for r in res["rows"]:
        best = min(STORES, key=lambda s: r[s][0])
        lines.append(
            f"L={r['L']}: fastest store {best} ({r[best][0]:.1f} ms p50), old/new {r['old'][0] / r[best][0]:.0f}x"
        )
    lines.append(
        f"device bytes per cached {res['longest']}-behaviour user: old {res['old_device_bytes'] / 2**20:.2f} MiB, "
        f"new {res['new_device_bytes'] / 2**20:.3f} MiB (+ {res['new_host_bytes'] / 2**20:.2f} MiB host ids); "
        f"shared item table {res['item_table_rows']} items, {res['item_table_bytes'] / 2**20:.1f} MiB on the device "
        f"(loaded in {res['item_table_load_s']:.1f} s)"
    )
    lines.append(
        "search of the cached longest user (ms), old per-user vectors vs new gather: "
        + ", ".join(f"{b} targets {ms['old']:.2f} vs {ms['new']:.2f}" for b, ms in res["search_ms"].items())
    )
    lines.append(
        f"device {res['device']}, storage {res['storage_dtype']}, torch threads {res['torch_threads']}, "
        f"milvus {res['milvus_uri']}, redis {res['redis_url']}"
    )
    return "\n".join(lines)


def table(res: dict[str, Any]) -> str:
    cmp_dt = res["compressed_dtype"]
    head = (
        f"{'L':>7} {'T':>4} {'milvus ms':>10} {'strong ms':>10} {'cache f32':>10} {'floor f32':>10} {'c/f f32':>8} "
        f"{'cache ' + cmp_dt[:4]:>10} {'floor ' + cmp_dt[:4]:>10} {'c/f cmp':>8} {'mil/c f32':>10} "
        f"{'mil/c cmp':>10} {'recall50':>9} {'same ids':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in res["rows"]:
        lines.append(
            f"{r['L']:>7} {r['targets']:>4} {r['milvus_ms']:>10.2f} {r['milvus_strong_ms']:>10.2f} "
            f"{r['cache_f32_ms']:>10.3f} "
            f"{r['floor_f32_ms']:>10.3f} {r['cache/floor_f32']:>8.2f} {r['cache_cmp_ms']:>10.3f} "
            f"{r['floor_cmp_ms']:>10.3f} {r['cache/floor_cmp']:>8.2f} {r['milvus/cache_f32']:>10.1f} "
            f"{r['milvus/cache_cmp']:>10.1f} {r['recall@50_cmp']:>9.4f} {r['milvus_same_ids']:>9.2f}"
        )
    lines.append("")
    for key, what in (
        ("device_bytes_per_longest_user", "device (vectors)"),
        ("bytes_per_longest_user", "total (+ host ids)"),
    ):
        mem = res[key]
        lines.append(
            f"memory per {res['longest_history']}-behaviour user, {what}: "
            + ", ".join(f"{dt} {b / 2**20:.2f} MiB ({b / mem['float32']:.3f}x)" for dt, b in mem.items())
        )
    lines.append(
        f"compressed dtype choice (cache ms at {res['longest_history']} x 100): "
        + ", ".join(
            f"{dt} {ms:.1f} ms (recall@50 {res['compressed_choice_recall'][dt]:.4f})"
            for dt, ms in res["compressed_choice_ms"].items()
        )
        + f" -> {cmp_dt} (fastest with recall@50 >= {MIN_RECALL})"
    )
    lines.append(
        "history load from Milvus into the cache (ms): "
        + ", ".join(f"L={n}: {ms:.0f}" for n, ms in res["load_ms"].items())
    )
    lines.append(
        f"device {res['device']}, torch threads {res['torch_threads']}, K={res['k']}, milvus {res['milvus_uri']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--milvus-uri", default="http://127.0.0.1:19530", help="Milvus server to search")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--drop", action="store_true", help="drop the bench collections from Milvus and exit")
    p.add_argument(
        "--lengths", default=",".join(map(str, LENGTHS)), help="history lengths (subset of 1000,10000,100000)"
    )
    p.add_argument("--tables", default="search,prefetch", help="tables to measure: search, prefetch or both")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="Redis of the sequence-store candidate")
    p.add_argument(
        "--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test", help="PostgreSQL of that candidate"
    )
    p.add_argument("--dtype", default="float32", help="storage dtype of the prefetch table's caches")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.drop:
        settings = load_settings(
            env={},
            data_dir=tempfile.mkdtemp(prefix="musebench-"),
            milvus_uri=args.milvus_uri,
            milvus_prefix="musebench",
        )
        with VectorStore(settings) as store:
            store.drop_collections(REF)
        print(f"dropped the {SOURCE!r} bench collections (prefix musebench) at {args.milvus_uri}")
        return 0
    lengths = tuple(int(x) for x in args.lengths.split(","))
    unknown = [n for n in lengths if n not in USER_OF]
    if unknown:
        print(f"error: --lengths {unknown} not among {sorted(USER_OF)}", file=sys.stderr)
        return 2
    tables = {t.strip() for t in args.tables.split(",")}
    progress = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    out: dict[str, Any] = {}
    if "search" in tables:
        out["search"] = run(args.device, args.milvus_uri, progress, lengths)
    if "prefetch" in tables:
        out["prefetch"] = run_prefetch(
            args.device, args.milvus_uri, args.redis_url, args.postgres_url, progress, lengths, args.dtype
        )
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print("\n\n".join((table if name == "search" else prefetch_table)(res) for name, res in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
