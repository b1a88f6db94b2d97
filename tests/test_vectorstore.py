"""The Milvus access layer, run against Milvus Lite and the real Milvus 2.3 server alike."""

from __future__ import annotations

import numpy as np
import pytest

from muse.arrays import l2_normalise
from muse.errors import ConfigurationError, NotFoundError
from muse.settings import Settings, load_settings
from muse.vectorstore import CollectionRef, VectorStore, behaviour_pk

DIM = 16
REF = CollectionRef("ds-a", "scl", 1)
MISSING = CollectionRef("ds-a", "openclip", 1)


@pytest.fixture
def store(milvus_settings: Settings):
    vs = VectorStore(milvus_settings)
    vs.ensure_collections(REF, DIM)
    try:
        yield vs
    finally:
        vs.drop_collections(REF)
        vs.close()


def _history(rng: np.random.Generator, users: list[int], length: int):
    user_ids = np.repeat(np.asarray(users, dtype=np.int64), length)
    positions = np.tile(np.arange(length, dtype=np.int64), len(users))
    item_ids = rng.integers(-(2**62), 2**62, size=len(user_ids), dtype=np.int64)
    vectors = rng.standard_normal((len(user_ids), DIM)).astype(np.float32)
    return user_ids, positions, item_ids, vectors


def test_behaviour_pk_is_deterministic_and_distinct():
    users = np.array([-5124604129084675105, -5124604129084675105, 7, 7], dtype=np.int64)
    pos = np.array([0, 1, 0, 1])
    pk = behaviour_pk(users, pos)
    assert pk.dtype == np.int64 and (pk >= 0).all()
    assert len(set(pk.tolist())) == 4
    np.testing.assert_array_equal(pk, behaviour_pk(users.tolist(), pos.tolist()))


def test_items_read_your_writes_and_idempotent_upsert(store: VectorStore):
    rng = np.random.default_rng(0)
    ids = np.array([3, -9, 2**62, 11, 3], dtype=np.int64)  # 3 twice: last row wins
    vecs = rng.standard_normal((5, DIM)).astype(np.float32)
    cats = np.array([1, 2, 3, 4, 5])
    assert store.upsert_items(REF, ids, vecs, cats) == 4
    assert store.count_items(REF) == 4
    store.upsert_items(REF, ids, vecs, cats)
    assert store.count_items(REF) == 4  # same rows twice -> same count
    found, got = store.get_item_vectors(REF, [11, 3, 12345])
    assert found.tolist() == [11, 3]
    np.testing.assert_allclose(got, l2_normalise(vecs[[3, 4]]), atol=1e-6)
    found, got = store.get_item_vectors(REF, [12345, 2**62, 11, 2**62, -9])  # asked order, repeats kept
    assert found.tolist() == [2**62, 11, 2**62, -9] and got.dtype == np.float32
    np.testing.assert_allclose(got, l2_normalise(vecs[[2, 3, 2, 1]]), atol=1e-6)
    found, got = store.get_item_vectors(REF, [])
    assert found.shape == (0,) and got.shape == (0, DIM)


def test_search_items_gives_each_vectors_nearest_items(store: VectorStore):
    rng = np.random.default_rng(1)
    ids = np.arange(100, 140, dtype=np.int64)
    vecs = rng.standard_normal((len(ids), DIM)).astype(np.float32)
    store.upsert_items(REF, ids, vecs, np.zeros(len(ids), dtype=np.int64))
    store.flush(REF)
    unit = l2_normalise(vecs)
    queries = unit[[0, 7]] * 3.0  # any length: searched as unit vectors
    found = store.search_items(REF, queries, k=5)
    assert len(found) == 2
    for q, hits in zip((0, 7), found):
        cos = unit @ unit[q]
        want = np.argsort(-cos, kind="stable")[:5]
        assert [h.item_id for h in hits] == ids[want].tolist()  # the item itself first
        np.testing.assert_allclose([h.score for h in hits], cos[want], atol=1e-5)
    with pytest.raises(ConfigurationError, match="k must be"):
        store.search_items(REF, queries, k=0)
    with pytest.raises(NotFoundError):
        store.search_items(MISSING, queries, k=3)


