"""Ranker models and pipeline on the ``tiny`` simworld: every model trains (loss falls), evaluates,
is recorded, and scores through the API exactly as offline evaluation does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from indexer.item_vectors import item_vectors
from muse.errors import ConfigurationError, DataError
from muse.settings import Settings, load_settings
from ranker.data import iter_impression_batches, open_builder
from ranker.models import ESU_VARIANTS, FeatureSpec, build_model, list_models, make_config, model_class
from ranker.train import RankTrainConfig, train_steps

SOURCE = "scl-taobao"  # vectors shipped with the dataset (written by the fixture)
DIM = 16
FAST = {"tower": (32, 16), "k": 20, "recent_len": 10}  # small model so the file stays fast


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """One intra-op thread for the whole module (the shared fixture in conftest)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, str]:
    """A migrated embedded deployment with the tiny simworld and category-shaped item vectors
    (10% of items without a vector) shipped as ``embeddings/scl-taobao.parquet``."""
    from muse import db
    from muse.data.simworld import generate_simworld

    settings = load_settings(env={}, data_dir=tmp_path_factory.mktemp("ranker") / "muse-data", device="cpu")
    db.upgrade(settings)
    ds = generate_simworld(settings, size="tiny", seed=0)
    items = ds.items()
    rng = np.random.default_rng(0)
    cat = items.column("category").to_numpy()
    centres = rng.normal(size=(cat.max() + 1, DIM))
    vectors = (centres[cat] + 0.5 * rng.normal(size=(len(cat), DIM))).astype(np.float32)
    keep = rng.random(len(cat)) > 0.1
    (ds.path / "embeddings").mkdir(exist_ok=True)
    pq.write_table(
        pa.table({"item_id": items.column("item_id").to_numpy()[keep],
                  "vector": pa.array(list(vectors[keep]), type=pa.list_(pa.float32()))}),
        ds.path / "embeddings" / f"{SOURCE}.parquet",
    )
    return settings, ds.name


def _builder(world: tuple[Settings, str], name: str, **overrides):
    from muse.data.format import Dataset

    settings, dataset = world
    ds = Dataset.open(settings, dataset)
    config = make_config(name, **{**FAST, **overrides})
    return ds, config, open_builder(ds, model_class(name).retrieval, config, item_vectors(settings, SOURCE, ds))


def _vectors_for(settings: Settings):  # noqa: ANN202 - ranker.data.VectorsFor
    """What the CLI injects: the embedding stage's item_vectors."""
    return lambda source, dataset: item_vectors(settings, source, dataset)


def test_unknown_names_and_keys_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="din, sim-hard, sim-soft, twin, muse"):
        make_config("dien")
    with pytest.raises(ConfigurationError, match="heads"):
        make_config("din", heads=2)
    with pytest.raises(ConfigurationError, match="sa-ta\\+simtier"):
        make_config("muse", esu="gru")
    assert list_models() == ["din", "sim-hard", "sim-soft", "twin", "muse"]


MODEL_CASES = [(m, {}) for m in list_models() if m != "muse"] + [("muse", {"esu": e}) for e in ESU_VARIANTS]
MODEL_CASES += [(m, {"esu": "ta"}) for m in ("din", "twin", "sim-soft")]  # the classic ESU
MODEL_CASES.append(("muse", {"sparse_min_rows": 1}))  # every table sparse: SparseAdam path


@pytest.mark.parametrize(("name", "overrides"), MODEL_CASES)
def test_model_learns_and_gradients_reach_every_parameter(world, name: str, overrides: dict) -> None:
    ds, config, builder = _builder(world, name, **overrides)
    torch.manual_seed(0)
    model = build_model(name, FeatureSpec(builder.space.vocab_sizes(), builder.space.user_fields), config)
    raw = next(iter_impression_batches(ds, "train", 128, shuffle=True))
    losses, n, _ = train_steps(model, builder, [raw] * 30, RankTrainConfig(lr_dense=5e-3, lr_embedding=5e-3))
    assert n == 30 * 128
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
    # one more step to look at the gradients of every parameter
    model.train()
    batch = builder.build(raw["user_id"], raw["item_id"], raw["hist_len"], raw["label"])
    model.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(model(batch)["logit"], batch["label"]).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.is_sparse == ("tables" in pname and config.sparse_min_rows == 1), pname
        grad = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
        assert grad.abs().sum() > 0, pname


