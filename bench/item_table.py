"""The GSU item table at the open Taobao-MM's size (35M items): built once, loaded at start-up.

For each fraction f of the open data set (``--fractions``, default 0.001,0.003,0.01: 35K, 105K and
350K items of the 35M) two table files are written as the embedding stage writes them
(:mod:`muse.itemtable`): ``f32`` (an encoder source: unit float32 rows, every item present, in
clusters like real embeddings) and ``int8`` (Taobao-MM's shipped SCL: trunc(unit x 127) as int8, 90%
of items present). Then, per file and per storage dtype of the GSU table (``--dtypes``):

* **build**: generating and writing the file (``gen s``: mostly this bench's random numbers), its
  id -> row index (``index s``: what a backfill's done hook adds), and for int8 tables the int8
  form (``int8 s``: written once by the first int8 server);
* **load**: :meth:`retriever.cache.ItemTable.load_file` with the persisted index, warm (the file in
  the page cache) and cold (its pages dropped first with ``posix_fadvise``), the fastest of
  ``--reps``: wall and CPU seconds, rows/s against the goal of 1M rows/s, the table's device bytes
  and the index's host bytes;
* **milvus** (with ``--milvus-uri``): the old start-up, ``ItemTable.load`` reading every item from
  the Milvus item collection, on ``--milvus-items`` items (20K): rows/s, the baseline;
* **serve** (with ``--serve``; Milvus Lite unless ``--milvus-uri``): ``muse serve`` in a fresh
  process until its ready file, for the float32 file in each dtype;
* **recall@50** of each compressed dtype against float32: GSU top-50 of ``--users`` histories
  (lengths 100-1,000 over 3-6 interest clusters) and one 100K-behaviour history, 10 targets each,
  at the largest fraction.

Then a least-squares line per measurement over the fractions and its value at f = 1 (35M items).
Usage: ``python -m bench.item_table [--fractions 0.001,0.003,0.01] [--device cpu|cuda]
[--dtypes float32,bfloat16,float16,int8] [--milvus-uri URI] [--serve] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muse.itemtable import IdHash, int8_rows, read_index, read_table, write_index
from muse.ondisk import ArrayWriter
from retriever.cache import ItemTable, gather_history

FULL_ITEMS = 35_000_000  # items of the open Taobao-MM
DIM = 128
K = 50
GOAL_ROWS_PER_S = 1e6
CLUSTERS = 2000
KINDS = ("f32", "int8")
DTYPES = ("float32", "bfloat16", "float16", "int8")
BLOCK = 1 << 16
REPO = Path(__file__).resolve().parent.parent


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _centroids(seed: int = 0) -> np.ndarray:
    c = np.random.default_rng(seed).normal(size=(CLUSTERS, DIM)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def item_cluster(n: int) -> np.ndarray:
    """The interest cluster of each of ``n`` items (a fixed function of the row)."""
    return np.random.default_rng(11).integers(0, CLUSTERS, n)


def write_table(folder: Path, n: int, kind: str) -> dict[str, float]:
    """Write a synthetic table of ``n`` items (``f32`` or ``int8``, see the module docstring) a block
    at a time; returns seconds for the vectors and for the index."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    centroids = _centroids()
    clusters = item_cluster(n)
    t0 = time.perf_counter()
    ids_w = ArrayWriter(folder / "item_ids.npy", np.int64)
    vec_w = ArrayWriter(folder / "vectors.npy", np.float32 if kind == "f32" else np.int8, (DIM,))
    pres_w = ArrayWriter(folder / "present.npy", bool)
    for lo in range(0, n, BLOCK):
        m = min(BLOCK, n - lo)
        ids_w.append(rng.integers(-(2**62), 2**62, m))  # anonymised int64 ids, as Taobao-MM's
        v = centroids[clusters[lo:lo + m]] + rng.normal(size=(m, DIM)).astype(np.float32) / np.sqrt(DIM)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        if kind == "f32":
            present = np.ones(m, bool)
        else:
            present = rng.random(m) < 0.9
            v = np.trunc(v * 127)
            v[~present] = 0
        vec_w.append(v)
        pres_w.append(present)
    for w in (ids_w, vec_w, pres_w):
        w.close()
    key = {"source": {"name": "itembench", "version": 1, "dim": DIM}, "dataset": {"name": f"itembench-{n}", "meta_mtime_ns": None}}
    doc = {"key": key, "scale": None if kind == "f32" else 127.0, "normalised": kind == "f32"}
    (folder / "key.json").write_text(json.dumps(doc, sort_keys=True) + "\n")
    vectors_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    table, _ = read_table(folder)
    write_index(folder, table)
    return {"vectors_s": vectors_s, "index_s": time.perf_counter() - t0}


