"""Embedding sources end to end on the ``tiny`` simworld: real open_clip models, real rendered images.

One module-scoped world trains every source for a few steps (memorising a handful of pairs, so the
loss must fall within seconds); the tests then check the public API on those versions.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from indexer import encode, item_vectors, source_registry
from indexer.encoders import DEFAULT_MODEL, EncoderConfig, ItemEncoder, build_clip_encoder
from indexer.evaluation import evaluate_source, load_eval_data, random_baseline
from indexer.training import EmbedTrainConfig, TrainResult, train_source
from muse.errors import ConfigurationError, NotFoundError
from muse.settings import Settings, load_settings

TRAINED = ("openclip", "i2i", "scl", "id")
#: Few pairs, many passes: each source memorises its pairs, so the loss falls within a few steps.
QUICK = dict(epochs=50, batch_size=16, max_pairs=16, queue_size=16, max_steps=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, object, dict[str, TrainResult]]:
    from muse import db
    from muse.data.simworld import generate_simworld

    settings = load_settings(env={}, data_dir=tmp_path_factory.mktemp("embed") / "muse-data", device="cpu")
    db.upgrade(settings)
    dataset = generate_simworld(settings, size="tiny", seed=0)
    results = {src: train_source(settings, src, dataset, EmbedTrainConfig(**QUICK)) for src in TRAINED}
    return settings, dataset, results


def _some_images(dataset: object, n: int = 6) -> tuple[np.ndarray, list[bytes]]:
    ids = dataset.item_ids()[:n]
    images = dataset.load_images(ids)
    return ids, [images[int(i)] for i in ids]


@pytest.mark.parametrize("source", TRAINED)
def test_training_loss_falls_and_version_is_registered(world, source: str) -> None:
    settings, dataset, results = world
    result = results[source]
    losses = result.losses
    assert len(losses) == QUICK["max_steps"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    row = source_registry.get_version(settings, source)
    assert row.version == result.source.version and row.dim == 128
    assert Path(row.checkpoint_path) == source_registry.source_dir(settings, source, row.version) / "encoder.pt"
    assert row.metrics["train"]["steps"] == QUICK["max_steps"]
    assert row.config["batch_size"] == QUICK["batch_size"]


@pytest.mark.parametrize("source", ("openclip", "i2i", "scl"))
def test_checkpoint_reloads_to_identical_unit_vectors(world, source: str) -> None:
    settings, dataset, results = world
    _, images = _some_images(dataset)
    reloaded = encode.load_encoder(settings, source)
    res = reloaded.encode_images(images)
    assert res.failed == {} and res.vectors.shape == (len(images), 128) and res.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-5)
    in_memory = ItemEncoder(results[source].model, DEFAULT_MODEL)
    np.testing.assert_array_equal(in_memory.encode_images(images).vectors, res.vectors)
    np.testing.assert_array_equal(reloaded.encode_images(images).vectors, res.vectors)  # deterministic
    texts = reloaded.encode_texts(["red tote", "navy denim jeans"])
    assert texts.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)


def test_corrupt_and_missing_images_are_reported(world) -> None:
    settings, dataset, _ = world
    _, images = _some_images(dataset, 2)
    encoder = encode.load_encoder(settings, "openclip")
    res = encoder.encode_images([images[0], b"not an image at all", images[1][:40], None, b""])
    assert res.ok_index.tolist() == [0]
    assert set(res.failed) == {1, 2, 3, 4}
    assert "unreadable image" in res.failed[1] and "unreadable image" in res.failed[2]
    assert res.failed[3] == "no image" and res.failed[4] == "empty image bytes"
    # Through encode_items: an id with no image row is reported, the others encode.
    ids = np.concatenate([dataset.item_ids()[:3], [987_654_321]])
    res = encode.encode_items(settings, "scl", dataset, ids)
    assert res.ok_index.tolist() == [0, 1, 2] and res.failed == {3: "no image"}


def test_id_source_lookup_and_new_version(world) -> None:
    settings, dataset, results = world
    ids = np.concatenate([dataset.item_ids()[:4], [987_654_321]])
    res = encode.encode_items(settings, "id", dataset, ids)
    assert res.ok_index.tolist() == [0, 1, 2, 3] and 4 in res.failed
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-5)
    first = results["id"].source.version
    second = train_source(settings, "id", dataset, EmbedTrainConfig(**{**QUICK, "seed": 1})).source
    assert second.version == first + 1
    old = item_vectors.item_vectors(settings, "id", dataset, version=first)
    new = item_vectors.item_vectors(settings, "id", dataset)
    assert old.present.all() and new.present.all()
    assert not np.allclose(old.vectors, new.vectors)  # the older version stays usable and distinct
    with pytest.raises(ConfigurationError, match="has no encoder"):
        encode.load_encoder(settings, "id")
    with pytest.raises(NotFoundError, match="no version 99"):
        source_registry.get_version(settings, "id", 99)


def test_item_vectors_are_cached_per_version(world) -> None:
    settings, dataset, _ = world
    table = item_vectors.item_vectors(settings, "i2i", dataset)
    assert table.vectors.shape == (dataset.n_items, 128) and table.present.all()
    np.testing.assert_array_equal(table.item_ids, dataset.item_ids())
    version = source_registry.get_version(settings, "i2i").version
    cache = source_registry.source_dir(settings, "i2i", version) / f"items-{dataset.name}"
    assert (cache / "vectors.npy").exists() and (cache / "key.json").exists()
    again = item_vectors.item_vectors(settings, "i2i", dataset)
    np.testing.assert_array_equal(again.vectors, table.vectors)
    from muse.ondisk import is_mapped

    assert is_mapped(again.vectors) and is_mapped(again.present)  # opened, not loaded
    np.testing.assert_allclose(np.linalg.norm(again.vectors, axis=1), 1.0, rtol=1e-5)  # stored as unit rows


def test_scl_taobao_import_marks_missing_items(world) -> None:
    settings, dataset, _ = world
    ids = dataset.item_ids()
    shipped = ids[::2]
    rng = np.random.default_rng(0)
    vecs = rng.integers(-127, 128, size=(len(shipped), 128)).astype(np.float32) / 127
    (dataset.path / "embeddings").mkdir(exist_ok=True)
    pq.write_table(
        pa.table({"item_id": shipped, "vector": pa.array(vecs.tolist(), pa.list_(pa.float32()))}),
        dataset.path / "embeddings" / "scl-taobao.parquet",
    )
    table = item_vectors.item_vectors(settings, "scl-taobao", dataset)
    np.testing.assert_array_equal(table.present, np.isin(ids, shipped))
    np.testing.assert_allclose(table.unit_rows(slice(0, 1))[0], vecs[0] / np.linalg.norm(vecs[0]), rtol=1e-5)
    res = encode.encode_items(settings, "scl-taobao", dataset, ids[:2])
    assert res.ok_index.tolist() == [0] and "no scl-taobao vector" in res.failed[1]
    assert source_registry.get_version(settings, "scl-taobao").kind == "imported"


def test_eval_runs_stores_metrics_and_beats_nothing_silently(world) -> None:
    settings, dataset, _ = world
    data = load_eval_data(dataset)
    assert len(data.queries) > 0 and len(data.pairs) > 0
    base = random_baseline(dataset, data)
    for source in TRAINED:
        m = evaluate_source(settings, source, dataset, data=data)
        assert 0.0 <= m["i2i_recall@10"] <= 1.0
        if source in ("scl", "openclip"):
            assert 0.0 <= m["q2p_recall@10"] <= m["q2p_recall@50"] <= 1.0
        else:
            assert m["q2p_recall@10"] is None  # no text tower trained on text
        stored = source_registry.get_version(settings, source).metrics["eval"][dataset.name]
        assert stored["i2i_recall@10"] == m["i2i_recall@10"]
    assert base["q2p_recall@50"] is not None and base["coverage"] == 1.0


def test_pretrained_weights_load_from_a_local_file_only(world, tmp_path: Path) -> None:
    _, dataset, results = world
    trained = results["openclip"].model
    weights = tmp_path / "open_clip_weights.pt"
    torch.save(trained.clip.state_dict(), weights)  # an open_clip state dict, as users would have
    loaded = build_clip_encoder(EncoderConfig(model=DEFAULT_MODEL, pretrained=str(weights)))
    _, images = _some_images(dataset, 3)
    a = ItemEncoder(trained, DEFAULT_MODEL).encode_images(images).vectors
    b = ItemEncoder(loaded, DEFAULT_MODEL).encode_images(images).vectors
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigurationError, match="is not a file"):
        build_clip_encoder(EncoderConfig(pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(ConfigurationError, match="downloaded"):
        build_clip_encoder(EncoderConfig(model="hf-hub:someone/model"))
    with pytest.raises(ConfigurationError, match="Available:.*muse-tiny"):
        build_clip_encoder(EncoderConfig(model="no-such-net"))


def test_default_is_the_resnet_config_with_batchnorm_and_unit_outputs(world) -> None:
    settings, _, results = world
    assert DEFAULT_MODEL == "muse-tiny-rn"
    model = results["scl"].model
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.clip.visual.modules())  # a CNN tower
    assert results["i2i"].source.config["model"] == "muse-tiny-rn"
    # Eval mode uses the running BatchNorm statistics: an item's vector does not depend on its batch.
    x = torch.rand(5, 3, 64, 64)
    with torch.no_grad():
        alone = model.encode_image(x[:1])
        batched = model.encode_image(x)
    torch.testing.assert_close(alone[0], batched[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(5))


def test_i2i_with_momentum_queue_on_the_vit_config_trains_and_reloads(world) -> None:
    # muse-tiny (ViT) stays usable; the MoCo key encoder and its queue train end to end.
    settings, dataset, _ = world
    cfg = EmbedTrainConfig(**{**QUICK, "model": "muse-tiny", "momentum": 0.9, "view_weight": 0.5})
    result = train_source(settings, "i2i", dataset, cfg)
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3]), result.losses
    row = source_registry.get_version(settings, "i2i")
    assert row.config["momentum"] == 0.9 and row.config["augment"] is True and row.config["temperature"] == 0.2
    assert row.metrics["train"]["queue_size"] == int(result.n_pairs * 0.25)  # capped at 25% of the pairs
    _, images = _some_images(dataset)
    res = encode.load_encoder(settings, "i2i", row.version).encode_images(images)
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(ItemEncoder(result.model, "muse-tiny").encode_images(images).vectors, res.vectors)


def test_output_width_other_than_embed_dim_gets_a_linear_head() -> None:
    # When the requested width differs from the architecture's embed_dim, a linear head maps to it.
    import open_clip

    from indexer.encoders import register_model_configs

    register_model_configs()
    cfg = EncoderConfig(model="muse-tiny", dim=32)
    enc = build_clip_encoder(cfg)
    assert isinstance(enc.image_head, torch.nn.Linear) and enc.dim == 32
    img = Image.new("RGB", (80, 50), (200, 10, 10))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    out = ItemEncoder(enc, "muse-tiny").encode_images([buf.getvalue()])  # resized to 64x64
    assert out.vectors.shape == (1, 32)
    assert "muse-tiny" in open_clip.list_models()


def test_bad_options_are_rejected(world) -> None:
    settings, dataset, _ = world
    with pytest.raises(ConfigurationError, match="unknown keys.*bogus"):
        EmbedTrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigurationError, match="batch_size=1"):
        EmbedTrainConfig(batch_size=1)
    with pytest.raises(ConfigurationError, match="cannot train source 'scl-taobao'"):
        train_source(settings, "scl-taobao", dataset)
    with pytest.raises(ConfigurationError, match="unknown; valid"):
        encode.encode_items(settings, "clip", dataset, [1])


def test_cli_train_list_eval(world, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from muse_cli.main import main

    settings, dataset, _ = world
    monkeypatch.setenv("MUSE_DATA_DIR", str(settings.data_dir))
    assert main(["embed", "train", "--source", "id", "--dataset", dataset.name, "--max-steps", "3",
                 "--batch-size", "16", "--lr", "0.002", "--queue-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "id v" in out and "3 steps" in out
    assert main(["embed", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(s in listing for s in TRAINED)
    assert main(["embed", "eval", "--dataset", dataset.name, "--sources", "id", "scl", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["source"] for r in doc["results"]] == ["id", "scl", "random"]
    assert main(["embed", "eval", "--dataset", dataset.name, "--sources", "openclip"]) == 0
    assert "q2p_recall@10" in capsys.readouterr().out
    assert main(["embed", "train", "--source", "scl", "--dataset", "nope"]) == 2  # clear error, no trace
    assert "dataset 'nope' not found" in capsys.readouterr().err


def test_cli_train_from_a_config_file_stores_its_options(world, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from muse.configs import tomllib
    from muse_cli.embed import OPTIONS_FILE
    from muse_cli.main import main

    settings, dataset, _ = world
    monkeypatch.setenv("MUSE_DATA_DIR", str(settings.data_dir))
    path = tmp_path / "id.toml"
    path.write_text(f'source = "id"\ndataset = "{dataset.name}"\nmax_steps = 5\nbatch_size = 16\nlr = 0.002\n')
    assert main(["embed", "train", "--config", str(path), "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 steps" in out and OPTIONS_FILE in out
    row = source_registry.list_versions(settings, "id")[-1]
    assert row.config["batch_size"] == 16 and row.config["lr"] == 0.002 and row.config["max_steps"] == 2
    written = Path(row.checkpoint_path).parent / OPTIONS_FILE
    assert tomllib.loads(written.read_text()) == {"source": "id", "dataset": dataset.name, "max_steps": 2,
                                                  "batch_size": 16, "lr": 0.002}
    assert main(["embed", "train", "--config", str(written)]) == 0  # the stored file is a valid --config
    assert source_registry.list_versions(settings, "id")[-1].version == row.version + 1
    path.write_text('source = "id"\ndataset = "x"\nbatch = 16\n')
    assert main(["embed", "train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'batch'" in err and "batch_size" in err and "Traceback" not in err


def test_default_scl_run_on_tiny_does_not_collapse(world) -> None:
    """The tiny default (8 steps on 66 pairs) once gave every item the same vector in eval mode (mean
    cosine 0.997) because BatchNorm's running statistics were stale; they are recomputed now."""
    from indexer.evaluation import COLLAPSE_COSINE, mean_pair_cosine
    from indexer.training import default_max_pairs

    settings, dataset, _ = world
    result = train_source(settings, "scl", dataset, EmbedTrainConfig())
    train = result.source.metrics["train"]
    assert train["steps"] == 8 and result.source.config["max_pairs"] == default_max_pairs(600) == 2400
    assert train["mean_cosine"] < COLLAPSE_COSINE, train
    table = item_vectors.item_vectors(settings, "scl", dataset, version=result.source.version)
    assert mean_pair_cosine(table.vectors, table.present) < COLLAPSE_COSINE


