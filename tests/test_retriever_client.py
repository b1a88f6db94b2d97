"""Retriever client against real Milvus (Lite and the 2.3 server): the Milvus backend and the cache
backend return the same behaviours for tiny generated users, appends, single-flight, bad inputs. The
cache backend builds histories both ways: a gather from the item table by the sequence store's item
ids (the default) and from the behaviour collection's vectors."""

from __future__ import annotations

import numpy as np
import pytest

from muse.errors import ConfigurationError, NotFoundError
from muse.settings import Settings
from muse.simtier import N_TIERS
from muse.vectorstore import CollectionRef, VectorStore
from retriever.client import Retriever

DIM = 16
SOURCE = "scl"
DATASET = "ds-r"
REF = CollectionRef(DATASET, SOURCE, 1)
LENGTHS = {11: 80, 12: 6}  # user 12 is shorter than k
MISSING = {11: [5, 40, 41]}  # behaviours stored without a vector
ITEMS = np.arange(1000, 1200, dtype=np.int64)
NO_VECTOR = [1009, 1100, 1101, 1102]  # items stored without a vector
HISTORY_FROM = ("items", "behaviours")


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def populated(milvus_settings: Settings):
    rng = np.random.default_rng(7)
    store = VectorStore(milvus_settings)
    store.ensure_collections(REF, DIM)
    item_vecs = _unit(rng, len(ITEMS))
    item_vecs[np.asarray(NO_VECTOR) - 1000] = 0.0
    store.upsert_items(REF, ITEMS, item_vecs, np.zeros(len(ITEMS), dtype=np.int64))
    histories = {}
    pool = [int(i) for i in ITEMS[10:] if int(i) not in NO_VECTOR]  # targets ITEMS[:10] not in histories
    for user, n in LENGTHS.items():
        pos = np.arange(n, dtype=np.int64)
        items = rng.choice(pool, n, replace=False)  # distinct items: no tied scores
        for p, item in zip(MISSING.get(user, []), NO_VECTOR[1:]):
            items[p] = item
        vecs = item_vecs[items - 1000]  # as the backfill writes them: the items' vectors
        store.upsert_behaviours(REF, np.full(n, user), pos, items, vecs)
        histories[user] = (pos, items, vecs)
    store.set_live(REF)
    try:
        yield milvus_settings, store, item_vecs, histories
    finally:
        store.drop_live(DATASET, SOURCE)
        store.drop_collections(REF)
        store.close()


def _reference(target: np.ndarray, vecs: np.ndarray, k: int) -> np.ndarray:
    s = vecs.astype(np.float64) @ target.astype(np.float64)
    s[~np.any(vecs, axis=1)] = -np.inf
    order = np.argsort(-s, kind="stable")
    return order[np.isfinite(s[order])][:k]


