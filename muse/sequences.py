"""Behaviour sequences: each user's item-id sequence (position -> item id), kept beside the
behaviour collection so that a history can be rebuilt by a gather from the item-vector table
without reading 100K vectors from Milvus.

Every behaviour write goes through :meth:`muse.vectorstore.VectorStore.upsert_behaviours`, which
writes the sequence too (same rows, same call), so the backfill and the append path keep both in
step. Writes are idempotent: a sequence is a set of chunks of ``(position, item_id)`` pairs, and a
reader merges them with "last write of a position wins", so a retried chunk changes nothing. Long
chains of chunks are compacted on write (the file store merges at every write).

A chunk (:func:`pack`, format 2) stores a run of positions as its first one and item ids as int32
when they fit: a history of the open Taobao-MM (positions 0..L-1, 64-bit item ids) takes 8 bytes a
behaviour, half of format 1's 16 (which is still read). ``bench/sequences.py`` measures the bytes per
user of each store and extrapolates them to the 9M users of the open data set (docs/scale.md).

Stores (``MUSE_SEQUENCE_URL``):

* ``file`` (default on the embedded deployment): one SQLite file per collection under
  ``MUSE_DATA_DIR/sequences``, a row per user;
* ``redis://host:port/db`` (the server deployment): one Redis list of packed chunks per user;
* ``milvus`` (default when Milvus is a server and no Redis is set): no copy at all, a query of the
  behaviour collection's scalar fields. Always in step, but slower for long histories.

``bench/gsu.py`` measures these (and a PostgreSQL array column) side by side.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import numpy as np

from muse.errors import BackendUnavailable, ConfigurationError, DataError
from muse.settings import Settings

log = logging.getLogger(__name__)

#: Chunks of one user's sequence after which a write compacts them into one.
COMPACT_AFTER = 16
SCHEMES = ("file", "redis", "rediss", "milvus")


#: First 8 bytes of a packed chunk (format 2). As a little-endian int64 it is negative, so it is never
#: the first position of a format-1 chunk (positions are >= 0).
MAGIC = b"MSEQ\x02\x00\x00\xff"
#: Format 2 header: magic, n, bytes per item id (4 or 8), flags, 2 pad bytes, first position.
HEADER = struct.Struct("<8sIBB2xq")
#: Flag: the positions are ``first, first + 1, ..., first + n - 1`` and are not stored.
DENSE = 1
_INT32 = np.iinfo(np.int32)


def pack(positions: np.ndarray, item_ids: np.ndarray) -> bytes:
    """One chunk (format 2): a 24-byte header, the positions only when they are not one run
    ``first .. first + n - 1`` (int64), then the item ids as int32 when they all fit, else int64;
    little-endian. A history (positions 0..L-1) of 64-bit item ids takes 8 bytes a behaviour (format
    1, :func:`pack_v1`, took 16)."""
    pos = np.asarray(positions, np.int64)
    items = np.asarray(item_ids, np.int64)
    n = len(pos)
    first = int(pos[0]) if n else 0
    dense = n == 0 or bool(pos[-1] - first == n - 1 and np.all(pos[1:] - pos[:-1] == 1))
    narrow = n > 0 and int(items.min()) >= _INT32.min and int(items.max()) <= _INT32.max
    parts = [HEADER.pack(MAGIC, n, 4 if narrow else 8, DENSE if dense else 0, first)]
    if not dense:
        parts.append(pos.astype("<i8", copy=False).tobytes())
    parts.append(items.astype("<i4" if narrow else "<i8").tobytes())
    return b"".join(parts)


def pack_v1(positions: np.ndarray, item_ids: np.ndarray) -> bytes:
    """A format-1 chunk: ``n`` int64 positions then ``n`` int64 item ids (read, no longer written)."""
    return np.concatenate([positions, item_ids]).astype("<i8", copy=False).tobytes()


def _parts(raw: bytes) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Positions and item ids of one stored value: a format-1 chunk, or format-2 chunks back to back."""
    if raw[:8] != MAGIC:  # format 1
        a = np.frombuffer(raw, dtype="<i8")
        n = a.shape[0] // 2
        return [a[:n]], [a[n:]]
    pos_parts, item_parts = [], []
    at = 0
    while at + HEADER.size <= len(raw):
        magic, n, width, flags, first = HEADER.unpack_from(raw, at)
        if magic != MAGIC or width not in (4, 8):
            raise DataError(f"a packed sequence chunk is damaged at byte {at} (magic {magic!r}, width {width})")
        at += HEADER.size
        if flags & DENSE:
            pos_parts.append(np.arange(first, first + n, dtype=np.int64))
        else:
            pos_parts.append(np.frombuffer(raw, "<i8", n, at))
            at += 8 * n
        item_parts.append(np.frombuffer(raw, "<i4" if width == 4 else "<i8", n, at))
        at += width * n
    return pos_parts, item_parts


