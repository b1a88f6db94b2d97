"""The dataset format: writer and reader round trip, streaming by row range, errors; registration
in the metadata database (SQLite, and PostgreSQL with full-range int64 ids).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sqlalchemy import func, select

from muse import models
from muse.data.format import Dataset, DatasetWriter, check_name, datasets_root
from muse.data.registry import database_ready, list_datasets, register_dataset, update_stats
from muse.errors import DataError, NotFoundError
from muse.settings import Settings, load_settings

N_USERS = 23


def _write(settings: Settings, name: str = "toy", users_per_shard: int = 5) -> Dataset:
    w = DatasetWriter(datasets_root(settings) / name, name, "simworld")
    ids = np.array([-(2**63), -5, 7, 2**63 - 1], dtype=np.int64)  # full-range int64 ids
    w.write_items(
        pa.table(
            {
                "item_id": ids,
                "category": [1, 2, 1, 3],
                "feat_a": [0] * 4,
                "feat_b": [9] * 4,
                "title": ["red tee", None, "blue mug", "x"],
            }
        )
    )
    w.write_images(pa.table({"item_id": ids[:2], "image": [b"png-a", b"png-b"]}))
    w.write_images(pa.table({"item_id": ids[2:3], "image": [b"png-c"]}))
    w.write_users(
        pa.table(
            {"user_id": np.arange(N_USERS, dtype=np.int64), **{f"f{i}": [i] * N_USERS for i in range(1, 6)}}
        )
    )
    for start in range(0, N_USERS, 4):  # several row groups per shard, several shards
        users = list(range(start, min(start + 4, N_USERS)))
        w.write_histories(
            pa.table(
                {
                    "user_id": pa.array(users, pa.int64()),
                    "item_ids": [[int(ids[u % 4])] * u for u in users],
                    "categories": [[1] * u for u in users],
                    "times": [list(range(u)) for u in users],
                }
            )
        )
    w.write_impressions(
        pa.table(
            {
                "user_id": [0, 1, 2],
                "item_id": ids[:3],
                "label": pa.array([1, 0, 1], pa.int8()),
                "split": ["train", "train", "test"],
                "time": [5, 6, 9],
                "hist_len": pa.array([0, 1, 2], pa.int32()),
            }
        )
    )
    return w.finish(n_behaviours=sum(range(N_USERS)), has_titles=True)


def test_round_trip(settings: Settings) -> None:
    ds = _write(settings)
    assert Dataset.open(settings, "toy").meta == ds.meta
    assert ds.n_users == N_USERS and ds.n_items == 4 and ds.meta["n_impressions"] == 3
    assert ds.item_ids().tolist() == [-(2**63), -5, 7, 2**63 - 1]
    assert ds.items().column("title").to_pylist() == ["red tee", None, "blue mug", "x"]
    assert ds.load_images([7, -5, 2**63 - 1]) == {7: b"png-c", -5: b"png-b"}
    assert ds.load_images([]) == {}
    assert [b.num_rows for b in ds.iter_images(batch_size=1)] == [1, 1, 1]
    assert ds.users().num_rows == N_USERS
    assert ds.histories().lengths().tolist() == list(range(N_USERS))
    assert ds.histories_table().column("user_id").to_pylist() == list(range(N_USERS))
    assert [r.num_rows for r in ds.iter_impressions(split="test")] == [1]
    assert sum(r.num_rows for r in ds.iter_impressions()) == 3
    assert (
        ds.search_sessions() is None and ds.embeddings_path("scl") is None and ds.truth_path("items") is None
    )


@pytest.mark.parametrize("start,stop,batch", [(0, None, 1024), (3, 11, 2), (4, 5, 7), (7, 7, 3), (20, 99, 1)])
def test_iter_histories_ranges(settings: Settings, start: int, stop: int | None, batch: int) -> None:
    ds = _write(settings)
    batches = list(ds.iter_histories(batch_size=batch, start=start, stop=stop))
    got = [u for b in batches for u in b.column("user_id").to_pylist()]
    assert got == list(range(start, N_USERS if stop is None else min(stop, N_USERS)))
    assert all(b.num_rows <= batch for b in batches)
    rows = [r for b in batches for r in b.to_pylist()]
    assert all(len(r["item_ids"]) == r["user_id"] and r["times"] == list(range(r["user_id"])) for r in rows)
    only = list(ds.iter_histories(start=start, stop=stop, columns=["user_id"]))
    assert all(b.schema.names == ["user_id"] for b in only)


def test_errors(settings: Settings) -> None:
    ds = _write(settings)
    with pytest.raises(NotFoundError, match=r"'nope' not found .* available: \['toy'\]"):
        Dataset.open(settings, "nope")
    with pytest.raises(DataError, match="'../x' is invalid"):
        check_name("../x")
    with pytest.raises(DataError, match="split 'dev' is unknown; valid: train, test"):
        list(ds.iter_impressions(split="dev"))
    w = DatasetWriter(datasets_root(settings) / "bad", "bad", "simworld")
    with pytest.raises(DataError, match=r"items: missing columns \['title'\]"):
        w.write_items(pa.table({"item_id": [1], "category": [1], "feat_a": [1], "feat_b": [1]}))
    with pytest.raises(DataError, match="kind 'movies' is unknown"):
        DatasetWriter(datasets_root(settings) / "m", "m", "movies")
    meta = json.loads((ds.path / "meta.json").read_text())
    (ds.path / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99 is not supported"):
        Dataset(ds.path)
    with pytest.raises(NotFoundError, match="meta.json missing"):
        Dataset(settings.path("datasets", "bad"))


def _count(settings: Settings, table: type, dataset_id: int) -> int:
    from muse.db import session_scope

    with session_scope(settings) as s:
        return s.scalar(select(func.count()).select_from(table).where(table.dataset_id == dataset_id))


def _check_registration(settings: Settings) -> None:
    ds = _write(settings)
    dataset_id = register_dataset(settings, ds)
    assert register_dataset(settings, ds) == dataset_id  # replaced, not duplicated
    assert (
        _count(settings, models.Item, dataset_id) == 4
        and _count(settings, models.User, dataset_id) == N_USERS
    )
    from muse.db import session_scope

    with session_scope(settings) as s:
        row = s.get(models.Dataset, dataset_id)
        assert (row.name, row.kind, row.stats["n_items"], row.stats["items_registered"]) == (
            "toy",
            "simworld",
            4,
            True,
        )
        item = s.get(models.Item, (dataset_id, -(2**63)))
        assert item.title == "red tee" and item.attributes == {"feat_a": 0, "feat_b": 9}
        assert item.image_location == "images/part-00000.parquet#0"
        assert s.get(models.Item, (dataset_id, 7)).image_location == "images/part-00000.parquet#2"
        assert s.get(models.User, (dataset_id, 3)).features == {f"f{i}": i for i in range(1, 6)}
    update_stats(settings, "toy", {"ctr": 0.5})
    with session_scope(settings) as s:
        assert s.get(models.Dataset, dataset_id).stats["ctr"] == 0.5
    with pytest.raises(NotFoundError, match="'other' is not registered"):
        update_stats(settings, "other", {})
    listed = list_datasets(settings)
    assert [(r["name"], r["registered"], r["on_disk"]) for r in listed] == [("toy", True, True)]


def test_register_sqlite(settings: Settings) -> None:
    assert not database_ready(settings)
    from muse import db

    db.upgrade(settings)
    assert database_ready(settings)
    _check_registration(settings)


@pytest.mark.postgres
def test_register_postgres(settings: Settings, postgres_url: str) -> None:
    from muse import db

    pg = load_settings(env={}, data_dir=settings.data_dir, database_url=postgres_url, device="cpu")
    db.upgrade(pg)
    _check_registration(pg)


def test_register_max_rows_bounds_the_per_row_metadata(settings: Settings) -> None:
    """MUSE_REGISTER_MAX_ROWS: a dataset with more items (users) than it gets no row per item (user),
    and its stats say so; the dataset row itself is registered either way."""
    from muse import db

    db.upgrade(settings)
    ds = _write(settings)
    few = load_settings(env={"MUSE_REGISTER_MAX_ROWS": "5"}, data_dir=settings.data_dir, device="cpu")
    dataset_id = register_dataset(few, ds)  # 4 items <= 5 < 23 users
    assert (_count(few, models.Item, dataset_id), _count(few, models.User, dataset_id)) == (4, 0)
    none = load_settings(env={"MUSE_REGISTER_MAX_ROWS": "0"}, data_dir=settings.data_dir, device="cpu")
    assert register_dataset(none, ds) == dataset_id
    assert (_count(none, models.Item, dataset_id), _count(none, models.User, dataset_id)) == (0, 0)
    from muse.db import session_scope

    with session_scope(none) as s:
        stats = s.get(models.Dataset, dataset_id).stats
    assert (stats["n_items"], stats["items_registered"], stats["users_registered"]) == (4, False, False)


def test_list_without_database(settings: Settings, tmp_path: Path) -> None:
    assert list_datasets(settings) == []
    _write(settings)
    assert [(r["name"], r["registered"]) for r in list_datasets(settings)] == [("toy", False)]


def test_cooccurrence_pairs(settings: Settings) -> None:
    from muse.data.pairs import iter_cooccurrence_pairs

    w = DatasetWriter(datasets_root(settings) / "pairs", "pairs", "simworld")
    w.write_items(
        pa.table(
            {
                "item_id": [1, 2, 3, 4],
                "category": [1] * 4,
                "feat_a": [0] * 4,
                "feat_b": [0] * 4,
                "title": [None] * 4,
            }
        )
    )
    w.write_users(pa.table({"user_id": [10, 11], **{f"f{i}": [0, 0] for i in range(1, 6)}}))
    w.write_histories(
        pa.table(
            {
                "user_id": [10, 11],
                "item_ids": [[1, 2, 2, 3], [4, 1]],
                "categories": [[1] * 4, [1] * 2],
                "times": [[0, 1, 2, 3], [0, 1]],
            }
        )
    )
    ds = w.finish()
    got = np.concatenate(list(iter_cooccurrence_pairs(ds, window=2)))
    # window 1: (1,2) (2,3) [(2,2) dropped] and user 11: (4,1); window 2: (1,2) (2,3); never across users
    assert sorted(map(tuple, got.tolist())) == [(1, 2), (1, 2), (2, 3), (2, 3), (4, 1)]
    only_11 = list(iter_cooccurrence_pairs(ds, window=2, keep_users=lambda users: users == 11))
    assert [p.tolist() for p in only_11] == [[[4, 1]]]  # the other user's histories are not paired
    assert list(iter_cooccurrence_pairs(ds, window=2, keep_users=lambda users: users < 0)) == []
    with pytest.raises(DataError, match="window must be >= 1"):
        list(iter_cooccurrence_pairs(ds, window=0))


def test_registration_json_is_built_by_arrow_and_reads_back() -> None:
    """The ``items.attributes`` / ``users.features`` JSON texts, built column-wise, decode to the
    values of each row (nulls, the int64 extremes, strings that need escaping, floats)."""
    import json

    import pyarrow as pa

    from muse.data.registry import _json_objects

    table = pa.table({"a": pa.array([1, None, -(2**63), 2**63 - 1], pa.int64()),
                      "b": ['say "hi"', "tab\there", None, "é"], "c": [0.5, 1e20, None, -2.0]})
    got = [json.loads(t) for t in _json_objects(table, ["a", "b", "c"]).to_pylist()]
    assert got == [{"a": a, "b": b, "c": c} for a, b, c in zip(*(table.column(k).to_pylist() for k in "abc"))]
    assert _json_objects(table, []).to_pylist() == ["{}"] * 4
