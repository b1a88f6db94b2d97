"""The Celery app of the indexer, built from :class:`muse.settings.Settings`.

Two queues: ``gpu`` (encoding items; one long task at a time per process: prefetch 1, ``acks_late``)
and ``cpu`` (copying item vectors to behaviours, imports, bookkeeping). The broker is
``MUSE_BROKER_URL``; the embedded default is kombu's ``filesystem://`` transport with its folders
under ``settings.broker_dir``, which needs no server. There is no result backend: the state of a
job lives in the ``backfill_jobs``/``backfill_chunks`` tables.

``settings.queue_prefix`` (``MUSE_QUEUE_PREFIX``, optional) is prepended to both queue names, so that
several deployments (or tests) can share one broker without taking each other's messages.

``celery -A indexer.celery_app worker`` works too: the module attribute ``app`` is built lazily from
the environment.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from celery import Celery

from muse.settings import Settings, load_settings

log = logging.getLogger(__name__)

#: Queue names (before ``settings.queue_prefix``).
GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"
QUEUES = (GPU_QUEUE, CPU_QUEUE)
#: Task names (stable strings, so producers never import the task module).
ENCODE_TASK = "muse.indexer.encode_items_chunk"
BEHAVIOURS_TASK = "muse.indexer.copy_behaviours_chunk"
IMPORT_TASK = "muse.indexer.import_vectors_chunk"
#: How long a redis/amqp broker keeps an unacknowledged message before redelivering it (seconds).
VISIBILITY_TIMEOUT_S = 3600
#: AMQP heartbeat (seconds): a worker notices a broker that went away and reconnects.
BROKER_HEARTBEAT_S = 10


def queue_name(kind: str, prefix: str = "") -> str:
    """The broker queue for ``kind`` (``gpu``/``cpu``) with ``prefix`` (``settings.queue_prefix``) applied."""
    if kind not in QUEUES:
        from muse.errors import ConfigurationError

        raise ConfigurationError(f"unknown queue {kind!r}; valid: {', '.join(QUEUES)}")
    return f"{prefix}{kind}"


def _prefix(settings: Settings, queue_prefix: str | None) -> str:
    """``queue_prefix`` if given, else the settings' (``MUSE_QUEUE_PREFIX``, empty when unset)."""
    return settings.queue_prefix if queue_prefix is None else queue_prefix


def is_embedded_broker(settings: Settings) -> bool:
    """True for the filesystem broker of the embedded deployment (the CLI runs its own worker)."""
    return settings.broker_url.startswith("filesystem://")


def broker_url(settings: Settings) -> str:
    """The broker URL Celery is given: the settings' own, except that the embedded ``filesystem://``
    gets a host (``filesystem://localhost/``). The filesystem transport ignores the host, but kombu
    warns "No hostname was supplied. Reverting to default 'localhost'" for every connection without
    one, which the embedded backfill printed."""
    url = settings.broker_url
    if is_embedded_broker(settings) and url.rstrip("/") == "filesystem:":
        return "filesystem://localhost/"
    return url


def broker_transport_options(settings: Settings, queue_prefix: str | None = None) -> dict[str, Any]:
    """Transport options for the configured broker: folders for ``filesystem://``; for Redis the
    redelivery timeout and, with a queue prefix, the same prefix on every key."""
    if is_embedded_broker(settings):
        root = settings.broker_dir.absolute()
        queue_dir = root / "queue"
        processed = root / "processed"
        control = root / "control"
        for d in (queue_dir, processed, control):
            d.mkdir(parents=True, exist_ok=True)
        # Producer and consumer share one folder: messages are written to and read from it.
        return {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "processed_folder": str(processed),
            "control_folder": str(control),
            "store_processed": False,
            "polling_interval": 0.05,
        }
    if settings.broker_url.startswith(("redis://", "rediss://")):
        options: dict[str, Any] = {
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            # Notice a dead or restarted Redis within seconds instead of blocking on a dead socket.
            "socket_keepalive": True,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "health_check_interval": 10,
            "retry_on_timeout": True,
        }
        prefix = _prefix(settings, queue_prefix)
        if prefix:
            options["global_keyprefix"] = prefix  # unacked and binding keys too, not only the queues
        return options
    return {}


