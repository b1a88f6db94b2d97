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
    p.add_argument("--no-supervise", dest="supervise", action="store_false",
                   help="run Celery in this process (default with a server broker: a small supervisor "
                   "runs it as a child and starts it again when it restarts itself after a broker outage)")
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
    mode = "embedded" if is_embedded_broker(settings) else "server"
    if mode == "server" and args.supervise:
        return _supervise()
    app = create_app(settings)
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
    from indexer import tasks

    try:
        app.worker_main(argv)
    except SystemExit:
        if tasks.restart_requested.is_set():
            return RESTART_EXIT
        raise
    return RESTART_EXIT if tasks.restart_requested.is_set() else 0


#: Exit code of a supervised Celery child that asks to be started again.
RESTART_EXIT = 75
#: A child that ran at least this long is started again whatever its exit code.
RESTART_AFTER_S = 30.0


def _supervise() -> int:
    """Run ``muse worker --no-supervise`` as a child and start it again when it asks to (the
    watchdog asks after the broker was unreachable and is back: Celery's Redis consumer can stay
    wedged after a broker restart) or when it dies after a while. SIGTERM/SIGINT are passed on and
    end the supervisor once the child has stopped."""
    import logging
    import os
    import signal
    import subprocess
    import sys
    import time

    from indexer.tasks import SUPERVISED_ENV

    log = logging.getLogger(__name__)
    argv = [sys.executable, "-m", "muse_cli", "worker", "--no-supervise", *sys.argv[sys.argv.index("worker") + 1:]]
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        started = time.monotonic()
        child = subprocess.Popen(argv, env={**os.environ, SUPERVISED_ENV: "1"})
        code = child.wait()
        while code is None:  # pragma: no cover - wait() returns the code
            code = child.wait()
        if stopping:
            return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
        ran = time.monotonic() - started
        if code != RESTART_EXIT and ran < RESTART_AFTER_S:
            return code
        log.warning("worker child exited with %s after %.0f s; starting it again", code, ran)
        time.sleep(1.0)
