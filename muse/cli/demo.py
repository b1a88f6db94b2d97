"""``muse demo``: the whole pipeline on the embedded deployment, in one command.

Runs the same commands a user would type, in order: migrate the database, generate a synthetic
world, train an embedding source, backfill it into Milvus through the queue and a worker,
retrieve a user's relevant behaviours, and train + evaluate a CTR model on them.
"""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a synthetic world (embedded, no servers)")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"], help="simworld size (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--source", default="scl", choices=["scl", "i2i", "openclip", "id"], help="embedding source"
    )
    p.add_argument("--model", default="muse", help="ranker model (default: muse)")
    p.add_argument("--epochs", type=int, default=2, help="embedding training epochs (default 2)")
    p.set_defaults(func=_demo)


def _step(title: str, argv: list[str]) -> None:
    from muse.cli.main import main

    print(f"\n=== {title}: muse {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    code = main(argv)
    if code:
        raise SystemExit(code)
    print(f"--- {title} done in {time.perf_counter() - start:.1f} s", flush=True)


def _demo(args: argparse.Namespace) -> int:
    from muse.data.format import Dataset
    from muse.settings import load_settings

    settings = load_settings()
    name = f"demo-{args.size}-{args.seed}"
    print(f"data dir: {settings.data_dir.absolute()}")
    _step("migrate the metadata database", ["db", "upgrade"])
    if not settings.path("datasets", name, "meta.json").exists():
        _step(
            "generate a synthetic world",
            ["data", "simworld", "--size", args.size, "--seed", str(args.seed), "--name", name],
        )
    _step(
        f"train the {args.source} embedding source",
        ["embed", "train", "--source", args.source, "--dataset", name, "--epochs", str(args.epochs)],
    )
    _step(
        "backfill item and behaviour vectors into Milvus",
        ["backfill", "--source", args.source, "--dataset", name, "--new"],
    )

    ds = Dataset.open(settings, name)
    first = next(ds.iter_impressions(split="test", batch_size=8))
    user = int(first.column("user_id")[0].as_py())
    targets = ",".join(str(int(x.as_py())) for x in first.column("item_id")[:3])
    _step(
        "retrieve the user's relevant behaviours (GSU)",
        ["retrieve", "search", "--source", args.source, "--dataset", name, "--user", str(user), "--items", targets, "--k", "5"],
    )
    train = ["rank", "train", "--model", args.model, "--dataset", name]
    if args.model in ("muse",):
        train += ["--source", args.source]
    _step(f"train and evaluate the {args.model} ranker", train)
    print("\ndemo finished: see `muse rank list`, `muse backfill list`, `muse embed list`.")
    return 0
