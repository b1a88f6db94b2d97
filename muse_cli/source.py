"""``muse source``: the versions of an embedding source's collections per dataset, and the live one.

``list`` shows every version with its counts, job, live flag and promotion time (and legacy
collections with the command that adopts them); ``promote`` switches readers to a version in one
step; ``rollback`` returns to the previous live version; ``drop`` removes a version that is not
live; ``adopt`` keeps (or drops) collections of the old ``<prefix>_<source>_items`` naming.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "source",
        help="versions of a source's collections per dataset: list, promote, rollback, drop, adopt",
        description="Each backfill writes one version of (dataset, source) beside the others; readers use "
        "the live one. Promote a checked version, roll back, drop old ones.",
    )
    acts = p.add_subparsers(dest="source_command", metavar="ACTION", required=True)
    ls = acts.add_parser("list", help="versions, counts, backfill job, live flag, promotion time")
    ls.add_argument("--dataset", help="only this dataset")
    ls.add_argument("--source", help="only this source")
    ls.add_argument("--no-counts", action="store_true", help="skip counting rows in Milvus")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)
    pr = acts.add_parser("promote", help="make a version live (checks its job and counts first)")
    pr.add_argument("dataset", help="dataset name (see `muse data list`)")
    pr.add_argument("source", help="embedding source, e.g. scl")
    pr.add_argument("version", type=int, help="the source version to make live (see `muse source list`)")
    pr.add_argument("--force", action="store_true",
                    help="promote even if the job is unfinished or counts differ from the dataset's")
    pr.add_argument("--json", action="store_true", help="print the result (with timings) as JSON")
    pr.set_defaults(func=_promote)
    rb = acts.add_parser("rollback", help="make the previously live version live again")
    rb.add_argument("dataset", help="dataset name")
    rb.add_argument("source", help="embedding source")
    rb.add_argument("--json", action="store_true", help="print the result (with timings) as JSON")
    rb.set_defaults(func=_rollback)
    dr = acts.add_parser("drop", help="drop a version's collections (never the live one)")
    dr.add_argument("dataset", help="dataset name")
    dr.add_argument("source", help="embedding source")
    dr.add_argument("version", type=int, help="the source version to drop (not the live one)")
    dr.set_defaults(func=_drop)
    ad = acts.add_parser("adopt", help="keep collections of the old naming as a version of a dataset (or drop them)")
    ad.add_argument("source", help="the source named in the legacy collections, e.g. scl for muse_scl_items")
    ad.add_argument("--dataset", help="the dataset the legacy collections were written for")
    ad.add_argument("--version", type=int, help="the source version they hold (default: that of the dataset's "
                    "newest done backfill of the source)")
    ad.add_argument("--drop", action="store_true", help="drop the legacy collections instead")
    ad.set_defaults(func=_adopt)


def _open() -> tuple[Any, Any]:
    from muse.settings import load_settings
    from muse.vectorstore import VectorStore

    settings = load_settings()
    return settings, VectorStore(settings)


def _n(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _list(args: argparse.Namespace) -> int:
    from muse import versions

    settings, store = _open()
    with store:
        rows = versions.list_versions(settings, store, args.dataset, args.source, counts=not args.no_counts)
        legacy = versions.legacy_report(settings, store, args.source)
    if args.json:
        print(json.dumps({"versions": [r.to_dict() for r in rows], "legacy": legacy}, indent=2))
        return 0
    if not rows:
        print("no source versions yet: `muse backfill --source NAME --dataset NAME` writes the first one")
    else:
        print(f"{'dataset':<22} {'source':<12} {'ver':>4} {'live':<5} {'items':>10} {'behaviours':>12} "
              f"{'job':>5} {'job status':<10} {'promoted at':<26} collections")
        for r in rows:
            cols = f"{r.items_collection}, {r.behaviours_collection}" + ("" if r.in_milvus else " (missing)")
            print(f"{r.dataset:<22} {r.source:<12} {r.version:>4} {'live' if r.live else '':<5} {_n(r.items):>10} "
                  f"{_n(r.behaviours):>12} {r.job_id or '-':>5} {r.job_status or '-':<10} "
                  f"{r.promoted_at or '-':<26} {cols}")
    for line in legacy:
        print(f"legacy: {line}")
    return 0


def _print_switch(res: Any, verb: str, as_json: bool, table: str | None = None) -> None:
    if as_json:
        print(json.dumps({**res.to_dict(), "item_table": table}, indent=2))
        return
    before = f"v{res.previous}" if res.previous is not None else "none"
    print(f"{verb} {res.dataset}/{res.source}: live v{res.version} (was {before}); collections "
          f"{res.items_collection}, {res.behaviours_collection}; switch took {res.switch_s * 1000:.0f} ms "
          f"(checks {res.check_s * 1000:.0f} ms)")
    for p in res.problems_ignored:
        print(f"  forced past: {p}")
    if table:
        print(f"  item table for the GSU servers: {table}")


def _publish_table(settings: Any, store: Any, res: Any) -> str:
    """Write the live version's item table for the GSU servers (`muse serve` loads it at start-up);
    returns its folder, or why it could not be written (the switch itself stands)."""
    from indexer.item_vectors import publish_item_table
    from muse.errors import MuseError
    from muse.vectorstore import CollectionRef

    try:
        return str(publish_item_table(settings, CollectionRef(res.dataset, res.source, res.version), store))
    except MuseError as e:
        return f"not written ({e}); `muse serve` reads the items from Milvus once and writes it"


def _promote(args: argparse.Namespace) -> int:
    from muse import versions

    settings, store = _open()
    with store:
        res = versions.promote(settings, store, args.dataset, args.source, args.version, force=args.force)
        table = _publish_table(settings, store, res)
    _print_switch(res, "promoted", args.json, table)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from muse import versions

    settings, store = _open()
    with store:
        res = versions.rollback(settings, store, args.dataset, args.source)
        table = _publish_table(settings, store, res)
    _print_switch(res, "rolled back", args.json, table)
    return 0


def _drop(args: argparse.Namespace) -> int:
    from muse import versions
    from muse.vectorstore import CollectionRef

    settings, store = _open()
    ref = CollectionRef(args.dataset, args.source, args.version)
    with store:
        versions.drop(settings, store, args.dataset, args.source, args.version)
        print(f"dropped {ref}: collections {store.item_collection(ref)}, {store.behaviour_collection(ref)}")
    return 0


def _adopt(args: argparse.Namespace) -> int:
    from muse import versions

    settings, store = _open()
    with store:
        res = versions.adopt(settings, store, args.source, args.dataset, args.version, drop_legacy=args.drop)
    if res is None:
        print(f"dropped the legacy collections of source {args.source!r}")
        return 0
    live = "live" if res.live else "not live (`muse source promote` it)"
    print(f"adopted the legacy collections of {args.source!r} as {res.dataset}/{res.source} v{res.version}, {live}: "
          f"{res.items_collection} ({_n(res.items)} items), {res.behaviours_collection} ({_n(res.behaviours)} behaviours)")
    return 0