def celery_config(settings: Settings, queue_prefix: str | None = None) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (a plain dict, easy to inspect and test)."""
    from kombu import Exchange, Queue

    prefix = _prefix(settings, queue_prefix)
    gpu, cpu = queue_name(GPU_QUEUE, prefix), queue_name(CPU_QUEUE, prefix)
    exchange = Exchange(f"{prefix}muse", type="direct")
    return {
        "broker_url": broker_url(settings),
        "broker_transport_options": broker_transport_options(settings, queue_prefix),
        "broker_connection_retry_on_startup": True,
        # A restarted broker is reconnected to, forever, with AMQP heartbeats noticing a dead peer.
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        "broker_channel_error_retry": True,
        "broker_heartbeat": BROKER_HEARTBEAT_S,
        "broker_pool_limit": 4,
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 10, "interval_start": 0.5, "interval_step": 1.0,
                                      "interval_max": 5.0},
        "result_backend": None,  # job state lives in the database
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_queues": (Queue(gpu, exchange, routing_key=gpu), Queue(cpu, exchange, routing_key=cpu)),
        "task_default_queue": cpu,
        "task_default_exchange": exchange.name,
        "task_default_routing_key": cpu,
        "task_routes": {
            ENCODE_TASK: {"queue": gpu},
            BEHAVIOURS_TASK: {"queue": cpu},
            IMPORT_TASK: {"queue": cpu},
        },
        # Reliability: a chunk is acknowledged only once written; a killed worker's chunk is redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # No remote control or events: nothing needs them, and the filesystem broker has no fanout.
        "worker_enable_remote_control": False,
        "worker_send_task_events": False,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


def create_app(settings: Settings | None = None, queue_prefix: str | None = None) -> Celery:
    """A Celery app for ``settings`` (default: read from the environment) with the indexer's tasks.

    The settings travel on the app (``app.muse_settings``) so tasks use the same ones as the
    producer that built it.
    """
    settings = load_settings() if settings is None else settings
    app = Celery("muse", include=["indexer.tasks"])
    app.conf.update(celery_config(settings, queue_prefix))
    app.muse_settings = settings  # type: ignore[attr-defined]
    return app


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """Build the module-level ``app`` on first access (``celery -A indexer.celery_app``)."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- worker subprocesses ------------------------------------------------------------------------------
def settings_env(settings: Settings) -> dict[str, str]:
    """``MUSE_*`` variables that make a child process load exactly ``settings``."""
    import json

    from muse.settings import ENV_VARS

    env: dict[str, str] = {}
    for var, name in ENV_VARS.items():
        value = getattr(settings, name)
        if name == "data_dir":
            value = str(Path(value).absolute())
        elif isinstance(value, dict):
            value = json.dumps(value)
        env[var] = str(value)
    return env


def worker_command(
    queues: tuple[str, ...] | list[str] = QUEUES,
    concurrency: int = 1,
    pool: str = "prefork",
    loglevel: str = "INFO",
) -> list[str]:
    """The command line of an indexer worker subprocess run by this interpreter (:mod:`indexer.worker`)."""
    from indexer.worker import worker_args

    return [sys.executable, "-m", "indexer.worker", *worker_args(",".join(queues), concurrency, pool, loglevel, None)]


class WorkerProcess:
    """An indexer worker subprocess (``python -m indexer.worker``, as ``muse worker`` runs) with the given settings, in its own process group.

    ``stop()`` asks for a warm shutdown (SIGTERM: the running chunk finishes) and kills the group
    after ``timeout``; ``kill()`` sends SIGKILL to the whole group at once (as a crash would).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        queues: tuple[str, ...] | list[str] = QUEUES,
        concurrency: int = 1,
        pool: str = "prefork",
        extra_env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.settings = settings
        self.cmd = worker_command(queues, concurrency, pool)
        self.env = {**os.environ, **settings_env(settings), **(extra_env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        out: Any = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        log.info("started worker pid %d: %s", self.proc.pid, " ".join(self.cmd))
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes, as if the machine lost them."""
        self._signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int | None:
        """Warm shutdown; SIGKILL after ``timeout`` seconds. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in %.0fs; killing it", self.proc.pid, timeout)
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=30)
        # Pool processes or a Milvus Lite server left in the group go too.
        self._signal_group(signal.SIGKILL)
        return self.proc.returncode

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
