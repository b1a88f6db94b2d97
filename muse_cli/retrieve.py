"""``muse retrieve``: GSU top-K search over a user's lifelong history from the command line."""

from __future__ import annotations

import argparse
import json


def _item_list(raw: str) -> list[int]:
    try:
        ids = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--items must be comma-separated integers, got {raw!r}") from e
    if not ids:
        raise argparse.ArgumentTypeError("--items is empty: give at least one target item id")
    return ids


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrieve", help="GSU retrieval: top-K behaviours of a user for target items")
    rsub = p.add_subparsers(dest="retrieve_command", metavar="ACTION", required=True)
    s = rsub.add_parser("search", help="top-K behaviours (and SimTier counts) of a user for target items")
    s.add_argument("--source", required=True, help="embedding source, e.g. scl, i2i, openclip, id")
    s.add_argument("--dataset", required=True, help="dataset whose collections are searched (see `muse data list`)")
    s.add_argument(
        "--version", type=int, default=None,
        help="source version to search (default: the live one, see `muse source list`)",
    )
    s.add_argument("--user", type=int, required=True, help="user id")
    s.add_argument("--items", type=_item_list, required=True, help="target item ids, e.g. 1,2,3")
    s.add_argument("--k", type=int, default=50, help="behaviours per target (default 50)")
    s.add_argument(
        "--backend",
        choices=("cache", "milvus"),
        default="cache",
        help="device cache (default) or Milvus filtered search; both give the same results",
    )
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=_search)


def _search(args: argparse.Namespace) -> int:
    from indexer.source_registry import check_source
    from retriever.client import Retriever

    check_source(args.source)  # an unknown source fails here, before any server is asked
    with Retriever.from_settings(
        source=args.source, dataset=args.dataset, version=args.version, backend=args.backend
    ) as r:
        result = r.search(args.user, args.items, k=args.k)
        collection = r.store.behaviour_collection(r.ref)
    if args.json:
        print(json.dumps({**result.to_dict(), "collection": collection}, indent=2))
        return 0 if result.found else 1
    where = f"{args.dataset}/{args.source} v{result.version} (collection {collection})"
    if not result.found:
        print(f"user {result.user_id} has no behaviours in {where}: {_who(args.user, args.source, args.dataset)}")
        return 1
    length = f", {result.history_length} behaviours" if result.history_length is not None else ""
    print(f"{where}")
    print(f"user {result.user_id} ({result.backend} backend{length}), top {result.k}:")
    for hits in result:
        print(f"target item {hits.item_id}: {len(hits)} behaviours")
        print(f"  {'rank':>4} {'position':>9} {'item':>12} {'cosine':>8}")
        for rank, (pos, item, score) in enumerate(
            zip(hits.positions, hits.behaviour_item_ids, hits.scores, strict=True), 1
        ):
            print(f"  {rank:>4} {int(pos):>9} {int(item):>12} {float(score):>8.4f}")
        tiers = ", ".join(f"{t}:{int(c)}" for t, c in enumerate(hits.simtier) if c)
        print(f"  simtier (tier:count) {tiers or '-'}")
    return 0


def _who(user_id: int, source: str, dataset: str) -> str:
    """Whether ``user_id`` is a user of ``dataset`` at all, in words."""
    from muse.data.format import Dataset
    from muse.settings import load_settings

    users = Dataset.open(load_settings(), dataset).users().column("user_id").to_numpy()
    if (users == user_id).any():
        return (f"user {user_id} is a user of dataset {dataset!r}, but none of their behaviours are in the "
                f"collection (is the backfill finished? `muse backfill list`)")
    span = f" (its user ids run {users.min()}..{users.max()})" if len(users) else ""
    return f"dataset {dataset!r} has no user {user_id}{span}"
