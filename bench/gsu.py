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
searches its steady state, not freshly written growing segments. Usage: ``python bench/gsu.py [--device cpu|cuda] [--json]``.
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
    targets_np = rng.normal(size=(max(N_TARGETS), DIM)).astype(np.float32)
    targets_np /= np.linalg.norm(targets_np, axis=1, keepdims=True)
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
    res = run(args.device, args.milvus_uri, lambda msg: print(msg, file=sys.stderr), lengths)
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
