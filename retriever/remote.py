"""``RemoteRetriever``: the GSU client of one or more ``muse serve`` servers, with the methods,
results and errors of the in-process :class:`retriever.client.Retriever`, so that
``Ranker.load(..., retriever=...)`` and user code take either.

>>> with RemoteRetriever(["gsu-0:50051", "gsu-1:50051"]) as r:     # doctest: +SKIP
...     r.prefetch([42])
...     r.search(42, [1001, 1002], k=50)[0].scores

Users are sharded over the servers by rendezvous (highest-random-weight) hashing of the user id:
each user always goes to the same server, and removing a server moves only that server's users.
Every call has a deadline (``timeout_s``, for all attempts together); a server that does not
answer (UNAVAILABLE, deadline exceeded) is retried with exponential backoff until the deadline,
then :class:`~muse.errors.BackendUnavailable` names it. Channels reconnect on their own, so a
restarted server is used again by the same client.

Errors are the in-process client's: the same checks run here before anything is sent
(:func:`retriever.client.check_search_request`, a request over
:data:`~muse.validation.MAX_REQUEST_BYTES`), and an error the server raised comes back as the same
:class:`~muse.errors.MuseError` class with the same message (the class travels in the trailing
metadata, see :mod:`retriever.service`), raised at once: only transport failures are retried.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from muse.errors import BackendUnavailable, ConfigurationError, MuseError, NotFoundError
from muse.validation import check_ids, check_positions, check_request_bytes, check_same_length, check_vectors
from retriever.cache import CacheStats
from retriever.client import SearchResult, _check_user, check_search_request

log = logging.getLogger(__name__)

#: Longest pause between two attempts (a restarting server is tried again within it).
MAX_BACKOFF_S = 0.5
#: Status codes worth another attempt (the server is down, restarting or overloaded).
_RETRIABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


def parse_addresses(raw: str | Sequence[str]) -> list[str]:
    """``"host:port,host:port"`` (``MUSE_GSU_ADDRESSES``) or a list, validated."""
    items = [a.strip() for a in (raw.split(",") if isinstance(raw, str) else raw) if a and a.strip()]
    if not items:
        raise ConfigurationError("MUSE_GSU_ADDRESSES is empty: give host:port of at least one GSU server")
    for a in items:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigurationError(f"GSU server address {a!r} must be host:port")
    if len(set(items)) != len(items):
        raise ConfigurationError(f"GSU server addresses repeat: {items}")
    return items


def rendezvous(user_id: int, addresses: Sequence[str]) -> str:
    """The server of ``user_id``: the address with the highest hash of (address, user)."""

    def weight(addr: str) -> int:
        h = hashlib.blake2b(f"{addr}|{int(user_id)}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big")

    return max(addresses, key=weight)


class RemoteRetriever:
    """GSU retrieval through ``muse serve`` servers (see the module docstring).

    Args:
        addresses: ``host:port`` of each server (a list or a comma-separated string).
        timeout_s: deadline of every call, all retries included.
        retries: most attempts after the first on an unavailable server; None: as many as the
            deadline allows.
        backoff_s: first pause between attempts; doubles each time, up to :data:`MAX_BACKOFF_S`.
        prefetch_timeout_s: deadline of a prefetch that is waited for (loading takes longer).
        store: a :class:`~muse.vectorstore.VectorStore` for callers that read item vectors
            themselves (the ranker does); None: opened from the settings on first use.
        settings: settings for that store.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        timeout_s: float = 5.0,
        retries: int | None = None,
        backoff_s: float = 0.05,
        prefetch_timeout_s: float = 120.0,
        store: Any = None,
        settings: Any = None,
    ) -> None:
        import grpc

        from retriever import gsu_pb2, gsu_pb2_grpc

        if timeout_s <= 0:
            raise ConfigurationError(f"timeout_s must be positive, got {timeout_s}")
        if retries is not None and retries < 0:
            raise ConfigurationError(f"retries must be >= 0, got {retries}")
        self.addresses = parse_addresses(addresses)
        self.timeout_s = float(timeout_s)
        self.retries = retries
        self.backoff_s = float(backoff_s)
        self.prefetch_timeout_s = float(prefetch_timeout_s)
        self.pb = gsu_pb2
        self._grpc = grpc
        options = [
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
            # Come back quickly after a server restart (the defaults back off up to 2 minutes).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0),
        ]
        self._channels = {a: grpc.insecure_channel(a, options=options) for a in self.addresses}
        self._stubs = {a: gsu_pb2_grpc.GsuStub(c) for a, c in self._channels.items()}
        self._store = store
        self._settings = settings
        self._info: dict[str, Any] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any = None, **kwargs: Any) -> RemoteRetriever:
        """Servers from ``MUSE_GSU_ADDRESSES`` (``settings.gsu_addresses``)."""
        from muse.settings import load_settings

        settings = settings or load_settings()
        raw = getattr(settings, "gsu_addresses", "")
        if not raw:
            raise ConfigurationError("MUSE_GSU_ADDRESSES is not set: give host:port of the GSU servers")
        return cls(raw, settings=settings, **kwargs)

    # -- plumbing --------------------------------------------------------------------------------
    def server_of(self, user_id: int) -> str:
        return rendezvous(int(user_id), self.addresses)

    def _call(self, address: str, method: str, request: Any, timeout_s: float | None = None) -> Any:
        check_request_bytes(request.ByteSize(), f"{method} request")
        grpc = self._grpc
        start = time.monotonic()
        deadline = start + (timeout_s or self.timeout_s)  # of the call (a waited prefetch may take long)
        retry_until = start + self.timeout_s  # a server that does not answer is given up on after timeout_s
        pause = self.backoff_s
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            try:
                return getattr(self._stubs[address], method)(request, timeout=max(left, 0.001))
            except grpc.RpcError as e:
                code = e.code()
                details = e.details() or ""
                raised = _server_error(e, details)
                if raised is not None:  # the server's own MuseError: same class, same message
                    raise raised from None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ConfigurationError(details) from None
                if code == grpc.StatusCode.NOT_FOUND:
                    raise NotFoundError(details) from None
                if code.name not in _RETRIABLE:
                    raise MuseError(f"GSU server {address}: {method} failed ({code.name}): {details}") from None
                attempt += 1
                left = min(deadline, retry_until) - time.monotonic()
                if (self.retries is not None and attempt > self.retries) or left <= pause:
                    raise BackendUnavailable(
                        f"GSU server {address} did not answer {method} ({code.name} after {attempt} "
                        f"attempt(s) in {time.monotonic() - start:.1f} s): {details}"
                    ) from None
                log.debug("GSU server %s: %s %s, retrying in %.2f s", address, method, code.name, pause)
                time.sleep(pause)
                pause = min(2 * pause, MAX_BACKOFF_S)

    def _server_info(self) -> dict[str, Any]:
        if self._info is None:
            reply = self._call(self.addresses[0], "Stats", self.pb.StatsRequest())
            self._info = {"source": reply.source, "dataset": reply.dataset, "dim": int(reply.dim), "backend": reply.backend}
        return self._info

    @property
    def dim(self) -> int:
        return int(self._server_info()["dim"])

    @property
    def source(self) -> str:
        return str(self._server_info()["source"])

    @property
    def dataset(self) -> str:
        return str(self._server_info()["dataset"])

    @property
    def version(self) -> int:
        """The source version the (first) server reads now."""
        return int(self._call(self.addresses[0], "Stats", self.pb.StatsRequest()).version)

    @property
    def backend(self) -> str:
        return str(self._server_info()["backend"])

    @property
    def store(self) -> Any:
        """A VectorStore on the settings' Milvus (for item vectors), opened on first use."""
        with self._lock:
            if self._store is None:
                from muse.settings import load_settings
                from muse.vectorstore import VectorStore

                self._store = VectorStore(self._settings or load_settings())
            return self._store

    # -- the Retriever methods -------------------------------------------------------------------
    def search(self, user_id: int, target_item_ids: Sequence[int], k: int = 50) -> SearchResult:
        """As :meth:`retriever.client.Retriever.search`, on the user's server."""
        from retriever.service import reply_to_result

        user, k, ids = check_search_request(user_id, k, target_item_ids)  # the in-process checks and messages
        req = self.pb.SearchRequest(user_id=user, target_item_ids=ids, k=int(k))
        return reply_to_result(self._call(self.server_of(user), "Search", req))

    def search_vectors(self, user_id: int, targets: np.ndarray, k: int = 50) -> SearchResult:
        """As :meth:`retriever.client.Retriever.search_vectors`."""
        from retriever.service import reply_to_result

        user, k, t = check_search_request(user_id, k, targets=targets)  # the width is checked by the server
        req = self.pb.SearchRequest(user_id=user, target_vectors=t.ravel().tolist(), dim=t.shape[1], k=int(k))
        return reply_to_result(self._call(self.server_of(user), "Search", req))

    def prefetch(self, user_ids: Sequence[int]) -> Future:
        """Load the users' histories on their servers; a Future resolving to ``{user_id: history
        length}`` once loaded (as the in-process client's). The calls run in the background."""
        users = [_check_user(u) for u in user_ids]
        by_server: dict[str, list[int]] = {}
        for u in dict.fromkeys(users):
            by_server.setdefault(self.server_of(u), []).append(u)
        out: Future = Future()
        if not by_server:
            out.set_result({})
            return out

        def run() -> None:
            try:
                lengths: dict[int, int] = {}
                for addr, us in by_server.items():
                    req = self.pb.PrefetchRequest(user_ids=us, wait=True)
                    reply = self._call(addr, "Prefetch", req, timeout_s=self.prefetch_timeout_s)
                    lengths.update({int(u): int(n) for u, n in reply.lengths.items()})
                out.set_result({u: lengths.get(u, 0) for u in dict.fromkeys(users)})
            except BaseException as e:  # delivered through the Future
                out.set_exception(e)

        threading.Thread(target=run, name="muse-remote-prefetch", daemon=True).start()
        return out

    def prefetch_nowait(self, user_ids: Sequence[int]) -> int:
        """Queue the users' loads on their servers and return at once; returns users queued."""
        users = [_check_user(u) for u in user_ids]
        by_server: dict[str, list[int]] = {}
        for u in dict.fromkeys(users):
            by_server.setdefault(self.server_of(u), []).append(u)
        return sum(
            int(self._call(a, "Prefetch", self.pb.PrefetchRequest(user_ids=us)).queued) for a, us in by_server.items()
        )

    def append_behaviours(
        self,
        user_id: int,
        positions: Sequence[int],
        item_ids: Sequence[int],
        vectors: np.ndarray | None = None,
    ) -> int:
        """As :meth:`retriever.client.Retriever.append_behaviours`; returns rows written."""
        user = _check_user(user_id)
        pos = check_positions(positions)
        items = check_ids(item_ids, "item_ids")
        v = None if vectors is None else check_vectors(vectors, None, "behaviour vectors", allow_empty=True)
        if v is None:
            check_same_length("append_behaviours", positions=pos, item_ids=items)
        else:
            check_same_length("append_behaviours", positions=pos, item_ids=items, vectors=v)
        req = self.pb.AppendRequest(user_id=user, positions=pos.tolist(), item_ids=items.tolist())
        if v is not None:
            req.vectors.extend(v.ravel().tolist())
            req.dim = int(v.shape[1])
        return int(self._call(self.server_of(user), "AppendBehaviours", req).written)

    def invalidate(self, user_id: int) -> None:
        user = _check_user(user_id)
        self._call(self.server_of(user), "Invalidate", self.pb.InvalidateRequest(user_ids=[user]))

    def server_stats(self) -> dict[str, Any]:
        """Each server's ``StatsReply``, by address."""
        return {a: self._call(a, "Stats", self.pb.StatsRequest()) for a in self.addresses}

    def stats(self) -> CacheStats:
        """Cache counters summed over the servers."""
        replies = list(self.server_stats().values())
        return CacheStats(
            **{
                f: sum(int(getattr(r, f)) for r in replies)
                for f in ("hits", "misses", "loads", "evictions", "entries", "bytes", "capacity_bytes")
            }
        )

    def close(self) -> None:
        for c in self._channels.values():
            c.close()
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> RemoteRetriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _server_error(e: Any, details: str) -> MuseError | None:
    """The MuseError a GSU server reported (its class in the trailing metadata), or None for a
    transport failure or a server that does not say."""
    from retriever.service import ERROR_KEY, error_from

    try:
        metadata = e.trailing_metadata() or ()
    except Exception:  # some RpcErrors (e.g. a channel that never connected) carry none
        return None
    for key, value in metadata:
        if key == ERROR_KEY:
            return error_from(str(value), details)
    return None


__all__ = ["RemoteRetriever", "parse_addresses", "rendezvous"]
