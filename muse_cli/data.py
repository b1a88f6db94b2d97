"""``muse data``: build datasets (Taobao-MM import, synthetic world), list them, show their statistics."""

from __future__ import annotations

import argparse
import json
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="datasets: import Taobao-MM, generate a synthetic world, list, stats")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    tb = dsub.add_parser("taobao-mm", help="import the raw Taobao-MM parquet files from PATH")
    tb.add_argument("path", help="folder holding train_samples.parquet, item_features.parquet, ...")
    tb.add_argument("--name", default="taobao-mm", help="dataset name (default: taobao-mm)")
    tb.add_argument("--fresh", action="store_true",
                    help="start over instead of resuming an interrupted import of the same files")
    tb.set_defaults(func=_taobao_mm)

    sw = dsub.add_parser("simworld", help="generate a synthetic multimodal shopping world")
    sw.add_argument(
        "--size", default="tiny", choices=("tiny", "small", "medium", "large"), help="default: tiny"
    )
    sw.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes; default 0)")
    sw.add_argument("--name", default=None, help="dataset name (default: simworld-SIZE-SEED)")
    sw.set_defaults(func=_simworld)

    ls = dsub.add_parser("list", help="list datasets on disk and in the database")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)

    st = dsub.add_parser(
        "stats", help="statistics of a dataset (and a PNG of popularity and history lengths)"
    )
    st.add_argument("name", help="dataset name")
    st.add_argument("--json", action="store_true", help="print the full statistics as JSON")
    st.add_argument("--plot", default=None, help="PNG path (default: DATASET_DIR/stats.png)")
    st.set_defaults(func=_stats)


def _settings():  # noqa: ANN202 - Settings, imported lazily
    from muse.settings import load_settings

    return load_settings()


def _summary(ds) -> str:  # noqa: ANN001
    m = ds.meta
    return (
        f"dataset {ds.name} ({ds.kind}) at {ds.path}: {m['n_items']:,} items, {m['n_users']:,} users, "
        f"{m['n_behaviours']:,} behaviours, {m['n_impressions']:,} impressions"
    )


_REGISTERED = {True: "registered in the database", False: "not registered: run `muse db upgrade` first"}


def _registered_note(settings) -> str:  # noqa: ANN001
    from muse.data.registry import database_ready

    return _REGISTERED[database_ready(settings)]


def _taobao_mm(args: argparse.Namespace) -> int:
    from muse.data.registrar import BackgroundRegistration
    from muse.data.taobao_mm import import_taobao_mm

    settings = _settings()
    started = time.perf_counter()
    # the metadata layer loads and connects in a process of its own while the files are read
    with BackgroundRegistration(settings) as registration:
        ds = import_taobao_mm(settings, args.path, name=args.name, register=False, progress=True, fresh=args.fresh)
        registered = registration.finish(ds) is not None
    print(_summary(ds) + f" in {time.perf_counter() - started:.1f}s")
    m = ds.meta
    print(
        f"  {m['n_users_without_features']:,} sample users without a user-feature row (empty history), "
        f"{m['n_impressions_without_history']:,} impressions with hist_len 0, "
        f"{m['n_impression_items_without_features']:,} impressions on items without item features, "
        f"{m.get('embeddings', {}).get('scl-taobao', {}).get('n_items', 0):,} scl-taobao vectors"
    )
    print(f"  {_REGISTERED[registered]}")
    return 0


def _simworld(args: argparse.Namespace) -> int:
    from muse.data.simworld import generate_simworld

    settings = _settings()
    started = time.perf_counter()
    ds = generate_simworld(settings, size=args.size, seed=args.seed, name=args.name, progress=True)
    print(_summary(ds) + f" in {time.perf_counter() - started:.1f}s")
    print(f"  {_registered_note(settings)}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from muse.data.registry import list_datasets

    rows = list_datasets(_settings())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no datasets (create one with `muse data simworld` or `muse data taobao-mm PATH`)")
        return 0
    header = (
        f"{'name':<28} {'kind':<10} {'items':>10} {'users':>9} {'behaviours':>12} {'impressions':>12}  state"
    )
    print(header)
    for r in rows:
        state = ", ".join(s for s, ok in (("on disk", r["on_disk"]), ("registered", r["registered"])) if ok)
        cells = [
            f"{r[k]:,}" if isinstance(r.get(k), int) else "?"
            for k in ("n_items", "n_users", "n_behaviours", "n_impressions")
        ]
        print(
            f"{r['name']:<28} {r['kind']:<10} {cells[0]:>10} {cells[1]:>9} {cells[2]:>12} {cells[3]:>12}"
            f"  {state}"
        )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    from muse.data.format import Dataset
    from muse.data.registry import database_ready, update_stats
    from muse.data.stats import dataset_stats, write_stats
    from muse.errors import NotFoundError

    settings = _settings()
    ds = Dataset.open(settings, args.name)
    plot = Path(args.plot) if args.plot else ds.path / "stats.png"
    stats = dataset_stats(ds, plot_path=plot)
    write_stats(ds, stats)
    if database_ready(settings):
        try:
            update_stats(settings, ds.name, stats)
        except NotFoundError:
            pass  # on disk but not registered: the stats.json file holds them
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    pop, hl = stats["impression_popularity"], stats["history_length"]
    print(_summary(ds))
    print(f"  CTR {stats['ctr']}  (train {stats['splits']['train']}, test {stats['splits']['test']})")
    print(
        f"  impressions on the top 1% of items: {pop['share_on_top1pct_items']:.1%}; "
        f"on items seen < 5 times: "
        f"{pop['share_on_items_seen_lt5']:.1%}; items seen < 5 times: {pop['share_of_items_seen_lt5']:.1%}"
    )
    if hl.get("n"):
        print(
            f"  history length: min {hl['min']}, median {hl['median']:.0f}, "
            f"p90 {hl['p90']:.0f}, max {hl['max']}"
        )
    if "long_history" in stats:
        lh = stats["long_history"]
        print(
            f"  clicks whose matching facet is absent from the recent 50: "
            f"{lh['share_clicks_facet_absent_from_recent50']:.1%} "
            f"(recoverable from the long history: {lh['share_clicks_facet_only_in_long_history']:.1%})"
        )
    print(f"  plot: {plot}")
    return 0