def test_behaviours_partitioned_by_user(store: VectorStore):
    rng = np.random.default_rng(1)
    users = [101, -202, 303]
    u, p, items, vecs = _history(rng, users, 40)
    assert store.upsert_behaviours(REF, u, p, items, vecs) == 120
    store.upsert_behaviours(REF, u, p, items, vecs)  # retried task: no duplicates
    assert store.count_behaviours(REF) == 120
    assert store.count_behaviours(REF, user_id=-202) == 40

    got = store.fetch_user_behaviours(REF, -202, batch_size=7)  # several pages
    mask = u == -202
    assert got.positions.tolist() == list(range(40))
    assert got.item_ids.tolist() == items[mask].tolist()
    np.testing.assert_allclose(got.vectors, l2_normalise(vecs[mask]), atol=1e-6)

    targets = rng.standard_normal((3, DIM)).astype(np.float32)
    hits = store.search_behaviours(REF, 303, targets, k=10)
    assert len(hits) == 3
    user_items = set(items[u == 303].tolist())
    for per_target, t in zip(hits, targets, strict=True):
        assert len(per_target) == 10
        assert all(h.item_id in user_items for h in per_target)  # never another user's rows
        expected = l2_normalise(vecs[u == 303]) @ l2_normalise(t[None])[0]
        top = np.sort(expected)[::-1][:10]
        np.testing.assert_allclose([h.score for h in per_target], top, atol=1e-5)
        assert [h.position for h in per_target] == np.argsort(-expected)[:10].tolist()
    # Once the writes are visible (the Strong search above), a Bounded search returns the same hits.
    assert store.search_behaviours(REF, 303, targets, k=10, consistency_level="Bounded") == hits


def test_unknown_user_is_empty(store: VectorStore):
    got = store.fetch_user_behaviours(REF, 999)
    assert len(got) == 0 and got.vectors.shape == (0, DIM)
    assert store.search_behaviours(REF, 999, np.ones((1, DIM), np.float32), k=5) == [[]]


def test_bad_inputs(store: VectorStore, milvus_settings: Settings):
    with pytest.raises(ConfigurationError, match="differ in length"):
        store.upsert_items(REF, [1, 2], np.zeros((1, DIM)), [1, 2])
    with pytest.raises(ConfigurationError, match="integers"):
        store.upsert_items(REF, ["1 or 1==1"], np.zeros((1, DIM)), [1])
    with pytest.raises(ConfigurationError, match="source name"):
        CollectionRef("ds-a", "scl; drop", 1)
    with pytest.raises(ValueError, match="k must be"):
        store.search_behaviours(REF, 1, np.ones((1, DIM), np.float32), k=0)
    with pytest.raises(ValueError, match="consistency_level 'Weak' is unknown"):
        store.search_behaviours(REF, 1, np.ones((1, DIM), np.float32), k=1, consistency_level="Weak")
    with pytest.raises(NotFoundError, match="does not exist"):
        store.count_items(MISSING)
    with pytest.raises(ConfigurationError, match="16-d"):
        store.ensure_collections(REF, DIM * 2)


def test_describe(store: VectorStore):
    d = store.describe(REF)
    assert d["items"]["dim"] == DIM and d["behaviours"]["dim"] == DIM
    assert d["items"]["metric_type"] == "COSINE" and d["items"]["index_type"] == "FLAT"


def test_paging_with_position_gaps_reads_every_row_once_in_order(store: VectorStore):
    """Pages are fetched several at a time: gaps wider than all pages in flight, empty pages in
    the middle and a sparse tail must neither lose nor repeat a row."""
    rng = np.random.default_rng(7)
    positions = np.array([0, 1, 2, 9, 10, 11, 60, 61, 200, 203, 950, 951, 999], dtype=np.int64)
    n = len(positions)
    items = rng.integers(1, 10**9, size=n, dtype=np.int64)
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    store.upsert_behaviours(REF, np.full(n, 404), positions, items, vecs)
    pages = list(store.iter_user_behaviours(REF, 404, batch_size=4))
    got = np.concatenate([p.positions for p in pages])
    assert got.tolist() == positions.tolist()
    assert np.concatenate([p.item_ids for p in pages]).tolist() == items.tolist()
    np.testing.assert_allclose(np.concatenate([p.vectors for p in pages]), l2_normalise(vecs), atol=1e-6)
    assert list(store.iter_user_behaviours(REF, 405, batch_size=4)) == []  # unknown user: no page


