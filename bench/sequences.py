"""The users' item-id sequences at the open Taobao-MM's size (9M users): bytes per user and load time.

For each fraction f of the open data set (``--fractions``, default 0.001,0.003,0.01: 9K, 27K and 90K
of its 9M users) the users' histories (lengths spread over 100-1,000, mean ~550; positions 0..L-1;
item ids drawn from 35M·f anonymised int64 ids, as Taobao-MM's) are written as a backfill writes
them (users in order, 8,192 behaviours per write call, so a user may take two chunks) into each
sequence store layout (``--layouts``):

* ``file``: :class:`muse.sequences.FileSequences`, one SQLite file per collection, a row per user;
* ``redis``: :class:`muse.sequences.RedisSequences`, a Redis list of packed chunks per user;
* ``file-v1`` and ``redis-v1``: the layouts before (one append-only file per user; Redis lists of
  format-1 chunks, 16 bytes a behaviour), written here the way the old code wrote them.

Per layout: write time and users/s, bytes (files: blocks allocated on disk; Redis: ``MEMORY USAGE``
of a sample of keys, which counts the key, the value and Redis' own overhead), bytes per user and per
behaviour, files, and the read latency of one user's sequence (p50/p99 over random users). Then a
least-squares line per layout over the fractions and its value at 9M users.
Usage: ``python -m bench.sequences [--fractions 0.001,0.003,0.01] [--layouts file,redis,file-v1,redis-v1]
[--redis-url redis://127.0.0.1:6379/14] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from muse.sequences import FileSequences, RedisSequences, pack_v1

FULL_USERS = 9_000_000
FULL_ITEMS = 35_000_000
WRITE_ROWS = 8192  # behaviours per write call, as indexer.backfill.BEHAVIOUR_UPSERT_ROWS
LAYOUTS = ("file", "redis", "file-v1", "redis-v1")
COLLECTION = "musebench_seq_behaviours"
USER_BASE = 10**12  # user ids: USER_BASE + row


def histories(n_users: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(user_ids, positions, item_ids)`` in write calls of :data:`WRITE_ROWS` behaviours, users in order."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(100, 1001, n_users)
    pool = rng.integers(-(2**63), 2**63 - 1, max(1, int(FULL_ITEMS * n_users / FULL_USERS)), dtype=np.int64)
    user_of = np.repeat(np.arange(n_users, dtype=np.int64) + USER_BASE, lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    for lo in range(0, len(user_of), WRITE_ROWS):
        users = user_of[lo:lo + WRITE_ROWS]
        positions = np.arange(lo, lo + len(users), dtype=np.int64) - starts[lo:lo + WRITE_ROWS]
        yield users, positions, pool[rng.integers(0, len(pool), len(users))]


class FileV1:
    """The file layout before: one append-only file per user, records of int64 n + a format-1 chunk."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, collection: str, user: int) -> Path:
        return self.root / collection / f"{user % 256:02x}" / f"{user}.seq"

    def write(self, collection: str, user_ids: np.ndarray, positions: np.ndarray, item_ids: np.ndarray) -> None:
        cuts = np.flatnonzero(user_ids[1:] != user_ids[:-1]) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(user_ids)], strict=True):
            path = self._path(collection, int(user_ids[lo]))
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as fh:
                fh.write(np.asarray([hi - lo], "<i8").tobytes() + pack_v1(positions[lo:hi], item_ids[lo:hi]))

    def get(self, collection: str, user: int) -> tuple[np.ndarray, np.ndarray]:
        from muse.sequences import unpack

        raw = self._path(collection, user).read_bytes()
        chunks, at = [], 0
        while at + 8 <= len(raw):
            n = int(np.frombuffer(raw, "<i8", 1, at)[0])
            chunks.append(raw[at + 8:at + 8 + 16 * n])
            at += 8 + 16 * n
        return unpack(chunks)


class RedisV1(RedisSequences):
    """The Redis layout before: the same lists, of format-1 chunks."""

    def write(self, collection: str, user_ids: np.ndarray, positions: np.ndarray, item_ids: np.ndarray) -> None:
        pipe = self._redis.pipeline(transaction=False)
        cuts = np.flatnonzero(user_ids[1:] != user_ids[:-1]) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(user_ids)], strict=True):
            pipe.rpush(self._key(collection, int(user_ids[lo])), pack_v1(positions[lo:hi], item_ids[lo:hi]))
        pipe.execute()


def disk_bytes(root: Path) -> tuple[int, int, int]:
    """(allocated bytes, apparent bytes, files) under ``root``."""
    allocated = apparent = files = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            st = os.stat(os.path.join(dirpath, name))
            allocated += st.st_blocks * 512
            apparent += st.st_size
            files += 1
    return allocated, apparent, files


def redis_bytes(store: RedisSequences, users: np.ndarray, sample: int) -> float:
    """Mean ``MEMORY USAGE`` (bytes) of the keys of a sample of users, times the users."""
    client = store._redis
    pick = users[np.random.default_rng(1).choice(len(users), min(sample, len(users)), replace=False)]
    pipe = client.pipeline(transaction=False)
    for u in pick:
        pipe.memory_usage(store._key(COLLECTION, int(u)), samples=0)
    sizes = [s for s in pipe.execute() if s is not None]
    return float(np.mean(sizes)) * len(users)


