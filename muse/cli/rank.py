"""``muse rank``: train, evaluate, list and score CTR ranker runs; ``muse compare``: the embedding-source
x model matrix."""

from __future__ import annotations

import argparse
import json
from typing import Any

MODEL_NAMES = ("din", "sim-hard", "sim-soft", "twin", "muse")  # checked again by ranker.models
ESU_NAMES = ("ta", "simtier", "ta+simtier", "sa-ta", "sa-ta+simtier")


def _csv(raw: str) -> list[str]:
    return [x.strip() for x in raw.split(",") if x.strip()]


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset name (see `muse data list`)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the train split (default 1)")
    p.add_argument("--batch-size", type=int, default=None, help="impressions per step (default 256)")
    p.add_argument("--seed", type=int, default=None, help="seed of weights and shuffle (default 0)")
    p.add_argument("--max-train", type=int, default=None, help="stop each epoch after this many impressions")
    p.add_argument("--max-eval", type=int, default=None, help="evaluate on at most this many test impressions")
    p.add_argument("--k", type=int, default=None, help="behaviours kept by the GSU (default 50)")
    p.add_argument("--max-history", type=int, default=None, help="newest behaviours kept (default 1000)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rank", help="CTR ranker: train, evaluate, list and score runs")
    rsub = p.add_subparsers(dest="rank_command", metavar="ACTION", required=True)

    t = rsub.add_parser("train", help="train a model, evaluate it on the test split and record the run")
    t.add_argument("--model", required=True, choices=MODEL_NAMES, help="model to train")
    t.add_argument("--source", default=None, help="embedding source of the GSU (muse): scl, i2i, openclip, id, ...")
    t.add_argument("--esu", default=None, choices=ESU_NAMES, help="ESU variant of muse (default sa-ta+simtier)")
    _add_train_options(t)
    t.add_argument("--json", action="store_true", help="print the run's metrics as JSON")
    t.set_defaults(func=_train)

    e = rsub.add_parser("eval", help="re-evaluate a run from its checkpoint: AUC, GAUC, logloss and slices")
    e.add_argument("run", type=int, help="run id (see `muse rank list`)")
    e.add_argument("--split", default="test", choices=("train", "test"))
    e.add_argument("--limit", type=int, default=None, help="evaluate at most this many impressions")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.set_defaults(func=_eval)

    ls = rsub.add_parser("list", help="list the recorded runs")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

    s = rsub.add_parser("score", help="click probabilities of candidate items for a user (the scoring API)")
    s.add_argument("run", type=int)
    s.add_argument("--user", type=int, required=True)
    s.add_argument("--items", type=lambda r: [int(x) for x in _csv(r)], required=True, help="e.g. 1,2,3")
    s.add_argument("--path", choices=("cache", "milvus"), default="cache", help="retriever path (muse)")
    s.add_argument("--version", type=int, default=None,
                   help="source version the retriever reads (muse; default: the live one of the run's dataset)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_score)

    c = sub.add_parser("compare", help="train the embedding-source x model matrix; write a table and a plot")
    c.add_argument("--models", type=_csv, default=list(MODEL_NAMES), help="comma-separated (default all)")
    c.add_argument("--sources", type=_csv, default=["scl"], help="GSU sources for muse (default scl)")
    c.add_argument("--esu", type=_csv, default=["sa-ta+simtier"],
                   help=f"muse ESU variants, comma-separated ({', '.join(ESU_NAMES)})")
    c.add_argument("--out", default=None, help="output folder (default $MUSE_DATA_DIR/ranker/compare-DATASET)")
    _add_train_options(c)
    c.set_defaults(func=_compare)


def _train_config(args: argparse.Namespace) -> Any:
    import torch

    from ranker.train import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    return TrainConfig.from_dict({"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
                                  "max_train": args.max_train, "max_eval": args.max_eval})


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in {"k": args.k, "max_history": args.max_history}.items() if v is not None}


def _print_metrics(metrics: dict[str, Any]) -> None:
    print(f"  {'slice':<14} {'n':>8} {'AUC':>7} {'GAUC':>7} {'logloss':>8}")
    for name in ("overall", "long_tail", "long_history"):
        m = metrics.get(name)
        if m:
            print(f"  {name:<14} {m['n']:>8} {m['auc']:>7.4f} {m['gauc']:>7.4f} {m['logloss']:>8.4f}")


def _train(args: argparse.Namespace) -> int:
    from muse.settings import load_settings
    from ranker.train import train

    res = train(load_settings(), args.model, args.dataset, source=args.source, esu=args.esu,
                train_config=_train_config(args), model_overrides=_overrides(args), progress=True)
    if args.json:
        print(json.dumps({"run": res.run_id, **res.metrics}, indent=2, default=str))
        return 0
    tr = res.metrics["train"]
    print(f"run {res.run_id}: {args.model} on {args.dataset}, {tr['samples']} samples, "
          f"{tr['samples_per_s']:.0f} samples/s; checkpoint {res.checkpoint}")
    _print_metrics(res.metrics)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from muse.settings import load_settings
    from ranker.evaluate import evaluate_run

    metrics = evaluate_run(load_settings(), args.run, split=args.split, limit=args.limit)
    if args.json:
        print(json.dumps(metrics, indent=2, default=str))
        return 0
    print(f"run {args.run} on {args.split}:")
    _print_metrics(metrics)
    return 0


def _list(args: argparse.Namespace) -> int:
    from muse.settings import load_settings
    from ranker.runs import list_runs

    runs = list_runs(load_settings())
    if args.json:
        print(json.dumps([r.__dict__ for r in runs], indent=2, default=str))
        return 0
    if not runs:
        print("no ranker runs yet: `muse rank train --model muse --source scl --dataset NAME`")
        return 0
    print(f"{'run':>4} {'model':<9} {'esu':<14} {'source':<11} {'dataset':<20} {'seed':>4} {'status':<7} {'GAUC':>7}")
    for r in runs:
        gauc = (r.metrics.get("overall") or {}).get("gauc")
        g = f"{gauc:.4f}" if isinstance(gauc, float) else "-"
        print(f"{r.id:>4} {r.model:<9} {r.esu or '-':<14} {r.source or '-':<11} {r.dataset:<20} {r.seed:>4} "
              f"{r.status:<7} {g:>7}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from muse.settings import load_settings
    from ranker.scoring import Ranker

    with Ranker.load(load_settings(), args.run, path=args.path, version=args.version) as ranker:
        probs = ranker.score(args.user, args.items)
        r = ranker.retriever
        used = {} if r is None else {"version": r.version, "collection": r.store.behaviour_collection(r.ref)}
    if args.json:
        print(json.dumps({"user": args.user, "items": args.items, "probs": probs.tolist(), **used}))
        return 0
    if used:
        print(f"GSU on {r.ref} (collection {used['collection']})")
    for item, p in sorted(zip(args.items, probs, strict=True), key=lambda t: -t[1]):
        print(f"{item:>12} {p:.4f}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from muse.settings import load_settings
    from ranker.compare import compare

    def show(row: Any) -> None:
        print(f"  {row.label:<26} {row.source or '-':<11} run {row.run_id}: "
              f"GAUC {row.metrics['overall']['gauc']:.4f}", flush=True)

    res = compare(load_settings(), args.dataset, models=args.models, sources=args.sources, esus=args.esu,
                  train_config=_train_config(args), model_overrides=_overrides(args),
                  out_dir=Path(args.out) if args.out else None, on_row=show, progress=True)
    print(res.table)
    print(f"table {res.table_path}\nplot  {res.plot_path}")
    return 0
