"""The ranker on the dataset's memory-mapped arrays: the same batches as from arrays read into RAM,
the arrays really mapped (not loaded), and the streamed evaluation equal to the in-RAM metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from muse.data.format import Dataset
from muse.ondisk import is_mapped
from ranker.data import iter_impression_batches, open_builder
from ranker.models import build_model, make_config
from ranker.models.base import FeatureSpec


@dataclass(frozen=True)
class _Vectors:
    item_ids: np.ndarray
    vectors: np.ndarray
    present: np.ndarray
    scale: float | None


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    from bench.taobao_mm_synth import SynthConfig, generate
    from muse.data.taobao_mm import import_taobao_mm
    from muse.settings import load_settings

    root = tmp_path_factory.mktemp("mm")
    generate(root / "raw", SynthConfig(n_users=120, n_items=1_500, train_per_user=20, test_per_user=8))
    settings = load_settings(env={}, data_dir=root / "data", device="cpu")
    return import_taobao_mm(settings, root / "raw", name="synth", register=False)


def _shipped(ds: Dataset, in_ram: bool) -> _Vectors:
    shipped = ds.embeddings("scl-taobao")
    load = np.array if in_ram else (lambda a: a)
    return _Vectors(load(shipped.item_ids), load(shipped.vectors), np.ones(len(shipped.item_ids), bool),
                    shipped.scale)


@pytest.mark.parametrize("model", ["muse", "sim-hard", "din"])
def test_mapped_batches_equal_in_ram_batches(synth: Dataset, model: str) -> None:
    config = make_config(model, **({"esu": "sa-ta+simtier"} if model == "sim-hard" else {}))
    mapped = open_builder(synth, _retrieval(model), config,
                          _shipped(synth, in_ram=False), with_vectors=True)
    in_ram = open_builder(synth, _retrieval(model), config, _shipped(synth, in_ram=True), space=mapped.space,
                          with_vectors=True, mmap=False)
    assert is_mapped(mapped.histories.item_positions) and is_mapped(mapped.histories.category_positions)
    assert is_mapped(mapped.vectors._array) and mapped.vectors.raw.dtype == torch.int8  # int8 as shipped
    assert not is_mapped(in_ram.histories.item_positions) and not is_mapped(in_ram.vectors._array)
    n = 0
    for raw in iter_impression_batches(synth, "test", 64):
        a = mapped.build(raw["user_id"], raw["item_id"], raw["hist_len"], raw["label"])
        b = in_ram.build(raw["user_id"], raw["item_id"], raw["hist_len"], raw["label"])
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
        n += len(raw["label"])
    assert n == synth.n_impressions("test")


def _retrieval(model: str) -> str:
    from ranker.models import model_class

    return model_class(model).retrieval


def test_recent_window_is_the_newest_history_entries(synth: Dataset) -> None:
    """The batch's short sequence equals the newest entries of the raw history (read independently)."""
    builder = open_builder(synth, "none", make_config("din", esu="ta"), None)
    raw = next(iter_impression_batches(synth, "train", 32))
    batch = builder.build(raw["user_id"], raw["item_id"], raw["hist_len"])
    rows = {r["user_id"]: r for r in synth.histories_table().to_pylist()}
    recent = batch["recent"][..., 0].numpy()
    for b, (user, n) in enumerate(zip(raw["user_id"].tolist(), raw["hist_len"].tolist(), strict=True)):
        want = rows[user]["item_ids"][:n][-recent.shape[1]:]
        got = recent[b][batch["recent_mask"][b].numpy()]
        assert got.tolist() == builder.space.items.lookup(np.array(want, np.int64)).tolist()


