"""``muse db``: migrate and inspect the metadata database."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="metadata database migrations")
    dsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = dsub.add_parser("upgrade", help="migrate the database to a revision (default: head)")
    up.add_argument("revision", nargs="?", default="head", help="Alembic revision id (default: head, the newest)")
    up.set_defaults(func=_upgrade)
    down = dsub.add_parser("downgrade", help="migrate the database down to a revision")
    down.add_argument("revision", help="Alembic revision id to go down to (base: empty database)")
    down.set_defaults(func=_downgrade)
    cur = dsub.add_parser("current", help="print the database's revision and the head")
    cur.set_defaults(func=_current)


def _upgrade(args: argparse.Namespace) -> int:
    from muse import db
    from muse.settings import load_settings

    settings = load_settings()
    db.upgrade(settings, args.revision)
    print(f"database at {db.current_revision(settings)} ({settings.database_url})")
    return 0


def _downgrade(args: argparse.Namespace) -> int:
    from muse import db
    from muse.settings import load_settings

    settings = load_settings()
    db.downgrade(settings, args.revision)
    print(f"database at {db.current_revision(settings) or 'base'}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from muse import db
    from muse.settings import load_settings

    settings = load_settings()
    head = db.head_revision(settings)
    if db.database_missing(settings):  # said, not created
        print(f"current: none (no database at {db.sqlite_file(settings.database_url)} yet)\nhead:    {head}\n"
              "behind: run `muse db upgrade` to create it")
        return 0
    cur = db.current_revision(settings)
    state = "up to date" if cur == head else "behind: run `muse db upgrade`"
    print(f"current: {cur or 'base (empty)'}\nhead:    {head}\n{state}")
    return 0
