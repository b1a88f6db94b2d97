"""Run an indexer worker: ``python -m indexer.worker [--queues gpu,cpu] [--concurrency N] ...``.

A Celery worker of the indexer's app (encoding on the ``gpu`` queue, copying vectors on ``cpu``),
configured from :func:`muse.settings.load_settings`. With a server broker it runs, by default, under
a small supervisor (:func:`supervise`) that starts the Celery worker as a child process and starts it
again when it restarts itself after a broker outage. ``muse worker`` takes the same flags and calls
:func:`run`; :class:`indexer.celery_app.WorkerProcess` starts this module as a subprocess.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)

POOLS = ("prefork", "solo", "threads")
#: Exit code of a supervised Celery child that asks to be started again.
RESTART_EXIT = 75
#: A child that ran at least this long is started again whatever its exit code.
RESTART_AFTER_S = 30.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The worker's flags (shared by ``python -m indexer.worker`` and ``muse worker``)."""
    p.add_argument("--queues", default="gpu,cpu", help="comma-separated queues to consume (default: gpu,cpu)")
    p.add_argument("--concurrency", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument("--pool", choices=POOLS, default="prefork", help="Celery pool (default: prefork)")
    p.add_argument("--loglevel", default="INFO", help="Celery log level (default: INFO)")
    p.add_argument("--hostname", default=None, help="worker node name (default: muse-<queues>@<host>)")
    p.add_argument("--no-supervise", dest="supervise", action="store_false",
                   help="run Celery in this process (default with a server broker: a small supervisor "
                   "runs it as a child and starts it again when it restarts itself after a broker outage)")


def worker_args(queues: str, concurrency: int, pool: str, loglevel: str, hostname: str | None) -> list[str]:
    """The flags that make :func:`main` run a worker with these options."""
    args = ["--queues", queues, "--concurrency", str(concurrency), "--pool", pool, "--loglevel", loglevel]
    return args + (["--hostname", hostname] if hostname else [])


def run(queues: str = "gpu,cpu", concurrency: int = 1, pool: str = "prefork", loglevel: str = "INFO",
        hostname: str | None = None, supervise_child: bool = True) -> int:
    """Check the options, then run the worker (under the supervisor with a server broker unless
    ``supervise_child`` is False). Returns the exit code.

    Raises:
        ConfigurationError: unknown queues, ``concurrency`` below 1, or several processes on one
            Milvus Lite file.
    """
    import os
    import socket

    from indexer.celery_app import QUEUES, create_app, is_embedded_broker, queue_name
    from muse.errors import ConfigurationError
    from muse.settings import load_settings

    kinds = [q.strip() for q in queues.split(",") if q.strip()]
    bad = [q for q in kinds if q not in QUEUES]
    if not kinds or bad:
        raise ConfigurationError(f"--queues {queues!r}: unknown {bad or 'empty'}; valid: {', '.join(QUEUES)}")
    if concurrency < 1:
        raise ConfigurationError(f"--concurrency must be >= 1, got {concurrency}")
    if pool not in POOLS:
        raise ConfigurationError(f"--pool {pool!r} is unknown; valid: {', '.join(POOLS)}")
    settings = load_settings()
    if settings.embedded_milvus and concurrency > 1 and pool != "threads":
        raise ConfigurationError(
            f"--concurrency {concurrency}: the Milvus Lite file {settings.milvus_uri!r} can be held by "
            "one process only; use --concurrency 1 (or --pool threads) or a Milvus server"
        )
    mode = "embedded" if is_embedded_broker(settings) else "server"
    if mode == "server" and supervise_child:
        return supervise(worker_args(queues, concurrency, pool, loglevel, hostname))
    app = create_app(settings)
    hostname = hostname or f"muse-{'-'.join(kinds)}-{mode}-{os.getpid()}@{socket.gethostname()}"
    argv = [
        "worker",
        "--queues", ",".join(queue_name(k, settings.queue_prefix) for k in kinds),
        "--concurrency", str(concurrency),
        "--pool", pool,
        "--loglevel", loglevel,
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


def supervise(args: Sequence[str]) -> int:
    """Run ``python -m indexer.worker --no-supervise ARGS`` as a child and start it again when it asks
    to (the watchdog asks after the broker was unreachable and is back: Celery's Redis consumer can
    stay wedged after a broker restart) or when it dies after a while. SIGTERM/SIGINT are passed on
    and end the supervisor once the child has stopped."""
    import os
    import signal
    import subprocess
    import time

    from indexer.tasks import SUPERVISED_ENV

    argv = [sys.executable, "-m", "indexer.worker", "--no-supervise", *args]
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m indexer.worker``: parse the flags and :func:`run` the worker. Errors of
    configuration are logged in one line and give exit code 2."""
    from muse.errors import MuseError

    parser = argparse.ArgumentParser(prog="python -m indexer.worker", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args.queues, args.concurrency, args.pool, args.loglevel, args.hostname, args.supervise)
    except MuseError as e:
        log.error("error: %s", e)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