def test_tower_width_comes_from_the_parts(world) -> None:
    _, config, builder = _builder(world, "muse", emb_dim=8)
    model = build_model("muse", FeatureSpec(builder.space.vocab_sizes(), builder.space.user_fields), config)
    d, n_user = 8, len(builder.space.user_fields)
    # short TA (2D) + recent mean (2D) + target (4D) + user + long mean (2D) + SA-TA (2D) + 2 SimTiers
    assert model.tower.in_dim == 2 * d + 2 * d + 4 * d + n_user * d + 2 * d + 2 * d + 2 * 22


def test_sim_hard_keeps_the_most_recent_same_category_behaviours(world) -> None:
    ds, config, builder = _builder(world, "sim-hard", k=5)
    raw = next(iter_impression_batches(ds, "train", 32))
    batch = builder.build(raw["user_id"], raw["item_id"], raw["hist_len"])
    h = builder.histories
    starts, lengths = h.rows(raw["user_id"])
    for b in range(32):
        n = min(int(raw["hist_len"][b]), lengths[b])
        items, cats = h.entries(np.arange(starts[b], starts[b] + n))
        same = np.flatnonzero(cats == batch["target"][b, 1].item())[::-1][:5]  # newest first
        got = batch["long"][b][batch["long_mask"][b]].numpy()
        np.testing.assert_array_equal(got[:, 0], items[same])
        assert (got[:, 1] == batch["target"][b, 1].item()).all()


def test_multimodal_gsu_equals_brute_force_cosine(world) -> None:
    ds, config, builder = _builder(world, "muse", k=8)
    raw = next(iter_impression_batches(ds, "test", 16))
    batch = builder.build(raw["user_id"], raw["item_id"], raw["hist_len"])
    table, h = builder.vectors, builder.histories
    starts, lengths = h.rows(raw["user_id"])
    for b in range(16):
        n = min(int(raw["hist_len"][b]), lengths[b])
        items = h.entries(np.arange(starts[b], starts[b] + n))[0]
        t = int(batch["target"][b, 0])
        ok = table.present[items].numpy() & bool(table.present[t])
        cos = table.vectors[items].numpy() @ table.vectors[t].numpy()
        expected = np.sort(cos[ok])[::-1][:8]
        got = batch["long_sim"][b][batch["long_mask"][b]].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
        # the retrieved ids are the behaviours with those similarities
        got_items = batch["long"][b, :len(got), 0].numpy()
        np.testing.assert_allclose(table.vectors[got_items].numpy() @ table.vectors[t].numpy(), got, atol=1e-5)
        # recent similarities are in sequence order and only where both sides have a vector
        rec = batch["recent"][b, :, 0]
        rmask = batch["recent_sim_mask"][b]
        np.testing.assert_allclose(batch["recent_sim"][b][rmask].numpy(),
                                   (table.vectors[rec] @ table.vectors[t])[rmask].numpy(), atol=1e-5)


def test_nan_loss_stops_training_with_the_step(world) -> None:
    ds, config, builder = _builder(world, "din")
    model = build_model("din", FeatureSpec(builder.space.vocab_sizes(), builder.space.user_fields), config)
    with torch.no_grad():
        model.tower.net[-1].bias.fill_(float("nan"))
    raw = next(iter_impression_batches(ds, "train", 16))
    with pytest.raises(DataError, match="step 0"):
        train_steps(model, builder, [raw], RankTrainConfig())


def test_muse_needs_a_source(world) -> None:
    from ranker.train import train

    settings, dataset = world
    with pytest.raises(ConfigurationError, match="embedding source"):
        train(settings, "muse", dataset, record=False)
    with pytest.raises(ConfigurationError, match="--esu ta"):  # the paper's DIN uses SimTier
        train(settings, "din", dataset, record=False)
    with pytest.raises(ConfigurationError, match="not an ESU of DINConfig"):
        train(settings, "din", dataset, esu="sa-ta", record=False)
    with pytest.raises(ConfigurationError, match="pass them as vectors="):  # the ranker never loads them
        train(settings, "muse", dataset, source=SOURCE, record=False)
    with pytest.raises(DataError, match="item vectors"):
        from muse.data.format import Dataset

        open_builder(Dataset.open(settings, dataset), "multimodal", make_config("muse"), None)


