"""Ranker benchmark: training samples/s per model at each batch size and torch thread count, and
scoring latency (100 candidates), on one synthetic dataset with fixed-length histories (default
1,000 behaviours, K = 50). Every model runs with its default ESU (the paper's set-up).

    python -m bench.ranker                       # every model, batch 100 and 256, 1 and 2 threads
    python -m bench.ranker --models muse --batches 100 --threads 2 --no-score
    python -m bench.ranker --no-score --repeats 3 --cpu   # best of 3; and samples per CPU-second
    python -m bench.ranker --no-score --nproc 1,2         # also: samples/s at 1 and 2 processes

``--nproc 1,2`` adds a table of training samples/s per model at each process count, with the same
global batch (the first of ``--batches``) and CPUs // N torch threads per process: 1 is this process
(what ``muse rank train`` runs), N > 1 are N processes started by torch.distributed's elastic launcher
(what ``muse rank train --nproc N`` runs: gloo, DDP, each rank on its own impressions; samples of every
rank over the slowest rank's seconds).

Training runs the real pipeline (history join + in-batch GSU with the retriever's kernel + forward +
backward + sparse/dense optimiser steps). Scoring goes through :class:`ranker.scoring.Ranker`; for
``muse`` with a :class:`retriever.client.Retriever` on a Milvus Lite file (device-cache backend,
histories prefetched, as in serving).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from muse.settings import Settings, load_settings
from ranker.data import BatchBuilder, FeatureSpace, HistoryStore, VectorTable, iter_impression_batches
from ranker.models import FeatureSpec, build_model, list_models, make_config, model_class
from ranker.runs import LoadedRun
from ranker.scoring import Ranker
from ranker.train import RankTrainConfig, train_steps

SOURCE = "scl-taobao"  # shipped-vector source: the bench writes the vectors itself


def make_dataset(settings: Settings, n_users: int, n_items: int, history: int, n_impressions: int, dim: int,
                 seed: int = 0) -> str:
    """Write a dataset whose every user has exactly ``history`` behaviours, with ``dim``-d vectors."""
    from muse.data.format import DatasetWriter

    rng = np.random.default_rng(seed)
    name = f"bench-{n_users}x{history}"
    n_cats = 200
    cat = rng.integers(0, n_cats, n_items)
    item_ids = np.arange(1, n_items + 1, dtype=np.int64) * 7  # ids that are not row numbers
    w = DatasetWriter(settings.path("datasets", name), name, "simworld")
    w.write_items(pa.table({"item_id": item_ids, "category": cat, "feat_a": rng.integers(0, 50, n_items),
                            "feat_b": rng.integers(0, 20, n_items), "title": pa.nulls(n_items, pa.string())}))
    users = np.arange(n_users, dtype=np.int64)
    w.write_users(pa.table({"user_id": users, **{f"f{i}": rng.integers(0, 10, n_users) for i in range(1, 6)}}))
    hist_items = rng.integers(0, n_items, (n_users, history))
    w.write_histories(pa.table({
        "user_id": users,
        "item_ids": pa.array(list(item_ids[hist_items]), type=pa.list_(pa.int64())),
        "categories": pa.array(list(cat[hist_items]), type=pa.list_(pa.int64())),
        "times": pa.array([np.arange(history, dtype=np.int64)] * n_users, type=pa.list_(pa.int64())),
    }))
    imp_user = rng.integers(0, n_users, n_impressions)
    imp_item = rng.integers(0, n_items, n_impressions)
    w.write_impressions(pa.table({
        "user_id": imp_user, "item_id": item_ids[imp_item], "label": rng.integers(0, 2, n_impressions).astype(np.int8),
        "split": pa.array(["train"] * n_impressions), "time": np.zeros(n_impressions, np.int64),
        "hist_len": np.full(n_impressions, history, np.int32)}))
    centres = rng.normal(size=(n_cats, dim))
    vectors = (centres[cat] + rng.normal(size=(n_items, dim))).astype(np.float32)
    ds = w.finish(n_behaviours=n_users * history)
    (ds.path / "embeddings").mkdir(exist_ok=True)
    pq.write_table(pa.table({"item_id": item_ids, "vector": pa.array(list(vectors), type=pa.list_(pa.float32()))}),
                   ds.path / "embeddings" / f"{SOURCE}.parquet")
    return name


def train_rate(settings: Settings, dataset: str, name: str, args: argparse.Namespace, parts: dict,
               batch_size: int, threads: int) -> tuple[float, float, Any]:
    """Training samples/s of one model (full pipeline) at ``batch_size`` with ``threads`` torch threads:
    the best wall-clock rate of ``args.repeats`` timings, and the samples per CPU-second (this
    process's CPU time, every thread: the batch builder and torch's) of that timing."""
    from muse.data.format import Dataset

    torch.set_num_threads(threads)
    ds = Dataset.open(settings, dataset)
    config = make_config(name, k=args.k, max_history=args.history)
    space, histories, vectors = parts["space"], parts["histories"], parts["vectors"]
    builder = BatchBuilder(space, histories, model_class(name).retrieval, config.k, config.recent_len,
                           config.max_history, vectors if config.needs_vectors else None)
    torch.manual_seed(0)
    model = build_model(name, FeatureSpec(space.vocab_sizes(), space.user_fields), config)
    cfg = RankTrainConfig(batch_size=batch_size)
    batches = list(iter_impression_batches(ds, "train", batch_size, shuffle=True,
                                           limit=batch_size * (args.steps + 3)))
    train_steps(model, builder, batches[:3], cfg)  # warm-up
    best = (0.0, 0.0)
    for _ in range(args.repeats):
        cpu = time.process_time()
        _, n, seconds = train_steps(model, builder, batches[3:], cfg)
        best = max(best, (n / seconds, n / max(time.process_time() - cpu, 1e-9)))
    return best[0], best[1], model


def process_rates(data_dir: str, dataset: str, args: argparse.Namespace,
                  nproc: int) -> dict[str, tuple[float, float]]:
    """Training samples/s of every model of ``args.models`` with ``nproc`` processes started by the elastic
    launcher (one launch for all models): every rank's samples over the slowest rank's seconds, and over
    the CPU-seconds of all ranks together (each rank's process time: its batch builder and torch's threads)."""
    import uuid

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="bench-launch-") as logs:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=logs))
        params = {"data_dir": data_dir, "dataset": dataset, "models": args.models.split(","), "k": args.k,
                  "history": args.history, "batch": int(args.batches.split(",")[0]), "steps": args.steps,
                  "repeats": args.repeats}
        return elastic_launch(config, _rank_rates)(params)[0]


def _rank_rates(params: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """One rank of :func:`process_rates` (started by the launcher)."""
    from muse.data.format import Dataset
    from ranker.distributed import StepSync, plan_epoch, rank_batches, start

    dist = start("cpu")
    try:
        settings = load_settings(env={}, data_dir=Path(params["data_dir"]), device="cpu")
        ds = Dataset.open(settings, params["dataset"])
        space = FeatureSpace.from_dataset(ds)
        histories = HistoryStore.from_dataset(ds, space)
        from indexer.item_vectors import item_vectors

        vectors = VectorTable(space, item_vectors(settings, SOURCE, ds))
        batch, warm = params["batch"], 3
        plan = plan_epoch(batch * (params["steps"] + warm), dist.world, batch)
        out = {}
        for name in params["models"]:
            config = make_config(name, k=params["k"], max_history=params["history"])
            builder = BatchBuilder(space, histories, model_class(name).retrieval, config.k, config.recent_len,
                                   config.max_history, vectors if config.needs_vectors else None)
            torch.manual_seed(0)
            model = build_model(name, FeatureSpec(space.vocab_sizes(), space.user_fields), config)
            sync = StepSync(dist, model)
            cfg = RankTrainConfig(batch_size=batch)
            best = (0.0, 0.0)
            for repeat in range(params["repeats"]):
                sync.begin_epoch(plan)
                batches = list(rank_batches(ds, "train", plan, dist.rank, seed=repeat))
                train_steps(model, builder, batches[:warm], cfg, sync=sync)  # warm-up
                dist.barrier()
                cpu = time.process_time()
                _, n, seconds = train_steps(model, builder, batches[warm:], cfg, sync=sync)
                cpu_ms = int(1000 * (time.process_time() - cpu))
                sync.end_epoch()  # every row of the plan trained once
                total, slowest = sync.totals(n, seconds)
                cpu_s = dist.all_sum_int([cpu_ms])[0] / 1000
                best = max(best, (total / max(slowest, 1e-9), total / max(cpu_s, 1e-9)))
            out[name] = best
        return out
    finally:
        dist.close()


def score_latency(model: Any, dataset: str, name: str, args: argparse.Namespace, parts: dict) -> tuple[float, float]:
    """p50 and p95 milliseconds of scoring ``args.candidates`` items through :class:`Ranker`."""
    space, histories = parts["space"], parts["histories"]
    multimodal = model_class(name).retrieval == "multimodal"
    ranker = Ranker(LoadedRun(model, space, SOURCE, dataset, {}), histories,
                    parts["retriever"] if multimodal else None, parts["vectors"])
    rng = np.random.default_rng(1)
    users = parts["score_users"]
    times = []
    for i in range(args.score_calls + 3):
        candidates = rng.choice(space.items.values, args.candidates, replace=False)
        t0 = time.perf_counter()
        ranker.score(int(users[i % len(users)]), candidates)
        if i >= 3:  # the first calls warm up
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * statistics.median(times), 1000 * times[int(0.95 * (len(times) - 1))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(list_models()))
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--history", type=int, default=1000)
    p.add_argument("--impressions", type=int, default=8000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--batches", default="100,256", help="training batch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per model and setting")
    p.add_argument("--no-score", action="store_true", help="skip the scoring latency (no Milvus Lite)")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--score-calls", type=int, default=30)
    p.add_argument("--score-users", type=int, default=5, help="users backfilled into Milvus Lite for muse")
    p.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    p.add_argument("--repeats", type=int, default=1, help="timings per setting; the best is reported")
    p.add_argument("--cpu", action="store_true",
                   help="also print samples per CPU-second (process CPU time: less sensitive to other load)")
    p.add_argument("--nproc", default=None,
                   help="process counts, comma-separated (e.g. 1,2): a table of training samples/s per model at "
                        "each count, same global batch (the first of --batches), CPUs // N threads per process")
    args = p.parse_args()
    batch_sizes = [int(b) for b in args.batches.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]

    from muse import db
    from muse.data.format import Dataset
    from muse.vectorstore import CollectionRef, VectorStore
    from retriever.client import Retriever

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(env={}, data_dir=Path(tmp) / "muse-data", device="cpu")
        db.upgrade(settings)
        t0 = time.perf_counter()
        dataset = make_dataset(settings, args.users, args.items, args.history, args.impressions, args.dim)
        ds = Dataset.open(settings, dataset)
        space = FeatureSpace.from_dataset(ds)
        histories = HistoryStore.from_dataset(ds, space)
        from indexer.item_vectors import item_vectors

        table = item_vectors(settings, SOURCE, ds)  # the vectors the bench shipped with its dataset
        ids, vecs = table.item_ids[table.present], table.vectors[table.present]
        vectors = VectorTable(space, table)
        retriever, score_users = None, histories.user_ids[: args.score_users]
        if not args.no_score:  # backfill a few users into Milvus Lite for the retriever's serving path
            store = VectorStore(settings)
            ref = CollectionRef(dataset, SOURCE, 1)
            store.ensure_collections(ref, args.dim)
            store.upsert_items(ref, ids, vecs, space.item_features[space.items.lookup(ids), 0])
            for u in score_users:
                start, length = (int(v[0]) for v in histories.rows(np.array([u])))
                idx = histories.entries(np.arange(start, start + length))[0]
                store.upsert_behaviours(ref, np.full(length, u), np.arange(length), space.items.values[idx - 1],
                                        vectors.vectors[idx].numpy())
            store.close()
            retriever = Retriever.from_settings(source=SOURCE, settings=settings, dataset=dataset, version=1)
            retriever.prefetch([int(u) for u in score_users]).result()
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; setup {time.perf_counter() - t0:.1f}s: {args.users} users x {args.history} behaviours, "
              f"{args.items} items, {args.dim}-d vectors; K={args.k}; {args.steps} timed steps per setting "
              f"(best of {args.repeats}); load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs")
        if args.cpu:
            print("cells: training samples/s (samples per CPU-second of the whole process)")
        parts = {"space": space, "histories": histories, "vectors": vectors, "retriever": retriever,
                 "score_users": score_users}
        settings_cols = [(b, t) for b in batch_sizes for t in thread_counts]
        print(f"| model (ESU) | {' | '.join(f'batch {b}, {t} thr' for b, t in settings_cols)} | "
              f"fastest threads @{batch_sizes[0]} |" + ("" if args.no_score else " score p50 / p95 ms |"))
        print("|---|" + "---|" * (len(settings_cols) + 1 + (0 if args.no_score else 1)))
        for name in args.models.split(","):
            rates, cpu_rates, model = {}, {}, None
            for b, t in settings_cols:
                rates[(b, t)], cpu_rates[(b, t)], model = train_rate(settings, dataset, name, args, parts, b, t)
            best = max(thread_counts, key=lambda t: rates[(batch_sizes[0], t)])
            cells = " | ".join(f"{rates[c]:.0f}" + (f" ({cpu_rates[c]:.0f})" if args.cpu else "") for c in settings_cols)
            line = f"| {name} ({make_config(name).esu}) | {cells} | {best} |"
            if not args.no_score:
                torch.set_num_threads(best)
                p50, p95 = score_latency(model, dataset, name, args, parts)
                line += f" {p50:.1f} / {p95:.1f} |"
            print(line, flush=True)
        if args.nproc:
            _print_process_table(settings, dataset, args, parts)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        if retriever is not None:
            retriever.close()


def _print_process_table(settings: Settings, dataset: str, args: argparse.Namespace, parts: dict) -> None:
    """Training samples/s per model at each of ``args.nproc`` process counts (one launch per count)."""
    from ranker.distributed import default_threads

    counts = [int(n) for n in args.nproc.split(",")]
    batch = int(args.batches.split(",")[0])
    models = args.models.split(",")
    rates: dict[int, dict[str, tuple[float, float]]] = {}
    for n in counts:
        t0 = time.perf_counter()
        if n == 1:  # this process, as `muse rank train` runs
            rates[n] = {m: train_rate(settings, dataset, m, args, parts, batch, default_threads(1))[:2] for m in models}
        else:
            rates[n] = process_rates(str(settings.data_dir), dataset, args, n)
        print(f"{n} process(es): measured in {time.perf_counter() - t0:.0f}s (start-up included), load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
    first, last = counts[0], counts[-1]
    print(f"\ntraining samples/s by processes (global batch {batch}; torch threads per process = "
          f"{os.cpu_count()} CPUs // N; gloo); in parentheses: samples per CPU-second of all processes")
    print(f"| model (ESU) | {' | '.join(f'{n} proc x {default_threads(n)} thr' for n in counts)} | {last} / {first} |")
    print("|---|" + "---|" * (len(counts) + 1))
    for m in models:
        cells = " | ".join(f"{rates[n][m][0]:.0f} ({rates[n][m][1]:.0f})" for n in counts)
        ratio = rates[last][m][0] / max(rates[first][m][0], 1e-9)
        print(f"| {m} ({make_config(m).esu}) | {cells} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
