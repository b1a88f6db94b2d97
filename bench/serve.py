"""GSU service throughput and latency on loopback: ``muse serve`` + ``RemoteRetriever`` beside the
in-process ``Retriever`` (cache backend) and the Milvus filtered-search backend, in one run.

For users of 1K, 10K and 100K behaviours (the prefetch bench's users of ``bench/gsu.py``, written
once under the prefix ``musebench``) and 1, 8 and 32 concurrent client threads, each backend runs
``search(user, [target], k=50)`` (``--targets`` targets per request) for ``--seconds`` seconds:
QPS and p50/p99 latency per request. Cached users (prefetched first) on the cache paths; the Milvus
backend searches at ``Bounded`` consistency (no time-tick wait). Bounded in time: about
``3 paths x 9 cells x --seconds`` plus start-up.

Usage: ``python bench/serve.py --milvus-uri http://127.0.0.1:PORT [--seconds 2] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gsu import LENGTHS, PREFETCH_REF, PREFETCH_SOURCE, populate_items, populate_users  # noqa: E402

from muse.settings import load_settings  # noqa: E402
from muse.vectorstore import VectorStore  # noqa: E402
from retriever.client import Retriever  # noqa: E402
from retriever.remote import RemoteRetriever  # noqa: E402

CLIENTS = (1, 8, 32)
K = 50
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(search: Any, n_clients: int, seconds: float, targets: list[list[int]]) -> dict[str, float]:
    """``n_clients`` threads calling ``search(targets[i % len])`` for ``seconds``: QPS, p50, p99 (ms)."""
    stop = time.perf_counter() + seconds
    lat: list[list[float]] = [[] for _ in range(n_clients)]
    errors: list[BaseException] = []
    start = threading.Barrier(n_clients + 1)

    def client(i: int) -> None:
        start.wait()
        j = i
        try:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                search(targets[j % len(targets)])
                lat[i].append((time.perf_counter() - t0) * 1e3)
                j += n_clients
        except BaseException as e:  # reported after the run
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    all_lat = np.concatenate([np.asarray(x) for x in lat if x])
    return {
        "qps": len(all_lat) / elapsed,
        "p50": float(np.percentile(all_lat, 50)),
        "p99": float(np.percentile(all_lat, 99)),
        "n": int(len(all_lat)),
    }


def run(milvus_uri: str, redis_url: str, seconds: float, n_targets: int, lengths: tuple[int, ...],
        progress: Any) -> dict[str, Any]:
    data_dir = tempfile.mkdtemp(prefix="musebench-")
    env = {
        "MUSE_DATA_DIR": data_dir,
        "MUSE_MILVUS_URI": milvus_uri,
        "MUSE_MILVUS_PREFIX": "musebench",
        "MUSE_SEQUENCE_URL": redis_url,
        "MUSE_DEVICE": "cpu",
    }
    settings = load_settings(env=env)
    store = VectorStore(settings)
    item_ids, item_vecs, wrote = populate_items(store, progress)
    users, wrote_users = populate_users(store, item_ids, item_vecs, lengths, progress)
    if wrote or wrote_users:
        store.flush(PREFETCH_REF, reload=True)
    rng = np.random.default_rng(2)
    targets = [[int(x) for x in rng.choice(item_ids, n_targets)] for _ in range(256)]

    port = _free_port()
    ready = Path(data_dir) / "ready"
    log = open(Path(data_dir) / "server.log", "wb")
    progress(f"starting muse serve on 127.0.0.1:{port} ...")
    proc = subprocess.Popen(
        [sys.executable, "-m", "muse_cli", "serve", "--dataset", PREFETCH_REF.dataset, "--source", PREFETCH_SOURCE, "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "-1", "--ready-file", str(ready)],
        env={**os.environ, **env, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")},
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"muse serve exited: {(Path(data_dir) / 'server.log').read_text()[-2000:]}")
            time.sleep(0.1)
        local = Retriever(store, PREFETCH_SOURCE, dataset=PREFETCH_REF.dataset, backend="cache")
        milvus = Retriever(
            store, PREFETCH_SOURCE, dataset=PREFETCH_REF.dataset, backend="milvus", consistency_level="Bounded"
        )
        remote = RemoteRetriever([f"127.0.0.1:{port}"], timeout_s=30, settings=settings)
        progress("prefetching the users (in process and on the server) ...")
        t0 = time.perf_counter()
        local.preload_items(item_ids)
        progress(f"  in-process item table loaded in {time.perf_counter() - t0:.1f} s")
        local.prefetch(list(users.values())).result()
        remote.prefetch(list(users.values())).result()
        # Warm every backend's target-vector LRU (a miss is a Milvus query, at Strong consistency).
        every = sorted({i for t in targets for i in t})
        for r in (local, remote, milvus):
            r.search(users[min(users)], every, K)
        for user in users.values():  # same results on both cache paths
            a, b = local.search(user, targets[0], K), remote.search(user, targets[0], K)
            assert all(np.array_equal(x.positions, y.positions) for x, y in zip(a, b, strict=True))
        rows = []
        for n, user in users.items():
            for c in CLIENTS:
                progress(f"L={n} clients={c} ...")
                row: dict[str, Any] = {"L": n, "clients": c}
                row["in_process"] = load(lambda t, user=user: local.search(user, t, K), c, seconds, targets)
                row["service"] = load(lambda t, user=user: remote.search(user, t, K), c, seconds, targets)
                row["milvus"] = load(lambda t, user=user: milvus.search(user, t, K), c, seconds, targets)
                rows.append(row)
        hits = remote.stats()
        remote.close()
        for r in (local, milvus):
            if r.cache is not None:
                r.cache.close()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        store.close()
    import torch

    return {
        "rows": rows,
        "seconds": seconds,
        "targets": n_targets,
        "k": K,
        "server_cache": {"hits": hits.hits, "misses": hits.misses, "entries": hits.entries},
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "milvus_uri": milvus_uri,
    }


def table(res: dict[str, Any]) -> str:
    paths = ("in_process", "service", "milvus")
    head = (f"{'L':>7} {'clients':>7} " + " ".join(f"{p + ' qps/p50/p99':>26}" for p in paths)
            + f" {'svc/in qps':>10} {'svc-in p50':>10}")
    lines = [head, "-" * len(head)]
    for r in res["rows"]:
        cells = [f"{r[p]['qps']:>8.0f} {r[p]['p50']:>8.2f} {r[p]['p99']:>8.2f}" for p in paths]
        lines.append(
            f"{r['L']:>7} {r['clients']:>7} " + " ".join(f"{c:>26}" for c in cells)
            + f" {r['service']['qps'] / r['in_process']['qps']:>10.2f} {r['service']['p50'] - r['in_process']['p50']:>10.2f}"
        )
    lines.append("")
    lines.append(
        f"search(user, {res['targets']} target(s), k={res['k']}), {res['seconds']} s per cell; latency in ms; "
        f"server cache {res['server_cache']}; {res['cpus']} CPUs, torch threads {res['torch_threads']}; "
        f"milvus backend at Bounded consistency on {res['milvus_uri']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--milvus-uri", default="http://127.0.0.1:19530", help="Milvus server")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="Redis of the sequence store")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per cell (default 2)")
    p.add_argument("--targets", type=int, default=1, help="targets per request (default 1)")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="history lengths")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    lengths = tuple(int(x) for x in args.lengths.split(","))
    res = run(args.milvus_uri, args.redis_url, args.seconds, args.targets, lengths,
              lambda m: print(m, file=sys.stderr))
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
