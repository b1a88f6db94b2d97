"""The synthetic world: determinism, the contents of every file, sizes, and the statistics that make
multimodal long-history retrieval matter.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from muse.data.format import Dataset
from muse.data.simworld import generate_simworld
from muse.data.simworld_config import SIZES, world_config
from muse.data.stats import dataset_stats
from muse.errors import ConfigurationError
from muse.settings import Settings, load_settings


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(env={}, data_dir=tmp_path_factory.mktemp("sw") / "muse-data", device="cpu")


@pytest.fixture(scope="module")
def tiny(module_settings: Settings) -> Dataset:
    return generate_simworld(module_settings, "tiny", seed=0)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(module_settings: Settings, tiny: Dataset) -> None:
    again = generate_simworld(module_settings, "tiny", seed=0, name="tiny-again", register=False)
    a, b = _digests(tiny.path), _digests(again.path)
    a.pop("meta.json"), b.pop("meta.json")  # holds the name
    # every file of the format (7 of the history CSR, 6 per impression split, items, users, images,
    # sessions) + 3 of truth
    assert a == b and len(a) == 26
    assert {k: v for k, v in tiny.meta.items() if k != "name"} == {
        k: v for k, v in again.meta.items() if k != "name"
    }
    other = generate_simworld(module_settings, "tiny", seed=1, register=False)
    assert _digests(other.path)["histories/items.npy"] != a["histories/items.npy"]


def test_every_file_of_the_format(tiny: Dataset) -> None:
    cfg = SIZES["tiny"]
    m = tiny.meta
    assert (m["n_items"], m["n_users"], m["seed"], m["kind"]) == (cfg.n_items, cfg.n_users, 0, "simworld")
    assert m["has_images"] and m["has_titles"] and m["has_search_sessions"]
    items = tiny.items()
    assert items.num_rows == cfg.n_items and items.column("item_id").to_pylist() == list(
        range(1, cfg.n_items + 1)
    )
    assert all(isinstance(t, str) and t for t in items.column("title").to_pylist())
    n_leaves = cfg.n_top_categories * cfg.leaves_per_top
    assert set(items.column("category").to_pylist()) <= set(range(1, n_leaves + 1))
    assert tiny.users().num_rows == cfg.n_users
    assert sum(b.num_rows for b in tiny.iter_images(100)) == cfg.n_items
    png = tiny.load_images([1, 7, 99999])
    assert sorted(png) == [1, 7]
    img = Image.open(io.BytesIO(png[7]))
    assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
    pixels = np.asarray(img)
    assert pixels.std() > 20  # a shape on a background with noise, not a flat swatch
    for name in ("items", "facets", "impressions"):
        assert tiny.truth_path(name) is not None


def test_histories_and_impressions_are_consistent(tiny: Dataset) -> None:
    cfg = SIZES["tiny"]
    item_cat = dict(
        zip(tiny.items().column("item_id").to_pylist(), tiny.items().column("category").to_pylist())
    )
    hist = {r["user_id"]: r for r in tiny.histories_table().to_pylist()}
    assert len(hist) == cfg.n_users
    lengths = []
    for r in hist.values():
        times = np.asarray(r["times"])
        assert len(r["item_ids"]) == len(r["categories"]) == len(times)
        assert np.all(np.diff(times) >= 0)
        assert r["categories"] == [item_cat[i] for i in r["item_ids"]]
        lengths.append(len(times))
        # repeats: some items come back in a user's history
    assert min(lengths) >= cfg.min_history and max(lengths) == cfg.max_history
    assert any(len(set(r["item_ids"])) < len(r["item_ids"]) for r in hist.values())
    imps = pa.Table.from_batches(list(tiny.iter_impressions())).to_pylist()
    assert len(imps) == tiny.meta["n_impressions"]
    for imp in imps:
        times = hist[imp["user_id"]]["times"]
        h = imp["hist_len"]
        # the model sees item_ids[:hist_len]: everything strictly before the impression
        assert (h == 0 or times[h - 1] < imp["time"]) and (h == len(times) or times[h] >= imp["time"])
    train_t = [i["time"] for i in imps if i["split"] == "train"]
    test_t = [i["time"] for i in imps if i["split"] == "test"]
    assert train_t and test_t and max(train_t) < min(test_t)  # split by time
    labels = {i["label"] for i in imps}
    assert labels == {0, 1}


def test_search_sessions(tiny: Dataset) -> None:
    sessions = tiny.search_sessions()
    assert sessions is not None and sessions.num_rows > 0
    items = set(tiny.item_ids().tolist())
    n_purchased = 0
    for s in sessions.to_pylist():
        assert s["query"] and s["clicked"] and set(s["clicked"]) <= items
        if s["purchased"] != -1:
            assert s["purchased"] in s["clicked"]
            n_purchased += 1
    assert 0 < n_purchased < sessions.num_rows  # purchases and clicked-not-purchased hard negatives
    assert len(set(sessions.column("session_id").to_pylist())) == sessions.num_rows


def test_stats_of_tiny(tiny: Dataset, tmp_path: Path) -> None:
    stats = dataset_stats(tiny, plot_path=tmp_path / "p.png")
    assert stats["n_impressions"] == tiny.meta["n_impressions"]
    assert stats["n_behaviours"] == tiny.meta["n_behaviours"]
    assert 0.1 < stats["ctr"] < 0.6
    pop = stats["impression_popularity"]
    assert pop["share_of_items_seen_lt5"] > 0.5 and pop["share_on_top1pct_items"] > 0.1
    lh = stats["long_history"]
    assert (
        0 < lh["share_clicks_facet_only_in_long_history"] <= lh["share_clicks_facet_absent_from_recent50"] < 1
    )
    assert sum(lh["clicks_by_explanation"].values()) == pytest.approx(1.0, abs=1e-3)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_long_tail_and_long_history_at_1k_histories(module_settings: Settings) -> None:
    """A reduced `small` (same 1K histories and world, fewer users/items): most items are seen fewer
    than 5 times and at least 20% of clicks are explained by a facet absent from the recent 50.
    """
    cfg = world_config("small", n_items=3_000, n_users=250)
    ds = generate_simworld(module_settings, config=cfg, seed=3, name="mid", register=False)
    stats = dataset_stats(ds)
    assert stats["impression_popularity"]["share_of_items_seen_lt5"] > 0.5
    assert stats["long_history"]["share_clicks_facet_absent_from_recent50"] >= 0.2
    assert stats["history_length"]["max"] == 1000


def test_sizes_and_config_errors() -> None:
    small, large = SIZES["small"], SIZES["large"]
    assert (small.n_items, small.n_users, small.max_history) == (20_000, 2_000, 1_000)
    assert large.max_history == 100_000 and large.user_batch_behaviours <= 2_000_000
    with pytest.raises(ConfigurationError, match="'huge' is unknown; valid: tiny, small, medium, large"):
        world_config("huge")
    with pytest.raises(ConfigurationError, match=r"unknown world config keys \['n_itemz'\]"):
        world_config("tiny", n_itemz=3)
    with pytest.raises(ConfigurationError, match="max_history"):
        world_config("tiny", max_history=5)


def test_streaming_batches_do_not_change_bytes(module_settings: Settings) -> None:
    """Users are simulated from their own random streams: flushing every few users (as `large`
    does) writes the same rows as one flush.
    """
    base = world_config("tiny", n_users=12, n_items=200)
    one = generate_simworld(module_settings, config=base, seed=5, name="one", register=False)
    many = generate_simworld(
        module_settings,
        config=world_config("tiny", n_users=12, n_items=200, user_batch_behaviours=500),
        seed=5,
        name="many",
        register=False,
    )
    assert one.histories_table().equals(many.histories_table())
    imp = [pa.Table.from_batches(list(ds.iter_impressions())) for ds in (one, many)]
    assert imp[0].equals(imp[1])
    for name in ("items", "offsets", "times"):  # the same bytes, though written in several appends
        assert (one.path / "histories" / f"{name}.npy").read_bytes() == (many.path / "histories" / f"{name}.npy").read_bytes()


def test_images_show_the_leaf_through_their_label(tiny: Dataset) -> None:
    """The leaf half of an interest key is visible: every image carries its leaf's label band
    (the same for every item of a leaf, different between leaves, unchanged by a horizontal flip)."""
    from muse.data.simworld_images import IMAGE_VERSION, LABEL_ROWS, leaf_label_digits

    assert tiny.meta["image_version"] == IMAGE_VERSION == 2

    assert len({tuple(d) for d in leaf_label_digits(np.arange(64)).tolist()}) == 64
    truth = pq.read_table(tiny.truth_path("items")).to_pandas()
    leaf_of = dict(zip(truth["item_id"].tolist(), truth["leaf"].tolist()))
    ids = truth["item_id"].tolist()[:120]
    rows = max(1, round(LABEL_ROWS * 64))
    bands: dict[int, list[np.ndarray]] = {}
    for iid, data in tiny.load_images(ids).items():
        band = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32)[1 : rows - 1].mean(axis=(0, 2))
        centres = ((np.arange(5) + 0.5) * 64 / 5).astype(int)
        cells = np.array([band[c - 3 : c + 3].mean() for c in centres])  # [5] grey per cell, noise averaged
        assert np.allclose(cells, cells[::-1], atol=12)  # a palindrome: flips keep it
        bands.setdefault(leaf_of[iid], []).append(cells)
    means = {leaf: np.mean(v, axis=0) for leaf, v in bands.items()}
    for leaf, v in bands.items():
        assert all(np.abs(c - means[leaf]).max() < 12 for c in v)  # same leaf, same label
    leaves = sorted(means)
    assert len(leaves) > 3
    assert all(np.abs(means[a] - means[b]).max() > 40 for i, a in enumerate(leaves) for b in leaves[i + 1 :])
