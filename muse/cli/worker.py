"""``muse worker``: run a Celery worker of the indexer (encoding on ``gpu``, copying on ``cpu``)."""

from __future__ import annotations

import argparse

POOLS = ("prefork", "solo", "threads")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run an indexer worker (Celery) on the gpu and/or cpu queues",
        description="Consume backfill chunks from the broker (MUSE_BROKER_URL). Encoding runs on the "
        "'gpu' queue (the model loads once per worker process), copying vectors on 'cpu'. "
        "MUSE_QUEUE_PREFIX, when set, is prepended to the queue names.",
    )
    p.add_argument("--queues", default="gpu,cpu", help="comma-separated queues to consume (default: gpu,cpu)")
    p.add_argument("--concurrency", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument("--pool", choices=POOLS, default="prefork", help="Celery pool (default: prefork)")
    p.add_argument("--loglevel", default="INFO", help="Celery log level (default: INFO)")
    p.add_argument("--hostname", default=None, help="worker node name (default: muse-<queues>@<host>)")
    p.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> int:
    import os
    import socket

    from indexer.celery_app import QUEUES, create_app, is_embedded_broker, queue_name
    from muse.errors import ConfigurationError
    from muse.settings import load_settings

    kinds = [q.strip() for q in args.queues.split(",") if q.strip()]
    bad = [q for q in kinds if q not in QUEUES]
    if not kinds or bad:
        raise ConfigurationError(f"--queues {args.queues!r}: unknown {bad or 'empty'}; valid: {', '.join(QUEUES)}")
    if args.concurrency < 1:
        raise ConfigurationError(f"--concurrency must be >= 1, got {args.concurrency}")
    settings = load_settings()
    if settings.embedded_milvus and args.concurrency > 1 and args.pool != "threads":
        raise ConfigurationError(
            f"--concurrency {args.concurrency}: the Milvus Lite file {settings.milvus_uri!r} can be held by "
            "one process only; use --concurrency 1 (or --pool threads) or a Milvus server"
        )
    app = create_app(settings)
    mode = "embedded" if is_embedded_broker(settings) else "server"
    hostname = args.hostname or f"muse-{'-'.join(kinds)}-{mode}-{os.getpid()}@{socket.gethostname()}"
    argv = [
        "worker",
        "--queues", ",".join(queue_name(k) for k in kinds),
        "--concurrency", str(args.concurrency),
        "--pool", args.pool,
        "--loglevel", args.loglevel,
        "--hostname", hostname,
        # Gossip and mingle are cluster chatter nothing here uses.
        "--without-gossip", "--without-mingle",
    ]
    if mode == "embedded":  # the filesystem broker has no fanout exchange for worker heartbeats
        argv.append("--without-heartbeat")
    app.worker_main(argv)
    return 0
