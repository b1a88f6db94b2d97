"""The synthetic multimodal shopping world: :func:`generate_simworld` writes a dataset in the
project's format (items with rendered images and titles, users, lifelong histories, labelled
impressions, search sessions) plus the generator's ground truth under ``truth/``.

The world is built so that multimodal, long-history retrieval matters: clicks depend on lifelong
interest facets (dormant ones included), recent intent and popularity; facets are (leaf category,
colour) pairs visible in images and titles; popularity has a long tail so rare items have too few
interactions for ID embeddings. Same size + seed -> same bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from muse.data.format import COMPRESSION, Dataset, DatasetWriter, check_name, datasets_root
from muse.data.simworld_config import WorldConfig, world_config
from muse.data.simworld_images import IMAGE_VERSION, render_batch
from muse.data.simworld_items import Catalogue, make_catalogue, make_pools
from muse.data.simworld_users import EXPLAINED, RECENT, UserSim, simulate_user
from muse.settings import Settings

log = logging.getLogger(__name__)

TRUTH_IMPRESSIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("p_click", pa.float32()),
        ("explained_by", pa.string()),  # lifelong | recent | other
        ("match_key", pa.int64()),  # interest key (leaf * n_colours + colour) of the best facet, -1 none
        ("key_in_recent", pa.bool_()),  # that key is among the last 50 visible behaviours
        ("key_in_history", pa.bool_()),  # that key is anywhere in the visible history
    ]
)


def default_name(size: str, seed: int) -> str:
    return f"simworld-{size}-{seed}"


def _items_table(cat: Catalogue) -> pa.Table:
    return pa.table(
        {
            "item_id": cat.item_id,
            "category": cat.leaf + 1,
            "feat_a": cat.top + 1,
            "feat_b": cat.brand,
            "title": pa.array(cat.titles, type=pa.string()),
        }
    )


def _truth_items(cat: Catalogue) -> pa.Table:
    return pa.table(
        {
            "item_id": cat.item_id,
            "leaf": cat.leaf,
            "top": cat.top,
            "colour": cat.colour,
            "shape": cat.shape,
            "pattern": cat.pattern,
            "style": cat.style,
            "brand": cat.brand,
            "key": cat.key,
            "popularity": cat.popularity,
            "birth": cat.birth,
            "death": cat.death,
        }
    )


class _UserBatch:
    """Users accumulated until the next flush."""

    def __init__(self) -> None:
        self.users: list[UserSim] = []
        self.n_behaviours = 0

    def add(self, u: UserSim) -> None:
        self.users.append(u)
        self.n_behaviours += len(u.hist_items)


def _rows_table(rows: list[tuple], fields: list[tuple[str, pa.DataType]]) -> pa.Table:
    """A table from row tuples, one ``(name, type)`` per column (no rows: an empty table)."""
    cols = list(zip(*rows)) if rows else [[]] * len(fields)
    return pa.table({name: pa.array(col, typ) for (name, typ), col in zip(fields, cols)})


def _flush(
    batch: _UserBatch, cat: Catalogue, writer: DatasetWriter, truth: pq.ParquetWriter, split_time: int
) -> None:
    users = batch.users
    if not users:
        return
    ids = cat.item_id
    lengths = np.array([len(u.hist_items) for u in users])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat_items = np.concatenate([u.hist_items for u in users])
    flat_times = np.concatenate([u.hist_times for u in users])

    def lst(values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int64()))

    writer.write_histories(
        pa.table(
            {
                "user_id": np.array([u.user_id for u in users], dtype=np.int64),
                "item_ids": lst(ids[flat_items]),
                "categories": lst(cat.leaf[flat_items] + 1),
                "times": lst(flat_times),
            }
        )
    )
    imp_user = np.concatenate([np.full(len(u.imp_items), u.user_id, dtype=np.int64) for u in users])
    imp_items = ids[np.concatenate([u.imp_items for u in users])]
    imp_times = np.concatenate([u.imp_times for u in users])
    writer.write_impressions(
        pa.table(
            {
                "user_id": imp_user,
                "item_id": imp_items,
                "label": np.concatenate([u.imp_labels for u in users]),
                "split": pa.array(
                    np.where(imp_times < split_time, "train", "test").tolist(), type=pa.string()
                ),
                "time": imp_times,
                "hist_len": np.concatenate([u.imp_hist_len for u in users]).astype(np.int32),
            }
        )
    )
    explained = np.asarray(EXPLAINED, dtype=object)[np.concatenate([u.imp_explained for u in users])]
    truth.write_table(
        pa.table(
            {
                "user_id": imp_user,
                "item_id": imp_items,
                "p_click": np.concatenate([u.imp_p_click for u in users]),
                "explained_by": pa.array(explained.tolist(), type=pa.string()),
                "match_key": np.concatenate([u.imp_match_key for u in users]),
                "key_in_recent": np.concatenate([u.imp_key_in_recent for u in users]),
                "key_in_history": np.concatenate([u.imp_key_in_history for u in users]),
            },
            schema=TRUTH_IMPRESSIONS_SCHEMA,
        )
    )
    batch.users = []
    batch.n_behaviours = 0


def generate_simworld(
    settings: Settings,
    size: str = "tiny",
    seed: int = 0,
    name: str | None = None,
    *,
    config: WorldConfig | None = None,
    register: bool = True,
    progress: bool = False,
) -> Dataset:
    """Generate a simworld dataset under ``settings.path("datasets", name)`` and register it when
    the database is migrated (``register=False`` skips that).

    Args:
        size: ``tiny`` | ``small`` | ``medium`` | ``large`` (see ``muse.data.simworld_config.SIZES``).
        seed: random seed; same size + seed + config -> byte-identical files.
        name: dataset name (default ``simworld-<size>-<seed>``); an existing one is replaced.
        config: a full world config overriding the size's.
        progress: show tqdm progress bars (CLI use).

    Raises:
        ConfigurationError: unknown size.
    """
    cfg = config or world_config(size)
    name = check_name(name or default_name(size, seed))
    path = datasets_root(settings) / name
    started = time.perf_counter()
    writer = DatasetWriter(
        path,
        name,
        "simworld",
    )

    cat = make_catalogue(cfg, seed)
    pools = make_pools(cat)
    writer.write_items(_items_table(cat))
    pq.write_table(_truth_items(cat), writer.truth_path("items"), compression=COMPRESSION)

    order = np.arange(cat.n)
    for b, start in enumerate(
        tqdm(range(0, cat.n, cfg.image_batch), desc="images", unit="batch", disable=not progress)
    ):
        index = order[start : start + cfg.image_batch]
        images = render_batch(np.random.default_rng([seed, 2, b]), cat, index, cfg.image_size)
        writer.write_images(
            pa.table({"item_id": cat.item_id[index], "image": pa.array(images, type=pa.binary())})
        )

    log_pop = np.log(cat.popularity)
    log_pop_stats = (float(log_pop.mean()), float(log_pop.std()))
    split_time = int(cfg.horizon * (1.0 - cfg.test_frac))
    truth = pq.ParquetWriter(
        writer.truth_path("impressions"), TRUTH_IMPRESSIONS_SCHEMA, compression=COMPRESSION
    )
    batch = _UserBatch()
    features, facets, sessions = [], [], []
    n_behaviours = n_impressions = 0
    for uid in tqdm(range(1, cfg.n_users + 1), desc="users", unit="user", disable=not progress):
        u = simulate_user(cfg, cat, pools, seed, uid, log_pop_stats)
        batch.add(u)
        n_behaviours += len(u.hist_items)
        n_impressions += len(u.imp_items)
        features.append((uid, *u.features))
        for f in range(len(u.facet_keys)):
            facets.append(
                (
                    uid,
                    f,
                    int(u.facet_keys[f]),
                    int(u.facet_patterns[f]),
                    float(u.facet_strength[f]),
                    float(u.facet_active_share[f]),
                )
            )
        for j, (t, query, clicked, purchased) in enumerate(u.sessions):
            sessions.append(
                (
                    uid * 1000 + j,
                    uid,
                    t,
                    query,
                    [int(cat.item_id[c]) for c in clicked],
                    int(cat.item_id[purchased]) if purchased >= 0 else -1,
                )
            )
        if batch.n_behaviours >= cfg.user_batch_behaviours or len(batch.users) >= cfg.users_per_shard:
            _flush(batch, cat, writer, truth, split_time)
    _flush(batch, cat, writer, truth, split_time)
    truth.close()

    i64 = pa.int64()
    writer.write_users(_rows_table(features, [("user_id", i64)] + [(f"f{i}", i64) for i in range(1, 6)]))
    pq.write_table(
        _rows_table(
            facets,
            [("user_id", i64), ("facet", i64), ("key", i64), ("pattern", i64),
             ("strength", pa.float64()), ("active_share", pa.float64())],
        ),
        writer.truth_path("facets"),
        compression=COMPRESSION,
    )
    writer.write_search_sessions(
        _rows_table(
            sessions,
            [("session_id", i64), ("user_id", i64), ("time", i64), ("query", pa.string()),
             ("clicked", pa.list_(i64)), ("purchased", i64)],
        )
    )
    dataset = writer.finish(
        seed=seed,
        n_behaviours=n_behaviours,
        n_impressions=n_impressions,
        has_images=True,
        has_titles=True,
        has_search_sessions=True,
        size=size if config is None else "custom",
        world=dataclasses.asdict(cfg),
        split_time=split_time,
        recent_window=RECENT,
        truth_files=["items", "facets", "impressions"],
        image_version=IMAGE_VERSION,
    )
    log.info(
        "simworld %s: %d items, %d users, %d behaviours, %d impressions in %.1fs",
        name,
        cat.n,
        cfg.n_users,
        n_behaviours,
        n_impressions,
        time.perf_counter() - started,
    )
    if register:
        from muse.data.registry import register_if_ready

        register_if_ready(settings, dataset)
    return dataset


def dataset_path(settings: Settings, name: str) -> Path:
    return datasets_root(settings) / check_name(name)
