"""The GSU service: a real ``muse serve`` process on the Milvus 2.3 server with Redis sequences,
used through ``RemoteRetriever``; results equal the in-process Retriever's; cache hits after a
prefetch; appends; INVALID_ARGUMENT with the in-process messages; a killed server gives
BackendUnavailable within the deadline and a restarted one is used again by the same client.
Plus the generated gRPC code agreeing with retriever/gsu.proto, rendezvous sharding, and the
sequence stores."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from muse.errors import BackendUnavailable, ConfigurationError, NotFoundError
from muse.settings import load_settings
from muse.vectorstore import CollectionRef, VectorStore
from retriever.client import Retriever

DIM = 16
SOURCE = "scl"
DATASET = "ds-serve"
REF = CollectionRef(DATASET, SOURCE, 1)
ITEMS = np.arange(1000, 1200, dtype=np.int64)
NO_VECTOR = [1009]
LENGTHS = {11: 80, 12: 6, 13: 300}
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``muse serve`` in a child process on a fixed port (so a restart comes back on it)."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env, self.tmp = env, tmp
        self.port, self.metrics_port = _free_port(), _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> None:
        ready = self.tmp / f"ready-{time.monotonic_ns()}"
        log = open(self.tmp / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "muse_cli", "serve", "--dataset", DATASET, "--source", SOURCE, "--host", "127.0.0.1",
             "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--ready-file", str(ready)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"muse serve exited {self.proc.returncode}: {(self.tmp / 'server.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("muse serve did not start in time")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def served(tmp_path: Path, milvus_server_uri: str, redis_url: str, unique_prefix: str):
    env = {
        **os.environ,
        "MUSE_DATA_DIR": str(tmp_path / "data"),
        "MUSE_MILVUS_URI": milvus_server_uri,
        "MUSE_MILVUS_PREFIX": unique_prefix,
        "MUSE_SEQUENCE_URL": redis_url,
        "MUSE_DEVICE": "cpu",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    settings = load_settings(env={k: v for k, v in env.items() if k.startswith("MUSE_")})
    rng = np.random.default_rng(3)
    store = VectorStore(settings)
    store.ensure_collections(REF, DIM)
    item_vecs = _unit(rng, len(ITEMS))
    item_vecs[np.asarray(NO_VECTOR) - 1000] = 0.0
    store.upsert_items(REF, ITEMS, item_vecs, np.zeros(len(ITEMS), np.int64))
    pool = [int(i) for i in ITEMS[10:]]
    for user, n in LENGTHS.items():
        items = np.asarray([pool[j] for j in rng.permutation(len(pool))[: min(n, len(pool))]])
        if n > len(pool):  # user 13 repeats items: ties are broken the same way by both paths
            items = rng.choice(pool, n)
        store.upsert_behaviours(REF, np.full(n, user), np.arange(n), items, item_vecs[items - 1000])
    store.set_live(REF)
    server = ServerProcess(env, tmp_path)
    server.start()
    try:
        yield settings, store, server
    finally:
        server.stop()
        store.drop_live(DATASET, SOURCE)
        store.drop_collections(REF)
        store.close()


def _same(a, b) -> None:
    assert (a.user_id, a.found, a.k, a.history_length, len(a)) == (b.user_id, b.found, b.k, b.history_length, len(b))
    assert (a.dataset, a.source, a.version) == (b.dataset, b.source, b.version)
    for ha, hb in zip(a, b, strict=True):
        assert ha.item_id == hb.item_id
        np.testing.assert_array_equal(ha.behaviour_item_ids, hb.behaviour_item_ids)
        np.testing.assert_array_equal(ha.positions, hb.positions)
        np.testing.assert_allclose(ha.scores, hb.scores, atol=1e-5)
        np.testing.assert_array_equal(ha.simtier, hb.simtier)


@pytest.mark.milvus_server
@pytest.mark.redis
@pytest.mark.slow
def test_served_search_equals_in_process(served) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from retriever import gsu_pb2, gsu_pb2_grpc
    from retriever.remote import RemoteRetriever

    settings, _, server = served
    targets = [int(i) for i in ITEMS[:4]]
    with (
        Retriever.from_settings(SOURCE, settings, dataset=DATASET, backend="cache") as local,
        Retriever.from_settings(SOURCE, settings, dataset=DATASET, backend="milvus", consistency_level="Strong") as milvus,
        RemoteRetriever([server.address], timeout_s=3.0, settings=settings) as remote,
    ):
        assert remote.dim == DIM and remote.source == SOURCE
        # Uncached users: the first search loads them.
        for user, k in ((11, 10), (13, 50), (999, 5)):
            got = remote.search(user, targets, k=k)
            _same(got, local.search(user, targets, k=k))
            if user != 13:  # no repeated items, so no ties that Milvus might order otherwise
                for hg, hm in zip(got, milvus.search(user, targets, k=k), strict=True):
                    np.testing.assert_array_equal(hg.positions, hm.positions)
        st = remote.stats()
        assert (st.misses, st.hits, st.entries) == (3, 0, 2)  # user 999 has no history: not kept
        # Cached user: prefetch, then search hits the cache.
        assert remote.prefetch([12]).result(timeout=30) == {12: 6}
        st = remote.stats()
        assert (st.loads, st.entries) == (4, 3)
        _same(remote.search(12, targets, k=50), local.search(12, targets, k=50))
        _same(remote.search(11, targets, k=10), local.search(11, targets, k=10))
        st = remote.stats()
        assert (st.hits, st.misses, st.loads) == (2, 3, 4)
        vecs = np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32)
        _same(remote.search_vectors(11, vecs, k=7), local.search_vectors(11, vecs, k=7))

        # AppendBehaviours is visible to the next search (and written to Milvus and the sequence).
        target = int(ITEMS[2])
        assert remote.search(12, [target], k=3)[0].behaviour_item_ids[0] != target
        assert remote.append_behaviours(12, [6], [target]) == 1
        hit = remote.search(12, [target], k=3)[0]
        assert hit.behaviour_item_ids[0] == target and hit.positions[0] == 6
        local.invalidate(12)
        _same(remote.search(12, targets, k=50), local.search(12, targets, k=50))
        remote.invalidate(12)
        assert remote.stats().entries == 2

        # Bad input: the in-process message, as INVALID_ARGUMENT on the wire.
        stub = gsu_pb2_grpc.GsuStub(grpc.insecure_channel(server.address))
        cases = [
            (dict(user_id=11, target_item_ids=targets, k=0), lambda r: r.search(11, targets, k=0)),
            (dict(user_id=11, target_item_ids=targets, k=100_000), lambda r: r.search(11, targets, k=100_000)),
            (dict(user_id=11, k=5), lambda r: r.search(11, [], k=5)),
            (dict(user_id=11, target_vectors=[0.5] * 8, dim=8, k=5), lambda r: r.search_vectors(11, np.full((1, 8), 0.5), k=5)),
            (dict(user_id=11, target_vectors=[float("nan")] * DIM, dim=DIM, k=5),
             lambda r: r.search_vectors(11, np.full((1, DIM), np.nan), k=5)),
        ]
        for request, call in cases:
            with pytest.raises(ConfigurationError) as in_process:
                call(local)
            with pytest.raises(grpc.RpcError) as wire:
                stub.Search(gsu_pb2.SearchRequest(**request), timeout=5)
            assert wire.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert wire.value.details() == str(in_process.value)
            with pytest.raises(ConfigurationError) as via_client:
                call(remote)
            assert str(via_client.value) == str(in_process.value)
        for bad in ("11", 1.5, True):  # not encodable: the same check and message in the client
            with pytest.raises(ConfigurationError) as a:
                local.search(bad, targets)
            with pytest.raises(ConfigurationError) as b:
                remote.search(bad, targets)
            assert str(a.value) == str(b.value)
        with pytest.raises(NotFoundError, match=r"\[4242\] not found"):
            remote.search(11, [4242])

        # Health and metrics.
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
        for name in ("", "muse.gsu.v1.Gsu"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
        assert 'muse_gsu_requests_total{code="OK",method="Search"}' in text
        assert 'muse_gsu_requests_total{code="INVALID_ARGUMENT",method="Search"}' in text
        assert "muse_gsu_cache_hits_total" in text and "muse_gsu_request_seconds_bucket" in text

        # A killed server: BackendUnavailable naming it, within the deadline; restarted: used again.
        server.kill()
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable, match=server.address):
            remote.search(11, targets, k=10)
        assert time.monotonic() - t0 < remote.timeout_s + 1.0
        server.start()
        _same(remote.search(11, targets, k=10), local.search(11, targets, k=10))


def test_generated_code_agrees_with_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    from retriever.service import regenerate

    for path in regenerate(tmp_path):
        committed = REPO / "retriever" / path.name
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run retriever.service.regenerate"


def test_rendezvous_is_stable_and_moves_only_a_removed_servers_users() -> None:
    from retriever.remote import parse_addresses, rendezvous

    three = ["a:1", "b:1", "c:1"]
    owner = {u: rendezvous(u, three) for u in range(3000)}
    counts = {a: sum(1 for v in owner.values() if v == a) for a in three}
    assert all(800 < c < 1200 for c in counts.values()), counts
    two = ["a:1", "c:1"]
    for u, a in owner.items():
        if a != "b:1":
            assert rendezvous(u, two) == a
    assert parse_addresses("x:1, y:2") == ["x:1", "y:2"]
    for bad in ("", "x", "x:1,x:1", "x:port"):
        with pytest.raises(ConfigurationError):
            parse_addresses(bad)


def test_remote_retriever_on_nothing_listening_fails_fast() -> None:
    from retriever.remote import RemoteRetriever

    addr = f"127.0.0.1:{_free_port()}"
    with RemoteRetriever([addr], timeout_s=1.0) as r:
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable, match=addr):
            r.search(1, [1], k=5)
        assert time.monotonic() - t0 < 2.0


def _check_store(seq) -> None:
    col = "tseq"
    seq.drop(col)
    seq.write(col, np.array([5, 5, 6]), np.array([1, 0, 0]), np.array([11, 10, 60]))
    seq.write(col, np.array([5, 5]), np.array([1, 0]), np.array([11, 10]))  # a retried write
    seq.write(col, np.array([5]), np.array([2]), np.array([12]))
    pos, items = seq.get(col, 5)
    assert pos.tolist() == [0, 1, 2] and items.tolist() == [10, 11, 12]
    seq.write(col, np.array([5]), np.array([1]), np.array([99]))  # a rewritten position: last wins
    assert seq.get(col, 5)[1].tolist() == [10, 99, 12]
    for i in range(40):  # past the compaction threshold
        seq.write(col, np.array([6]), np.array([i + 1]), np.array([i]))
    pos, items = seq.get(col, 6)
    assert pos.tolist() == list(range(41)) and items.tolist() == [60, *range(40)]
    seq.delete_user(col, 5)
    assert len(seq.get(col, 5)[0]) == 0
    seq.drop(col)
    assert len(seq.get(col, 6)[0]) == 0


def test_file_sequences(tmp_path: Path) -> None:
    from muse.sequences import FileSequences

    _check_store(FileSequences(tmp_path / "seq"))


@pytest.mark.redis
def test_redis_sequences(redis_url: str) -> None:
    from muse.sequences import RedisSequences

    seq = RedisSequences(redis_url)
    try:
        _check_store(seq)
    finally:
        seq.close()


def test_gathered_history_memory_and_results() -> None:
    import torch

    from retriever.cache import CacheConfig, GatherCache, HistoryCache, ItemTable

    rng = np.random.default_rng(0)
    ids = np.arange(5000, dtype=np.int64) * 7
    vecs = rng.normal(size=(len(ids), DIM)).astype(np.float32)
    by_id = dict(zip(ids.tolist(), vecs, strict=True))

    def fetch(wanted: np.ndarray):
        found = [i for i in wanted.tolist() if i in by_id and i != 7]  # item 7 has no vector
        return np.asarray(found, np.int64), np.asarray([by_id[i] for i in found], np.float32).reshape(-1, DIM)

    seq_items = rng.choice(ids, 20_000)
    seq = {1: (np.arange(20_000), seq_items)}
    for dtype in ("float32", "int8"):
        table = ItemTable(fetch, DIM, dtype)
        cfg = CacheConfig(storage_dtype=dtype)
        with (
            GatherCache(lambda u: seq.get(u, (np.zeros(0, np.int64),) * 2), table, cfg) as gc,
            HistoryCache(lambda u: (), DIM, cfg) as hc,
        ):
            h = gc.get(1)
            assert h.device_bytes == 4 * len(h.positions)  # only int32 rows per user
            has = seq_items != 7
            ref = hc.put(1, np.arange(20_000)[has], seq_items[has], np.stack([by_id[i] for i in seq_items[has]]))
            assert len(h) == 20_000 and len(h.missing_positions) == int((~has).sum())
            t = torch.from_numpy(_unit(rng, 5))
            a, b = h.topk(t, 50), ref.topk(t, 50)
            np.testing.assert_allclose(a.scores.numpy(), b.scores.numpy(), atol=1e-6)
            assert table.fetched == len(np.unique(seq_items))


def test_serve_cli_names_an_unknown_source(settings, monkeypatch, capsys) -> None:
    from muse_cli.main import main

    monkeypatch.setenv("MUSE_DATA_DIR", str(settings.data_dir))
    assert main(["serve", "--dataset", "nope", "--source", "scl", "--port", "0", "--metrics-port", "-1"]) == 2
    assert "nope/scl has no live version" in capsys.readouterr().err
    assert main(["serve", "--dataset", "nope", "--source", "scl", "--version", "3", "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_two_servers_shard_users_by_rendezvous(settings) -> None:
    """Two in-process servers on the embedded deployment: each user is searched on its own shard."""
    from retriever.remote import RemoteRetriever, rendezvous
    from retriever.service import GsuServer

    rng = np.random.default_rng(1)
    store = VectorStore(settings)
    store.ensure_collections(REF, DIM)
    item_vecs = _unit(rng, len(ITEMS))
    store.upsert_items(REF, ITEMS, item_vecs, np.zeros(len(ITEMS), np.int64))
    users = list(range(20, 30))
    for u in users:
        items = rng.choice(ITEMS[10:], 30, replace=False)
        store.upsert_behaviours(REF, np.full(30, u), np.arange(30), items, item_vecs[items - 1000])
    store.set_live(REF)
    servers = [GsuServer(Retriever(store, SOURCE, dataset=DATASET), port=0, metrics_port=None).start() for _ in range(2)]
    try:
        addrs = [s.address for s in servers]
        with (
            RemoteRetriever(addrs, timeout_s=5) as remote,
            Retriever(VectorStore(settings), SOURCE, dataset=DATASET) as local,
        ):
            for u in users:
                _same(remote.search(u, [int(ITEMS[0])], k=5), local.search(u, [int(ITEMS[0])], k=5))
            per_server = {a: st.entries for a, st in remote.server_stats().items()}
            expected = {a: sum(rendezvous(u, addrs) == a for u in users) for a in addrs}
            assert per_server == expected and all(expected.values())
    finally:
        for s in servers:
            s.stop()


def test_sequences_follow_behaviour_writes_and_rebuild_old_users(settings) -> None:
    """upsert_behaviours writes the sequence beside the rows (a retried write changes nothing),
    delete_user_behaviours removes it, and a user written before the sequence store existed is
    rebuilt from Milvus on first read."""
    from dataclasses import replace

    store = VectorStore(settings)
    store.ensure_collections(REF, DIM)
    name = store.behaviour_collection(REF)
    vecs = _unit(np.random.default_rng(0), 5)
    for _ in range(2):  # a retried task
        store.upsert_behaviours(REF, np.full(5, 7), np.arange(5), np.arange(500, 505), vecs)
    assert [a.tolist() for a in store.sequences.get(name, 7)] == [list(range(5)), list(range(500, 505))]
    store.delete_user_behaviours(REF, 7)
    assert len(store.sequences.get(name, 7)[0]) == 0
    # Rows written with no sequence copy (the "milvus" store), then read through the file store.
    legacy = VectorStore(replace(settings, sequence_url="milvus"))
    legacy.upsert_behaviours(REF, np.full(3, 8), np.array([0, 2, 4]), np.array([9, 8, 7]), vecs[:3])
    legacy.close()
    assert len(store.sequences.get(name, 8)[0]) == 0
    pos, items = store.user_sequence(REF, 8)
    assert pos.tolist() == [0, 2, 4] and items.tolist() == [9, 8, 7]
    assert store.sequences.get(name, 8)[0].tolist() == [0, 2, 4]  # written back
    store.drop_collections(REF)
    store.close()


@pytest.mark.milvus_server
@pytest.mark.redis
@pytest.mark.slow
def test_bad_input_and_a_frozen_server_through_grpc(served) -> None:
    """Each bad input raises the in-process class and message through ``muse serve`` +
    ``RemoteRetriever`` (the issue's cases: no targets list, a vector of strings, 100,000 targets),
    oversized requests are refused at once on every path, and a frozen server (SIGSTOP) gives
    BackendUnavailable within the client's deadline."""
    import grpc

    from muse.validation import MAX_TARGETS
    from retriever import gsu_pb2, gsu_pb2_grpc
    from retriever.remote import RemoteRetriever
    from retriever.service import ERROR_KEY

    settings, _, server = served
    many = list(range(10**6, 10**6 + 100_000))  # 100,000 distinct unknown items
    strings = [["a"] * DIM]
    with (
        Retriever.from_settings(SOURCE, settings, dataset=DATASET, backend="cache") as local,
        Retriever.from_settings(SOURCE, settings, dataset=DATASET, backend="milvus") as milvus,
        RemoteRetriever([server.address], timeout_s=3.0, settings=settings) as remote,
    ):
        cases = [
            ("targets None", lambda r: r.search(11, None, k=5)),
            ("vector of strings", lambda r: r.search_vectors(11, strings, k=5)),
            ("100,000 targets", lambda r: r.search(11, many, k=5)),
            ("MAX_TARGETS + 1 vectors", lambda r: r.search_vectors(11, np.ones((MAX_TARGETS + 1, DIM)), k=5)),
            ("unknown item", lambda r: r.search(11, [4242], k=5)),
        ]
        for case, call in cases:
            raised = {}
            for name, r in (("in process", local), ("milvus backend", milvus), ("gRPC", remote)):
                t0 = time.monotonic()
                with pytest.raises(Exception) as info:
                    call(r)
                raised[name] = (type(info.value), str(info.value))
                assert time.monotonic() - t0 < 1.0, f"{case} on {name}: refused after {time.monotonic() - t0:.1f} s"
            assert len(set(raised.values())) == 1, f"{case}: {raised}"
            assert raised["gRPC"][0] in (ConfigurationError, NotFoundError), f"{case}: {raised}"
        # The server checks on its own too, before any backend work (a client that skips the checks).
        stub = gsu_pb2_grpc.GsuStub(grpc.insecure_channel(server.address))
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as wire:
            stub.Search(gsu_pb2.SearchRequest(user_id=11, target_item_ids=many, k=5), timeout=5)
        assert time.monotonic() - t0 < 1.0
        assert wire.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "per request" in wire.value.details()
        assert (ERROR_KEY, "ConfigurationError") in tuple(wire.value.trailing_metadata())
        # Request bytes: refused by both clients before anything is sent or written.
        n = 300_000
        big = (11, np.arange(n) + 10, np.full(n, int(ITEMS[20])), np.ones((n, DIM), np.float32))
        for r in (local, remote):
            t0 = time.monotonic()
            with pytest.raises(ConfigurationError, match="MAX_REQUEST_BYTES"):
                r.append_behaviours(*big)
            assert time.monotonic() - t0 < 2.0

        # A frozen server: BackendUnavailable within the deadline; thawed: answers again.
        remote.search(11, [int(ITEMS[0])], k=5)
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(2):
                t0 = time.monotonic()
                with pytest.raises(BackendUnavailable, match=server.address):
                    remote.search(11, [int(ITEMS[0])], k=5)
                assert time.monotonic() - t0 < remote.timeout_s + 1.0
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert len(remote.search(11, [int(ITEMS[0])], k=5)[0]) == 5


def test_health_means_ready(settings) -> None:
    """A server reports NOT_SERVING (and refuses searches with UNAVAILABLE "starting", which the
    client retries within its deadline) until its item table is loaded and its kernels warmed;
    then SERVING, with the same results as in process."""
    import threading

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from retriever.remote import RemoteRetriever
    from retriever.service import GsuServer

    rng = np.random.default_rng(4)
    store = VectorStore(settings)
    store.ensure_collections(REF, DIM)
    item_vecs = _unit(rng, len(ITEMS))
    store.upsert_items(REF, ITEMS, item_vecs, np.zeros(len(ITEMS), np.int64))
    store.upsert_behaviours(REF, np.full(30, 7), np.arange(30), ITEMS[10:40], item_vecs[10:40])
    store.set_live(REF)
    retriever = Retriever(store, SOURCE, dataset=DATASET)
    server = GsuServer(retriever, port=0, metrics_port=None)
    release = threading.Event()

    def load_table() -> None:  # whatever loads the item table; here: it waits for the test first
        release.wait(30)
        retriever.preload_items(ITEMS)

    starting = threading.Thread(target=server.start, kwargs={"prepare": load_table})
    starting.start()
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
        for _ in range(100):
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                break
            except grpc.RpcError:
                time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with RemoteRetriever([server.address], timeout_s=0.5) as remote:
            with pytest.raises(BackendUnavailable, match="starting"):
                remote.search(7, [int(ITEMS[12])], k=5)
            release.set()
            starting.join(60)
            assert server.servicer.ready.is_set() and server.ready_s is not None
            for name in ("", "muse.gsu.v1.Gsu"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert len(retriever.item_table) == len(ITEMS)
            with Retriever(VectorStore(settings), SOURCE, dataset=DATASET) as local:
                _same(remote.search(7, [int(ITEMS[12])], k=5), local.search(7, [int(ITEMS[12])], k=5))
    finally:
        release.set()
        starting.join(60)
        server.stop()


def test_every_muse_error_maps_to_a_status_and_back() -> None:
    """The service's mapping: each MuseError class has its status, and its name in the trailing
    metadata brings back the same class (subclasses the client cannot build map to their base)."""
    import grpc

    from muse.deadlines import DeadlineExceeded
    from muse.errors import DataError, MuseError
    from muse.vectorstore import CollectionNotFound
    from retriever.service import _status_of, error_from, error_name

    cases = [
        (ConfigurationError("bad k"), grpc.StatusCode.INVALID_ARGUMENT, ConfigurationError),
        (NotFoundError("no item"), grpc.StatusCode.NOT_FOUND, NotFoundError),
        (CollectionNotFound("dropped", "c"), grpc.StatusCode.NOT_FOUND, NotFoundError),
        (DataError("corrupt"), grpc.StatusCode.FAILED_PRECONDITION, DataError),
        (BackendUnavailable("milvus down"), grpc.StatusCode.UNAVAILABLE, BackendUnavailable),
        (DeadlineExceeded("too slow"), grpc.StatusCode.UNAVAILABLE, DeadlineExceeded),
        (MuseError("other"), grpc.StatusCode.UNKNOWN, MuseError),
        (ValueError("numpy"), grpc.StatusCode.INVALID_ARGUMENT, ConfigurationError),
    ]
    for exc, status, cls in cases:
        assert _status_of(exc) == status, exc
        back = error_from(error_name(exc), str(exc))
        assert type(back) is cls and str(back) == str(exc)
    assert error_from("KeyError", "x") is None