def test_flush_seals_rows_that_stay_readable(store: VectorStore):
    rng = np.random.default_rng(8)
    u, p, items, vecs = _history(rng, [505], 30)
    store.upsert_behaviours(REF, u, p, items, vecs)
    store.upsert_items(REF, items[:5], vecs[:5], [1] * 5)
    store.flush(REF, reload=True)
    assert store.count_behaviours(REF, user_id=505) == 30
    hits = store.search_behaviours(REF, 505, vecs[:1], k=1)
    assert hits[0][0].position == 0 and hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(NotFoundError):
        store.flush(MISSING)  # no collections


def test_names_per_dataset_source_and_version(milvus_settings: Settings):
    vs = VectorStore(milvus_settings)
    p = milvus_settings.milvus_prefix
    ref = CollectionRef("demo-tiny.0", "scl-taobao", 3)
    assert vs.item_collection(ref) == f"{p}_demo_tiny_0_scl_taobao_v3_items"
    assert vs.behaviour_collection(ref) == f"{p}_demo_tiny_0_scl_taobao_v3_behaviours"
    assert vs.alias_name("demo-tiny.0", "scl-taobao", "behaviours") == f"{p}_demo_tiny_0_scl_taobao_behaviours"
    with pytest.raises(ConfigurationError, match=r"more than Milvus' 255"):
        vs.item_collection(CollectionRef("x" * 128, "s" * 48, 10**90))
    with pytest.raises(ConfigurationError, match="version must be an integer >= 1"):
        CollectionRef("d", "scl", 0)
    with pytest.raises(ConfigurationError, match="expected a muse.vectorstore.CollectionRef"):
        vs.count_items("scl")  # the old per-source call is refused, not silently mapped
    bad = VectorStore(load_settings(env={}, data_dir=milvus_settings.data_dir, milvus_prefix="9bad-prefix"))
    with pytest.raises(ConfigurationError, match="MUSE_MILVUS_PREFIX"):
        bad.item_collection(ref)


def test_datasets_and_versions_keep_separate_counts_and_colliding_names_are_refused(milvus_settings: Settings):
    refs = [CollectionRef("ds-a", "scl", 1), CollectionRef("ds-b", "scl", 1), CollectionRef("ds-a", "scl", 2)]
    rng = np.random.default_rng(3)
    with VectorStore(milvus_settings) as vs:
        try:
            for n, ref in enumerate(refs, start=1):
                vs.ensure_collections(ref, DIM)
                u, p, items, vecs = _history(rng, [7], 10 * n)
                vs.upsert_behaviours(ref, u, p, items, vecs)
                vs.upsert_items(ref, items[: 5 * n], vecs[: 5 * n], [0] * (5 * n))
            for n, ref in enumerate(refs, start=1):
                assert vs.count_behaviours(ref, user_id=7) == 10 * n
                assert vs.count_items(ref) == 5 * n
            assert vs.versions("ds-a", "scl") == [1, 2] and vs.versions("ds-b", "scl") == [1]
            # "ds_a" sanitises to the name of "ds-a": refused, naming the dataset that owns it
            with pytest.raises(ConfigurationError, match="holds dataset 'ds-a'.*collide"):
                vs.ensure_collections(CollectionRef("ds_a", "scl", 1), DIM)
            with pytest.raises(ConfigurationError, match="holds dataset 'ds-a'"):
                VectorStore(milvus_settings).count_items(CollectionRef("ds_a", "scl", 1))
        finally:
            for ref in refs:
                vs.drop_collections(ref)


def test_legacy_collections_are_detected(milvus_settings: Settings):
    from pymilvus import DataType, MilvusClient

    with VectorStore(milvus_settings) as vs:
        legacy = f"{milvus_settings.milvus_prefix}_scl_items"
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("item_id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
        vs.client.create_collection(legacy, schema=schema, index_params=vs._index_params())
        vs.ensure_collections(REF, DIM)
        try:
            found = vs.legacy_collections()
            assert [(c.name, c.source, c.kind) for c in found] == [(legacy, "scl", "items")]
        finally:
            vs.client.drop_collection(legacy)
            vs.drop_collections(REF)