@pytest.mark.parametrize("history_from", HISTORY_FROM)
def test_cache_and_milvus_paths_agree(populated, history_from: str) -> None:
    settings, _, item_vecs, histories = populated
    targets = [int(i) for i in ITEMS[:5]]
    with (
        # Read-your-writes: the histories were written just before (the default is Bounded).
        Retriever.from_settings(SOURCE, settings, dataset=DATASET, backend="milvus", consistency_level="Strong") as rm,
        Retriever.from_settings(
            SOURCE, settings, dataset=DATASET, backend="cache", cache={"history_from": history_from}
        ) as rc,
    ):
        for user, k in ((11, 10), (11, 50), (12, 50)):
            a, b = rm.search(user, targets, k=k), rc.search(user, targets, k=k)
            assert a.found and b.found and b.history_length == LENGTHS[user]
            assert (a.dataset, a.source, a.version) == (b.dataset, b.source, b.version) == (DATASET, SOURCE, 1)
            pos, items, vecs = histories[user]
            for j, (ha, hb) in enumerate(zip(a, b, strict=True)):
                ref = _reference(item_vecs[j], vecs, k)
                assert ha.item_id == hb.item_id == targets[j]
                np.testing.assert_array_equal(hb.positions, pos[ref])
                np.testing.assert_array_equal(ha.positions, hb.positions)
                np.testing.assert_array_equal(ha.behaviour_item_ids, items[ref])
                np.testing.assert_array_equal(hb.behaviour_item_ids, items[ref])
                np.testing.assert_allclose(ha.scores, hb.scores, atol=1e-5)
                np.testing.assert_array_equal(ha.simtier, hb.simtier)
                assert ha.simtier.shape == (N_TIERS,) and ha.simtier.sum() == len(ref)
                assert not set(ha.positions.tolist()) & set(MISSING.get(user, []))
        stats = rc.stats()
        assert stats.misses == 2 and stats.hits == 1 and stats.loads == 2 and stats.entries == 2
        # Target vectors are read from Milvus once, then served from the client's item LRU.
        assert (rc.item_lookups, rc.item_fetches) == (15, 5)
        # Without the Strong wait (serving setting), once the writes are visible: the same results.
        with Retriever.from_settings(SOURCE, settings, dataset=DATASET, backend="milvus", consistency_level="Bounded") as rb:
            for user in (11, 12):
                a, b = rb.search(user, targets, k=50), rc.search(user, targets, k=50)
                for ha, hb in zip(a, b, strict=True):
                    np.testing.assert_array_equal(ha.positions, hb.positions)
                    np.testing.assert_allclose(ha.scores, hb.scores, atol=1e-5)


def test_unknown_user_gives_an_empty_result(populated) -> None:
    settings = populated[0]
    for backend in ("cache", "milvus"):
        with Retriever.from_settings(SOURCE, settings, dataset=DATASET, backend=backend, consistency_level="Strong") as r:
            res = r.search(999, [int(ITEMS[0])], k=5)
            assert not res.found and len(res) == 1 and len(res[0]) == 0
            assert res.to_dict()["found"] is False


def test_bad_inputs_raise_clear_errors(populated) -> None:
    settings = populated[0]
    with Retriever.from_settings(SOURCE, settings, dataset=DATASET, backend="cache") as r:
        with pytest.raises(NotFoundError, match=r"\[4242\] not found"):
            r.search(11, [int(ITEMS[0]), 4242], k=5)
        with pytest.raises(NotFoundError, match=r"\[1009\] have no 'scl' vector"):
            r.search(11, [1009], k=5)
        for bad_k in (0, -1, 2.0, 100_000, True):
            with pytest.raises(ValueError, match="k must be an integer"):
                r.search(11, [int(ITEMS[0])], k=bad_k)
        with pytest.raises(ConfigurationError, match="user_id must be an integer"):
            r.search("11 or user_id > 0", [int(ITEMS[0])])
        with pytest.raises(ConfigurationError, match="empty"):
            r.search(11, [])
    with pytest.raises(ConfigurationError, match="backend 'gpu' is unknown"):
        Retriever.from_settings(SOURCE, settings, dataset=DATASET, backend="gpu")
    with pytest.raises(ConfigurationError, match="consistency_level 'Weak' is unknown"):
        Retriever.from_settings(SOURCE, settings, dataset=DATASET, backend="milvus", consistency_level="Weak")
    with pytest.raises(ConfigurationError, match="unknown cache options"):
        Retriever.from_settings(SOURCE, settings, dataset=DATASET, cache={"size": 1})
    with pytest.raises(NotFoundError, match="ds-r/nosuchsource has no live version"):
        Retriever.from_settings("nosuchsource", settings, dataset=DATASET)
    with pytest.raises(NotFoundError, match=r"_ds_r_scl_v7_behaviours' \(ds-r/scl/v7\) does not exist"):
        Retriever.from_settings(SOURCE, settings, dataset=DATASET, version=7)
    with pytest.raises(NotFoundError, match="other-ds/scl has no live version"):
        Retriever.from_settings(SOURCE, settings, dataset="other-ds")


