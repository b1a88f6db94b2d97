"""Backfill throughput: end to end (queue + worker + Milvus + database) versus encoder only.

On the same items in the same run:

1. *encoder only*: this process decodes and encodes every item image of the dataset, in batches of
   ``--chunk-size``, with the same encoder the worker uses;
2. *end to end*: a backfill job (items only) through the broker, a worker subprocess, Milvus and the
   metadata database, timed from enqueue to the job's end, after a warm-up job (full: items and
   behaviours) has loaded the model in the worker;
   (the two are alternated ``--repeats`` times and the best of each is kept: the machine may be shared);
3. *Milvus upsert*: raw ``upsert_items`` rows/s of random 128-d vectors.

Prints a table and the ratio end-to-end / encoder-only (target >= 0.85). Settings come from the
environment as usual (embedded default: filesystem broker, SQLite, Milvus Lite under --data-dir).

    python bench/backfill.py --size small --chunk-size 512

``--behaviours`` measures instead the two ways behaviour rows reach a Milvus server, on the same
server, dataset and worker in one run: a job writing them with upserts and a job importing them
in bulk (:mod:`indexer.bulk`), each timed from its first behaviour chunk's start to its last one's
end (rows/s), plus the bulk path's stages: reading the histories and writing the files in this
process (the client's share), and the time until the imported rows are visible to queries.

    python bench/backfill.py --behaviours --milvus-uri http://127.0.0.1:19530 --n-users 600
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

SOURCE = "openclip"
UPSERT_SOURCE = "benchupsert"


def ensure_encoder(settings) -> None:  # noqa: ANN001
    """Register a seeded, untrained ``openclip`` encoder unless the source has a version
    (throughput does not depend on the weights)."""
    from indexer.checkpoints import register_untrained_encoder
    from indexer.source_registry import list_versions

    if not list_versions(settings, SOURCE):
        register_untrained_encoder(settings, SOURCE, seed=0, metrics={"note": "bench: random init"})


def encoder_only(encoder, images: list[bytes], chunk_size: int) -> tuple[int, float]:  # noqa: ANN001
    """Decode + encode the images in chunks; returns (items encoded, seconds)."""
    t0 = time.perf_counter()
    n = 0
    for lo in range(0, len(images), chunk_size):
        n += len(encoder.encode_images(images[lo : lo + chunk_size]).ok_index)
    return n, time.perf_counter() - t0


def run_job(settings, dataset, chunk_size: int, items_only: bool) -> tuple[object, float]:  # noqa: ANN001
    """Create, enqueue and wait for a job; returns (progress, seconds from enqueue to finish).

    The time comes from the job row (``started_at`` is set at enqueue, ``finished_at`` by the
    worker), so the slow polling here neither adds to it nor takes CPU from the worker.
    """
    from indexer import jobs

    job_id = jobs.create_job(settings, SOURCE, dataset.name, chunk_size=chunk_size, behaviours=not items_only)
    jobs.enqueue_job(settings, job_id)
    while True:
        time.sleep(0.5)
        progress = jobs.job_progress(settings, job_id)
        if progress.finished:
            return progress, float(progress.elapsed_s)


def upsert_rate(settings, n_rows: int) -> tuple[int, float]:  # noqa: ANN001
    """Raw Milvus upsert of ``n_rows`` random 128-d item vectors; returns (rows, seconds)."""
    from muse.vectorstore import CollectionRef, VectorStore

    ref = CollectionRef("benchupsert", UPSERT_SOURCE, 1)

    rng = np.random.default_rng(0)
    with VectorStore(settings) as store:
        store.drop_collections(ref)
        store.ensure_collections(ref, 128)
        ids = np.arange(n_rows, dtype=np.int64)
        vectors = rng.standard_normal((n_rows, 128)).astype(np.float32)
        t0 = time.perf_counter()
        for lo in range(0, n_rows, 2000):
            store.upsert_items(ref, ids[lo : lo + 2000], vectors[lo : lo + 2000], ids[lo : lo + 2000] % 7)
        seconds = time.perf_counter() - t0
        store.drop_collections(ref)
    return n_rows, seconds


IMPORTED = "scl-taobao"  # the behaviour benchmark's source: random vectors shipped with the dataset


def behaviour_dataset(settings, n_users: int, n_items: int, min_history: int, max_history: int, dim: int):  # noqa: ANN001, ANN201
    """A simworld with long histories and few items (fast to generate) shipping random ``dim``-d
    ``scl-taobao`` vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from muse.data.format import EMBEDDINGS_SCHEMA
    from muse.data.simworld import generate_simworld
    from muse.data.simworld_config import world_config

    config = world_config("small", n_items=n_items, n_users=n_users, min_history=min_history,
                          max_history=max_history, impressions_per_user=1, search_sessions_per_user=0)
    name = f"bench-bhv-u{n_users}-h{max_history}"
    dataset = generate_simworld(settings, size="small", name=name, config=config)
    ids = dataset.item_ids()
    vectors = np.random.default_rng(0).standard_normal((len(ids), dim)).astype(np.float32)
    (dataset.path / "embeddings").mkdir(exist_ok=True)
    pq.write_table(pa.table({"item_id": ids, "vector": list(vectors)}, schema=EMBEDDINGS_SCHEMA),
                   dataset.path / "embeddings" / f"{IMPORTED}.parquet")
    return dataset