@pytest.mark.parametrize("name", ["din", "muse"])
def test_train_runs_on_the_resolved_device(world, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The model and its batches are on ``settings.resolve_device()`` while training (CPU here;
    MUSE_TEST_DEVICE=cuda on a GPU machine); the checkpoint is written from CPU tensors."""
    import dataclasses
    import os

    import ranker.train as rt

    settings, dataset = world
    settings = dataclasses.replace(settings, device=os.environ.get("MUSE_TEST_DEVICE", "cpu"))
    seen: list[str] = []
    real = rt.train_steps

    def spy(model, builder, batches, cfg, progress=None):  # noqa: ANN001, ANN202
        seen.append(str(rt.model_device(model)))
        return real(model, builder, batches, cfg, progress)

    monkeypatch.setattr(rt, "train_steps", spy)
    res = rt.train(settings, name, dataset, source=SOURCE, model_overrides=dict(FAST), record=False,
                   train_config=RankTrainConfig(batch_size=64, max_train=128, max_eval=64),
                   vectors=item_vectors(settings, SOURCE, dataset))
    assert seen and all(d.startswith(settings.resolve_device()) for d in seen), seen
    assert res.losses and np.isfinite(res.losses).all()


#: model -> (short attention, long attention, SimTier on the retrieved K, SimTier on the recent 50)
PAPER_ESU = {
    "din": ("DinAttention", None, False, True),
    "sim-hard": ("DotProductTargetAttention", "SemanticAwareTargetAttention", True, True),
    "sim-soft": ("DotProductTargetAttention", "SemanticAwareTargetAttention", True, True),
    "twin": ("DotProductTargetAttention", "DotProductTargetAttention", True, True),
    "muse": ("DotProductTargetAttention", "SemanticAwareTargetAttention", True, True),
}


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("esu", [None, "ta"])
def test_each_model_gets_the_esu_of_the_table(world, name: str, esu: str | None) -> None:
    """Default: the paper's set-up (docs/ranker.md's table); --esu ta: the classic ID-only ESU. The
    tower receives exactly those parts: its width adds up, and the multimodal similarities change
    the output only where the ESU uses them."""
    overrides = {} if esu is None else {"esu": esu}
    ds, config, builder = _builder(world, name, emb_dim=8, **overrides)
    torch.manual_seed(0)
    model = build_model(name, FeatureSpec(builder.space.vocab_sizes(), builder.space.user_fields), config).eval()
    short, long, st_long, st_recent = PAPER_ESU[name]
    if esu == "ta":
        long, st_long, st_recent = (None if name == "din" else "DotProductTargetAttention"), False, False
    assert type(model.short_attention).__name__ == short
    assert type(getattr(model, "long_attention", None)).__name__ == (long or "NoneType")
    assert (getattr(model, "simtier_long", None) is not None) == st_long
    assert (model.simtier_recent is not None) == st_recent
    assert model.needs_vectors == (name == "muse" or esu is None)
    assert model_class(name).needs_vectors  # on the class: the default (the paper's) set-up
    d, n_user = 8, len(builder.space.user_fields)
    width = model.short_attention.out_dim + 2 * d + 4 * d + n_user * d  # short, recent mean, target, user
    width += 0 if name == "din" else 2 * d + (2 * d if long else 0) + (22 if st_long else 0)
    width += 22 if st_recent else 0
    assert model.tower.in_dim == width
    raw = next(iter_impression_batches(ds, "train", 64))
    batch = builder.build(raw["user_id"], raw["item_id"], raw["hist_len"])
    with torch.no_grad():
        before = model(batch)["logit"]
        for key in ("long_sim", "history_sim", "recent_sim"):
            if key in batch:
                batch[key] = -batch[key]
        after = model(batch)["logit"]
    uses_sims = esu is None  # (muse --esu ta searches with the vectors but its ESU ignores the cosines)
    assert (before - after).abs().max().item() > 1e-4 if uses_sims else torch.equal(before, after)


@pytest.mark.parametrize("name", list_models())
def test_train_eval_record_and_score(world, name: str) -> None:
    """Full run: train on tiny, evaluate, record, re-evaluate from the checkpoint, score via the API."""
    from ranker.evaluate import evaluate_run, predict
    from ranker.runs import get_run, list_runs, load_checkpoint
    from ranker.scoring import Ranker
    from ranker.train import train

    settings, dataset = world
    vectors = item_vectors(settings, SOURCE, dataset)
    res = train(settings, name, dataset, source=SOURCE, model_overrides=dict(FAST),
                train_config=RankTrainConfig(batch_size=64, lr_dense=2e-3), vectors=vectors)
    info = get_run(settings, res.run_id)
    assert info.status == "done" and info.model == name and Path(info.checkpoint_path).exists()
    assert info.source == SOURCE and info.esu == make_config(name).esu  # every default ESU uses the vectors
    assert res.run_id in [r.id for r in list_runs(settings)]
    overall = res.metrics["overall"]
    assert overall["n"] > 100 and 0 < overall["auc"] < 1 and 0 < overall["gauc"] < 1
    assert math.isfinite(overall["logloss"]) and "long_tail" in res.metrics and "long_history" in res.metrics
    assert len(res.losses) >= 15 and np.isfinite(res.losses).all()  # (loss falling: test above)
    again = evaluate_run(settings, res.run_id, vectors_for=_vectors_for(settings))
    assert again["overall"]["gauc"] == pytest.approx(overall["gauc"], abs=1e-9)

    if name == "muse":
        return  # scored through the retriever in test_muse_scoring_through_the_retriever
    ranker = Ranker.load(settings, res.run_id, vectors_for=_vectors_for(settings))
    loaded = load_checkpoint(info.checkpoint_path)
    user = int(ranker.histories.user_ids[3])
    candidates = np.unique(ranker.space.items.values[::7])[:40]
    from muse.data.format import Dataset

    builder = open_builder(Dataset.open(settings, dataset), loaded.model.retrieval,
                           loaded.model.config, vectors, loaded.space)
    offline = predict(loaded.model, builder, [{"user_id": np.full(len(candidates), user), "item_id": candidates,
                                               "label": np.zeros(len(candidates)),
                                               "hist_len": np.full(len(candidates), 10**9)}])
    online = ranker.score(user, candidates, batch_size=16)
    np.testing.assert_allclose(online, offline.probs, rtol=1e-5, atol=1e-6)


@pytest.mark.milvus_server
@pytest.mark.parametrize("backend", ["cache", "milvus"])
def test_muse_scoring_through_the_retriever(world, milvus_server_uri: str, unique_prefix: str, backend: str) -> None:
    """Item and behaviour vectors backfilled into the real Milvus server; the API's scores (GSU on
    the retriever's cache or Milvus backend) equal offline evaluation on the same user and candidates."""
    from muse.data.format import Dataset
    from muse.vectorstore import CollectionRef, VectorStore
    from ranker.evaluate import predict
    from ranker.runs import get_run, load_checkpoint
    from ranker.scoring import Ranker
    from ranker.train import train

    base, dataset = world
    settings = load_settings(env={}, data_dir=base.data_dir, device="cpu", milvus_uri=milvus_server_uri,
                             milvus_prefix=unique_prefix, search_consistency="Strong")  # reads its writes
    vectors = item_vectors(settings, SOURCE, dataset)
    res = train(settings, "muse", dataset, source=SOURCE, model_overrides=dict(FAST),
                train_config=RankTrainConfig(batch_size=64, lr_dense=2e-3, max_train=256, max_eval=64), vectors=vectors)
    loaded = load_checkpoint(get_run(settings, res.run_id).checkpoint_path)
    ds = Dataset.open(settings, dataset)
    builder = open_builder(ds, "multimodal", loaded.model.config, vectors, loaded.space)
    table = builder.vectors
    users = builder.histories.user_ids[:3]
    store = VectorStore(settings)
    ref = CollectionRef(dataset, SOURCE, 1)
    try:
        store.ensure_collections(ref, DIM)
        items = loaded.space.items.values  # raw ids; index i + 1 in the table
        ok = table.present[1:].numpy()
        store.upsert_items(ref, items[ok], table.vectors[1:][ok].numpy(), loaded.space.item_features[1:, 0][ok])
        for u in users:
            start, length = (int(v[0]) for v in builder.histories.rows(np.array([u])))
            idx = builder.histories.entries(np.arange(start, start + length))[0]
            has = table.present[idx].numpy()
            store.upsert_behaviours(ref, np.full(has.sum(), u), np.flatnonzero(has), items[idx[has] - 1],
                                    table.vectors[idx[has]].numpy())
        store.set_live(ref)
        candidates = items[::9][:30]
        with Ranker.load(settings, res.run_id, backend=backend) as ranker:
            assert ranker.retriever.ref == ref  # the live version of the run's dataset and source
            for u in users:
                online = ranker.score(int(u), candidates, batch_size=16)
                offline = predict(loaded.model, builder, [{
                    "user_id": np.full(len(candidates), u), "item_id": candidates,
                    "label": np.zeros(len(candidates)), "hist_len": np.full(len(candidates), 10**9)}])
                np.testing.assert_allclose(online, offline.probs, rtol=1e-5, atol=1e-6)
    finally:
        store.drop_live(dataset, SOURCE)
        store.drop_collections(ref)
        store.close()


