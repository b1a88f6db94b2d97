"""Registration of datasets in the metadata database: the ``datasets`` row (name, kind, location,
statistics) and, for datasets of moderate size, one ``items`` and one ``users`` row each.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import JSON, delete, insert, inspect, select

from muse import models
from muse.data.format import Dataset, datasets_root
from muse.db import check_database, database_missing, get_engine, session_scope
from muse.errors import NotFoundError
from muse.settings import Settings

log = logging.getLogger(__name__)

INSERT_CHUNK = 5_000


def database_ready(settings: Settings) -> bool:
    """True when the metadata database is migrated (has the ``datasets`` table); False when its
    SQLite file does not exist yet (nothing is created).

    Raises:
        BackendUnavailable: the database cannot be reached (names ``MUSE_DATABASE_URL``).
    """
    if database_missing(settings):
        return False
    check_database(settings)
    return inspect(get_engine(settings)).has_table("datasets")


def _image_locations(dataset: Dataset) -> dict[int, str]:
    """item id -> ``images/part-NNNNN.parquet#row``."""
    out: dict[int, str] = {}
    for shard in sorted((dataset.path / "images").glob("part-*.parquet")):
        ids = pq.read_table(shard, columns=["item_id"]).column("item_id").to_pylist()
        rel = f"images/{shard.name}"
        out.update((iid, f"{rel}#{row}") for row, iid in enumerate(ids))
    return out


