"""Entry point of the ``muse`` console script."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from muse import __version__
from muse.errors import MuseError

#: Modules under ``muse_cli`` that each add one command group through ``register(subparsers)``.
COMMAND_MODULES = ("db", "data", "embed", "worker", "backfill", "source", "retrieve", "serve", "rank", "quickstart",
                   "explore")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muse",
        description="Lifelong user-interest retrieval with multimodal embeddings (MUSE).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv: debug); tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"muse_cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `--nproc N` starts this command line again
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MuseError as e:
        _explain(args, f"error: {e}")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = database_error_message(e)
        if message is None:
            raise
        _explain(args, f"error: {message}")
        return 2


def _explain(args: argparse.Namespace, line: str) -> None:
    """One sentence on stderr; with -v also the traceback of the exception being handled."""
    if args.verbose:
        import traceback

        traceback.print_exc()
    print(line, file=sys.stderr)


def database_error_message(exc: BaseException) -> str | None:
    """One sentence for a SQLAlchemy error (None for any other exception).

    A missing table or column means the database is not migrated (or is behind the code): the sentence
    says to run ``muse db upgrade``. The URL is shown without its password.
    """
    if not type(exc).__module__.startswith("sqlalchemy"):
        return None
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    url = _database_url()
    where = f"the database {url}" if url else "the database"
    from muse.db import schema_missing

    if schema_missing(exc):
        return f"{where} is not migrated to this version ({first}); run `muse db upgrade`"
    return f"{where} failed: {first}"


def _database_url() -> str | None:
    try:
        from sqlalchemy.engine import make_url

        from muse.settings import load_settings

        return make_url(load_settings().database_url).render_as_string(hide_password=True)
    except Exception:  # the settings themselves may be what is broken
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
