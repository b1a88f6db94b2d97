"""The Taobao-MM reader on the ten-row demo files: exact values read back, and malformed input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muse.data.format import Dataset
from muse.data.taobao_mm import decode_labels, import_taobao_mm
from muse.errors import DataError, NotFoundError
from tests.conftest import TAOBAO_DEMO_DIR

USER_351 = -1001154915799468782  # the one test user whose history has 351 entries
FIRST_TRAIN_USER = -1000233199594900771
SCL_ITEM = -100135754869043717


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    from muse.settings import load_settings

    settings = load_settings(env={}, data_dir=tmp_path_factory.mktemp("tb") / "muse-data", device="cpu")
    return import_taobao_mm(settings, TAOBAO_DEMO_DIR, name="tb-demo")


def _histories(ds: Dataset) -> dict[int, dict]:
    return {r["user_id"]: r for r in ds.histories_table().to_pylist()}


def test_counts_and_missing_users(demo: Dataset) -> None:
    m = demo.meta
    assert (m["kind"], m["n_items"], m["n_impressions"]) == ("taobao-mm", 10, 20)
    # 20 users with features + 3 sample users that have no feature row in the demo files
    assert m["n_users"] == 23 and m["n_users_without_features"] == 3
    assert m["n_impressions_without_history"] == 20
    assert m["n_behaviours"] == 19 * 1000 + 351
    assert m["has_images"] is False and m["has_search_sessions"] is False


def test_history_values(demo: Dataset) -> None:
    hist = _histories(demo)
    first = hist[FIRST_TRAIN_USER]
    assert len(first["item_ids"]) == 1000
    assert first["item_ids"][:2] == [-3158540113177114857, 4382780109111517843]
    assert first["item_ids"][-1] == 2252854114667230267
    assert first["categories"][0] == -4316783378234398615
    assert first["times"] == list(range(1000))
    short = hist[USER_351]
    assert len(short["item_ids"]) == len(short["categories"]) == 351
    assert short["item_ids"][:2] == [8374074985177435509, 8063578943926079331]
    assert short["item_ids"][-1] == -789854766039803454 and short["categories"][-1] == -2840833756837532271
    for uid in (-587594303343277051, -5124604129084675105, -5343151251631757820):  # sample-only users
        assert hist[uid]["item_ids"] == [] and hist[uid]["times"] == []
    # canonical order: test feature rows, then train feature rows (of users stored once: not again),
    # then sample-only users
    first_test = pq.read_table(TAOBAO_DEMO_DIR / "test_user_features.parquet").column("129_1")[0].as_py()
    assert demo.histories_table().column("user_id")[0].as_py() == first_test
    assert demo.histories_table().column("user_id").to_pylist()[-3:] == [
        -587594303343277051, -5124604129084675105, -5343151251631757820]


def test_user_and_item_features(demo: Dataset) -> None:
    users = {r["user_id"]: r for r in demo.users().to_pylist()}
    assert users[FIRST_TRAIN_USER]["f1"] == -7446916648201533712 and users[FIRST_TRAIN_USER]["f5"] == 0
    items = demo.items().to_pylist()
    assert items[0] == {
        "item_id": -1000138449024228098,
        "category": 910958624523185984,
        "feat_a": -8811435593520713968,
        "feat_b": -464595281521813246,
        "title": None,
    }
    assert demo.item_ids().dtype == np.int64


def test_label_decoding_and_splits(demo: Dataset) -> None:
    test = pa.Table.from_batches(list(demo.iter_impressions(split="test"))).to_pylist()
    assert [r["label"] for r in test] == [0, 0, 1] + [0] * 7
    assert test[2]["item_id"] == -3283098639475878228 and test[2]["user_id"] == -5343151251631757820
    train = pa.Table.from_batches(list(demo.iter_impressions(split="train"))).to_pylist()
    assert len(train) == 10 and sum(r["label"] for r in train) == 0
    assert {r["user_id"] for r in train} == {-587594303343277051, -5124604129084675105}
    assert all(r["hist_len"] == 0 for r in train + test)  # those users have no feature row


def test_scl_vectors_stay_int8(demo: Dataset) -> None:
    path = demo.embeddings_path("scl-taobao")
    assert path is not None and demo.embeddings_path("openclip") is None
    shipped = demo.embeddings("scl-taobao")
    assert shipped.vectors.dtype == np.int8 and shipped.vectors.shape == (10, 128) and shipped.scale == 127.0
    row = int(np.flatnonzero(np.asarray(shipped.item_ids) == SCL_ITEM)[0])
    assert np.asarray(shipped.vectors[row, :4]).tolist() == [12, 12, 2, 21]
    got = shipped.float_rows(np.array([row]))[0]
    assert got.dtype == np.float32 and len(got) == 128
    assert got[:4].tolist() == pytest.approx([12 / 127, 12 / 127, 2 / 127, 21 / 127], abs=1e-7)
    assert got[-1] == pytest.approx(-26 / 127, abs=1e-7)


def test_decode_labels_rejects_non_one_hot() -> None:
    ok = decode_labels(pa.array([[1, 0], [0, 1]], type=pa.list_(pa.int8())), "x")
    assert ok.tolist() == [0, 1]
    with pytest.raises(DataError, match=r"\[1, 1\]"):
        decode_labels(pa.array([[1, 0], [1, 1]], type=pa.list_(pa.int8())), "x")
    with pytest.raises(DataError, match="one-hot"):
        decode_labels(pa.array([[1, 0, 0]], type=pa.list_(pa.int8())), "x")
    for bad in ([0, 0], [2, -1], [3, 0], [-1, 1], [0, 2]):  # integer pairs: every non-one-hot is refused
        with pytest.raises(DataError, match="one-hot"):
            decode_labels(pa.array([[0, 1], bad], type=pa.list_(pa.int64())), "x")
    assert decode_labels(pa.array([[0.0, 1.0], [1.0, 0.0]], type=pa.list_(pa.float32())), "x").tolist() == [1, 0]
    with pytest.raises(DataError, match="one-hot"):
        decode_labels(pa.array([[0.5, 0.5]], type=pa.list_(pa.float32())), "x")


def _copy_demo(dst: Path) -> Path:
    shutil.copytree(TAOBAO_DEMO_DIR, dst)
    return dst


def test_sharded_layout_reads_the_same(tmp_path: Path, settings, demo: Dataset) -> None:  # noqa: ANN001
    raw = _copy_demo(tmp_path / "raw")
    table = pq.read_table(raw / "train_user_features.parquet")
    (raw / "train_user_features.parquet").unlink()
    (raw / "train_user_features").mkdir()
    pq.write_table(table.slice(0, 4), raw / "train_user_features" / "part-0.parquet")
    pq.write_table(table.slice(4), raw / "train_user_features" / "part-1.parquet")
    ds = import_taobao_mm(settings, raw, name="tb-sharded")
    assert ds.histories_table().equals(demo.histories_table())


def test_malformed_inputs(tmp_path: Path, settings) -> None:  # noqa: ANN001
    with pytest.raises(NotFoundError, match="does not exist"):
        import_taobao_mm(settings, tmp_path / "nowhere")
    raw = _copy_demo(tmp_path / "raw")
    bad = pq.read_table(raw / "train_samples.parquet")
    pq.write_table(bad.drop(["205"]), raw / "train_samples.parquet")
    with pytest.raises(DataError, match=r"missing Taobao-MM columns \['205'\]"):
        import_taobao_mm(settings, raw, name="bad")
    labels = pa.array([[1, 1]] + [[1, 0]] * (bad.num_rows - 1), type=pa.list_(pa.int8()))
    pq.write_table(bad.set_column(0, "label_0", labels), raw / "train_samples.parquet")
    with pytest.raises(DataError, match="label_0 row 0"):
        import_taobao_mm(settings, raw, name="bad")
    (raw / "item_features.parquet").unlink()
    with pytest.raises(NotFoundError, match="item_features"):
        import_taobao_mm(settings, raw, name="bad")


def _digests(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "meta.json"}


def test_small_units_same_bytes_and_duplicate_users(
    tmp_path: Path,
    settings,
    demo: Dataset,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tiny batches and units exercise the streaming paths and write the same bytes; a user repeated in
    one file keeps its first row (and is counted); a train row equal to the test row is the normal case
    (stored once, not warned about)."""
    import muse.data.taobao_mm as tb

    monkeypatch.setattr(tb, "USER_BATCH", 3)
    monkeypatch.setattr(tb, "ROW_BATCH", 4)
    monkeypatch.setattr(tb, "UNIT_ROWS", {"users": 5, "rows": 7})
    small = import_taobao_mm(settings, TAOBAO_DEMO_DIR, name="tb-demo")  # the same name: the same meta
    arrays = {k: v for k, v in _digests(small.path).items() if not k.endswith(".parquet")}
    assert arrays == {k: v for k, v in _digests(demo.path).items() if not k.endswith(".parquet")}
    for table in ("items", "users"):  # written in other row groups: the same rows
        assert pq.read_table(small.path / f"{table}.parquet").equals(pq.read_table(demo.path / f"{table}.parquet"))

    raw = _copy_demo(tmp_path / "raw")
    test = pq.read_table(raw / "test_user_features.parquet")
    train = pq.read_table(raw / "train_user_features.parquet")
    pq.write_table(pa.concat_tables([test, test.slice(0, 1), train.slice(0, 1)]), raw / "test_user_features.parquet")
    with caplog.at_level("WARNING", logger="muse.data.taobao_mm"):
        ds = import_taobao_mm(settings, raw, name="tb-batches")
    assert ds.meta["n_duplicate_user_rows"] == 1 and ds.meta["n_test_users_same_as_train"] == 1
    assert "1 user-feature rows repeat a user" in caplog.text and "different train and test" not in caplog.text
    assert ds.n_users == demo.n_users  # the train row is stored once, as the test row
    assert {r["user_id"]: r for r in ds.histories_table().to_pylist()} == _histories(demo)


