"""The first requests after a GSU server (re)start against later ones: does health mean ready?

A dataset of its own (a simworld of ``--items`` items and ``--users`` users with their lifelong
histories; random 128-d item vectors, behaviours = the histories) is written once to Milvus under
the prefix ``musebench``, with Redis as the sequence store. Then, for each start mode, a
``muse serve`` process is started and, as soon as it reports SERVING (its ready file), ``--clients``
threads call ``RemoteRetriever.search(user, [target], k=50)`` over every user in turn (no prefetch:
the history cache is cold, as after a real restart) for ``--runs`` runs of ``--seconds`` each:

* ``warm``: the default start (item table loaded, kernels run on every RPC thread, then SERVING);
* ``no warm-up``: ``muse serve --no-warm-up`` (item table loaded, SERVING at once).

Printed: start-up seconds to SERVING, and QPS and p50 / p99 ms of each run; ``first/later`` is the
first run's p99 over the median p99 of the later runs. Usage:
``python bench/restart.py --milvus-uri http://127.0.0.1:PORT [--seconds 5] [--runs 3] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from muse.settings import load_settings
from muse.vectorstore import CollectionRef, VectorStore
from retriever.remote import RemoteRetriever

SOURCE = "restartbench"
DIM = 128
K = 50
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def populate(settings: Any, n_items: int, n_users: int, progress: Any) -> tuple[str, list[int], np.ndarray]:
    """The bench's dataset and its collections (written once per data dir): ``(dataset, users, item ids)``."""
    import dataclasses

    from muse.data.simworld import generate_simworld
    from muse.data.simworld_config import world_config

    name = f"restartbench-{n_items}-{n_users}"
    cfg = dataclasses.replace(world_config("tiny"), n_items=n_items, n_users=n_users)
    progress(f"generating {name} ...")
    ds = generate_simworld(settings, config=cfg, name=name, register=False)
    ref = CollectionRef(name, SOURCE, 1)
    item_ids = ds.item_ids()
    with VectorStore(settings) as store:
        store.ensure_collections(ref, DIM)
        if store.live_version(name, SOURCE) is None:
            store.set_live(ref)
        rng = np.random.default_rng(7)
        vectors = rng.standard_normal((len(item_ids), DIM)).astype(np.float32)
        users: list[int] = []
        if store.count_items(ref) != len(item_ids):
            progress(f"writing {len(item_ids)} items ...")
            store.upsert_items(ref, item_ids, vectors, np.zeros(len(item_ids), np.int64))
        by_item = {int(i): r for r, i in enumerate(item_ids.tolist())}
        hist = ds.histories_table()
        total = 0
        for user, items in zip(hist.column("user_id").to_pylist(), hist.column("item_ids").to_pylist(), strict=True):
            if not items:
                continue
            users.append(int(user))
            if store.count_behaviours(ref, int(user)) != len(items):
                rows = np.asarray([by_item[int(i)] for i in items])
                store.upsert_behaviours(ref, np.full(len(items), int(user)), np.arange(len(items)),
                                        np.asarray(items, np.int64), vectors[rows])
                total += len(items)
        if total:
            progress(f"wrote {total} behaviours; flushing ...")
            store.flush(ref, reload=True)
    return name, users, item_ids


def load(search: Any, n_clients: int, seconds: float, users: list[int], targets: list[int]) -> dict[str, float]:
    """``n_clients`` threads searching user after user for ``seconds``: QPS, p50, p99 (ms)."""
    stop = time.perf_counter() + seconds
    lat: list[list[float]] = [[] for _ in range(n_clients)]
    errors: list[BaseException] = []
    cursor = iter(range(10**9))
    lock = threading.Lock()

    def client(i: int) -> None:
        try:
            while time.perf_counter() < stop:
                with lock:
                    j = next(cursor)
                t0 = time.perf_counter()
                search(users[j % len(users)], [targets[j % len(targets)]])
                lat[i].append((time.perf_counter() - t0) * 1e3)
        except BaseException as e:  # reported after the run
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    all_lat = np.concatenate([np.asarray(x) for x in lat if x])
    return {"qps": len(all_lat) / elapsed, "p50": float(np.percentile(all_lat, 50)),
            "p99": float(np.percentile(all_lat, 99)), "n": int(len(all_lat))}