def behaviour_job(settings, dataset, bulk_path: bool, user_chunk_size: int, concurrency: int, log: Path):  # noqa: ANN001, ANN201
    """Run one backfill job of the imported source through a worker; returns its progress."""
    from indexer import bulk, jobs
    from indexer.celery_app import WorkerProcess, is_embedded_broker

    if bulk_path:
        job_id = bulk.create_job(settings, IMPORTED, dataset.name, chunk_size=5000, user_chunk_size=user_chunk_size)
    else:
        job_id = jobs.create_job(settings, IMPORTED, dataset.name, chunk_size=5000, user_chunk_size=user_chunk_size)
    embedded = is_embedded_broker(settings)
    worker = WorkerProcess(settings, pool="solo" if embedded else "prefork",
                           concurrency=1 if embedded else concurrency, log_path=log)
    worker.start()
    try:
        jobs.enqueue_job(settings, job_id)
        while True:
            time.sleep(0.5)
            progress = jobs.job_progress(settings, job_id)
            if progress.finished:
                break
    finally:
        worker.stop()
    if progress.status != "done":
        raise SystemExit(f"job {job_id} ended {progress.status}: {progress.errors[:3]}; see {log}")
    return job_id, progress


def behaviour_seconds(settings, job_id: int) -> float:  # noqa: ANN001
    """Wall seconds from the job's first behaviour chunk's start to its last one's end."""
    from muse import models
    from muse.db import session_scope

    with session_scope(settings) as session:
        chunks = [c for c in session.get(models.BackfillJob, job_id).chunks if c.kind == "behaviours"]
        return (max(c.finished_at for c in chunks) - min(c.started_at for c in chunks)).total_seconds()


def client_share(settings, dataset, job_id: int, user_chunk_size: int) -> tuple[int, float, float]:  # noqa: ANN001
    """Read the histories and write the import files of every bulk chunk in this process (no
    import); returns (rows, read seconds, write seconds)."""
    import shutil

    from indexer import backfill, bulk
    from muse.vectorstore import CollectionRef
    from muse.versions import job_ref

    ref: CollectionRef = job_ref(settings, job_id)
    store = backfill.get_store(settings)
    scratch = Path(tempfile.mkdtemp(prefix="muse-bench-files-"))
    rows = 0
    read_s = write_s = 0.0
    try:
        for lo in range(0, dataset.n_users, user_chunk_size):
            spec = backfill.ChunkSpec(chunk_id=0, job_id=job_id, kind="behaviours", start=lo,
                                      stop=min(lo + user_chunk_size, dataset.n_users), source=ref.source,
                                      source_version=ref.version, source_kind="imported", dim=store.dim(ref),
                                      dataset_location=str(dataset.path), dataset=ref.dataset, bulk=True)
            t0 = time.perf_counter()
            chunk = bulk.read_chunk_rows(store, spec)
            t1 = time.perf_counter()
            bulk.write_files(scratch, chunk)
            write_s += time.perf_counter() - t1
            read_s += t1 - t0
            rows += len(chunk)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows, read_s, write_s


