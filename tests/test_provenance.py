"""Provenance across datasets: an imported source's versions are numbered per dataset, every run and
comparison records its own dataset's version, ``muse compare`` reuses runs with two datasets
interleaved, and migration 0005 repairs records written before (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

from muse import db, models
from muse.settings import Settings, load_settings

SOURCE = "scl-taobao"
DIM = 8
FAST = {"tower": [32, 16], "k": 20, "recent_len": 10}


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """One intra-op thread for the whole module (the shared fixture in conftest)."""


def _ship_vectors(ds, seed: int) -> None:  # noqa: ANN001 - a muse.data.format.Dataset
    ids = ds.item_ids()
    vectors = np.random.default_rng(seed).normal(size=(len(ids), DIM)).astype(np.float32)
    (ds.path / "embeddings").mkdir(exist_ok=True)
    pq.write_table(pa.table({"item_id": ids, "vector": pa.array(list(vectors), type=pa.list_(pa.float32()))}),
                   ds.path / "embeddings" / f"{SOURCE}.parquet")


@pytest.mark.slow
def test_two_datasets_interleaved_keep_their_own_versions_and_reuse(tmp_path: Path) -> None:
    from indexer.item_vectors import item_vectors
    from indexer.source_registry import get_version, list_versions
    from muse.data.simworld import generate_simworld
    from ranker.compare import compare
    from ranker.runs import get_run
    from ranker.train import RankTrainConfig

    settings = load_settings(env={}, data_dir=tmp_path / "muse-data", device="cpu")
    db.upgrade(settings)
    names = []
    for seed in (0, 1):
        ds = generate_simworld(settings, size="tiny", seed=seed)
        _ship_vectors(ds, seed)
        names.append(ds.name)
    a, b = names
    cfg = RankTrainConfig(max_train=256, max_eval=150, batch_size=64)

    def run(dataset: str):  # noqa: ANN202 - CompareResult
        return compare(settings, dataset, models=["muse"], sources=[SOURCE], train_config=cfg, seeds=[0],
                       model_overrides=FAST, write_files=False, threads=1,
                       vectors_for=lambda s, d: item_vectors(settings, s, d))

    first_a, first_b = run(a), run(b)  # A, then B, then A and B again: interleaved
    again_a, again_b = run(a), run(b)

    # one imported version per dataset, each numbered 1, told apart by its dataset
    rows = list_versions(settings, SOURCE)
    assert sorted((r.version, r.config["dataset"]) for r in rows) == [(1, a), (1, b)]
    assert get_version(settings, SOURCE, 1, dataset=b).config["dataset"] == b
    for dataset, res in ((a, first_a), (b, first_b)):
        assert not any(r.reused for r in res.rows)
        own = get_version(settings, SOURCE, dataset=dataset)
        for r in res.rows:
            info = get_run(settings, r.run_id)
            assert (info.dataset, info.source_version) == (dataset, 1)
        with db.session_scope(settings) as session:
            ids = {session.get(models.RankerRun, r.run_id).source_id for r in res.rows}
        assert ids == {own.id}  # the dataset's own row, not the other dataset's v1
        assert res.result["intrinsic"][SOURCE]["version"] == 1

    # reused whatever was trained in between, and the comparison is the stored one, not a copy
    for first, again in ((first_a, again_a), (first_b, again_b)):
        assert all(r.reused for r in again.rows) and [r.run_id for r in again.rows] == [r.run_id for r in first.rows]
        assert again.comparison_id == first.comparison_id and again.stored_before
    with db.session_scope(settings) as session:
        assert len(session.scalars(select(models.Comparison)).all()) == 2


@pytest.fixture(params=["sqlite", "postgres"])
def old_db(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """A database at revision 0004 holding what the old code recorded: ``scl-taobao`` v1 for dataset
    a and v2 for dataset b (global numbering), runs on a recorded with b's v2, a comparison on a
    naming v2, and a run on dataset c, which has no imported version of its own."""
    if request.param == "postgres":
        settings = load_settings(env={}, data_dir=settings.data_dir, database_url=request.getfixturevalue("postgres_url"))
    db.upgrade(settings, "0004")
    return settings


def test_migration_0005_repairs_runs_and_comparisons(old_db: Settings, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from indexer.source_registry import next_version
    from muse_cli.main import main
    from ranker.runs import get_run

    with db.session_scope(old_db) as s:
        ds = {n: models.Dataset(name=n, kind="taobao-mm", location=f"/x/{n}", stats={}) for n in "abc"}
        s.add_all(ds.values())
        s.flush()
        v1 = models.EmbeddingSource(name=SOURCE, version=1, kind="imported", dim=DIM, dataset_id=ds["a"].id,
                                    config={"file": "/x/a/e.parquet"}, metrics={"eval": {"a": {"mean_cosine": 0.1}}})
        v2 = models.EmbeddingSource(name=SOURCE, version=2, kind="imported", dim=DIM, dataset_id=ds["b"].id,
                                    config={"file": "/x/b/e.parquet"}, metrics={})
        scl = models.EmbeddingSource(name="scl", version=1, kind="trained", dim=DIM, dataset_id=ds["a"].id)
        s.add_all([v1, v2, scl])
        s.flush()
        runs = {
            "a-wrong": models.RankerRun(model="muse", source_id=v2.id, source_name=SOURCE, dataset_id=ds["a"].id,
                                        status="done", config={"model": {}}),
            "b-right": models.RankerRun(model="muse", source_id=v2.id, source_name=SOURCE, dataset_id=ds["b"].id,
                                        status="done", config={}),
            "c-unknown": models.RankerRun(model="muse", source_id=v2.id, source_name=SOURCE, dataset_id=ds["c"].id,
                                          status="done", config={}),
            "a-trained": models.RankerRun(model="muse", source_id=scl.id, source_name="scl", dataset_id=ds["a"].id,
                                          status="done", config={}),
        }
        s.add_all(runs.values())
        comp = models.Comparison(dataset_id=ds["a"].id, spec={"dataset": "a"},
                                 result={"cells": [], "intrinsic": {SOURCE: {"version": 2, "eval": None}}})
        s.add(comp)
        s.flush()
        ids = {k: r.id for k, r in runs.items()}
        ids.update(v1=v1.id, v2=v2.id, scl=scl.id, comparison=comp.id)

    db.upgrade(old_db)  # 0005
    with db.session_scope(old_db) as s:
        got = {k: s.get(models.RankerRun, ids[k]) for k in runs}
        assert got["a-wrong"].source_id == ids["v1"]  # repaired: a's own version
        assert got["b-right"].source_id == ids["v2"] and "provenance" not in got["b-right"].config
        assert got["a-trained"].source_id == ids["scl"]  # trained sources were right: untouched
        assert got["c-unknown"].source_id is None and "source version unknown" in got["c-unknown"].config["provenance"]
        assert got["a-wrong"].config == {"model": {}}
        intrinsic = s.get(models.Comparison, ids["comparison"]).result["intrinsic"][SOURCE]
        assert intrinsic == {"version": 1, "eval": {"mean_cosine": 0.1}}
        assert s.get(models.EmbeddingSource, ids["v2"]).config == {"file": "/x/b/e.parquet", "dataset": "b"}
    assert (get_run(old_db, ids["a-wrong"]).source_version, get_run(old_db, ids["c-unknown"]).source_version) == (1, None)
    # new imports are numbered per dataset from here on (c's first is v1, beside a's v1)
    assert next_version(old_db, SOURCE, "c") == 1 and next_version(old_db, SOURCE, "b") == 3
    with db.session_scope(old_db) as s:
        s.add(models.EmbeddingSource(name=SOURCE, version=1, kind="imported", dim=DIM,
                                     dataset_id=s.scalar(select(models.Dataset.id).where(models.Dataset.name == "c"))))

    monkeypatch.setenv("MUSE_DATABASE_URL", old_db.database_url)
    monkeypatch.setenv("MUSE_DATA_DIR", str(old_db.data_dir))
    assert main(["rank", "show", str(ids["c-unknown"])]) == 0
    shown = capsys.readouterr().out
    assert "source scl-taobao," in shown and "source version unknown" in shown
    assert main(["rank", "list"]) == 0
    listed = capsys.readouterr().out
    assert "scl-taobao v1" in listed and "source version unknown" in listed
    assert main(["rank", "list", "--json"]) == 0
    assert {r["id"]: r["source_version"] for r in json.loads(capsys.readouterr().out)}[ids["b-right"]] == 2
