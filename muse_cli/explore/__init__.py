"""``muse explore``: the retrieval explorer, a small read-only web application that shows what each
embedding source retrieves for a user and a target item, side by side (``app.py``: the routes;
``data.py``: what the pages show; ``templates/`` and ``static/``: the HTML and its style).

Flask is imported only when the command runs, so ``muse --help`` stays fast.
"""

from __future__ import annotations

import argparse

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explore",
        help="the retrieval explorer: a read-only web page per user showing each source's top-K side by side",
        description="Serves the explorer (docs/explore.md) on HOST:PORT until interrupted. It only reads: "
                    "data sets, live source versions, the retriever, stored comparisons and runs.",
    )
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 shares "
                        "every data set with whoever can reach the machine)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0 picks a free one and prints it)")
    p.set_defaults(func=_explore)


def _explore(args: argparse.Namespace) -> int:
    import sys

    from muse.errors import ConfigurationError

    if not 0 <= args.port <= 65535:
        raise ConfigurationError(f"--port {args.port} must be in 0..65535")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host}: the explorer shows every data set to anyone who can reach this "
              "address (it has no login)", file=sys.stderr)
    from muse_cli.explore.app import serve

    try:
        serve(args.host, args.port, announce=lambda line: print(line, flush=True))
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise ConfigurationError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    return 0