def _sample_rows(users: list[int], items: list[int], click: bool) -> pa.Table:
    label = [0, 1] if click else [1, 0]
    return pa.table({
        "label_0": pa.array([label] * len(users), type=pa.list_(pa.int8())),
        "129_1": pa.array(users, type=pa.int64()),
        "205": pa.array(items, type=pa.int64()),
    })


def test_each_split_joins_its_own_user_file(tmp_path: Path, settings) -> None:  # noqa: ANN001
    """Train samples get the train user file's row, test samples the test file's (history included),
    as the release joins them: a test row extending the train row (7 more behaviours) is stored once
    and train impressions see its prefix; a test row with other features or another history gets
    an alias user that only test impressions use."""
    raw = _copy_demo(tmp_path / "raw")
    train = pq.read_table(raw / "train_user_features.parquet")
    test = pq.read_table(raw / "test_user_features.parquet")
    rows = train.slice(0, 3).to_pylist()
    u_ext, u_feat, u_hist = (r["129_1"] for r in rows)
    extended = dict(rows[0])
    extended["150_2_180"] = rows[0]["150_2_180"] + list(range(7))
    extended["151_2_180"] = rows[0]["151_2_180"] + [5] * 7
    other_features = dict(rows[1], **{"130_1": 12345})
    other_history = dict(rows[2])
    other_history["150_2_180"] = [99] + rows[2]["150_2_180"][1:] + [98]
    other_history["151_2_180"] = rows[2]["151_2_180"] + [5]
    extra = pa.Table.from_pylist([extended, other_features, other_history], schema=test.schema)
    pq.write_table(pa.concat_tables([test, extra]), raw / "test_user_features.parquet")
    item = pq.read_table(raw / "item_features.parquet").column("205")[0].as_py()
    users = [u_ext, u_feat, u_hist]
    for split in ("train", "test"):
        samples = pq.read_table(raw / f"{split}_samples.parquet")
        extra_samples = _sample_rows(users, [item] * 3, click=split == "test").cast(samples.schema)
        pq.write_table(pa.concat_tables([samples, extra_samples]), raw / f"{split}_samples.parquet")
    ds = import_taobao_mm(settings, raw, name="tb-join")
    assert ds.meta["n_test_users_extending_train"] == 1 and ds.meta["n_test_user_aliases"] == 2

    hist = _histories(ds)
    feats = {r["user_id"]: r for r in ds.users().to_pylist()}
    split_imps = {split: pa.Table.from_batches(list(ds.iter_impressions(split=split))).to_pylist()[-3:]
                  for split in ("train", "test")}
    file_rows = {"train": {r["129_1"]: r for r in rows},
                 "test": {r["129_1"]: r for r in (extended, other_features, other_history)}}
    for split, imp, sample_user in [(sp, imp, u) for sp in split_imps for imp, u in zip(split_imps[sp], users)]:
        want = file_rows[split][sample_user]
        got_hist = hist[imp["user_id"]]["item_ids"][: imp["hist_len"]]
        assert imp["hist_len"] == len(want["150_2_180"]), (split, sample_user)
        assert got_hist == want["150_2_180"], (split, sample_user)
        assert feats[imp["user_id"]]["f1"] == want["130_1"], (split, sample_user)
    train_imps, test_imps = split_imps["train"], split_imps["test"]
    assert [r["user_id"] for r in train_imps] == users  # train impressions keep the real user ids
    assert test_imps[0]["user_id"] == u_ext and test_imps[0]["hist_len"] == 1007
    assert train_imps[0]["hist_len"] == 1000
    assert test_imps[1]["user_id"] not in (u_feat, u_ext, u_hist)  # an alias
    assert test_imps[2]["user_id"] not in (u_feat, u_ext, u_hist)


