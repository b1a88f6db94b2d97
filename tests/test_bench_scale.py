"""``bench/scale.py`` and its raw Taobao-MM generator (``bench/scale_raw.py``) at a tiny fraction:
the schema the reader expects, the counts of the fraction, history lengths, bounded chunks, the
import of the files, and the bench's own arithmetic (child peak RSS, fits, goals)."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from bench import scale, scale_raw
from muse.data.taobao_mm import RAW_TABLES

FRACTION = 2e-5  # 180 users, 700 items, 20,000 samples
CHUNKS = {"chunk_users": 64, "chunk_rows": 4_096, "chunk_items": 256}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    spec = scale_raw.RawSpec.at(FRACTION, seed=3, **CHUNKS)
    info = scale_raw.generate_raw(out, spec)
    return out, spec, info


def _table(raw_dir, name):
    return pq.read_table(raw_dir / f"{name}.parquet")


def test_counts_follow_the_fraction(raw):
    out, spec, info = raw
    assert (spec.n_users, spec.n_items, spec.n_samples) == (180, 700, 20_000)
    rows = {name: pq.ParquetFile(out / f"{name}.parquet").metadata.num_rows for name in scale_raw.RAW_TABLES}
    assert rows["train_samples"] == 16_000 and rows["test_samples"] == 4_000  # 80/20
    assert rows["train_user_features"] == rows["test_user_features"] == 180
    assert rows["item_features"] == 700
    assert 0.8 * 700 < rows["scl_embedding_int8_p90"] < 0.97 * 700  # about 90% of items ship a vector
    assert info["rows"] == rows
    assert scale_raw.existing_raw(out, spec) is not None  # the marker describes the files
    assert scale_raw.existing_raw(out, scale_raw.RawSpec.at(FRACTION, seed=4)) is None


def test_schema_is_the_raw_taobao_mm_one(raw):
    out, _, _ = raw
    for name, required in RAW_TABLES.items():
        schema = pq.ParquetFile(out / f"{name}.parquet").schema_arrow
        assert set(required) <= set(schema.names), name
    users = pq.ParquetFile(out / "train_user_features.parquet").schema_arrow
    assert str(users.field("150_2_180").type.value_type) == "int64"
    samples = pq.ParquetFile(out / "train_samples.parquet").schema_arrow
    assert str(samples.field("label_0").type.value_type) == "int8"
    labels = np.stack(_table(out, "train_samples").column("label_0").to_pylist())
    assert set(map(tuple, labels)) <= {(1, 0), (0, 1)}
    scl = _table(out, "scl_embedding_int8_p90")
    assert set(pc.list_value_length(scl.column("205_c")).to_pylist()) == {scale_raw.DIM}
    assert str(scl.schema.field("205_c").type.value_type) == "int8"


def test_ids_are_distinct_and_joined(raw):
    out, _, _ = raw
    users = _table(out, "train_user_features").column("129_1").to_numpy()
    items = _table(out, "item_features").column("205").to_numpy()
    assert len(np.unique(users)) == len(users) and len(np.unique(items)) == len(items)
    assert (users != 0).all() and (items != 0).all()
    np.testing.assert_array_equal(_table(out, "test_user_features").column("129_1").to_numpy(), users)
    for split in ("train", "test"):
        s = _table(out, f"{split}_samples")
        assert np.isin(s.column("129_1").to_numpy(), users).all()
        assert np.isin(s.column("205").to_numpy(), items).all()
    hist = pc.list_flatten(_table(out, "test_user_features").column("150_2_180")).to_numpy()
    assert np.isin(hist, items).all()
    assert np.isin(_table(out, "scl_embedding_int8_p90").column("205").to_numpy(), items).all()


def test_history_lengths_and_test_rows_extend_train_rows(raw):
    out, _, _ = raw
    train, test = _table(out, "train_user_features"), _table(out, "test_user_features")
    tr_len = pc.list_value_length(train.column("150_2_180")).to_numpy()
    te_len = pc.list_value_length(test.column("150_2_180")).to_numpy()
    assert tr_len.min() >= 100 and tr_len.max() <= 950 and te_len.max() <= 1_000
    assert tr_len.max() - tr_len.min() > 500  # spread over the range, not one length
    assert ((te_len - tr_len) >= 1).all() and ((te_len - tr_len) <= 50).all()  # test histories are longer
    np.testing.assert_array_equal(pc.list_value_length(train.column("151_2_180")).to_numpy(), tr_len)
    for r in (0, 57, 179):  # the test row is the train row plus newer behaviours
        for col in ("150_2_180", "151_2_180"):
            assert test.column(col)[r].as_py()[: tr_len[r]] == train.column(col)[r].as_py()


def test_written_in_bounded_chunks(raw):
    out, spec, _ = raw
    limits = {"train_user_features": spec.chunk_users, "test_user_features": spec.chunk_users,
              "train_samples": spec.chunk_rows, "test_samples": spec.chunk_rows,
              "item_features": spec.chunk_items, "scl_embedding_int8_p90": spec.chunk_items}
    for name, limit in limits.items():
        meta = pq.ParquetFile(out / f"{name}.parquet").metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert max(sizes) <= limit, name
        assert meta.num_row_groups >= -(-meta.num_rows // limit), name
    assert pq.ParquetFile(out / "train_user_features.parquet").metadata.num_row_groups == 3  # 180 users / 64


def test_same_seed_same_rows(raw, tmp_path):
    out, spec, _ = raw
    scale_raw.generate_raw(tmp_path, spec)
    for name in scale_raw.RAW_TABLES:
        assert _table(tmp_path, name).equals(_table(out, name)), name


def test_the_reader_imports_the_files(raw, tmp_path):
    from muse.data.taobao_mm import import_taobao_mm
    from muse.settings import load_settings

    out, spec, info = raw
    settings = load_settings(env={}, data_dir=tmp_path / "data")
    ds = import_taobao_mm(settings, out, name="scale-test", register=False)
    assert ds.n_users == spec.n_users and ds.n_items == spec.n_items
    assert ds.meta["n_impressions"] == spec.n_samples
    assert ds.meta["n_test_users_extending_train"] == spec.n_users  # one history per user
    test_len = pc.list_value_length(_table(out, "test_user_features").column("150_2_180")).to_numpy()
    assert ds.meta["n_behaviours"] == int(test_len.sum())
    assert ds.meta["embeddings"]["scl-taobao"]["n_items"] == info["rows"]["scl_embedding_int8_p90"]


def test_scan_reads_every_row(raw):
    out, _, info = raw
    res = scale_raw.scan_raw(out)
    assert res["rows"] == sum(info["rows"].values())
    assert res["bytes"] == sum(info["bytes"].values())


def test_child_peak_rss_is_the_childs_own(tmp_path):
    """A child holding 300 MB reports at least that; a bare one reports its own few MB even while
    this process holds 300 MB (a child spawned directly would inherit that as its ru_maxrss)."""
    code = "import numpy as np; a = np.ones(300_000_000 // 8); print(a.sum())"
    child, wall = scale.run_child([sys.executable, "-c", code], {}, tmp_path, "alloc", 60)
    assert child.code == 0 and wall > 0
    assert 300e6 <= child.maxrss < 600e6 and child.cpu_s > 0
    ballast = np.ones(300_000_000 // 8)
    small, _ = scale.run_child([sys.executable, "-c", "pass"], {}, tmp_path, "small", 60)
    assert ballast.sum() > 0 and small.code == 0
    assert small.maxrss < 50e6
    failing, _ = scale.run_child([sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path, "fail", 60)
    assert failing.code == 3
    slow, wall = scale.run_child([sys.executable, "-c", "import time; time.sleep(60)"], {}, tmp_path, "slow", 1)
    assert slow.code == -15 and wall < 10  # stopped by SIGTERM at the timeout, its wrapper reported it


def test_fits_and_goals():
    def r(stage, f, rss_gb, wall=1.0, throughput=0.0, **extra):
        return scale.StageResult(stage, f, True, wall, int(rss_gb * scale.GB), throughput=throughput, extra=extra)

    results = [r("import", 0.001, 0.5, over_scan=2.0), r("import", 0.01, 1.4, over_scan=4.0),
               r("train", 0.001, 1.0, throughput=1000), r("train", 0.01, 0.9, throughput=700)]
    fitted = scale.fits(results)
    imp = fitted["import"]["peak_rss"]
    assert imp["b"] == pytest.approx(100 * scale.GB) and imp["at_1"] == pytest.approx(100.4 * scale.GB)
    tr = fitted["train"]["peak_rss"]
    assert tr["no_growth"] and tr["at_1"] == pytest.approx(1.0 * scale.GB)  # never below what was measured
    verdicts = {g["goal"]: g["verdict"] for g in scale.goals(results, fitted, 16)}
    assert verdicts["import: peak RSS at f = 1 <= 16 GB"] == "FAIL"
    assert verdicts["train: peak RSS at f = 1 <= 16 GB"] == "PASS"
    assert verdicts["import: peak RSS at f = 0.01 <= 1.5x that at f = 0.001"] == "FAIL"  # 2.8x
    assert verdicts["train: samples/s at f = 0.01 >= 0.8x that at f = 0.001"] == "FAIL"  # 0.7x
    assert verdicts["import at f = 0.001 <= 3x the bare pyarrow scan"] == "PASS"
    assert verdicts["import at f = 0.01 <= 3x the bare pyarrow scan"] == "FAIL"
    text = scale.render({"results": [vars(x) for x in results], "fits": fitted, "budget_gb": 16,
                         "fractions": [0.001, 0.01], "goals": scale.goals(results, fitted, 16), "total_s": 5})
    assert "EXCEEDS 16 GB" in text and "no growth measured" in text


def test_train_stage_uses_the_full_sets_gradient_regime() -> None:
    """The train stage gives a fraction's item table sparse gradients as the full set's 35M-row table
    has them by default (below 1M rows the model would use dense Adam), and no more than that."""
    from bench.scale import full_set_regime
    from ranker.layers.embeddings import FeatureEmbeddings
    from ranker.models.config import ModelConfig

    assert full_set_regime(35_000) == 35_001 and full_set_regime(3_500_000) == ModelConfig.sparse_min_rows
    tables = FeatureEmbeddings({"item": 35_001, "category": 7_001, "feat_a": 501, "feat_b": 36}, (),
                               sparse_min_rows=full_set_regime(35_000)).tables
    assert [n for n, t in tables.items() if t.sparse] == ["item"]
    opts = scale.Options()
    for argv in (scale.train_argv(opts, "scale-0.001", 35_000), scale.eval_argv(opts, "scale-0.001", 35_000)):
        assert argv[argv.index("--set") + 1] == "sparse_min_rows=35001", argv


def test_scan_and_import_run_alternately_and_report_their_fastest(tmp_path):
    """``--repeats 2``: two scans and two imports, each stage reporting its fastest run and the ratio
    of the two; the import registers as the full set does (no row per item or user)."""
    import json
    import subprocess

    from muse.data.registry import list_datasets
    from muse.settings import load_settings

    out = subprocess.run([sys.executable, "-m", "bench.scale", "--fractions", str(FRACTION), "--stages", "scan,import",
                          "--repeats", "2", "--json", "--work", str(tmp_path), "--keep"],
                         capture_output=True, text=True, timeout=600, cwd=scale.REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    got = {r["stage"]: r for r in report["results"] if r["stage"] in ("scan", "import")}
    assert set(got) == {"scan", "import"} and all(r["ok"] for r in got.values())
    for r in got.values():
        assert len(r["extra"]["walls"]) == 2 and r["wall_s"] == min(r["extra"]["walls"])
    assert got["import"]["extra"]["over_scan"] == pytest.approx(got["import"]["wall_s"] / got["scan"]["wall_s"])
    assert f"import at f = {FRACTION:g} <= 3x the bare pyarrow scan" in {g["goal"] for g in report["goals"]}
    data_dir = next(p.parent for p in tmp_path.rglob("datasets") if p.is_dir())
    from muse import db, models
    from muse.db import session_scope

    settings = load_settings(env={}, data_dir=data_dir, device="cpu")
    assert [d["registered"] for d in list_datasets(settings)] == [True]
    with session_scope(settings) as s:
        row = s.query(models.Dataset).one()
        assert (row.stats["items_registered"], row.stats["users_registered"]) == (False, False)
        assert s.query(models.Item).count() == 0 and s.query(models.User).count() == 0
    db._engine_for.cache_clear()
