"""Promote: how long the switch takes and what readers see while it happens.

Sets up one tiny simworld dataset with two versions of the imported ``scl-taobao`` source (random
16-d vectors, real backfill jobs run in this process), then starts reader threads (one per
retriever backend, ``refresh_s`` 0.2 s) searching one user in a loop and alternates
``muse.versions.promote`` between the two versions ``--switches`` times. Prints per switch and in
total: the promote's checks (job status, row counts) and switch (aliases + database record) time,
how long until each reader's results came from the new version, and the requests served, failed
and mixed (a result that is not exactly its version's top-K).

    python bench/promote.py                                   # Milvus Lite under a temp dir
    python bench/promote.py --milvus-uri http://127.0.0.1:19530
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SOURCE = "scl-taobao"
DIM = 16


def ship(settings, name: str, seed: int, version: int | None) -> int:  # noqa: ANN001
    """Write new vectors for every item and register them as a source version (the first through
    the usual import path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from indexer import encode, source_registry
    from muse.data.format import EMBEDDINGS_SCHEMA, Dataset

    ds = Dataset.open(settings, name)
    ids = ds.item_ids()
    vecs = np.random.default_rng(seed).standard_normal((len(ids), DIM)).astype(np.float32)
    (ds.path / "embeddings").mkdir(exist_ok=True)
    path = ds.path / "embeddings" / f"{SOURCE}.parquet"
    pq.write_table(pa.table({"item_id": ids, "vector": list(vecs)}, schema=EMBEDDINGS_SCHEMA), path)
    if version is None:
        return encode.ensure_imported(settings, SOURCE, ds).version
    v = source_registry.next_version(settings, SOURCE, name)
    source_registry.register_version(settings, SOURCE, v, kind="imported", dim=DIM, dataset_name=name,
                             checkpoint_path=path, config={"dataset": name}, metrics={})
    return v


def backfill(settings, name: str, version: int) -> None:  # noqa: ANN001
    from indexer import backfill as bf
    from indexer import jobs
    from muse import models
    from muse.db import session_scope

    job_id = jobs.create_job(settings, SOURCE, name, chunk_size=1000, user_chunk_size=60, version=version)
    with session_scope(settings) as session:
        chunk_ids = [c.id for c in session.get(models.BackfillJob, job_id).chunks]
    for cid in chunk_ids:
        bf.run_chunk(settings, cid)
    jobs.advance_job(settings, job_id, app=object())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--milvus-uri", default="", help="a Milvus server (default: Milvus Lite in a temp dir)")
    p.add_argument("--switches", type=int, default=6)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args()

    import uuid

    from indexer import backfill as bf
    from muse import db, versions
    from muse.data.format import Dataset
    from muse.data.simworld import generate_simworld
    from muse.settings import load_settings
    from retriever.client import Retriever

    with tempfile.TemporaryDirectory() as tmp:
        extra = {"milvus_uri": args.milvus_uri} if args.milvus_uri else {}
        settings = load_settings(env={}, data_dir=Path(tmp) / "muse-data", device="cpu",
                                 milvus_prefix=f"bench{uuid.uuid4().hex[:8]}", **extra)
        db.upgrade(settings)
        name = generate_simworld(settings, size="tiny", seed=0).name
        v1 = ship(settings, name, 1, None)
        backfill(settings, name, v1)
        v2 = ship(settings, name, 2, v1)
        backfill(settings, name, v2)
        store = bf.get_store(settings)
        user, targets = 3, [int(i) for i in Dataset.open(settings, name).item_ids()[:4]]
        want = {}
        for v in (v1, v2):
            with Retriever.from_settings(SOURCE, settings, dataset=name, version=v, backend="milvus") as r:
                want[v] = [h.behaviour_item_ids.tolist() for h in r.search(user, targets, k=args.k)]
        readers = {backend: Retriever.from_settings(SOURCE, settings, dataset=name, backend=backend, refresh_s=0.2,
                                                 consistency_level="Bounded" if backend == "milvus" else None)
                   for backend in ("cache", "milvus")}
        seen = {backend: [] for backend in readers}
        failed = {backend: 0 for backend in readers}
        mixed = {backend: 0 for backend in readers}
        stop = threading.Event()

        def read(backend: str) -> None:
            r = readers[backend]
            while not stop.is_set():
                try:
                    res = r.search(user, targets, k=args.k)
                except Exception:
                    failed[backend] += 1
                    continue
                if [h.behaviour_item_ids.tolist() for h in res] != want.get(res.version):
                    mixed[backend] += 1
                seen[backend].append((time.monotonic(), res.version))

        threads = [threading.Thread(target=read, args=(backend,), daemon=True) for backend in readers]
        for t in threads:
            t.start()
        time.sleep(1.0)
        rows = []
        target = v2
        for _ in range(args.switches):
            t0 = time.monotonic()
            res = versions.promote(settings, store, name, SOURCE, target)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(s and s[-1][1] == target for s in seen.values()):
                time.sleep(0.02)
            follow = {backend: min((ts for ts, v in s if v == target and ts >= t0), default=float("nan")) - t0
                      for backend, s in seen.items()}
            rows.append((res.previous, target, res.check_s, res.switch_s, follow["cache"], follow["milvus"]))
            target = v1 if target == v2 else v2
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        for r in readers.values():
            r.close()
        bf.close_stores()

    backend = args.milvus_uri or "Milvus Lite"
    print(f"promote on {backend}: {args.switches} switches, readers on both paths (refresh_s 0.2)")
    print(f"{'switch':<8} {'checks ms':>10} {'switch ms':>10} {'cache follows s':>16} {'milvus follows s':>17}")
    for prev, new, check_s, switch_s, fc, fm in rows:
        print(f"v{prev}->v{new:<4} {check_s * 1000:>10.0f} {switch_s * 1000:>10.0f} {fc:>16.2f} {fm:>17.2f}")
    sw = [r[3] * 1000 for r in rows]
    print(f"switch ms: median {statistics.median(sw):.0f}, max {max(sw):.0f}")
    for backend in seen:
        print(f"{backend:<7} requests {len(seen[backend]):>6}  failed {failed[backend]}  mixed {mixed[backend]}")


if __name__ == "__main__":
    main()