def behaviour_paths(args: argparse.Namespace) -> None:
    """Upserts against bulk import of the same behaviours, same server, one run (``--behaviours``)."""
    import dataclasses
    import uuid

    from indexer import bulk
    from indexer.backfill import close_stores
    from muse import db
    from muse.settings import load_settings

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="muse-bench-"))
    overrides = {"data_dir": data_dir}
    if args.milvus_uri:
        overrides["milvus_uri"] = args.milvus_uri
    base = load_settings(**overrides)
    if base.embedded_milvus:
        raise SystemExit("--behaviours needs a Milvus server (--milvus-uri or MUSE_MILVUS_URI): "
                         "Milvus Lite has no bulk import")
    db.upgrade(base)
    dataset = behaviour_dataset(base, args.n_users or 600, args.n_items or 2000, args.min_history,
                                args.max_history, args.dim)
    n = int(dataset.meta["n_behaviours"])
    size = args.user_chunk_size or bulk.bulk_user_chunk_size(dataset)
    from indexer.celery_app import is_embedded_broker

    processes = 1 if is_embedded_broker(base) else args.concurrency
    print(f"dataset {dataset.name}: {dataset.n_items} items, {dataset.n_users} users, {n:,} behaviours, "
          f"{args.dim}-d; Milvus {base.milvus_uri}; broker {base.broker_url}; {processes} worker process(es)")
    tag = uuid.uuid4().hex[:6]
    results = []
    for path in ("upsert", "bulk"):
        settings = dataclasses.replace(base, milvus_prefix=f"bench{tag}{path[0]}")
        chunk_users = size if path == "bulk" else args.upsert_user_chunk_size
        job_id, progress = behaviour_job(settings, dataset, path == "bulk", chunk_users, args.concurrency,
                                         data_dir / f"bench-{path}-worker.log")
        seconds = behaviour_seconds(settings, job_id)
        extra = {}
        if path == "bulk":
            verified = bulk.verify_job(settings, job_id)
            extra["visible_s"] = verified.waited_s
            extra["client"] = client_share(settings, dataset, job_id, size)
        results.append((path, settings, job_id, progress.behaviours_written, seconds, chunk_users, extra))
        close_stores()
    print(f"\n| {'path':<34} | {'rows':>10} | {'seconds':>8} | {'rows/s':>10} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 10}|{'-' * 12}|")
    for path, _, _, rows, seconds, chunk_users, extra in results:
        label = f"{path} ({chunk_users} users/chunk)"
        print(f"| {label:<34} | {rows:>10,} | {seconds:>8.2f} | {rows / seconds:>10,.0f} |")
        if path == "bulk":
            c_rows, read_s, write_s = extra["client"]
            print(f"| {'  client: read histories + vectors':<34} | {c_rows:>10,} | {read_s:>8.2f} | "
                  f"{c_rows / read_s:>10,.0f} |")
            print(f"| {'  client: write numpy files':<34} | {c_rows:>10,} | {write_s:>8.2f} | "
                  f"{c_rows / write_s:>10,.0f} |")
            server_s = max(seconds - read_s - write_s, 1e-9)
            print(f"| {'  server: import (the rest)':<34} | {rows:>10,} | {server_s:>8.2f} | "
                  f"{rows / server_s:>10,.0f} |")
            print(f"| {'  + until visible to queries':<34} | {'':>10} | {extra['visible_s']:>8.2f} | {'':>10} |")
    (_, _, _, r_up, s_up, _, _), (_, _, _, r_bulk, s_bulk, _, _) = results
    print(f"\nbulk / upsert = {(r_bulk / s_bulk) / (r_up / s_up):.1f}x; goal >= 100,000 behaviour rows/s "
          f"(bulk: {r_bulk / s_bulk:,.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", help="simworld size (tiny, small, ...; default small)")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--upsert-rows", type=int, default=20_000)
    parser.add_argument("--n-items", type=int, default=None, help="override the size's item count")
    parser.add_argument("--n-users", type=int, default=None, help="override the size's user count")
    parser.add_argument("--repeats", type=int, default=3, help="alternating encoder/end-to-end runs")
    parser.add_argument("--behaviours", action="store_true",
                        help="measure behaviour rows/s of upserts against bulk import on one Milvus server")
    parser.add_argument("--milvus-uri", default="", help="--behaviours: the Milvus server (or MUSE_MILVUS_URI)")
    parser.add_argument("--min-history", type=int, default=200, help="--behaviours: shortest history")
    parser.add_argument("--max-history", type=int, default=1000, help="--behaviours: longest history")
    parser.add_argument("--dim", type=int, default=128, help="--behaviours: vector width")
    parser.add_argument("--user-chunk-size", type=int, default=None,
                        help="--behaviours: users per bulk chunk (default: about 1M behaviours)")
    parser.add_argument("--upsert-user-chunk-size", type=int, default=64, help="--behaviours: users per upsert chunk")
    parser.add_argument("--concurrency", type=int, default=2, help="--behaviours: worker processes (server broker)")
    args = parser.parse_args()
    if args.behaviours:
        behaviour_paths(args)
        return

    from indexer.backfill import close_stores
    from indexer.celery_app import WorkerProcess, is_embedded_broker
    from muse import db
    from muse.data.simworld import generate_simworld
    from muse.data.simworld_config import world_config
    from muse.settings import load_settings

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="muse-bench-"))
    settings = load_settings(data_dir=data_dir)
    db.upgrade(settings)
    overrides = {k: v for k, v in (("n_items", args.n_items), ("n_users", args.n_users)) if v is not None}
    name = f"bench-{args.size}" + "".join(f"-{k[2:]}{v}" for k, v in overrides.items())
    dataset = generate_simworld(settings, size=args.size, name=name, config=world_config(args.size, **overrides))
    ensure_encoder(settings)
    print(f"dataset {dataset.name}: {dataset.n_items} items, {dataset.meta['n_behaviours']} behaviours; "
          f"device {settings.resolve_device()}; broker {settings.broker_url}; Milvus {settings.milvus_uri}")

    from indexer.encode import load_encoder

    encoder = load_encoder(settings, SOURCE)
    images = [img for batch in dataset.iter_images(4096) for img in batch.column("image").to_pylist()]
    encoder.encode_images(images[:64])  # warm-up (allocations, thread pools)
    embedded = is_embedded_broker(settings)
    worker = WorkerProcess(settings, pool="solo" if embedded else "prefork", log_path=data_dir / "bench-worker.log")
    worker.start()
    enc_runs, e2e_runs = [], []
    try:
        warm, s_warm = run_job(settings, dataset, args.chunk_size, items_only=False)
        # Alternate the two measurements so that load from other processes hits both alike.
        for _ in range(args.repeats):
            enc_runs.append(encoder_only(encoder, images, args.chunk_size))
            progress, seconds = run_job(settings, dataset, args.chunk_size, items_only=True)
            e2e_runs.append((progress.items_written, seconds))
    finally:
        worker.stop()
    close_stores()
    n_up, s_up = upsert_rate(settings, args.upsert_rows)
    n_enc, s_enc = min(enc_runs, key=lambda r: r[1])  # best of the repeats
    n_e2e, s_e2e = min(e2e_runs, key=lambda r: r[1])

    rows = [
        ("encoder only (decode + encode)", n_enc, s_enc, "items"),
        ("end to end (queue+worker+Milvus+DB)", n_e2e, s_e2e, "items"),
        ("  first job incl. model load", warm.items_written, None, "items"),
        ("behaviour copy (first job)", warm.behaviours_written, None, "behaviours"),
        ("Milvus upsert_items", n_up, s_up, "rows"),
    ]
    print(f"\n| {'stage':<38} | {'count':>8} | {'seconds':>8} | {'per second':>11} |")
    print(f"|{'-' * 40}|{'-' * 10}|{'-' * 10}|{'-' * 13}|")
    for name, count, seconds, unit in rows:
        if seconds is None:
            rate = warm.items_per_s if unit == "items" else warm.behaviours_per_s
            print(f"| {name:<38} | {count:>8,} | {'':>8} | {rate or 0:>9,.1f}/s |")
        else:
            print(f"| {name:<38} | {count:>8,} | {seconds:>8.2f} | {count / seconds:>9,.1f}/s |")
    pairs = ", ".join(f"{ne / se:,.0f} vs {n / s:,.0f}" for (ne, se), (n, s) in zip(enc_runs, e2e_runs, strict=True))
    print(f"\nitems/s per run, encoder-only vs end-to-end: {pairs}")
    ratio = (n_e2e / s_e2e) / (n_enc / s_enc)
    median = float(np.median([(n / s) / (ne / se) for (n, s), (ne, se) in zip(e2e_runs, enc_runs, strict=True)]))
    print(f"end-to-end / encoder-only = {ratio:.2f} best of {args.repeats} (median of pairs {median:.2f}); "
          f"target >= 0.85. First job (model load, items + behaviours) took {s_warm:.1f}s")


if __name__ == "__main__":
    main()