def test_cli_train_list_eval_and_compare(world, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    from muse_cli.main import main

    settings, dataset = world
    monkeypatch.setenv("MUSE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("MUSE_DEVICE", "cpu")
    common = ["--dataset", dataset, "--max-train", "300", "--max-eval", "200", "--batch-size", "64", "--k", "20"]
    assert main(["rank", "train", "--model", "muse", "--source", SOURCE, "--esu", "ta", *common, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    run = out["run"]
    assert out["overall"]["n"] == 200
    assert main(["rank", "list"]) == 0
    listed = capsys.readouterr().out
    assert f"{run:>4} muse" in listed and "ta" in listed
    assert main(["rank", "eval", str(run), "--limit", "200", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"]["gauc"] == pytest.approx(out["overall"]["gauc"])
    assert main(["rank", "eval", "99999"]) == 2
    assert "99999" in capsys.readouterr().err
    assert main(["rank", "train", "--model", "muse", "--dataset", dataset]) == 2  # no source
    assert "embedding source" in capsys.readouterr().err
    # learning rates and any config field from the command line, recorded with the run
    assert main(["rank", "train", "--model", "muse", "--source", SOURCE, *common, "--lr", "1e-3",
                 "--sparse-lr", "5e-3", "--set", "simtier_init=0.5", "--set", "tower=[32,16]", "--json"]) == 0
    from ranker.runs import get_run as _get_run

    cfg = _get_run(settings, json.loads(capsys.readouterr().out)["run"]).config
    assert (cfg["train"]["lr_dense"], cfg["train"]["lr_embedding"]) == (1e-3, 5e-3)
    assert cfg["model"]["simtier_init"] == 0.5 and cfg["model"]["tower"] == [32, 16]
    assert main(["rank", "train", "--model", "din", *common, "--set", "nope=1"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["rank", "train", "--model", "muse", "--source", SOURCE, *common, "--set", "simtier_init"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err

    assert main(["compare", "--models", "din,muse", "--sources", SOURCE, "--esu", "ta,sa-ta+simtier",
                 "--seeds", "2", "--threads", "1", "--out", str(tmp_path), *common]) == 0
    printed = capsys.readouterr().out
    assert "| din (ta) | - |" in printed and "| muse (sa-ta+simtier) | scl-taobao |" in printed
    assert "| muse (ta) | scl-taobao |" in printed and " ± " in printed  # mean ± std over the 2 seeds
    first = int(printed.split("comparison ", 1)[1].split()[0])
    assert (tmp_path / f"comparison-{first}.png").stat().st_size > 1000  # every comparison keeps its own files
    stored = json.loads((tmp_path / f"comparison-{first}.json").read_text())
    cells = stored["cells"]
    assert [(c["model"], c["esu"], c["source"], c["seeds"]) for c in cells] == [
        ("din", "ta", None, [0, 1]), ("muse", "ta", SOURCE, [0, 1]), ("muse", "sa-ta+simtier", SOURCE, [0, 1])]
    g = cells[0]["metrics"]["gauc"]
    assert g["n"] == 2 and g["mean"] == pytest.approx(np.mean(g["values"])) and g["std"] >= 0
    assert stored["intrinsic"][SOURCE]["version"] is not None and len(stored["run_ids"]) == 6
    # the same comparison again reuses every run, and then is the stored comparison (not a copy of it);
    # --show reproduces the stored table and JSON
    assert main(["compare", "--models", "din,muse", "--sources", SOURCE, "--esu", "ta,sa-ta+simtier",
                 "--seeds", "2", "--threads", "1", "--out", str(tmp_path), "--json", *common]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["id"] == stored["id"] and again["run_ids"] == stored["run_ids"] and again == stored
    from ranker.compare import list_comparisons

    assert [c["id"] for c in list_comparisons(settings)].count(stored["id"]) == 1
    table = printed[printed.index("Dataset `"):printed.index("table ")]
    assert main(["compare", "--show", str(stored["id"])]) == 0
    shown = capsys.readouterr().out
    assert shown[shown.index("Dataset `"):] == table
    assert main(["compare", "--show", str(stored["id"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == stored
    assert main(["compare", "--list"]) == 0
    assert f"{stored['id']:>4} {dataset}" in capsys.readouterr().out
    assert main(["compare", "--show", "9999"]) == 2
    assert "comparison 9999 does not exist" in capsys.readouterr().err
    rows = [{"run_id": cells[0]["runs"][0]}]
    din_run = rows[0]["run_id"]
    from ranker.runs import get_run, load_checkpoint
    from ranker.scoring import Ranker

    with Ranker.load(settings, din_run) as ranker:
        user = int(ranker.histories.user_ids[0])
        items = [int(i) for i in ranker.space.items.values[:3]]
        expected = ranker.score(user, items)
    assert get_run(settings, din_run).checkpoint_path and load_checkpoint(get_run(settings, din_run).checkpoint_path)
    assert main(["rank", "score", str(din_run), "--user", str(user), "--items", ",".join(map(str, items)),
                 "--json"]) == 0
    np.testing.assert_allclose(json.loads(capsys.readouterr().out)["probs"], expected)


def test_taobao_mm_demo_trains_with_shipped_scl_vectors(tmp_path: Path) -> None:
    """The Taobao-MM reader's output (int64 ids, int8 SCL vectors, users without histories) runs
    through the same pipeline: training, evaluation and the GSU on ``scl-taobao``."""
    from muse import db
    from muse.data.taobao_mm import import_taobao_mm
    from ranker.train import train
    from tests.conftest import TAOBAO_DEMO_DIR as demo
    settings = load_settings(env={}, data_dir=tmp_path / "muse-data", device="cpu")
    db.upgrade(settings)
    ds = import_taobao_mm(settings, demo)
    for name in ("din", "muse"):
        res = train(settings, name, ds.name, source="scl-taobao", train_config=RankTrainConfig(batch_size=4),
                    vectors=item_vectors(settings, "scl-taobao", ds))
        assert res.losses and np.isfinite(res.losses).all()
        assert res.metrics["overall"]["n"] > 0 and math.isfinite(res.metrics["overall"]["logloss"])


@pytest.mark.postgres
def test_runs_are_recorded_in_postgresql_with_nan_metrics(postgres_url: str, tmp_path: Path) -> None:
    """The server deployment's database: a run row with a NaN metric (one-class slice) and a tuple config."""
    from muse import db
    from muse.data.format import DatasetWriter
    from muse.data.registry import register_dataset
    from ranker.runs import create_run, finish_run, get_run, list_runs

    settings = load_settings(env={}, data_dir=tmp_path / "muse-data", device="cpu", database_url=postgres_url)
    db.upgrade(settings)
    w = DatasetWriter(settings.path("datasets", "one"), "one", "simworld")
    w.write_items(pa.table({"item_id": [1], "category": [1], "feat_a": [0], "feat_b": [0],
                            "title": pa.nulls(1, pa.string())}))
    w.write_users(pa.table({"user_id": [1], **{f"f{i}": [0] for i in range(1, 6)}}))
    register_dataset(settings, w.finish())
    run = create_run(settings, model="din", esu=None, source=None, dataset="one", seed=3,
                     config={"model": {"tower": (8, 4)}})
    finish_run(settings, run, status="done", metrics={"overall": {"auc": float("nan"), "gauc": 0.61}})
    info = get_run(settings, run)
    assert info.status == "done" and info.seed == 3 and info.config["model"]["tower"] == [8, 4]
    assert info.metrics["overall"] == {"auc": None, "gauc": 0.61}
    assert [r.id for r in list_runs(settings)] == [run]


def test_cli_runs_from_config_files_store_their_options(world, monkeypatch: pytest.MonkeyPatch, capsys,
                                                       tmp_path: Path) -> None:
    """``muse rank train --config`` / ``muse compare --config``: flags override the file, the effective
    options are stored with the run (row + run-<id>.toml) and with the comparison (spec.config +
    compare.toml), and a stored file trains the same set-up again."""
    from muse.configs import tomllib
    from muse_cli.main import main
    from ranker.runs import get_run, options_path

    settings, dataset = world
    monkeypatch.setenv("MUSE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("MUSE_DEVICE", "cpu")
    run_file = tmp_path / "din.toml"
    run_file.write_text(f'model = "din"\nesu = "ta"\ndataset = "{dataset}"\nmax_train = 300\nmax_eval = 200\nbatch_size = 64\n'
                        "k = 20\nepochs = 3\n[set]\ntower = [32, 16]\n")
    assert main(["rank", "train", "--config", str(run_file), "--epochs", "1", "--json"]) == 0
    run = get_run(settings, json.loads(capsys.readouterr().out)["run"])
    assert run.config["train"]["epochs"] == 1 and run.config["train"]["batch_size"] == 64
    assert run.config["model"]["tower"] == [32, 16] and run.config["model"]["k"] == 20
    cli = run.config["cli"]
    assert cli["command"] == "muse rank train" and cli["file"] == str(run_file)
    assert cli["options"] == {"model": "din", "esu": "ta", "dataset": dataset, "epochs": 1, "batch_size": 64,
                              "max_train": 300, "max_eval": 200, "k": 20, "set": {"tower": [32, 16]}, "json": True}
    stored = options_path(settings, run.id)
    assert tomllib.loads(stored.read_text()) == cli["options"]
    assert main(["rank", "show", str(run.id)]) == 0
    shown = capsys.readouterr().out
    assert f"run {run.id}: din" in shown and "epochs = 1" in shown and "[set]" in shown
    assert main(["rank", "train", "--config", str(stored)]) == 0  # the stored file is a valid --config
    again = get_run(settings, json.loads(capsys.readouterr().out)["run"])  # json = true is stored too
    assert (again.config["model"], again.config["train"]) == (run.config["model"], run.config["train"])

    matrix = tmp_path / "matrix.toml"
    matrix.write_text(f'dataset = "{dataset}"\nmodels = ["din"]\nesu = ["ta"]\nseeds = 1\nthreads = 1\n'
                      f'max_train = 300\nmax_eval = 200\nbatch_size = 64\nk = 20\nepochs = 1\nout = "{tmp_path}"\n'
                      "[set]\ntower = [32, 16]\n")
    assert main(["compare", "--config", str(matrix), "--seeds", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["spec"]["seeds"] == [0, 1] and result["spec"]["models"] == ["din"]
    assert result["spec"]["config"]["options"]["seeds"] == 2 and result["spec"]["config"]["file"] == str(matrix)
    assert result["cells"][0]["reused"] == 1  # seed 0 is the run above: same set-up
    written = tomllib.loads((tmp_path / f"comparison-{result['id']}.toml").read_text())
    assert written == {**result["spec"]["config"]["options"], "json": True}
    assert main(["compare", "--show", str(result["id"])]) == 0
    assert "seeds = 2" in capsys.readouterr().out


def test_a_run_without_a_checkpoint_is_not_found_everywhere_it_is_loaded(world) -> None:
    """Evaluation and scoring load a run through one function, with one error for a failed run."""
    from muse.errors import NotFoundError
    from ranker.evaluate import evaluate_run
    from ranker.runs import create_run, finish_run, load_run
    from ranker.scoring import Ranker

    settings, dataset = world
    run_id = create_run(settings, model="din", esu=None, source=None, dataset=dataset, seed=0, config={})
    finish_run(settings, run_id, status="failed")
    for load in (lambda: load_run(settings, run_id), lambda: evaluate_run(settings, run_id),
                 lambda: Ranker.load(settings, run_id)):
        with pytest.raises(NotFoundError, match=f"ranker run {run_id} has no checkpoint \\(status failed\\)"):
            load()
