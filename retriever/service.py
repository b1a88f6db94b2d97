"""The GSU retrieval service: ``muse serve`` runs one :class:`GsuServer` per shard of users.

The server owns one in-process :class:`retriever.client.Retriever` on the cache backend: the source's
item-vector table once on its device and a byte-bounded LRU of users' histories (rows of that
table). Ranking processes on any machine share it through
:class:`retriever.remote.RemoteRetriever`, which has the same methods, results and errors.

RPCs (``retriever/gsu.proto``): Prefetch, Search, AppendBehaviours, Invalidate, Stats, plus the
standard ``grpc.health.v1`` health service. Every :class:`~muse.errors.MuseError` maps to a status,
with the in-process message as the details and the class name in the trailing metadata
(``muse-error``), so :class:`retriever.remote.RemoteRetriever` raises the same class and message:
:class:`~muse.errors.ConfigurationError` (bad input) -> INVALID_ARGUMENT,
:class:`~muse.errors.NotFoundError` -> NOT_FOUND, :class:`~muse.errors.DataError` ->
FAILED_PRECONDITION, :class:`~muse.errors.BackendUnavailable` (Milvus, Redis, a missed deadline)
-> UNAVAILABLE, another ``MuseError`` -> UNKNOWN, anything else -> INTERNAL (logged with its
traceback). Requests larger than :data:`~muse.validation.MAX_REQUEST_BYTES` are refused by gRPC.

**Health means ready**: the server answers health checks from the start, NOT_SERVING until its
item table is loaded (whatever loads it: :meth:`GsuServer.start`'s ``prepare``) and its kernels are
warmed on every RPC thread; only then SERVING. RPCs that arrive before are refused with
UNAVAILABLE ("starting"), which ``RemoteRetriever`` retries within its deadline.

Prometheus metrics are served on their own HTTP port: ``muse_gsu_requests_total{method,code}``,
``muse_gsu_request_seconds{method}`` (histogram), ``muse_gsu_cache_{hits,misses,loads,evictions}_total``,
``muse_gsu_cache_{entries,bytes,capacity_bytes}``, ``muse_gsu_item_table_{rows,bytes}`` and
``muse_gsu_prefetch_queue`` (users queued or loading).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

from muse.errors import BackendUnavailable, ConfigurationError, DataError, MuseError, NotFoundError

log = logging.getLogger(__name__)

SERVICE_NAME = "muse.gsu.v1.Gsu"
PROTO = Path(__file__).with_name("gsu.proto")
#: Largest gRPC reply (a 100-target reply of k = 16384 stays below it); requests are bounded by
#: :data:`muse.validation.MAX_REQUEST_BYTES`.
MAX_MESSAGE_BYTES = 64 << 20
#: Trailing-metadata key carrying the class name of a MuseError.
ERROR_KEY = "muse-error"


def _error_classes() -> dict[str, type[MuseError]]:
    from muse.deadlines import DeadlineExceeded

    classes = (MuseError, ConfigurationError, NotFoundError, DataError, BackendUnavailable, DeadlineExceeded)
    return {c.__name__: c for c in classes}


def error_name(exc: BaseException) -> str:
    """The name of the nearest class of ``exc`` that a client can raise again (by :data:`ERROR_KEY`)."""
    classes = _error_classes()
    for cls in type(exc).__mro__:
        if cls.__name__ in classes and classes[cls.__name__] is cls:
            return cls.__name__
    return ConfigurationError.__name__ if isinstance(exc, ValueError) else "MuseError"


def error_from(name: str, message: str) -> MuseError | None:
    """The MuseError of class ``name`` (as sent in :data:`ERROR_KEY`) with ``message``; None for an
    unknown name."""
    cls = _error_classes().get(name)
    return None if cls is None else cls(message)


def regenerate(out_dir: Path) -> list[Path]:
    """Run ``grpc_tools.protoc`` on :data:`PROTO` into ``out_dir/retriever/`` (needs grpcio-tools);
    returns the generated files. The committed ``gsu_pb2*.py`` are this function's output."""
    from grpc_tools import protoc

    root = PROTO.parent.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(
        ["protoc", f"-I{root}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", str(PROTO.relative_to(root))]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
    return [out_dir / "retriever" / "gsu_pb2.py", out_dir / "retriever" / "gsu_pb2_grpc.py"]


def _status_of(exc: BaseException) -> Any:
    import grpc

    if isinstance(exc, (ConfigurationError, ValueError)) and not isinstance(exc, DataError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, DataError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, BackendUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, MuseError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.INTERNAL


class _Metrics:
    """The server's Prometheus registry (one per server, so several may live in one process)."""

    def __init__(self, retriever: Any, queue: Callable[[], int]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "muse_gsu_requests", "GSU RPCs served", ["method", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "muse_gsu_request_seconds",
            "GSU RPC latency",
            ["method"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            registry=self.registry,
        )

        class CacheCollector:
            def collect(self) -> Iterator[Any]:
                st = retriever.stats()
                if st is not None:
                    for name in ("hits", "misses", "loads", "evictions"):
                        yield CounterMetricFamily(f"muse_gsu_cache_{name}", f"history cache {name}", value=getattr(st, name))
                    for name in ("entries", "bytes", "capacity_bytes"):
                        yield GaugeMetricFamily(f"muse_gsu_cache_{name}", f"history cache {name}", value=getattr(st, name))
                table = retriever.item_table
                yield GaugeMetricFamily("muse_gsu_item_table_rows", "items in the device item table",
                                        value=len(table) if table is not None else 0)
                yield GaugeMetricFamily("muse_gsu_item_table_bytes", "device bytes of the item table",
                                        value=table.device_bytes if table is not None else 0)
                yield GaugeMetricFamily("muse_gsu_prefetch_queue", "users queued or loading", value=queue())

        self.registry.register(CacheCollector())

    def serve(self, port: int, host: str) -> Any:
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


class GsuServicer:
    """The RPC handlers over one :class:`~retriever.client.Retriever` (see the module docstring)."""

    def __init__(self, retriever: Any, dataset: str | None = None, max_concurrent_searches: int | None = None) -> None:
        import os

        from retriever import gsu_pb2

        self.pb = gsu_pb2
        # Searches running at once: more than the cores only thrash (each product already uses
        # torch's intra-op threads) and each running search holds a gather buffer.
        self._searches = threading.BoundedSemaphore(max_concurrent_searches or max(2, os.cpu_count() or 2))
        self.retriever = retriever
        self.dataset = dataset or ""
        self._queued = 0
        self._queue_lock = threading.Lock()
        self.metrics = _Metrics(retriever, lambda: self._queued)
        #: Set once the item table is loaded and the kernels warmed (health SERVING).
        self.ready = threading.Event()
        self.starting = "loading its item table"  # what a request before ``ready`` is told

    # -- plumbing --------------------------------------------------------------------------------
    def _run(self, method: str, context: Any, fn: Callable[[], Any], before_ready: bool = False) -> Any:
        import grpc

        t0 = time.perf_counter()
        status, message, name = None, "", None
        try:
            if not before_ready and not self.ready.is_set():
                status = grpc.StatusCode.UNAVAILABLE
                message = f"the GSU server is starting ({self.starting}); not ready yet"
            else:
                return fn()
        except MuseError as e:
            status, message, name = _status_of(e), str(e), error_name(e)
        except ValueError as e:  # numpy/torch conversions of bad input
            status, message, name = grpc.StatusCode.INVALID_ARGUMENT, str(e), ConfigurationError.__name__
        except Exception as e:
            log.exception("%s failed", method)
            status, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
        finally:
            self.metrics.requests.labels(method, "OK" if status is None else status.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - t0)
        if name is not None:
            context.set_trailing_metadata(((ERROR_KEY, name),))
        context.abort(status, message)

    def _track(self, fut: Any, n: int) -> Any:
        with self._queue_lock:
            self._queued += n

        def done(f: Any) -> None:
            with self._queue_lock:
                self._queued -= n
            if not f.cancelled() and f.exception() is not None:
                log.warning("prefetch failed: %s", f.exception())

        fut.add_done_callback(done)
        return fut

    # -- RPCs ------------------------------------------------------------------------------------
    def Prefetch(self, request: Any, context: Any) -> Any:
        def run() -> Any:
            users = list(request.user_ids)
            fut = self._track(self.retriever.prefetch(users), len(users))
            if not request.wait:
                return self.pb.PrefetchReply(queued=len(users))
            lengths = fut.result()
            return self.pb.PrefetchReply(queued=len(users), lengths={int(u): int(n) for u, n in lengths.items()})

        return self._run("Prefetch", context, run)

    def Search(self, request: Any, context: Any) -> Any:
        def run() -> Any:
            k = int(request.k)
            if len(request.target_vectors):
                dim = int(request.dim)
                flat = np.asarray(request.target_vectors, dtype=np.float32)
                if dim <= 0 or flat.shape[0] % dim:
                    raise ConfigurationError(
                        f"targets must be [B, {self.retriever.dim}], got {flat.shape[0]} values for dim {dim}"
                    )
                with self._searches:
                    res = self.retriever.search_vectors(request.user_id, flat.reshape(-1, dim), k=k)
            else:
                with self._searches:
                    res = self.retriever.search(request.user_id, list(request.target_item_ids), k=k)
            return result_to_reply(self.pb, res)

        return self._run("Search", context, run)

    def AppendBehaviours(self, request: Any, context: Any) -> Any:
        def run() -> Any:
            vectors = None
            if len(request.vectors):
                dim = int(request.dim) or self.retriever.dim
                flat = np.asarray(request.vectors, dtype=np.float32)
                if flat.shape[0] % dim:
                    raise ConfigurationError(
                        f"append_behaviours: {flat.shape[0]} vector values do not split into rows of {dim}"
                    )
                vectors = flat.reshape(-1, dim)
            n = self.retriever.append_behaviours(
                request.user_id, list(request.positions), list(request.item_ids), vectors
            )
            return self.pb.AppendReply(written=int(n))

        return self._run("AppendBehaviours", context, run)

    def Invalidate(self, request: Any, context: Any) -> Any:
        def run() -> Any:
            for u in request.user_ids:
                self.retriever.invalidate(int(u))
            return self.pb.InvalidateReply()

        return self._run("Invalidate", context, run)

    def Stats(self, request: Any, context: Any) -> Any:
        def run() -> Any:
            st = self.retriever.stats()
            table = self.retriever.item_table
            fields = {}
            if st is not None:
                fields = {f: getattr(st, f) for f in ("hits", "misses", "loads", "evictions", "entries", "bytes", "capacity_bytes")}
            return self.pb.StatsReply(
                **fields,
                item_table_rows=len(table) if table is not None else 0,
                item_table_bytes=table.device_bytes if table is not None else 0,
                prefetch_queue=self._queued,
                source=self.retriever.source,
                dataset=self.retriever.dataset,
                dim=self.retriever.dim,
                backend=self.retriever.backend,
                version=self.retriever.version,
            )

        return self._run("Stats", context, run, before_ready=True)


def result_to_reply(pb: Any, res: Any) -> Any:
    """A :class:`~retriever.client.SearchResult` as a ``SearchReply``."""
    targets = [
        pb.TargetHits(
            has_item_id=t.item_id is not None,
            item_id=int(t.item_id) if t.item_id is not None else 0,
            behaviour_item_ids=t.behaviour_item_ids.tolist(),
            positions=t.positions.tolist(),
            scores=t.scores.tolist(),
            simtier=t.simtier.tolist(),
        )
        for t in res.targets
    ]
    return pb.SearchReply(
        user_id=res.user_id,
        found=res.found,
        backend=res.backend,
        k=res.k,
        targets=targets,
        history_length=-1 if res.history_length is None else int(res.history_length),
        dataset=res.dataset,
        source=res.source,
        version=int(res.version),
    )


def reply_to_result(reply: Any) -> Any:
    """A ``SearchReply`` as a :class:`~retriever.client.SearchResult` (same dtypes as in process)."""
    from retriever.client import SearchResult, TargetHits

    targets = tuple(
        TargetHits(
            int(t.item_id) if t.has_item_id else None,
            np.asarray(t.behaviour_item_ids, dtype=np.int64),
            np.asarray(t.positions, dtype=np.int64),
            np.asarray(t.scores, dtype=np.float32),
            np.asarray(t.simtier, dtype=np.float32),
        )
        for t in reply.targets
    )
    return SearchResult(
        int(reply.user_id),
        bool(reply.found),
        reply.backend,
        int(reply.k),
        targets,
        None if reply.history_length < 0 else int(reply.history_length),
        reply.dataset,
        reply.source,
        int(reply.version),
    )


class GsuServer:
    """A running GSU gRPC server (and its metrics HTTP server) over one retriever.

    Args:
        retriever: a :class:`~retriever.client.Retriever` (closed by :meth:`stop`).
        port: gRPC port (0: pick a free one; see :attr:`port`).
        metrics_port: Prometheus HTTP port (0: pick one; None: no metrics server).
        host: address to bind.
        workers: RPC threads.
        max_concurrent_searches: searches run at once (default: the CPU count, at least 2).
    """

    def __init__(
        self,
        retriever: Any,
        port: int = 50051,
        metrics_port: int | None = 0,
        host: str = "127.0.0.1",
        workers: int = 16,
        dataset: str | None = None,
        max_concurrent_searches: int | None = None,
    ) -> None:
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from muse.validation import MAX_REQUEST_BYTES
        from retriever import gsu_pb2_grpc

        self.retriever = retriever
        self.servicer = GsuServicer(retriever, dataset, max_concurrent_searches)
        self.workers = int(workers)
        self.ready_s: float | None = None  # start-up seconds until SERVING
        self._executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="muse-gsu")
        self._server = grpc.server(
            self._executor,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        gsu_pb2_grpc.add_GsuServicer_to_server(self.servicer, self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        bound = self._server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise ConfigurationError(f"cannot bind the GSU server to {host}:{port} (port in use?)")
        self.host, self.port = host, bound
        self._health_pb2 = health_pb2
        self._metrics_server = None
        self.metrics_port: int | None = None
        if metrics_port is not None:
            self._metrics_server = self.servicer.metrics.serve(metrics_port, host)
            self.metrics_port = int(self._metrics_server.server_address[1])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, prepare: Callable[[], Any] | None = None, warm: bool = True) -> GsuServer:
        """Start answering, then get ready and only then report SERVING (the readiness gate).

        Health checks answer NOT_SERVING from the first moment, and other RPCs UNAVAILABLE
        ("starting"), while ``prepare()`` runs (whatever loads the item table: from Milvus, from a
        local file) and then, with ``warm``, the search kernels are run once on every RPC thread
        (:meth:`warm_up`). If ``prepare`` raises, the server is stopped and the error propagates.
        """
        not_serving = self._health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, not_serving)
        self._server.start()
        t0 = time.perf_counter()
        try:
            if prepare is not None:
                self.servicer.starting = "loading its item table"
                prepare()
            if warm:
                self.servicer.starting = "warming its kernels"
                self.warm_up()
        except BaseException:
            self._server.stop(0).wait()
            raise
        self.servicer.ready.set()
        for name in ("", SERVICE_NAME):
            self.health.set(name, self._health_pb2.HealthCheckResponse.SERVING)
        self.ready_s = time.perf_counter() - t0
        log.info("GSU server on %s (metrics on %s): SERVING after %.2f s of start-up", self.address,
                 self.metrics_port, self.ready_s)
        return self

    def warm_up(self, timeout_s: float = 60.0) -> float:
        """Run the retriever's kernels (:meth:`retriever.client.Retriever.warm_up`) once on each of
        the server's RPC threads, so that no request pays a first call (torch's, a thread's scratch
        buffers, the kernels' once-per-process choices); returns seconds."""
        t0 = time.perf_counter()
        warm = getattr(self.retriever, "warm_up", None)
        if warm is None:
            return 0.0
        # One task per RPC thread: each waits until all have started, so they land on distinct threads.
        barrier = threading.Barrier(self.workers)

        def one() -> None:
            try:
                barrier.wait(timeout=timeout_s)
            except threading.BrokenBarrierError:
                pass
            warm()

        for f in [self._executor.submit(one) for _ in range(self.workers)]:
            f.result(timeout=timeout_s)
        took = time.perf_counter() - t0
        log.info("warmed the kernels on %d RPC threads in %.2f s", self.workers, took)
        return took

    def wait(self) -> None:
        self._server.wait_for_termination()

    def stop(self, grace_s: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self._server.stop(grace_s).wait()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.retriever.close()


def serve(
    source: str,
    dataset: str,
    version: int | None = None,
    port: int = 50051,
    metrics_port: int | None = 9108,
    cache_bytes: int | None = None,
    host: str = "0.0.0.0",
    storage_dtype: str | None = None,
    settings: Any = None,
    preload_items: bool = True,
    warm_up: bool = True,
) -> GsuServer:
    """Build and start a server for ``dataset``/``source`` (the live version unless ``version`` pins
    one). With ``preload_items`` the item table is filled before the server reports SERVING, so that no
    prefetch waits for item vectors: from the version's table file, or, for a version without one,
    from one scan of its Milvus item collection written to that file when the dataset's folder is on
    this machine (see :mod:`retriever.item_table`); otherwise items load on demand. It reports SERVING
    (and returns) once that is done and, with ``warm_up``, the kernels ran on every RPC thread.

    Raises:
        NotFoundError: no collections or no live version for (dataset, source). ConfigurationError: bad options.
    """
    from muse.settings import load_settings
    from retriever.client import Retriever

    settings = settings or load_settings()
    cache: dict[str, Any] = {}
    if cache_bytes is not None:
        cache["capacity_bytes"] = int(cache_bytes)
    if storage_dtype:
        cache["storage_dtype"] = storage_dtype
    retriever = Retriever.from_settings(source, settings, dataset=dataset, version=version, backend="cache", cache=cache)
    try:
        server = GsuServer(retriever, port=port, metrics_port=metrics_port, host=host, dataset=dataset)
        # The readiness gate: SERVING only once the item table is loaded and the kernels warmed.
        return server.start(
            prepare=(lambda: retriever.load_item_table(scan_milvus=True)) if preload_items else None, warm=warm_up
        )
    except BaseException:
        retriever.close()
        raise


__all__ = [
    "ERROR_KEY", "GsuServer", "GsuServicer", "PROTO", "SERVICE_NAME", "error_from", "error_name",
    "regenerate", "serve",
]
