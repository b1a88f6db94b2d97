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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", help="simworld size (tiny, small, ...; default small)")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--upsert-rows", type=int, default=20_000)
    parser.add_argument("--n-items", type=int, default=None, help="override the size's item count")
    parser.add_argument("--n-users", type=int, default=None, help="override the size's user count")
    parser.add_argument("--repeats", type=int, default=3, help="alternating encoder/end-to-end runs")
    args = parser.parse_args()

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
