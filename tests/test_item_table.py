"""The GSU item table on disk (muse.itemtable) and its loading (retriever.item_table): a table file
and its persisted id -> row index; an ItemTable filled from the file holds the same vectors as one
filled from Milvus, in every storage dtype, with no Milvus read; int8 vectors as shipped stay exact in
an int8 table; a Retriever loads the file of its version; a finished backfill writes the file, and a
server without one scans Milvus once and writes it."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from muse.arrays import l2_normalise
from muse.itemtable import (
    ABSENT,
    IdHash,
    check_table,
    ensure_index,
    export_from_store,
    export_table,
    read_index,
    read_table,
    ref_table_dir,
    table_index,
)
from muse.settings import Settings
from muse.vectorstore import CollectionRef, VectorStore

DIM = 16
#: The device of the ItemTable tests (cpu; MUSE_TEST_DEVICE=cuda on a GPU machine).
DEVICE = os.environ.get("MUSE_TEST_DEVICE", "cpu")
KEY = {"source": {"name": "scl", "version": 2, "dim": DIM}, "dataset": {"name": "ds", "meta_mtime_ns": None}}


def _catalogue(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item ids (int64 hashes, negative ones included, as Taobao-MM's), unit vectors, and which have one."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(-(2**62), 2**62, 2**40, dtype=np.int64), n, replace=False)
    vecs = l2_normalise(rng.normal(size=(n, DIM)).astype(np.float32))
    present = rng.random(n) > 0.1
    vecs[~present] = 0.0
    return ids, vecs, present


def _fetcher(ids: np.ndarray, vecs: np.ndarray, present: np.ndarray, calls: list[int] | None = None):
    by_id = {int(i): v for i, v, p in zip(ids, vecs, present, strict=True) if p}

    def fetch(wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if calls is not None:
            calls.append(len(wanted))
        found = [int(i) for i in np.asarray(wanted).tolist() if int(i) in by_id]
        return np.asarray(found, np.int64), np.asarray([by_id[i] for i in found], np.float32).reshape(-1, DIM)

    return fetch


def test_table_file_and_its_persisted_index(tmp_path: Path) -> None:
    ids, vecs, present = _catalogue()
    folder = tmp_path / "items-ds"
    table = export_table(folder, ids, _fetcher(ids, vecs, present), DIM, KEY, batch=500)
    np.testing.assert_array_equal(table.item_ids, ids)
    np.testing.assert_array_equal(table.present, present)
    np.testing.assert_allclose(table.vectors, vecs, atol=1e-6)
    assert not list(tmp_path.glob("*.tmp-*"))  # written beside, renamed into place

    index = read_index(folder, table)
    assert index is not None  # written with the table
    rows = index.get(ids)
    np.testing.assert_array_equal(rows[present], np.arange(int(present.sum())))  # rows among the present ones
    assert (rows[~present] == ABSENT).all()
    assert index.get(np.asarray([12345, -7], np.int64)).tolist() == [-1, -1]  # unknown items
    np.testing.assert_array_equal(table_index(table).get(ids), rows)

    # The index belongs to its table: another table's contents make it unusable, and it is rebuilt.
    doc = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**doc, "present": doc["present"] - 1}))
    assert read_index(folder, table) is None
    np.testing.assert_array_equal(ensure_index(folder, table).get(ids), rows)
    assert read_index(folder, table) is not None

    # A table is used only for its own (dataset, source, version) and width, and dataset.
    assert check_table(folder, "ds", "scl", 2, DIM)[0] is not None
    assert "not ('ds', 'scl', 3)" in check_table(folder, "ds", "scl", 3, DIM)[1]
    assert "16-d" in check_table(folder, "ds", "scl", 2, 32)[1]
    ds = tmp_path / "dataset"
    ds.mkdir()
    (ds / "meta.json").write_text("{}")
    assert "written again" in check_table(folder, "ds", "scl", 2, DIM, ds)[1]
    assert "holds no item table" in check_table(tmp_path / "nothing", "ds", "scl", 2)[1]


def test_id_hash_overwrites_and_grows() -> None:
    h = IdHash(4)
    h.put(np.arange(3000, dtype=np.int64) * 7, np.arange(3000))
    h.put(np.asarray([7, 99_999]), np.asarray([ABSENT, 5]))  # one overwritten, one new
    assert len(h) == 3001 and h.bits >= 13
    assert h.get(np.asarray([0, 7, 14, 99_999, 3])).tolist() == [0, ABSENT, 2, 5, -1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
def test_item_table_from_the_file_equals_the_table_from_milvus(tmp_path: Path, dtype: str) -> None:
    """Same rows, same GSU results as a table filled by fetching (what it did before), with no
    fetch; items the file does not hold are still fetched; forget_absent fetches absent ones again."""
    from retriever.cache import GatherCache, ItemTable, gather_history

    ids, vecs, present = _catalogue()
    table_file = export_table(tmp_path / "t", ids, _fetcher(ids, vecs, present), DIM, KEY)
    calls: list[int] = []
    extra_id = np.int64(424242)
    all_ids = np.concatenate([ids, [extra_id]])
    all_vecs = np.concatenate([vecs, l2_normalise(np.ones((1, DIM), np.float32))])
    fetch = _fetcher(all_ids, all_vecs, np.concatenate([present, [True]]), calls)
    from_file = ItemTable(fetch, DIM, dtype, DEVICE)
    assert from_file.load_file(table_file, ensure_index(tmp_path / "t", table_file)) == int(present.sum())
    fetched = ItemTable(_fetcher(all_ids, all_vecs, np.concatenate([present, [True]])), DIM, dtype, DEVICE)
    fetched.load(ids)

    rng = np.random.default_rng(1)
    seq = rng.choice(ids, 2000)  # repeats, absent items included
    a = gather_history(1, np.arange(len(seq)), seq, from_file)
    b = gather_history(1, np.arange(len(seq)), seq, fetched)
    assert calls == []  # nothing read from "Milvus"
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.missing_positions, b.missing_positions)
    np.testing.assert_array_equal(np.isin(seq, ids[~present]), np.isin(np.arange(len(seq)), a.missing_positions))
    targets = torch.from_numpy(l2_normalise(rng.normal(size=(8, DIM)).astype(np.float32))).to(DEVICE)
    ta, tb = a.topk(targets, 50), b.topk(targets, 50)
    tol = {"float32": 1e-6, "bfloat16": 1e-2, "float16": 2e-3, "int8": 1e-2}[dtype]
    np.testing.assert_allclose(ta.scores.cpu().numpy(), tb.scores.cpu().numpy(), atol=tol)

    # An item written after the file is fetched once and appended.
    rows = from_file.rows_of(np.asarray([extra_id, ids[0]]))
    assert calls == [1] and rows[0] == int(present.sum())
    # Absent items are not fetched ... until the table is told more items were written.
    absent = ids[~present][:3]
    assert (from_file.rows_of(absent) == -1).all() and calls == [1]
    from_file.forget_absent()
    assert (from_file.rows_of(absent) == -1).all() and calls == [1, 3]
    with GatherCache(lambda u: (np.arange(len(seq)), seq), from_file) as cache:
        assert len(cache.get(1)) == len(seq)


def test_int8_vectors_as_shipped_are_exact_in_an_int8_table(tmp_path: Path) -> None:
    """Taobao-MM's SCL vectors are int8 (x 127) with ~10% missing: an int8 table keeps the shipped
    rows with a per-row scale 1/norm, so its cosines are those of the float vectors (no second
    rounding); a float32 table normalises them."""
    from muse.ondisk import write_array
    from retriever.cache import ItemTable, gather_history

    rng = np.random.default_rng(2)
    n = 1000
    ids = np.arange(n, dtype=np.int64) * 3 - 1500
    raw = np.trunc(rng.uniform(-0.3, 0.3, (n, DIM)) * 127).astype(np.int8)
    present = rng.random(n) > 0.1
    raw[~present] = 0
    folder = tmp_path / "items-tb"
    folder.mkdir()
    write_array(folder / "item_ids.npy", ids)
    write_array(folder / "vectors.npy", raw)
    write_array(folder / "present.npy", present)
    (folder / "key.json").write_text(json.dumps({"key": KEY, "scale": 127.0, "normalised": False}))
    table, _ = read_table(folder)
    unit = l2_normalise(raw.astype(np.float64) / 127.0)
    targets = l2_normalise(rng.normal(size=(4, DIM)))
    expected = (targets.astype(np.float64) @ unit.T.astype(np.float64))[:, present]  # [4, n_present]
    from muse.itemtable import int8_rows

    form = int8_rows(folder, table)
    assert form[0] is table.vectors and not (folder / "int8_vectors.npy").exists()  # shipped rows as they are
    for dtype, rows in (("int8", None), ("int8", form), ("float32", form), ("float32", None)):
        t = ItemTable(_no_fetch, DIM, dtype, DEVICE)
        t.load_file(table, ensure_index(folder, table), block_rows=300, int8_rows=rows)
        h = gather_history(1, np.arange(n), ids, t)
        assert len(h.positions) == int(present.sum())
        top = h.topk(torch.from_numpy(targets).to(DEVICE), int(present.sum()))
        got = np.sort(top.scores.cpu().numpy(), axis=1)
        np.testing.assert_allclose(got, np.sort(expected, axis=1), atol=2e-6)
    assert t.vectors.dtype == torch.float32


def test_direct_reads_and_the_int8_form_give_the_same_table(tmp_path: Path) -> None:
    """A float32 table of a file whose rows are all present is the file's bytes; an int8 table read
    from the int8 form written beside the file equals one quantised while loading."""
    from muse.itemtable import int8_rows
    from retriever.cache import ItemTable

    ids, vecs, _ = _catalogue(2000, seed=5)
    everything = np.ones(len(ids), bool)
    folder = tmp_path / "t"
    table = export_table(folder, ids, _fetcher(ids, l2_normalise(vecs + 0.01), everything), DIM, KEY)
    index = ensure_index(folder, table)
    t32 = ItemTable(_fetcher(ids, vecs, everything), DIM, "float32", DEVICE)
    t32.load_file(table, index, block_rows=700)
    np.testing.assert_array_equal(t32.vectors.cpu().numpy(), np.asarray(table.vectors))

    q, scale = int8_rows(folder, table)
    assert (folder / "int8.json").exists() and q.dtype == np.int8 and scale.shape == (len(ids),)
    stamp = (folder / "int8_vectors.npy").stat().st_mtime_ns
    assert int8_rows(folder, table)[0].shape == q.shape and (folder / "int8_vectors.npy").stat().st_mtime_ns == stamp
    via_form = ItemTable(_no_fetch, DIM, "int8", DEVICE)
    via_form.load_file(table, index, block_rows=700, int8_rows=(q, scale))
    quantised = ItemTable(_no_fetch, DIM, "int8", DEVICE)
    quantised.load_file(table, index, block_rows=700)
    mismatched = (via_form.vectors != quantised.vectors).sum().item()
    assert mismatched <= 2  # the same rounding, but for a rare tie at .5 between numpy and torch
    np.testing.assert_allclose(via_form.scale.cpu().numpy(), quantised.scale.cpu().numpy(), rtol=1e-6)


def _no_fetch(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros((0, DIM), np.float32)


# -- a Retriever on real Milvus (Lite and the 2.3 server) ------------------------------------------
REF = CollectionRef("ds-table", "scl", 1)


@pytest.fixture
def collections(milvus_settings: Settings):
    rng = np.random.default_rng(4)
    store = VectorStore(milvus_settings)
    store.ensure_collections(REF, DIM)
    ids, vecs, present = _catalogue(300, seed=4)
    store.upsert_items(REF, ids[present], vecs[present], np.zeros(int(present.sum()), np.int64))
    row_of = {int(i): r for r, i in enumerate(ids)}
    for user in (1, 2):
        items = rng.choice(ids, 120, replace=False)  # distinct items: no tied scores
        store.upsert_behaviours(REF, np.full(120, user), np.arange(120), items, vecs[[row_of[int(i)] for i in items]])
    store.set_live(REF)
    try:
        yield milvus_settings, store, ids, vecs, present
    finally:
        store.drop_live(REF.dataset, REF.source)
        store.drop_collections(REF)
        store.close()


def test_retriever_loads_its_versions_table_file(collections, caplog) -> None:
    from retriever.client import Retriever

    settings, store, ids, vecs, present = collections
    caplog.set_level(logging.INFO, logger="retriever.item_table")
    with Retriever(store, "scl", dataset=REF.dataset) as r:  # no file yet: items on demand, one line says so
        assert r.view().table_load.how == "on-demand" and len(r.item_table) == 0
        on_demand = r.search(1, [int(ids[present][0])], k=20)
        assert r.item_table.fetched > 0
    assert sum("no item table file" in rec.getMessage() for rec in caplog.records) == 1

    folder = ref_table_dir(settings, REF)
    export_from_store(store, REF, ids)  # what `muse serve` writes on its first start (dataset not needed)
    assert folder.is_dir() and (folder / "index.json").exists()
    with (
        Retriever(store, "scl", dataset=REF.dataset) as r,
        Retriever(store, "scl", dataset=REF.dataset, backend="milvus") as m,
    ):
        load = r.view().table_load
        assert (load.how, load.rows) == ("file", int(present.sum()))
        assert r.load_item_table() is load  # already from the file
        for user in (1, 2):
            targets = [int(i) for i in ids[present][:3]]
            got, want = r.search(user, targets, k=20), m.search(user, targets, k=20)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
                assert set(a.positions.tolist()) == set(b.positions.tolist())
        assert r.item_table.fetched == 0  # every behaviour's item came from the file
        res = r.search(1, [int(ids[present][0])], k=20)
        np.testing.assert_allclose(res[0].scores, on_demand[0].scores, atol=1e-6)


# -- the embedding stage writes it; a server without one writes it once -------------------------------
@pytest.mark.slow
def test_backfill_writes_the_table_and_serve_scans_milvus_once_without_it(settings: Settings, caplog) -> None:
    from test_indexer_helpers import SOURCE, make_tiny_world, ref_of

    from indexer import backfill, jobs, worker_context
    from muse import models
    from muse.db import session_scope
    from retriever.client import Retriever

    dataset = make_tiny_world(settings)
    try:
        job_id = jobs.create_job(settings, SOURCE, dataset.name, chunk_size=500, user_chunk_size=200)
        with session_scope(settings) as session:
            chunks = [c.id for c in session.get(models.BackfillJob, job_id).chunks]
        for chunk_id in chunks:
            backfill.run_chunk(settings, chunk_id)
        jobs.advance_job(settings, job_id, app=object())  # closes the job: the done hook runs
        ref = ref_of(settings, dataset.name)
        folder = ref_table_dir(settings, ref)
        table, doc = read_table(folder)
        assert doc["key"]["exported_from"]  # a trained source: what the backfill wrote, not encoded again
        assert len(table.item_ids) == dataset.n_items and read_index(folder, table) is not None

        store = backfill.get_store(settings)
        user = int(dataset.histories().row_ids[0])
        target = [int(table.item_ids[table.present][0])]
        with Retriever(store, SOURCE, dataset=dataset.name) as r:
            assert r.view().table_load.how == "file"
            first = r.search(user, target, k=10)
            assert r.item_table.fetched == 0

        shutil.rmtree(folder)  # a version backfilled before tables existed
        caplog.set_level(logging.INFO, logger="retriever.item_table")
        with Retriever(store, SOURCE, dataset=dataset.name) as r:
            assert r.view().table_load.how == "on-demand"
            load = r.load_item_table(scan_milvus=True)  # what `muse serve` does at start-up
            assert (load.how, load.rows) == ("milvus", int(table.present.sum()))
            np.testing.assert_allclose(r.search(user, target, k=10)[0].scores, first[0].scores, atol=1e-6)
        assert any("reading" in rec.getMessage() and "from Milvus once" in rec.getMessage() for rec in caplog.records)
        with Retriever(store, SOURCE, dataset=dataset.name) as r:
            assert r.view().table_load.how == "file"  # the next start reads the file

        # Training computes its own table from the encoder; the GSU servers accept that one too.
        from indexer.item_vectors import item_vectors

        caplog.clear()
        caplog.set_level(logging.INFO, logger="indexer.item_vectors")
        computed = item_vectors(settings, ref)
        assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
        np.testing.assert_allclose(computed.vectors[table.present], table.vectors[table.present], atol=1e-5)
        with Retriever(store, SOURCE, dataset=dataset.name) as r:
            assert r.view().table_load.how == "file" and len(r.item_table) == int(table.present.sum())
    finally:
        worker_context.reset()