@pytest.mark.parametrize("history_from", HISTORY_FROM)
def test_appended_behaviours_visible_in_next_search(populated, history_from: str) -> None:
    settings = populated[0]
    target = int(ITEMS[2])
    with (
        Retriever.from_settings(
            SOURCE, settings, dataset=DATASET, backend="cache", cache={"history_from": history_from}
        ) as rc,
        Retriever.from_settings(SOURCE, settings, dataset=DATASET, backend="milvus", consistency_level="Strong") as rm,
    ):
        assert rc.search(12, [target], k=3)[0].behaviour_item_ids[0] != target
        rc.append_behaviours(12, [6], [target])  # the target item itself: its vector from the items
        for r in (rc, rm):
            hit = r.search(12, [target], k=3)[0]
            assert hit.behaviour_item_ids[0] == target and hit.positions[0] == 6
            assert hit.scores[0] == pytest.approx(1.0, abs=1e-5)
        assert rc.stats().loads == 1  # extended in place, not reloaded
        assert rc.search(12, [target], k=50).history_length == 7


def test_concurrent_prefetch_loads_a_user_once(populated) -> None:
    settings = populated[0]
    with Retriever.from_settings(SOURCE, settings, dataset=DATASET, backend="cache", cache={"prefetch_workers": 4}) as r:
        futures = [r.prefetch([11]) for _ in range(4)] + [r.prefetch([11, 12, 999])]
        assert [f.result(timeout=60) for f in futures][-1] == {11: 80, 12: 6, 999: 0}
        r.search(11, [int(ITEMS[0])], k=5)
        st = r.stats()
        assert st.loads == 3 and st.hits == 1 and st.misses == 0 and st.entries == 2


def test_cli_search_prints_json_and_table(populated, monkeypatch, capsys) -> None:
    import json

    from muse_cli.main import main

    settings = populated[0]
    monkeypatch.setenv("MUSE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("MUSE_MILVUS_URI", settings.milvus_uri)
    monkeypatch.setenv("MUSE_MILVUS_PREFIX", settings.milvus_prefix)
    args = ["retrieve", "search", "--source", SOURCE, "--dataset", DATASET, "--user", "12", "--items", f"{ITEMS[0]},{ITEMS[1]}"]
    assert main([*args, "--k", "4", "--backend", "milvus", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["found"] and [len(t["positions"]) for t in out["targets"]] == [4, 4]
    assert out["version"] == 1 and out["collection"].endswith("_ds_r_scl_v1_behaviours")
    assert main([*args, "--k", "4"]) == 0
    text = capsys.readouterr().out
    assert "cache backend, 6 behaviours" in text and "simtier" in text
    assert "ds-r/scl v1 (collection " in text
    assert main([*args[:-1], "4242", "--k", "4"]) == 2
    assert "[4242] not found" in capsys.readouterr().err
    assert main([*args, "--k", "0"]) == 2
    assert "k must be an integer in 1..16384, got 0" in capsys.readouterr().err


def test_target_vectors_missing_zero_gives_zero_rows(populated) -> None:
    """The ranker's scoring reads candidates' vectors through the view: unknown items and items
    stored without a vector give zero rows with ``missing="zero"`` (an error by default)."""
    settings, _, item_vecs, _ = populated
    with Retriever.from_settings(SOURCE, settings, dataset=DATASET) as r:
        view = r.view()
        ids = [int(ITEMS[3]), 4242, 1009, int(ITEMS[3])]
        got = view.target_vectors(ids, missing="zero")
        assert got.shape == (4, DIM) and got.dtype == np.float32
        np.testing.assert_allclose(got[0], item_vecs[3], atol=1e-6)
        np.testing.assert_array_equal(got[1], 0.0)
        np.testing.assert_array_equal(got[2], 0.0)
        np.testing.assert_array_equal(got[3], got[0])
        with pytest.raises(NotFoundError, match=r"\[4242\] not found"):
            view.target_vectors(ids)
        with pytest.raises(ConfigurationError, match="missing='skip'"):
            view.target_vectors(ids, missing="skip")
