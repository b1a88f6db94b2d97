"""Behaviour sequences: each user's item-id sequence (position -> item id), kept beside the
behaviour collection so that a history can be rebuilt by a gather from the item-vector table
without reading 100K vectors from Milvus.

Every behaviour write goes through :meth:`muse.vectorstore.VectorStore.upsert_behaviours`, which
writes the sequence too (same rows, same call), so the backfill and the append path keep both in
step. Writes are idempotent: a sequence is a set of append-only chunks of ``(position, item_id)``
pairs, and a reader merges them with "last write of a position wins", so a retried chunk changes
nothing. Long chains of chunks are compacted on write.

Stores (``MUSE_SEQUENCE_URL``):

* ``file`` (default on the embedded deployment): one small append-only file per user under
  ``MUSE_DATA_DIR/sequences``;
* ``redis://host:port/db`` (the server deployment): one Redis list of packed int64 chunks per user;
* ``milvus`` (default when Milvus is a server and no Redis is set): no copy at all, a query of the
  behaviour collection's scalar fields. Always in step, but slower for long histories.

``bench/gsu.py`` measures these (and a PostgreSQL array column) side by side.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import numpy as np

from muse.errors import BackendUnavailable, ConfigurationError
from muse.settings import Settings

log = logging.getLogger(__name__)

#: Chunks of one user's sequence after which a write compacts them into one.
COMPACT_AFTER = 16
SCHEMES = ("file", "redis", "rediss", "milvus")


def pack(positions: np.ndarray, item_ids: np.ndarray) -> bytes:
    """One chunk: ``n`` int64 positions then ``n`` int64 item ids, little-endian."""
    return np.concatenate([positions, item_ids]).astype("<i8", copy=False).tobytes()


def unpack(chunks: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Merge chunks into ``(positions, item_ids)`` sorted by position; a position written twice keeps
    its last item."""
    if not chunks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos_parts, item_parts = [], []
    for raw in chunks:
        a = np.frombuffer(raw, dtype="<i8")
        n = a.shape[0] // 2
        pos_parts.append(a[:n])
        item_parts.append(a[n:])
    pos = np.concatenate(pos_parts).astype(np.int64, copy=False)
    items = np.concatenate(item_parts).astype(np.int64, copy=False)
    if pos.shape[0] < 2 or bool(np.all(pos[1:] > pos[:-1])):  # already in order, no rewrites
        return pos.copy(), items.copy()
    # Stable sort by position; among equal positions the last written comes last.
    order = np.argsort(pos, kind="stable")
    pos, items = pos[order], items[order]
    if pos.shape[0] > 1:
        last = np.ones(pos.shape[0], dtype=bool)
        last[:-1] = pos[1:] != pos[:-1]
        if not last.all():
            pos, items = pos[last], items[last]
    return pos, items


class SequenceStore(Protocol):
    """Per-collection item-id sequences of users."""

    def get(self, collection: str, user_id: int) -> tuple[np.ndarray, np.ndarray]: ...

    def write(self, collection: str, user_ids: np.ndarray, positions: np.ndarray, item_ids: np.ndarray) -> None: ...

    def delete_user(self, collection: str, user_id: int) -> None: ...

    def drop(self, collection: str) -> None: ...

    def close(self) -> None: ...


def _by_user(user_ids: np.ndarray, positions: np.ndarray, item_ids: np.ndarray):
    users = np.asarray(user_ids, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.int64)
    items = np.asarray(item_ids, dtype=np.int64)
    if len(users) == 0:
        return
    order = np.argsort(users, kind="stable")
    users, pos, items = users[order], pos[order], items[order]
    cuts = np.flatnonzero(users[1:] != users[:-1]) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(users)], strict=True):
        yield int(users[lo]), pos[lo:hi], items[lo:hi]