def _json_text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Each value of ``column`` as JSON text (null as ``null``): integers converted by Arrow, other
    types one ``json.dumps`` a value."""
    if pa.types.is_integer(column.type):
        text = pc.cast(column, pa.string())
    else:
        text = pa.array([json.dumps(v) for v in column.to_pylist()], pa.string())
    return pc.fill_null(text, "null")


def _json_objects(table: pa.Table, keys: list[str]) -> pa.Array:
    """One JSON object per row of ``table`` with the columns ``keys``, built by Arrow's string
    kernels (a ``json.dumps`` per row would be the registration's largest cost)."""
    parts: list[Any] = []
    for i, key in enumerate(keys):
        parts += [("{" if i == 0 else ", ") + json.dumps(key) + ": ", _json_text(table.column(key))]
    if not keys:
        return pa.array(["{}"] * table.num_rows, pa.string())
    return pc.binary_join_element_wise(*parts, "}", "")


def _item_rows(dataset: Dataset, dataset_id: int) -> tuple[list[str], list[tuple[Any, ...]]]:
    items = dataset.items()
    locations = _image_locations(dataset) if dataset.meta.get("has_images") else {}
    ids = items.column("item_id").to_pylist()
    columns = {
        "item_id": ids,
        "category": items.column("category").to_pylist(),
        "attributes": _json_objects(items, ["feat_a", "feat_b"]).to_pylist(),
        "title": items.column("title").to_pylist(),
        "image_location": [locations.get(i) for i in ids] if locations else [None] * len(ids),
    }
    return _rows(dataset_id, columns)


def _user_rows(dataset: Dataset, dataset_id: int) -> tuple[list[str], list[tuple[Any, ...]]]:
    users = dataset.users()
    columns = {
        "user_id": users.column("user_id").to_pylist(),
        "features": _json_objects(users, [c for c in users.column_names if c != "user_id"]).to_pylist(),
    }
    return _rows(dataset_id, columns)


def _rows(dataset_id: int, columns: dict[str, list[Any]]) -> tuple[list[str], list[tuple[Any, ...]]]:
    n = len(next(iter(columns.values())))
    return ["dataset_id", *columns], list(zip([dataset_id] * n, *columns.values()))


def _insert_rows(conn: Any, table: Any, names: list[str], rows: list[tuple[Any, ...]]) -> None:
    """Insert ``rows`` (tuples in the order of ``names``; the table's JSON columns as JSON text) into
    ``table`` in chunks: the driver's bulk path on SQLite (executemany) and PostgreSQL with psycopg2
    (multi-row VALUES); elsewhere SQLAlchemy Core with the JSON decoded again."""
    dialect, driver = conn.dialect.name, conn.dialect.driver
    cols = ", ".join(names)
    for i in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[i : i + INSERT_CHUNK]
        if dialect == "sqlite":
            conn.exec_driver_sql(f"INSERT INTO {table.name} ({cols}) VALUES ({', '.join('?' * len(names))})", chunk)
        elif dialect == "postgresql" and driver == "psycopg2":
            from psycopg2.extras import execute_values

            with conn.connection.dbapi_connection.cursor() as cur:
                execute_values(cur, f"INSERT INTO {table.name} ({cols}) VALUES %s", chunk, page_size=INSERT_CHUNK)
        else:
            decode = [json.loads if isinstance(table.c[n].type, JSON) else None for n in names]
            conn.execute(insert(table), [{n: (f(v) if f else v) for n, f, v in zip(names, decode, r)} for r in chunk])


def register_dataset(settings: Settings, dataset: Dataset, stats: dict[str, Any] | None = None) -> int:
    """Insert or replace the ``datasets`` row of ``dataset`` and its ``items``/``users`` rows.

    Per-row items/users are skipped when there are more than ``settings.register_max_rows``
    (``MUSE_REGISTER_MAX_ROWS``; the dataset's files stay the source of truth, and the stats say
    ``items_registered``/``users_registered`` false). Returns the dataset id.
    """
    base_stats: dict[str, Any] = {
        k: dataset.meta[k]
        for k in ("n_items", "n_users", "n_impressions", "n_behaviours")
        if k in dataset.meta
    }
    base_stats.update(stats or {})
    n_items, n_users = int(dataset.meta["n_items"]), int(dataset.meta["n_users"])
    base_stats["items_registered"] = n_items <= settings.register_max_rows
    base_stats["users_registered"] = n_users <= settings.register_max_rows
    with session_scope(settings) as session:
        row = session.scalars(select(models.Dataset).where(models.Dataset.name == dataset.name)).first()
        if row is None:
            row = models.Dataset(name=dataset.name, kind=dataset.kind, location=str(dataset.path.resolve()))
            session.add(row)
        else:
            session.execute(delete(models.Item).where(models.Item.dataset_id == row.id))
            session.execute(delete(models.User).where(models.User.dataset_id == row.id))
            row.kind = dataset.kind
            row.location = str(dataset.path.resolve())
        row.stats = json.loads(json.dumps(base_stats))
        session.flush()
        dataset_id = row.id
        for table, enabled, rows_fn in (
            (models.Item, base_stats["items_registered"], _item_rows),
            (models.User, base_stats["users_registered"], _user_rows),
        ):
            if not enabled:
                log.info("dataset %s: more %s than MUSE_REGISTER_MAX_ROWS (%d): no row each in the database",
                         dataset.name, table.__tablename__, settings.register_max_rows)
                continue
            # the driver's bulk insert on the session's connection: the ORM's (or Core's) per-row
            # bookkeeping would cost more than the rows themselves (about 20 us a row)
            names, rows = rows_fn(dataset, dataset_id)
            _insert_rows(session.connection(), table.__table__, names, rows)
    log.info(
        "dataset %s registered with id %d (%d items, %d users)", dataset.name, dataset_id, n_items, n_users
    )
    return dataset_id


def update_stats(settings: Settings, name: str, stats: dict[str, Any]) -> None:
    """Merge ``stats`` into the registered dataset's statistics.

    Raises:
        NotFoundError: the dataset is not registered.
    """
    with session_scope(settings) as session:
        row = session.scalars(select(models.Dataset).where(models.Dataset.name == name)).first()
        if row is None:
            raise NotFoundError(f"dataset {name!r} is not registered in {settings.database_url}")
        merged = dict(row.stats or {})
        merged.update(json.loads(json.dumps(stats)))
        row.stats = merged


def list_datasets(settings: Settings) -> list[dict[str, Any]]:
    """Every dataset folder under ``$MUSE_DATA_DIR/datasets`` and every registered dataset, merged by name:
    dicts with ``name``, ``kind``, ``location``, ``registered``, ``on_disk`` and the counts.
    """
    found: dict[str, dict[str, Any]] = {}
    root = datasets_root(settings)
    if root.exists():
        for path in sorted(root.iterdir()):
            if (path / "meta.json").exists():
                ds = Dataset(path)
                found[ds.name] = {
                    "name": ds.name,
                    "kind": ds.kind,
                    "location": str(path),
                    "registered": False,
                    "on_disk": True,
                    **{k: ds.meta[k] for k in ("n_items", "n_users", "n_impressions", "n_behaviours")},
                }
    if database_ready(settings):
        with session_scope(settings) as session:
            for row in session.scalars(select(models.Dataset).order_by(models.Dataset.name)):
                entry = found.setdefault(
                    row.name,
                    {
                        "name": row.name,
                        "kind": row.kind,
                        "location": row.location,
                        "on_disk": False,
                        **{
                            k: (row.stats or {}).get(k)
                            for k in ("n_items", "n_users", "n_impressions", "n_behaviours")
                        },
                    },
                )
                entry["registered"] = True
    return [found[k] for k in sorted(found)]


def register_if_ready(settings: Settings, dataset: Dataset) -> int | None:
    """Register ``dataset`` when the database is migrated; otherwise log how to do it and return None."""
    if not database_ready(settings):
        log.warning(
            "database %s is not migrated: dataset %s written but not registered (run `muse db upgrade`)",
            settings.database_url,
            dataset.name,
        )
        return None
    return register_dataset(settings, dataset)
