"""``muse retrieve``: GSU top-K search over a user's lifelong history from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any


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
    from muse.settings import load_settings
    from retriever.client import Retriever

    check_source(args.source)  # an unknown source fails here, before any server is asked
    from muse.vectorstore import CollectionRef, StoreLocked, VectorStore

    settings = load_settings()
    dataset = _check_user(settings, args.dataset, args.user, args.source)  # a missing dataset or user: a sentence, exit 2
    try:
        with Retriever.from_settings(
            source=args.source, settings=settings, dataset=args.dataset, version=args.version, backend=args.backend
        ) as r:
            result = r.search(args.user, args.items, k=args.k)
    except StoreLocked as e:
        address = _serving(e.argv, args)
        if address is None:
            raise
        # The embedded store is held by a `muse serve` of this dataset and source: ask it instead.
        from retriever.remote import RemoteRetriever

        with RemoteRetriever([address], settings=settings) as remote:
            result = remote.search(args.user, args.items, k=args.k)
        if not args.json:
            print(f"(through the GSU service of process {e.pid} on {address}: it holds the embedded store)")
    collection = VectorStore(settings).behaviour_collection(CollectionRef(result.dataset, result.source, result.version))
    if args.json:
        print(json.dumps({**result.to_dict(), "collection": collection}, indent=2))
        return 0 if result.found else 1
    where = f"{args.dataset}/{args.source} v{result.version} (collection {collection})"
    if not result.found:
        known = "" if dataset is None else f"user {args.user} is a user of dataset {args.dataset!r}, but "
        print(f"{known}user {result.user_id} has no behaviours in {where} (is the backfill finished? "
              "`muse backfill list`)")
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


def _serving(argv: list[str], args: argparse.Namespace) -> str | None:
    """``127.0.0.1:PORT`` when ``argv`` (another process's command line) is a ``muse serve`` of the
    dataset and source ``args`` asks for, on a known port (and the version, when pinned); else None."""
    if "serve" not in argv:
        return None
    import contextlib
    import io

    from muse_cli.main import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage text for a foreign command line
            served = build_parser().parse_args(argv[argv.index("serve"):])
    except (SystemExit, Exception):  # not a command line of this muse
        return None
    same = (served.dataset, served.source) == (args.dataset, args.source) and served.port > 0
    if not same or (args.version is not None and served.version not in (None, args.version)):
        return None
    host = "127.0.0.1" if served.host in ("0.0.0.0", "::", "") else served.host
    return f"{host}:{served.port}"


def _check_user(settings: Any, dataset: str, user_id: int, source: str) -> Any:
    """The dataset (None when only the database or Milvus knows it, as on a serving machine without
    its files), after checking that it exists and has ``user_id``.

    Raises:
        NotFoundError: the dataset exists neither on disk, nor in the database, nor in Milvus (for
            ``source``), or has no such user.
    """
    from muse.data.format import Dataset, datasets_root
    from muse.data.registry import database_ready
    from muse.errors import NotFoundError

    if (datasets_root(settings) / dataset / "meta.json").exists():
        ds = Dataset.open(settings, dataset)
        users = ds.users().column("user_id").to_numpy()
        if not (users == user_id).any():
            span = f" (its user ids run {users.min()}..{users.max()})" if len(users) else " (it has no users)"
            raise NotFoundError(f"dataset {dataset!r} has no user {user_id}{span}")
        return ds
    if database_ready(settings):
        from sqlalchemy import select

        from muse import models
        from muse.db import session_scope

        with session_scope(settings) as session:
            if session.scalar(select(models.Dataset.id).where(models.Dataset.name == dataset)) is not None:
                return None
    if _has_collections(settings, dataset, source):
        return None  # collections written for a dataset this machine knows nothing else about
    raise NotFoundError(f"dataset {dataset!r} does not exist (neither under {datasets_root(settings)}, nor in the "
                        "database, nor in Milvus); `muse data list` shows the datasets")


def _has_collections(settings: Any, dataset: str, source: str) -> bool:
    """Whether Milvus holds a version of (``dataset``, ``source``); an embedded store that does not
    exist is not created to find out, and one held by another process is left to the search."""
    from pathlib import Path

    from muse.vectorstore import StoreLocked, VectorStore

    if settings.embedded_milvus and not Path(settings.milvus_uri).exists():
        return False
    try:
        with VectorStore(settings) as store:
            return bool(store.versions(dataset, source)) or store.live_version(dataset, source) is not None
    except StoreLocked:
        return True