def measure(layout: str, n_users: int, work: Path, redis_url: str, reads: int) -> dict[str, Any]:
    root = work / layout
    shutil.rmtree(root, ignore_errors=True)
    if layout == "file":
        store: Any = FileSequences(root)
    elif layout == "file-v1":
        store = FileV1(root)
    elif layout == "redis":
        store = RedisSequences(redis_url)
    else:
        store = RedisV1(redis_url)
    if layout.startswith("redis"):
        store.drop(COLLECTION)
        before = int(store._redis.info("memory")["used_memory"])
    behaviours = 0
    t0 = time.perf_counter()
    for users, positions, items in histories(n_users):
        store.write(COLLECTION, users, positions, items)
        behaviours += len(users)
    write_s = time.perf_counter() - t0
    user_ids = np.arange(n_users, dtype=np.int64) + USER_BASE
    row: dict[str, Any] = {"layout": layout, "users": n_users, "behaviours": behaviours, "write_s": write_s,
                           "users_per_s": n_users / write_s}
    if layout.startswith("redis"):
        row["bytes"] = redis_bytes(store, user_ids, 2000)
        row["used_memory_delta"] = int(store._redis.info("memory")["used_memory"]) - before
        row["files"] = 0
    else:
        if isinstance(store, FileSequences):
            store.close()
            store = FileSequences(root)
            conn = store._conn(COLLECTION, create=False)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        allocated, apparent, files = disk_bytes(root)
        row.update(bytes=allocated, apparent_bytes=apparent, files=files)
    rng = np.random.default_rng(2)
    times = []
    for u in user_ids[rng.integers(0, n_users, reads)]:
        t0 = time.perf_counter()
        pos, _ = store.get(COLLECTION, int(u))
        times.append((time.perf_counter() - t0) * 1e3)
        assert 100 <= len(pos) <= 1000
    row.update(read_p50_ms=float(np.percentile(times, 50)), read_p99_ms=float(np.percentile(times, 99)),
               bytes_per_user=row["bytes"] / n_users, bytes_per_behaviour=row["bytes"] / behaviours)
    if layout.startswith("redis"):
        store.drop(COLLECTION)
        store.close()
    else:
        shutil.rmtree(root, ignore_errors=True)
    return row


def fit(xs: list[float], ys: list[float], at: float) -> float:
    """The least-squares line through (xs, ys) at ``at`` (NaN from a single point)."""
    if len(xs) < 2:
        return float("nan")
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a + b * at)


def run(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    fractions = [float(f) for f in args.fractions.split(",")]
    layouts = [x for x in args.layouts.split(",") if x]
    work = Path(tempfile.mkdtemp(prefix="seqbench-", dir=args.dir))
    rows = []
    try:
        for f in fractions:
            n = int(round(FULL_USERS * f))
            for layout in layouts:
                progress(f"f={f}: {n} users into {layout} ...")
                rows.append({"f": f, **measure(layout, n, work, args.redis_url, args.reads)})
                r = rows[-1]
                progress(f"  {r['write_s']:.1f} s, {r['bytes_per_user']:.0f} B/user, read p50 {r['read_p50_ms']:.2f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    extrapolated = []
    for layout in layouts:
        rs = [r for r in rows if r["layout"] == layout]
        xs = [r["users"] for r in rs]
        extrapolated.append({"layout": layout, "users": FULL_USERS,
                             "bytes": fit(xs, [r["bytes"] for r in rs], FULL_USERS),
                             "bytes_per_user_at_largest": rs[-1]["bytes_per_user"],
                             "write_s": fit(xs, [r["write_s"] for r in rs], FULL_USERS),
                             "files": fit(xs, [r["files"] for r in rs], FULL_USERS)})
    mean_len = float(np.mean([r["behaviours"] / r["users"] for r in rows])) if rows else 0.0
    return {"rows": rows, "extrapolated": extrapolated, "mean_length": mean_len, "loadavg": os.getloadavg()[0],
            "cpus": os.cpu_count()}


def table(res: dict[str, Any]) -> str:
    head = (f"{'f':>6} {'users':>7} {'layout':>9} {'write s':>8} {'users/s':>8} {'MB':>9} {'B/user':>7} "
            f"{'B/behav':>7} {'files':>7} {'read p50 ms':>11} {'p99 ms':>7}")
    lines = [f"users' item-id sequences by fraction of the open Taobao-MM (9M users; mean history {res['mean_length']:.0f})",
             head, "-" * len(head)]
    for r in res["rows"]:
        lines.append(f"{r['f']:>6} {r['users']:>7} {r['layout']:>9} {r['write_s']:>8.1f} {r['users_per_s']:>8,.0f} "
                     f"{r['bytes'] / 1e6:>9.1f} {r['bytes_per_user']:>7.0f} {r['bytes_per_behaviour']:>7.2f} "
                     f"{r['files']:>7} {r['read_p50_ms']:>11.3f} {r['read_p99_ms']:>7.3f}")
    lines += ["", "extrapolated to 9M users (least-squares line over the fractions)"]
    head = f"{'layout':>9} {'GB':>8} {'files':>11} {'write h':>8}"
    lines += [head, "-" * len(head)]
    for e in res["extrapolated"]:
        lines.append(f"{e['layout']:>9} {e['bytes'] / 1e9:>8.1f} {e['files']:>11,.0f} {e['write_s'] / 3600:>8.2f}")
    lines.append(f"file: blocks allocated on disk; redis: MEMORY USAGE of 2,000 keys x users; "
                 f"{res['cpus']} CPUs, load average {res['loadavg']:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fractions", default="0.001,0.003,0.01", help="fractions of the open data set's 9M users")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"sequence store layouts among {', '.join(LAYOUTS)}")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="Redis of the redis layouts")
    p.add_argument("--reads", type=int, default=1000, help="users read for the latency")
    p.add_argument("--dir", default=None, help="folder for the file layouts (default: the system's temp folder)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    bad = [x for x in args.layouts.split(",") if x not in LAYOUTS]
    if bad:
        print(f"error: --layouts {bad} not among {', '.join(LAYOUTS)}", file=sys.stderr)
        return 2
    res = run(args, lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