def test_collapse_and_small_set_notes() -> None:
    from indexer.evaluation import collapse_note, mean_pair_cosine, small_set_notes

    rng = np.random.default_rng(0)
    spread = rng.standard_normal((500, 128)).astype(np.float32)
    spread /= np.linalg.norm(spread, axis=1, keepdims=True)
    collapsed = spread * 0.05 + 1.0
    collapsed /= np.linalg.norm(collapsed, axis=1, keepdims=True)
    assert abs(mean_pair_cosine(spread)) < 0.05 and mean_pair_cosine(collapsed) > 0.99
    assert collapse_note(mean_pair_cosine(spread)) is None
    assert "collapsed" in collapse_note(mean_pair_cosine(collapsed))
    assert mean_pair_cosine(spread[:1]) is None
    notes = small_set_notes({"q2p_recall@10": 0.1, "n_queries": 14, "i2i_recall@10": 0.02, "n_pairs": 2000,
                             "i2i_recall@10_tail": None, "n_pairs_tail": 3})
    assert len(notes) == 1 and "14 held-out queries" in notes[0] and "0.071" in notes[0]


def test_embed_eval_cli_reports_spread_and_too_small_sets(world) -> None:
    import os
    import subprocess
    import sys

    settings, dataset, _ = world
    env = {**os.environ, "MUSE_DATA_DIR": str(settings.data_dir), "MUSE_DEVICE": "cpu"}
    res = subprocess.run([sys.executable, "-m", "muse_cli", "embed", "eval", "--dataset", dataset.name,
                          "--sources", "scl", "id"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    header = res.stdout.splitlines()[0].split()
    assert header[-1] == "mean_cosine"
    assert "held-out queries (< 50)" in res.stdout and "too few to compare sources" in res.stdout
    data = json.loads(subprocess.run(
        [sys.executable, "-m", "muse_cli", "embed", "eval", "--dataset", dataset.name, "--sources", "id",
         "--json"], env=env, capture_output=True, text=True, timeout=600).stdout)
    assert all(r["mean_cosine"] is not None for r in data["results"])
    assert any("held-out" in n for n in data["notes"])