def unpack(chunks: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Merge chunks (either format) into ``(positions, item_ids)`` sorted by position; a position
    written twice keeps its last item."""
    pos_parts: list[np.ndarray] = []
    item_parts: list[np.ndarray] = []
    for raw in chunks:
        p, i = _parts(raw)
        pos_parts += p
        item_parts += i
    if not pos_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
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


def _wal(conn: sqlite3.Connection, wait_s: float = 60.0) -> None:
    """Put the file in WAL mode. Two processes creating the same file can both ask at once, and
    SQLite answers the loser with "database is locked" at once, without its busy handler: retry."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class FileSequences:
    """One SQLite file per collection, ``root/<collection>.sqlite3``: a row per user (the user id as
    the row id, the whole sequence as one packed chunk). A write merges the new behaviours into the
    user's row in one transaction (last write of a position wins, so a retried write changes
    nothing); WAL mode, so readers never wait and writers in several processes take turns.

    A store of 9M users is one file per collection (about 1.2x the packed bytes, ``bench/sequences.py``),
    where the format-1 layout (one file per user under ``root/<collection>/<user % 256>/``) needed 9M
    files and a 4 KiB block for each. Users of that layout are not read: ``VectorStore.user_sequence``
    rebuilds a user missing here from the behaviour collection on first read, and :meth:`drop`
    removes the old folder too."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._open: dict[str, list[sqlite3.Connection]] = {}  # collection -> connections of every thread
        self._generation: dict[str, int] = {}  # bumped by drop: threads reopen that collection
        self._epoch = 0  # bumped by close: threads reopen every collection
        self._pid = os.getpid()

    def path(self, collection: str) -> Path:
        """The collection's file."""
        return self.root / f"{collection}.sqlite3"

    def _conn(self, collection: str, create: bool) -> sqlite3.Connection | None:
        mine = getattr(self._local, "conns", None)
        if mine is None or self._local.pid != os.getpid():  # a new thread, or a forked child
            mine = self._local.conns = {}
            self._local.pid = os.getpid()
        with self._lock:
            if self._pid != os.getpid():  # a forked child never uses (or closes) its parent's connections
                self._open, self._pid = {}, os.getpid()
            generation = (self._epoch, self._generation.get(collection, 0))
        held = mine.get(collection)
        if held is not None and held[0] == generation:
            return held[1]
        path = self.path(collection)
        if not create and not path.exists():
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(path, timeout=60.0, isolation_level=None, check_same_thread=False)
            _wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("CREATE TABLE IF NOT EXISTS seq (user INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        except sqlite3.Error as e:
            raise BackendUnavailable(f"sequence store {path}: {e}") from e
        mine[collection] = (generation, conn)
        with self._lock:
            self._open.setdefault(collection, []).append(conn)
        return conn

    def get(self, collection: str, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        conn = self._conn(collection, create=False)
        row = None if conn is None else conn.execute("SELECT data FROM seq WHERE user = ?", (int(user_id),)).fetchone()
        return unpack([row[0]]) if row is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))

    def write(self, collection: str, user_ids: np.ndarray, positions: np.ndarray, item_ids: np.ndarray) -> None:
        if len(user_ids) == 0:
            return
        conn = self._conn(collection, create=True)
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for user, pos, items in _by_user(user_ids, positions, item_ids):
                    row = conn.execute("SELECT data FROM seq WHERE user = ?", (user,)).fetchone()
                    new = pack(pos, items)
                    if row is not None or len(np.unique(pos)) < len(pos) or np.any(pos[1:] < pos[:-1]):
                        new = pack(*unpack([row[0], new] if row is not None else [new]))
                    conn.execute("INSERT OR REPLACE INTO seq (user, data) VALUES (?, ?)", (user, new))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise BackendUnavailable(f"sequence store {self.path(collection)}: write failed: {e}") from e

    def delete_user(self, collection: str, user_id: int) -> None:
        conn = self._conn(collection, create=False)
        if conn is not None:
            conn.execute("DELETE FROM seq WHERE user = ?", (int(user_id),))

    def drop(self, collection: str) -> None:
        with self._lock:
            self._generation[collection] = self._generation.get(collection, 0) + 1
            conns = self._open.pop(collection, [])
        for conn in conns:
            conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path(collection)}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(self.root / collection, ignore_errors=True)  # the format-1 layout's folder

    def close(self) -> None:
        with self._lock:
            conns = [c for cs in self._open.values() for c in cs]
            self._open.clear()
            self._epoch += 1
        for conn in conns:
            conn.close()


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
    "pack_v1",
    "sequence_url",
    "unpack",
]