_KILLABLE_IMPORT = """
import logging
import sys
logging.basicConfig(level=logging.INFO)
import muse.data.taobao_mm as tb
from muse.settings import load_settings
tb.UNIT_ROWS = {"users": 40, "rows": 500}
tb.USER_BATCH, tb.ROW_BATCH = 16, 128
settings = load_settings(env={}, data_dir=sys.argv[2], device="cpu")
tb.import_taobao_mm(settings, sys.argv[1], name=sys.argv[3], register=False)
"""


@pytest.mark.slow
def test_killed_import_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    """An import killed (SIGKILL) between commits resumes from its journal at the last unit and writes
    files byte-identical to an import that was never interrupted."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from bench.taobao_mm_synth import SynthConfig, generate

    raw = tmp_path / "raw"
    generate(raw, SynthConfig(n_users=300, n_items=2_000, train_per_user=12, test_per_user=4))
    data = tmp_path / "data"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    whole = subprocess.run([sys.executable, "-c", _KILLABLE_IMPORT, str(raw), str(data), "whole"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    journal = data / "datasets" / "cut" / "import-journal.json"
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE_IMPORT, str(raw), str(data), "cut"], env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # kill once a few units are committed, mid-way
            try:
                if json.loads(journal.read_text())["next_unit"] >= 9:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert proc.poll() is None, "the import finished before it could be killed"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done_before = json.loads(journal.read_text())["next_unit"]
    assert not (data / "datasets" / "cut" / "meta.json").exists()
    resumed = subprocess.run([sys.executable, "-c", _KILLABLE_IMPORT, str(raw), str(data), "cut"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming the import at unit {done_before}" in resumed.stderr
    a, b = _digests(data / "datasets" / "whole"), _digests(data / "datasets" / "cut")
    assert a == b and any(k.startswith("histories/") for k in a) and not journal.exists()


def test_backfill_reads_the_shipped_int8_table(demo: Dataset) -> None:
    """A backfill of ``scl-taobao`` on an imported Taobao-MM set reads the int8 table the import
    wrote (``embeddings/scl-taobao/``) chunk by chunk: every item in Milvus Lite, de-quantised and
    L2-normalised, with its category from the item table."""
    from indexer import backfill as bf
    from indexer import jobs
    from muse import db, models
    from muse.db import session_scope
    from muse.settings import load_settings
    from muse.vectorstore import CollectionRef

    settings = load_settings(env={}, data_dir=demo.path.parents[1], device="cpu")
    db.upgrade(settings)
    job_id = jobs.create_job(settings, "scl-taobao", demo.name, chunk_size=4, behaviours=False)
    with session_scope(settings) as session:
        job = session.get(models.BackfillJob, job_id)
        chunks = [(c.id, c.kind, c.start, c.stop) for c in job.chunks]
        version = int(job.options["source_version"])
    assert [(k, lo, hi) for _, k, lo, hi in chunks] == [("import", 0, 4), ("import", 4, 8), ("import", 8, 10)]
    try:
        for chunk_id, *_ in chunks:
            bf.run_chunk(settings, chunk_id)
        shipped = demo.embeddings("scl-taobao")
        ids = np.asarray(shipped.item_ids)
        store = bf.get_store(settings)
        ref = CollectionRef(demo.name, "scl-taobao", version)
        assert store.count_items(ref) == 10
        found, vectors = store.get_item_vectors(ref, ids)
        order = {int(i): r for r, i in enumerate(found)}
        want = shipped.float_rows()
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        got = np.stack([vectors[order[int(i)]] for i in ids])
        assert np.allclose(got, want, atol=1e-6)
    finally:
        bf.close_stores()
        db._engine_for.cache_clear()


@pytest.mark.parametrize("in_order", [True, False])
def test_prefix_comparison_matches_entry_by_entry(in_order: bool) -> None:
    """The train-row vs stored-test-row prefix check (contiguous path for rows in the stored order,
    gathered path otherwise) gives what comparing every entry one by one gives: equal prefixes, a
    changed item, a changed category, empty lists."""
    from muse.data.taobao_mm import prefix_equal

    rng = np.random.default_rng(3 if in_order else 4)
    n_rows = 60
    stored_len = rng.integers(0, 30, n_rows)
    stored_start = np.concatenate([[0], np.cumsum(stored_len)[:-1]])
    n_entries = int(stored_len.sum())
    item_table, cat_table = rng.permutation(10**6)[:500].astype(np.int64), rng.permutation(10**6)[:40].astype(np.int64)
    stored_items, stored_cats = rng.integers(0, 500, n_entries), rng.integers(0, 40, n_entries)
    test_rows = np.arange(n_rows) if in_order else rng.permutation(n_rows)
    lengths = np.minimum(rng.integers(0, 30, n_rows), stored_len[test_rows])  # a prefix at most as long
    row_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pieces = [stored_start[t] + np.arange(k) for t, k in zip(test_rows, lengths)]
    flat = np.concatenate(pieces).astype(np.int64)
    items, cats = item_table[stored_items[flat]].copy(), cat_table[stored_cats[flat]].copy()
    for row in rng.choice(np.flatnonzero(lengths > 0), 12, replace=False):  # spoil some rows
        at = row_start[row] + rng.integers(0, lengths[row])
        if row % 2:
            items[at] = -items[at] - 1
        else:
            cats[at] = -cats[at] - 1
    ok = np.flatnonzero(rng.random(n_rows) < 0.8)
    got = prefix_equal(lengths, row_start, items, cats, ok, stored_start[test_rows[ok]], stored_items, stored_cats,
                       item_table, cat_table)
    want = np.array([np.array_equal(items[row_start[r]:row_start[r] + lengths[r]], item_table[stored_items[p]])
                     and np.array_equal(cats[row_start[r]:row_start[r] + lengths[r]], cat_table[stored_cats[p]])
                     for r, p in ((r, pieces[r]) for r in ok)])
    assert np.array_equal(got, want) and (~want).sum() >= 5 and want.sum() >= 5