def one_start(env: dict[str, str], dataset: str, warm: bool, users: list[int], targets: list[int], clients: int,
              seconds: float, runs: int, progress: Any) -> dict[str, Any]:
    data_dir = Path(env["MUSE_DATA_DIR"])
    port = _free_port()
    ready = data_dir / f"ready-{port}"
    log = open(data_dir / f"server-{port}.log", "wb")  # noqa: SIM115
    cmd = [sys.executable, "-m", "muse_cli", "serve", "--dataset", dataset, "--source", SOURCE, "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "-1", "--ready-file", str(ready)]
    if not warm:
        cmd.append("--no-warm-up")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **env, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"muse serve exited: {(data_dir / f'server-{port}.log').read_text()[-2000:]}")
            time.sleep(0.05)
        started = time.perf_counter() - t0
        out: dict[str, Any] = {"mode": "warm" if warm else "no warm-up", "start_s": started, "runs": []}
        with RemoteRetriever([f"127.0.0.1:{port}"], timeout_s=30) as remote:
            for i in range(runs):
                progress(f"{out['mode']}: run {i + 1}/{runs} ...")
                out["runs"].append(load(lambda u, t: remote.search(u, t, K), clients, seconds, users, targets))
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(milvus_uri: str, redis_url: str, n_items: int, n_users: int, clients: int, seconds: float, runs: int,
        starts: int, progress: Any) -> dict[str, Any]:
    data_dir = tempfile.mkdtemp(prefix="musebench-restart-")
    env = {"MUSE_DATA_DIR": data_dir, "MUSE_MILVUS_URI": milvus_uri, "MUSE_MILVUS_PREFIX": "musebench",
           "MUSE_SEQUENCE_URL": redis_url, "MUSE_DEVICE": "cpu"}
    settings = load_settings(env=env)
    dataset, users, item_ids = populate(settings, n_items, n_users, progress)
    rng = np.random.default_rng(3)
    targets = [int(i) for i in rng.choice(item_ids, 64)]
    results = []
    for _ in range(starts):  # alternate the modes: the machine's load drifts
        for warm in (True, False):
            results.append(one_start(env, dataset, warm, users, targets, clients, seconds, runs, progress))
    return {"results": results, "clients": clients, "seconds": seconds, "users": len(users), "items": len(item_ids),
            "cpus": os.cpu_count(), "milvus_uri": milvus_uri}


def table(res: dict[str, Any]) -> str:
    n_runs = len(res["results"][0]["runs"])
    head = f"{'start':<11} {'to SERVING s':>12} " + " ".join(f"{f'run {i + 1} qps/p50/p99':>24}" for i in range(n_runs))
    head += f" {'first/later p99':>15}"
    lines = [head, "-" * len(head)]
    for r in res["results"]:
        cells = [f"{x['qps']:>7.0f} {x['p50']:>7.2f} {x['p99']:>8.2f}" for x in r["runs"]]
        later = statistics.median(x["p99"] for x in r["runs"][1:]) if n_runs > 1 else float("nan")
        lines.append(f"{r['mode']:<11} {r['start_s']:>12.1f} " + " ".join(f"{c:>24}" for c in cells)
                     + f" {r['runs'][0]['p99'] / later:>15.2f}")
    lines.append("")
    lines.append(f"search(user, 1 target, k={K}) over {res['users']} users in turn ({res['items']} items, cold history "
                 f"cache), {res['clients']} client threads, {res['seconds']} s per run; ms; {res['cpus']} CPUs; "
                 f"Milvus {res['milvus_uri']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--milvus-uri", default="http://127.0.0.1:19530", help="Milvus server")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="Redis of the sequence store")
    p.add_argument("--items", type=int, default=5000, help="items of the bench's dataset (default 5000)")
    p.add_argument("--users", type=int, default=400, help="users of the bench's dataset (default 400)")
    p.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--runs", type=int, default=3, help="runs after each start (default 3)")
    p.add_argument("--starts", type=int, default=2, help="starts of each mode, alternated (default 2)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = run(args.milvus_uri, args.redis_url, args.items, args.users, args.clients, args.seconds, args.runs,
              args.starts, lambda m: print(m, file=sys.stderr))
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