class FileSequences:
    """Append-only files under ``root/<collection>/<user % 256>/<user>.seq`` (records: int64 n, then
    the chunk). Writers hold an ``flock`` on the file, so processes sharing the folder may write."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, collection: str, user: int) -> Path:
        return self.root / collection / f"{user % 256:02x}" / f"{user}.seq"

    @staticmethod
    def _records(raw: bytes) -> list[bytes]:
        out, at = [], 0
        while at + 8 <= len(raw):
            n = int(np.frombuffer(raw, dtype="<i8", count=1, offset=at)[0])
            end = at + 8 + 16 * n
            if end > len(raw):  # a torn last record (writer killed mid-write): ignore it
                break
            out.append(raw[at + 8 : end])
            at = end
        return out

    def get(self, collection: str, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            raw = self._path(collection, int(user_id)).read_bytes()
        except FileNotFoundError:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return unpack(self._records(raw))

    def write(self, collection: str, user_ids: np.ndarray, positions: np.ndarray, item_ids: np.ndarray) -> None:
        for user, pos, items in _by_user(user_ids, positions, item_ids):
            path = self._path(collection, user)
            path.parent.mkdir(parents=True, exist_ok=True)
            record = np.asarray([len(pos)], "<i8").tobytes() + pack(pos, items)
            with open(path, "ab+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                fh.write(record)
                fh.flush()
                fh.seek(0)
                chunks = self._records(fh.read())
                if len(chunks) > COMPACT_AFTER:
                    p, i = unpack(chunks)
                    tmp = path.with_suffix(".tmp")
                    tmp.write_bytes(np.asarray([len(p)], "<i8").tobytes() + pack(p, i))
                    os.replace(tmp, path)  # readers see the old or the new file, both complete

    def delete_user(self, collection: str, user_id: int) -> None:
        self._path(collection, int(user_id)).unlink(missing_ok=True)

    def drop(self, collection: str) -> None:
        shutil.rmtree(self.root / collection, ignore_errors=True)

    def close(self) -> None:
        pass


class RedisSequences:
    """One Redis list of packed chunks per user, key ``muse:seq:<collection>:<user>``."""

    def __init__(self, url: str) -> None:
        import redis

        self.url = url
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    @staticmethod
    def _key(collection: str, user: int) -> str:
        return f"muse:seq:{collection}:{user}"

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        import redis

        try:
            return fn(*args)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise BackendUnavailable(f"MUSE_SEQUENCE_URL={self.url!r}: Redis {what} failed: {e}") from e

    def get(self, collection: str, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        return unpack(self._call("LRANGE", self._redis.lrange, self._key(collection, int(user_id)), 0, -1))

    def write(self, collection: str, user_ids: np.ndarray, positions: np.ndarray, item_ids: np.ndarray) -> None:
        pipe = self._redis.pipeline(transaction=False)
        users = []
        for user, pos, items in _by_user(user_ids, positions, item_ids):
            pipe.rpush(self._key(collection, user), pack(pos, items))
            users.append(user)
        lengths = self._call("RPUSH", pipe.execute)
        for user, n in zip(users, lengths, strict=True):
            if n > COMPACT_AFTER:
                self._call("compaction", self._compact, self._key(collection, user))

    def _compact(self, key: str) -> None:
        import redis

        with self._redis.pipeline() as pipe:
            try:
                pipe.watch(key)
                chunks = pipe.lrange(key, 0, -1)
                p, i = unpack(chunks)
                pipe.multi()
                pipe.delete(key)
                pipe.rpush(key, pack(p, i))
                pipe.execute()
            except redis.WatchError:  # another writer appended meanwhile: it compacts next time
                pass

    def delete_user(self, collection: str, user_id: int) -> None:
        self._call("DEL", self._redis.delete, self._key(collection, int(user_id)))

    def drop(self, collection: str) -> None:
        keys = list(self._call("SCAN", self._redis.scan_iter, f"muse:seq:{collection}:*", 1000))
        for start in range(0, len(keys), 1000):
            self._call("DEL", self._redis.delete, *keys[start : start + 1000])

    def close(self) -> None:
        self._redis.close()


class MilvusSequences:
    """No copy: the sequence is read from the behaviour collection's scalar fields on demand."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def get(self, collection: str, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        return self._store.query_sequence(collection, int(user_id))

    def write(self, collection: str, user_ids: np.ndarray, positions: np.ndarray, item_ids: np.ndarray) -> None:
        pass  # the behaviour rows are the sequence

    def delete_user(self, collection: str, user_id: int) -> None:
        pass

    def drop(self, collection: str) -> None:
        pass

    def close(self) -> None:
        pass


def sequence_url(settings: Settings) -> str:
    """The settings' sequence store: ``MUSE_SEQUENCE_URL``, else ``file`` on the embedded deployment
    and ``milvus`` when Milvus is a server (always consistent; set Redis for speed)."""
    url = getattr(settings, "sequence_url", "") or ""
    if url:
        return url
    return "file" if settings.embedded_milvus else "milvus"


def open_sequences(settings: Settings, store: Any) -> SequenceStore:
    """The sequence store the settings name (see :func:`sequence_url`).

    Raises:
        ConfigurationError: an unknown scheme.
    """
    url = sequence_url(settings)
    scheme = urlparse(url).scheme or url
    if scheme == "file":
        path = urlparse(url).path if "://" in url else ""
        return FileSequences(Path(path) if path else settings.path("sequences"))
    if scheme in ("redis", "rediss"):
        return RedisSequences(url)
    if scheme == "milvus":
        return MilvusSequences(store)
    raise ConfigurationError(
        f"MUSE_SEQUENCE_URL={url!r}: unknown store {scheme!r}; valid: file, file:///path, redis://host:port/db, milvus"
    )


__all__ = [
    "COMPACT_AFTER",
    "FileSequences",
    "MilvusSequences",
    "RedisSequences",
    "SequenceStore",
    "open_sequences",
    "pack",
    "sequence_url",
    "unpack",
]
