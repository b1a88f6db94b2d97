"""``muse worker``: run a Celery worker of the indexer (encoding on ``gpu``, copying on ``cpu``).

The worker itself is :mod:`indexer.worker` (``python -m indexer.worker`` takes the same flags).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from indexer.worker import add_arguments

    p = sub.add_parser(
        "worker",
        help="run an indexer worker (Celery) on the gpu and/or cpu queues",
        description="Consume backfill chunks from the broker (MUSE_BROKER_URL). Encoding runs on the "
        "'gpu' queue (the model loads once per worker process), copying vectors on 'cpu'. "
        "MUSE_QUEUE_PREFIX, when set, is prepended to the queue names.",
    )
    add_arguments(p)
    p.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> int:
    from indexer.worker import run

    return run(args.queues, args.concurrency, args.pool, args.loglevel, args.hostname, args.supervise)