def drop_page_cache(folder: Path) -> None:
    """Drop the folder's pages from the page cache (clean pages; no privileges needed)."""
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _no_fetch(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros((0, DIM), np.float32)


def load(folder: Path, dtype: str, device: str) -> tuple[ItemTable, float, float]:
    """A GSU item table from ``folder`` (the file, its persisted index and, for int8, its int8 form),
    the wall seconds it took and the CPU seconds of this process (all threads)."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    table, _ = read_table(folder)
    index = read_index(folder, table)
    assert index is not None
    t = ItemTable(_no_fetch, DIM, dtype, device, initial_rows=1)
    wants = dtype == "int8" or table.vectors.dtype == np.int8  # as retriever.item_table does
    t.load_file(table, index, int8_rows=int8_rows(folder, table) if wants else None)
    _sync(device)
    return t, time.perf_counter() - t0, time.process_time() - c0


def milvus_baseline(uri: str, n_items: int, device: str, progress: Any) -> dict[str, float]:
    """The start-up before table files: every item read from the Milvus item collection."""
    from muse.settings import load_settings
    from muse.vectorstore import CollectionRef, VectorStore

    settings = load_settings(env={}, data_dir=tempfile.mkdtemp(prefix="itembench-"), milvus_uri=uri,
                             milvus_prefix="musebench", device=device)
    ref = CollectionRef("itembench", "itembench", 1)
    rng = np.random.default_rng(3)
    ids = np.arange(1, n_items + 1, dtype=np.int64) * 17
    with VectorStore(settings) as store:
        store.ensure_collections(ref, DIM)
        if store.count_items(ref) != n_items:
            progress(f"writing {n_items} items to Milvus ...")
            for lo in range(0, n_items, 10_000):
                m = min(10_000, n_items - lo)
                store.upsert_items(ref, ids[lo:lo + m], rng.normal(size=(m, DIM)).astype(np.float32), np.zeros(m, np.int64))
            store.flush(ref, reload=True)
        table = ItemTable(lambda q: store.get_item_vectors(ref, q), DIM, "float32", device)
        t0 = time.perf_counter()
        rows = table.load(ids)
        seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}


def serve_startup(folder: Path, n: int, dtype: str, device: str, uri: str | None, work: Path) -> float:
    """Seconds from starting ``muse serve`` to its ready file, with the table file in place."""
    from muse.itemtable import table_dir
    from muse.settings import load_settings
    from muse.vectorstore import CollectionRef, VectorStore

    data = work / "serve-data"
    dataset = f"itembench-{n}"
    env_vars = {"MUSE_DATA_DIR": str(data), "MUSE_MILVUS_PREFIX": "musebench", "MUSE_DEVICE": device,
                "MUSE_MILVUS_URI": uri or str(data / "milvus.db")}
    settings = load_settings(env=env_vars)
    ref = CollectionRef(dataset, "itembench", 1)
    with VectorStore(settings) as store:
        store.ensure_collections(ref, DIM)
        store.set_live(ref)
    target = table_dir(settings, dataset, "itembench", 1)
    if not target.exists():
        shutil.copytree(folder, target)
        doc = json.loads((target / "key.json").read_text())
        doc["key"]["dataset"]["name"] = dataset
        (target / "key.json").write_text(json.dumps(doc))
    ready = work / f"ready-{time.monotonic_ns()}"
    env = {**os.environ, **env_vars, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "muse_cli", "serve", "--dataset", dataset, "--source", "itembench",
                             "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--dtype", dtype,
                             "--ready-file", str(ready)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"muse serve exited {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    out = proc.stdout.read().decode()
    assert "item table:" in out and "from " + str(target) in out, out
    return seconds


def recall_at_k(tables: dict[str, ItemTable], ids: np.ndarray, users: int, device: str) -> dict[str, float]:
    """Mean recall@50 of each dtype's GSU top-50 against float32's (histories of 100-1,000 over
    3-6 interest clusters, and one of 100K behaviours; 10 targets from the users' clusters)."""
    rng = np.random.default_rng(9)
    clusters = item_cluster(len(ids))
    by_cluster = np.argsort(clusters, kind="stable")
    starts = np.searchsorted(clusters[by_cluster], np.arange(CLUSTERS + 1))

    def draw(cluster_of_each: np.ndarray) -> np.ndarray:  # a random item of each given cluster
        lo, hi = starts[cluster_of_each], starts[cluster_of_each + 1]
        return ids[by_cluster[lo + (rng.random(len(lo)) * (hi - lo)).astype(np.int64)]]

    reference = tables["float32"]
    hits: dict[str, list[float]] = {dt: [] for dt in tables if dt != "float32"}
    for u in range(users + 1):
        length = 100_000 if u == users else int(rng.integers(100, 1001))
        interests = rng.choice(CLUSTERS, int(rng.integers(3, 7)), replace=False)
        seq = draw(interests[rng.integers(0, len(interests), length)])
        target_rows = torch.from_numpy(reference.rows_of(draw(interests[rng.integers(0, len(interests), 10)])))
        t = reference.vectors[target_rows.to(reference.vectors.device)].float()  # [10, d] unit
        want = gather_history(u, np.arange(length), seq, reference).topk(t, K).indices.cpu().numpy()
        for dt in hits:
            got = gather_history(u, np.arange(length), seq, tables[dt]).topk(t, K).indices.cpu().numpy()
            hits[dt].append(float(np.mean([len(set(a) & set(b)) / K for a, b in zip(want, got, strict=True)])))
    return {dt: float(np.mean(v)) for dt, v in hits.items()}


def fit(xs: list[float], ys: list[float], at: float) -> float:
    """The least-squares line through (xs, ys) evaluated at ``at`` (NaN from a single point)."""
    if len(xs) < 2:
        return float("nan")
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a + b * at)


def run(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    fractions = [float(f) for f in args.fractions.split(",")]
    dtypes = [d for d in args.dtypes.split(",") if d]
    work = Path(tempfile.mkdtemp(prefix="itembench-"))
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    keep: dict[str, ItemTable] = {}
    keep_ids = np.zeros(0, np.int64)
    try:
        for f in fractions:
            n = int(round(FULL_ITEMS * f))
            for kind in KINDS:
                folder = work / f"items-{kind}-{n}"
                progress(f"f={f}: writing {n} {kind} items ...")
                build = write_table(folder, n, kind)
                file_bytes = sum(p.stat().st_size for p in folder.iterdir() if not p.name.startswith("index"))
                index_file_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("index"))
                build["int8_form_s"] = 0.0
                if "int8" in dtypes or kind == "int8":  # the int8 form, written once by the first server wanting it
                    t0 = time.perf_counter()
                    int8_rows(folder, read_table(folder)[0])
                    build["int8_form_s"] = time.perf_counter() - t0
                for dtype in dtypes:
                    row: dict[str, Any] = {"f": f, "items": n, "file": kind, "dtype": dtype, **build,
                                           "file_bytes": file_bytes, "index_file_bytes": index_file_bytes}
                    cold = warm = cold_cpu = warm_cpu = float("inf")
                    for _ in range(args.reps):  # best of reps: other processes on a shared machine only add time
                        drop_page_cache(folder)
                        table, wall, cpu = load(folder, dtype, args.device)
                        cold, cold_cpu = min(cold, wall), min(cold_cpu, cpu)
                        del table
                        table, wall, cpu = load(folder, dtype, args.device)
                        warm, warm_cpu = min(warm, wall), min(warm_cpu, cpu)
                    row["rows"] = len(table)
                    row.update(cold_s=cold, warm_s=warm, cold_cpu_s=cold_cpu, warm_cpu_s=warm_cpu,
                               cold_rows_per_s=row["rows"] / cold, warm_rows_per_s=row["rows"] / warm,
                               device_bytes=table.device_bytes, index_bytes=table.index_bytes)
                    if args.serve and kind == "f32":
                        progress(f"f={f}: muse serve with a {dtype} table ...")
                        row["serve_s"] = serve_startup(folder, n, dtype, args.device, args.milvus_uri, work)
                    if f == max(fractions) and kind == "f32":
                        keep[dtype] = table
                        keep_ids = np.array(read_table(folder)[0].item_ids)
                    del table
                    rows.append(row)
                    progress(f"  {kind} -> {dtype}: {row['rows']} rows, cold {cold:.3f} s ({cold_cpu:.3f} s CPU), "
                             f"warm {warm:.3f} s ({warm_cpu:.3f} s CPU)")
                shutil.rmtree(folder, ignore_errors=True)
        recall = {}
        if "float32" in keep and len(keep) > 1:
            progress("recall@50 against float32 ...")
            recall = recall_at_k(keep, keep_ids, args.users, args.device)
        keep.clear()
        baseline = None
        if args.milvus_uri:
            progress(f"Milvus baseline on {args.milvus_items} items ...")
            baseline = milvus_baseline(args.milvus_uri, args.milvus_items, args.device, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    extrapolated = []
    for kind in KINDS:
        for dtype in dtypes:
            rs = [r for r in rows if r["file"] == kind and r["dtype"] == dtype]
            if not rs:
                continue
            xs = [r["items"] for r in rs]
            e = {"file": kind, "dtype": dtype, "items": FULL_ITEMS}
            for key in ("rows", "cold_s", "warm_s", "cold_cpu_s", "vectors_s", "index_s", "int8_form_s", "device_bytes",
                        "index_bytes", "file_bytes", "index_file_bytes"):
                e[key] = fit(xs, [r[key] for r in rs], FULL_ITEMS)
            e["cold_rows_per_s"] = e["rows"] / e["cold_s"]
            # the index is a power-of-two hash, not a line: its size at 35M items is exact
            exact = 12 * 2 ** IdHash._bits_for(FULL_ITEMS)  # int64 keys + int32 rows per slot
            e["index_bytes"] = e["index_file_bytes"] = exact
            if all("serve_s" in r for r in rs):
                # muse serve = a fixed part (interpreter, imports, Milvus, gRPC: the median over the
                # fractions of start-up minus table load) + the table load at 35M items
                e["serve_fixed_s"] = float(np.median([r["serve_s"] - r["cold_s"] for r in rs]))
                e["serve_s"] = e["serve_fixed_s"] + e["cold_s"]
            extrapolated.append(e)
    return {"device": args.device, "torch_threads": torch.get_num_threads(), "rows": rows, "cpus": os.cpu_count(),
            "loadavg": [load_before, os.getloadavg()[0]],
            "extrapolated": extrapolated, "recall": recall, "milvus": baseline, "users": args.users}


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def table(res: dict[str, Any]) -> str:
    serve = any("serve_s" in r for r in res["rows"])
    head = (f"{'f':>6} {'items':>9} {'file':>5} {'dtype':>9} {'gen s':>8} {'index s':>8} {'int8 s':>7} "
            f"{'cold s':>7} {'cpu s':>6} {'warm s':>7} {'cold rows/s':>12} {'warm rows/s':>12} {'device GB':>10} "
            f"{'index GB':>9} {'file GB':>8}" + (f" {'serve s':>8}" if serve else ""))
    lines = ["GSU item table: written once, then loaded at start-up; by fraction of the open Taobao-MM (35M items)",
             head, "-" * len(head)]
    for r in res["rows"]:
        lines.append(
            f"{r['f']:>6} {r['items']:>9} {r['file']:>5} {r['dtype']:>9} {r['vectors_s']:>8.2f} {r['index_s']:>8.2f} "
            f"{r['int8_form_s']:>7.2f} {r['cold_s']:>7.3f} {r['cold_cpu_s']:>6.3f} {r['warm_s']:>7.3f} "
            f"{r['cold_rows_per_s']:>12,.0f} {r['warm_rows_per_s']:>12,.0f} "
            f"{_gb(r['device_bytes']):>10} {_gb(r['index_bytes']):>9} {_gb(r['file_bytes'] + r['index_file_bytes']):>8}"
            + (f" {r['serve_s']:>8.2f}" if "serve_s" in r else ""))
    lines += ["", "extrapolated to f = 1 (35M items; least-squares line over the fractions; serve s = the median fixed "
              "part of the start-up + the cold load); goal >= 1M rows/s at start-up"]
    head = (f"{'file':>5} {'dtype':>9} {'gen s':>8} {'index s':>8} {'int8 s':>7} {'cold load s':>12} {'cpu s':>7} "
            f"{'cold rows/s':>12} {'goal':>5} {'device GB':>10} {'index GB':>9} {'file GB':>8}" + (" serve s" if serve else ""))
    lines += [head, "-" * len(head)]
    for e in res["extrapolated"]:
        ok = "ok" if e["cold_rows_per_s"] >= GOAL_ROWS_PER_S else "MISS"
        lines.append(
            f"{e['file']:>5} {e['dtype']:>9} {e['vectors_s']:>8.1f} {e['index_s']:>8.1f} {e['int8_form_s']:>7.1f} "
            f"{e['cold_s']:>12.1f} {e['cold_cpu_s']:>7.1f} {e['cold_rows_per_s']:>12,.0f} {ok:>5} "
            f"{_gb(e['device_bytes']):>10} {_gb(e['index_bytes']):>9} {_gb(e['file_bytes'] + e['index_file_bytes']):>8}"
            + (f" {e['serve_s']:>7.1f}" if "serve_s" in e else ""))
    if res["recall"]:
        lines.append("")
        lines.append(f"recall@50 against float32 ({res['users']} histories of 100-1,000 and one of 100K, 10 targets each): "
                     + ", ".join(f"{dt} {v:.4f}" for dt, v in res["recall"].items()))
    if res["milvus"]:
        m = res["milvus"]
        f32 = {e["dtype"]: e["cold_s"] for e in res["extrapolated"] if e["file"] == "f32"}
        vs = ", ".join(f"{dt} {sec:.0f} s" for dt, sec in f32.items())
        lines.append(f"Milvus scan (the start-up before table files): {m['rows']} items in {m['seconds']:.1f} s, "
                     f"{m['rows_per_s']:,.0f} rows/s; 35M items: {FULL_ITEMS / m['rows_per_s'] / 3600:.1f} h "
                     f"(from the f32 file, cold: {vs})")
    lines.append(f"device {res['device']}, torch threads {res['torch_threads']}, {res['cpus']} CPUs, load average "
                 f"{res['loadavg'][0]:.1f} -> {res['loadavg'][1]:.1f} (cpu s: this process's CPU time, all threads)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fractions", default="0.001,0.003,0.01", help="fractions of the open data set's 35M items")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="storage dtypes of the GSU table")
    p.add_argument("--users", type=int, default=200, help="histories of 100-1,000 for the recall (plus one of 100K)")
    p.add_argument("--milvus-uri", default=None, help="a Milvus server: measure the old start-up (a scan of Milvus)")
    p.add_argument("--milvus-items", type=int, default=20_000, help="items of that scan")
    p.add_argument("--serve", action="store_true", help="time `muse serve` to ready (Milvus Lite unless --milvus-uri)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--reps", type=int, default=3, help="loads per measurement; the fastest is kept")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        print(f"error: --dtypes {bad} not among {', '.join(DTYPES)}", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    res = run(args, lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