def test_streamed_evaluation_equals_in_ram_metrics(synth: Dataset, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    import ranker.metrics as metrics_module
    from ranker.evaluate import evaluate, predict, train_item_counts
    from ranker.metrics import evaluate_predictions

    config = make_config("din", esu="ta")
    builder = open_builder(synth, "none", config, None)
    torch.manual_seed(0)
    model = build_model("din", FeatureSpec(builder.space.vocab_sizes(), builder.space.user_fields), config)
    counts = train_item_counts(synth, builder.space)
    preds = predict(model, builder, iter_impression_batches(synth, "test", 64))  # the same batches
    by_id = {int(i): int(counts[j]) for i, j in zip(preds.item_ids, builder.space.items.lookup(preds.item_ids))}
    want = evaluate_predictions(preds.user_ids, preds.item_ids, preds.labels, preds.probs, preds.hist_lens, by_id)
    monkeypatch.setattr(metrics_module, "BUCKET_ROWS", 50)  # force the bucketed path: many buckets on disk
    got = evaluate(model, builder, synth, "test", batch_size=64, item_counts=counts)
    got.pop("split")
    assert got == want and got["overall"]["n"] == synth.n_impressions("test")


def _resident_kb(array: np.ndarray) -> int:
    """Resident kB of the mapping that holds ``array``'s data (from /proc/self/smaps)."""
    address, inside = array.ctypes.data, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and all(c in "0123456789abcdef-" for c in head[0]):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("Rss:"):
            return int(head[1])
    raise AssertionError("the array's mapping is not in /proc/self/smaps")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_history_windows_are_read_not_mapped(synth: Dataset) -> None:
    """The windows a batch reads come from the files by positional reads: the same values as indexing
    the arrays (padding: the first entry's, as before), and no page of the mapped files becomes
    resident (a fault would map the whole cached folio around each short run)."""
    from muse.ondisk import release

    mapped = open_builder(synth, "none", make_config("din", esu="ta"), None).histories
    in_ram = open_builder(synth, "none", make_config("din", esu="ta"), None, mmap=False).histories
    users = mapped.user_ids[::3]
    starts, lengths = mapped.rows(users)
    lengths = np.minimum(lengths, np.arange(len(lengths)) % 40)  # some empty, some shorter than the window
    release(mapped.item_positions), release(mapped.category_positions)
    items, categories, valid = mapped.window(starts, lengths, 25)
    assert _resident_kb(mapped.item_positions) == 0 and _resident_kb(mapped.category_positions) == 0
    n = np.minimum(lengths, 25)
    pos = np.where(valid, (starts + lengths - n)[:, None] + np.arange(25)[None, :], 0)  # the indexed reference
    want_items, want_categories = in_ram.entries(pos)
    assert valid.sum() == n.sum() > 0 and (n == 0).any()
    assert np.array_equal(items, want_items) and np.array_equal(categories, want_categories)


def test_checkpoint_space_is_the_held_arrays(synth: Dataset, tmp_path: Path) -> None:
    """A checkpoint saves the feature space the process holds (tensors over its own arrays, no raw
    columns read again or copied at the end of training) and gives back the same mapping; a checkpoint
    of the older form (the raw columns) still loads to the same space."""
    from ranker.data import FeatureSpace, _raw_columns

    space = FeatureSpace.from_dataset(synth)
    state = space.state()
    assert "items" not in state and "users" not in state
    assert state["item_features"].data_ptr() == space.item_features.ctypes.data  # no copy
    assert state["item_ids"].data_ptr() == space.items.values.ctypes.data
    torch.save({"space": state}, tmp_path / "ckpt.pt")
    items, users = _raw_columns(synth, space.user_fields)
    older = FeatureSpace.from_state({"items": items, "users": users, "user_fields": list(space.user_fields)})
    for loaded in (FeatureSpace.from_state(torch.load(tmp_path / "ckpt.pt", weights_only=False)["space"]), older):
        assert loaded.user_fields == space.user_fields and loaded.vocab_sizes() == space.vocab_sizes()
        assert np.array_equal(loaded.item_features, space.item_features)
        assert np.array_equal(loaded.user_features, space.user_features)
        raw = np.concatenate([space.items.values[::7], [-5, 123456789]])
        assert np.array_equal(loaded.items.lookup(raw), space.items.lookup(raw))
        assert np.array_equal(loaded.users.lookup(space.users.values), np.arange(1, space.users.size))


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_vector_table_leaves_no_page_of_the_mapped_file_resident(synth: Dataset) -> None:
    """Building the table reads every row once (which rows hold a vector): the mapped file's pages are
    dropped as it goes, so the process does not hold the whole table after start-up (4.5 GB at 35M)."""
    from ranker.data import VectorTable

    shipped = _shipped(synth, in_ram=False)
    space = open_builder(synth, "none", make_config("din", esu="ta"), None).space
    table = VectorTable(space, shipped)
    assert is_mapped(table._array) and _resident_kb(table._array) == 0
    assert int(table.present.sum()) == int(np.any(np.asarray(shipped.vectors) != 0, axis=1).sum()) > 0
