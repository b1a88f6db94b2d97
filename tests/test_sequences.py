"""The users' item-id sequences at full size (muse.sequences): the packed chunk format (a history of
64-bit ids in 8 bytes a behaviour, format-1 chunks still read), the file store as one SQLite file
per collection written by several processes at once, and format-1 Redis lists read and compacted."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest

from muse.errors import DataError
from muse.sequences import HEADER, FileSequences, pack, pack_v1, unpack


def test_packed_chunks_are_compact_and_read_both_formats() -> None:
    rng = np.random.default_rng(0)
    items = rng.integers(-(2**63), 2**63 - 1, 550, dtype=np.int64)  # anonymised ids, as Taobao-MM's
    history = pack(np.arange(550), items)
    assert len(history) == HEADER.size + 8 * 550  # positions 0..549 are not stored
    assert [a.tolist() for a in unpack([history])] == [list(range(550)), items.tolist()]
    small = pack(np.arange(10, 20), np.arange(100, 110))  # ids that fit int32: 4 bytes each
    assert len(small) == HEADER.size + 4 * 10
    sparse = pack(np.array([5, 2, 9]), np.array([-1, 2**40, 7]))  # positions stored, unsorted
    assert len(sparse) == HEADER.size + 8 * 3 + 8 * 3
    assert [a.tolist() for a in unpack([sparse])] == [[2, 5, 9], [2**40, -1, 7]]
    assert [a.tolist() for a in unpack([pack(np.zeros(0), np.zeros(0))])] == [[], []]
    # A format-1 chunk (written before) merges with format-2 ones; the last write of a position wins.
    old = pack_v1(np.array([0, 1, 2]), np.array([10, 11, 12]))
    pos, got = unpack([old, pack(np.array([1]), np.array([99])), sparse + small])
    assert pos.tolist() == [0, 1, 2, 5, 9, *range(10, 20)]
    assert got.tolist() == [10, 99, 2**40, -1, 7, *range(100, 110)]
    with pytest.raises(DataError, match="damaged"):
        unpack([history[:HEADER.size] + b"\x00" * 7 + b"junk" * 10 + history])


def _write_users(root: str, users: list[int]) -> None:
    store = FileSequences(Path(root))
    for u in users:  # two chunks per user, as a behaviour chunk split over two upserts writes them
        store.write("col", np.full(3, u), np.arange(3), np.full(3, u * 10))
        store.write("col", np.full(2, u), np.arange(3, 5), np.full(2, u * 10 + 1))
    store.close()


def test_file_store_is_one_sqlite_file_written_by_several_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_users, args=(str(tmp_path), list(range(w, 400, 2)))) for w in range(2)]
    for p in procs:
        p.start()
    store = FileSequences(tmp_path)
    reads: list[int] = []
    stop = threading.Event()

    def reader() -> None:  # readers never wait for the writers (WAL)
        while not stop.is_set():
            reads.append(len(store.get("col", 7)[0]))

    t = threading.Thread(target=reader)
    t.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    stop.set()
    t.join()
    assert set(reads) <= {0, 3, 5}
    for u in (0, 1, 7, 398, 399):
        pos, items = store.get("col", u)
        assert pos.tolist() == list(range(5)) and items.tolist() == [u * 10] * 3 + [u * 10 + 1] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["col.sqlite3", "col.sqlite3-shm", "col.sqlite3-wal"]
    store.drop("col")
    assert len(store.get("col", 7)[0]) == 0 and not list(tmp_path.iterdir())
    store.write("col", np.array([1]), np.array([0]), np.array([5]))  # usable again after a drop
    store.close()
    assert FileSequences(tmp_path).get("col", 1)[1].tolist() == [5]  # and after close, from another instance
    assert store.get("col", 1)[1].tolist() == [5]


@pytest.mark.redis
def test_redis_lists_of_format_1_are_read_and_compacted(redis_url: str) -> None:
    import redis

    from muse.sequences import COMPACT_AFTER, RedisSequences

    seq = RedisSequences(redis_url)
    client = redis.Redis.from_url(redis_url)
    key = seq._key("tseq1", 3)
    try:
        client.delete(key)
        client.rpush(key, pack_v1(np.arange(4), np.array([1, 2, 3, 4])))  # written by an older version
        assert seq.get("tseq1", 3)[1].tolist() == [1, 2, 3, 4]
        for i in range(COMPACT_AFTER):  # the old chunk + 16 new ones: past the threshold
            seq.write("tseq1", np.array([3]), np.array([4 + i]), np.array([2**40 + i]))
        assert client.llen(key) == 1  # compacted into one format-2 chunk
        raw = client.lindex(key, 0)
        pos, items = seq.get("tseq1", 3)
        assert pos.tolist() == list(range(4 + COMPACT_AFTER))
        assert items.tolist() == [1, 2, 3, 4, *(2**40 + i for i in range(COMPACT_AFTER))]
        assert len(raw) == HEADER.size + 8 * len(pos)
    finally:
        client.delete(key)
        client.close()
        seq.close()
