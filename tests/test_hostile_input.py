"""Hostile input to the retriever client, the vector store and the CLI, on Milvus Lite and the 2.3
server: every case gets a ConfigurationError (a ValueError) naming the problem before any server
call, never BackendUnavailable, never a raw pymilvus/numpy/torch error and never a silent empty
answer. One row per case of the bad-input paragraph of the fault issue."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from muse.errors import BackendUnavailable, ConfigurationError, NotFoundError
from muse.settings import Settings
from muse.vectorstore import CollectionRef, VectorStore
from retriever.client import Retriever

DIM = 8
SOURCE = "scl"
DATASET = "hostile-ds"
REF = CollectionRef(DATASET, SOURCE, 1)
USER = 21
N = 40
ITEMS = np.arange(500, 560, dtype=np.int64)
NAN = float("nan")
INF = float("inf")


@pytest.fixture
def world(milvus_settings: Settings):
    rng = np.random.default_rng(3)
    store = VectorStore(milvus_settings)
    store.ensure_collections(REF, DIM)
    item_vecs = rng.normal(size=(len(ITEMS), DIM)).astype(np.float32)
    item_vecs /= np.linalg.norm(item_vecs, axis=1, keepdims=True)
    store.upsert_items(REF, ITEMS, item_vecs, np.zeros(len(ITEMS), np.int64))
    picked = rng.choice(len(ITEMS), N, replace=False)  # as a backfill writes them: the items' vectors
    vecs = item_vecs[picked]
    store.upsert_behaviours(REF, np.full(N, USER), np.arange(N), ITEMS[picked], vecs)
    try:
        yield milvus_settings, store, vecs
    finally:
        store.drop_collections(REF)
        store.close()


def _target(scale: float = 1.0) -> np.ndarray:
    return np.full((1, DIM), scale, np.float32)


# (case, call on a Retriever r, message fragment); every row must raise ConfigurationError.
HOSTILE = [
    ("user id 2**70", lambda r: r.search(2**70, [int(ITEMS[0])], k=5), "outside the int64 id range"),
    ("user id -2**63", lambda r: r.search(-(2**63), [int(ITEMS[0])], k=5), "outside the int64 id range"),
    ("user id None", lambda r: r.search(None, [int(ITEMS[0])], k=5), "user_id must be an integer"),
    ("item id 2**70", lambda r: r.search(USER, [2**70], k=5), "outside the int64 id range"),
    ("item id None", lambda r: r.search(USER, [None], k=5), "must be integers"),
    ("item ids None", lambda r: r.search(USER, None, k=5), "target_item_ids is None"),
    ("no target items", lambda r: r.search(USER, [], k=5), "empty"),
    ("NaN target vector", lambda r: r.search_vectors(USER, np.full((1, DIM), NAN), k=5), "NaN, inf"),
    ("inf target vector", lambda r: r.search_vectors(USER, np.full((1, DIM), INF), k=5), "NaN, inf"),
    ("float64 beyond float32", lambda r: r.search_vectors(USER, np.full((1, DIM), 1e300), k=5), "float32"),
    ("empty [0, d] targets", lambda r: r.search_vectors(USER, np.zeros((0, DIM)), k=5), "is empty"),
    ("zero target vector", lambda r: r.search_vectors(USER, np.zeros((1, DIM)), k=5), "all zero"),
    ("wrong target width", lambda r: r.search_vectors(USER, np.ones((1, DIM + 1)), k=5), f"[n, {DIM}]"),
    ("k = 0", lambda r: r.search(USER, [int(ITEMS[0])], k=0), "k must be"),
    ("k = 16385", lambda r: r.search(USER, [int(ITEMS[0])], k=16385), "k must be"),
    ("NaN append", lambda r: r.append_behaviours(USER, [N], [1], np.full((1, DIM), NAN)), "NaN, inf"),
    ("append item id 2**70", lambda r: r.append_behaviours(USER, [N], [2**70], np.ones((1, DIM))), "int64"),
    ("append user 2**70", lambda r: r.append_behaviours(2**70, [0], [1], np.ones((1, DIM))), "int64"),
    ("append negative position", lambda r: r.append_behaviours(USER, [-1], [1], np.ones((1, DIM))), "negative"),
    ("append lengths differ", lambda r: r.append_behaviours(USER, [N, N + 1], [1], np.ones((1, DIM))), "differ"),
]


@pytest.mark.parametrize("backend", ["cache", "milvus"])
def test_hostile_client_input_is_a_clear_configuration_error(world, backend: str) -> None:
    settings, _, _ = world
    with Retriever.from_settings(SOURCE, settings, dataset=DATASET, version=1, backend=backend,
                                 consistency_level="Strong") as r:
        for case, call, fragment in HOSTILE:
            with pytest.raises(ConfigurationError) as info:
                call(r)
            assert fragment in str(info.value), f"{backend}/{case}: {info.value}"
            assert not isinstance(info.value, BackendUnavailable), case
        # The store still answers after all of that.
        assert len(r.search(USER, [int(ITEMS[0])], k=5)[0]) == 5


@pytest.mark.parametrize("backend", ["cache", "milvus"])
def test_huge_vectors_and_many_targets(world, backend: str) -> None:
    """A 1e30-sized target ranks like its unit vector (not five 0.0 scores); a retriever request
    takes at most MAX_TARGETS targets (more is refused at once, before any backend work), while the
    store splits more targets than one Milvus request takes (16,384) into batches."""
    from muse.validation import MAX_TARGETS

    settings, store, vecs = world
    # 4,096 targets in one Milvus search take seconds on Milvus Lite under load: a deadline to match.
    with Retriever.from_settings(SOURCE, settings, dataset=DATASET, version=1, backend=backend,
                                 consistency_level="Strong", timeout_s=60.0) as r:
        unit = r.search_vectors(USER, _target(), k=5)[0]
        huge = r.search_vectors(USER, _target(1e30), k=5)[0]
        assert huge.positions.tolist() == unit.positions.tolist()
        np.testing.assert_allclose(huge.scores, unit.scores, atol=1e-5)
        assert np.all(huge.scores != 0.0)
        res = r.search_vectors(USER, np.tile(_target(), (MAX_TARGETS, 1)), k=2)
        assert len(res) == MAX_TARGETS and res[-1].positions.tolist() == unit.positions[:2].tolist()
        for call in (lambda: r.search_vectors(USER, np.tile(_target(), (MAX_TARGETS + 1, 1)), k=2),
                     lambda: r.search(USER, list(range(10**6, 10**6 + 100_000)), k=2)):
            with pytest.raises(ConfigurationError, match="per request"):
                call()
    if backend == "milvus":
        hits = store.search_behaviours(REF, USER, np.tile(_target(), (16385, 1)), k=2, consistency_level="Strong")
        assert len(hits) == 16385 and [h.position for h in hits[16384]] == unit.positions[:2].tolist()


def test_store_maps_milvus_input_errors_and_dropped_collections(world) -> None:
    settings, store, _ = world
    name = store.behaviour_collection(REF)
    # Milvus' own rejection of a request is the request's fault, not an outage.
    with pytest.raises(ConfigurationError) as info:
        store._call("query", store.client.query, name, filter="user_id == 1180591620717411303424", limit=1)
    assert not isinstance(info.value, BackendUnavailable)
    with pytest.raises(ConfigurationError, match="NaN, inf"):
        store.upsert_items(REF, [1], np.full((1, DIM), NAN), [0])
    with pytest.raises(ConfigurationError, match="int64"):
        store.upsert_items(REF, [2**70], np.ones((1, DIM)), [0])
    with pytest.raises(ConfigurationError, match="must be integers"):
        store.get_item_vectors(REF, [None])
    assert store.upsert_behaviours(REF, [], [], [], np.zeros((0, DIM))) == 0
    # A long-lived client whose collections were dropped by someone else: a clear NotFoundError,
    # and once they exist again the same client works (its cached state was refreshed).
    other = VectorStore(settings)
    try:
        assert other.count_behaviours(REF, USER) == N
        store.drop_collections(REF)
        with pytest.raises(NotFoundError):
            other.count_behaviours(REF, USER)
        store.ensure_collections(REF, DIM)
        assert other.count_behaviours(REF, USER) == 0
    finally:
        other.close()


@pytest.mark.parametrize(
    "argv",
    [["backfill", "list", "--limit", "-1"], ["backfill", "list", "--limit", "0"]],
)
def test_cli_bad_input_is_one_sentence(tmp_path, argv: list[str]) -> None:
    env = {**os.environ, "MUSE_DATA_DIR": str(tmp_path / "d"), "MUSE_DEVICE": "cpu"}
    for var in ("MUSE_DATABASE_URL", "MUSE_MILVUS_URI", "MUSE_BROKER_URL"):
        env.pop(var, None)
    res = subprocess.run([sys.executable, "-m", "muse_cli", *argv], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: --limit must be"), res.stderr
    assert "Traceback" not in res.stderr
