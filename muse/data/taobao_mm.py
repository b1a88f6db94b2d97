"""Reader of the raw Taobao-MM parquet files into the project's dataset format.

Raw schema (see ``docs/method.md``): ``train_samples``/``test_samples`` (``label_0`` one-hot list<int8>,
``129_1`` user, ``205`` target item), ``train_user_features``/``test_user_features`` (``129_1``,
``130_1``..``130_5``, ``150_2_180`` item history, ``151_2_180`` category history, oldest first),
``item_features`` (``205``, ``206`` category, ``213``, ``214``) and ``scl_embedding_int8_p90``
(``205``, ``205_c`` list<int8>[128], quantised as trunc(x * 127)).

Everything is streamed with ``iter_batches``; only id columns are held in memory (as numpy arrays:
about 16 bytes per user and 8 per item). The data has no timestamps: history ``times`` are the
positions 0..n-1 and an impression's ``time`` is its ``hist_len`` (it sees the whole history).
Sample users absent from the user-feature files (the case in the ten-row demo files) get a users row
with zero features and an empty history, so their impressions have ``hist_len`` 0; the counts are
reported in ``meta.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from muse.data.format import Dataset, DatasetWriter, check_name, datasets_root
from muse.errors import DataError, NotFoundError
from muse.settings import Settings

log = logging.getLogger(__name__)

USER, ITEM, LABEL = "129_1", "205", "label_0"
USER_FEATURES = ("130_1", "130_2", "130_3", "130_4", "130_5")
HIST_ITEMS, HIST_CATS = "150_2_180", "151_2_180"
ITEM_FEATURES = {"category": "206", "feat_a": "213", "feat_b": "214"}
SCL_VECTOR = "205_c"
SCL_SCALE = 127.0
SCL_SOURCE = "scl-taobao"

#: raw table stem -> required columns
RAW_TABLES: dict[str, tuple[str, ...]] = {
    "train_samples": (LABEL, USER, ITEM),
    "test_samples": (LABEL, USER, ITEM),
    "train_user_features": (USER, *USER_FEATURES, HIST_ITEMS, HIST_CATS),
    "test_user_features": (USER, *USER_FEATURES, HIST_ITEMS, HIST_CATS),
    "item_features": (ITEM, *ITEM_FEATURES.values()),
    "scl_embedding_int8_p90": (ITEM, SCL_VECTOR),
}
USER_BATCH = 2_048  # user-feature rows per batch (a row holds two lists of up to 1,000 int64)
ROW_BATCH = 262_144  # sample / item rows per batch


def find_raw_files(raw_dir: Path, stem: str) -> list[Path]:
    """Files of one raw table: ``<stem>.parquet``, ``<stem>/**/*.parquet`` or ``<stem>-*.parquet``."""
    files = [raw_dir / f"{stem}.parquet"] if (raw_dir / f"{stem}.parquet").is_file() else []
    if (raw_dir / stem).is_dir():
        files += sorted((raw_dir / stem).rglob("*.parquet"))
    files += sorted(raw_dir.glob(f"{stem}-*.parquet"))
    return files


def _check_columns(path: Path, required: tuple[str, ...]) -> None:
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from e
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{path}: missing Taobao-MM columns {missing}; has {names}")


def _iter(files: list[Path], columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    for path in files:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)


def _column_ids(files: list[Path], column: str) -> np.ndarray:
    parts = [b.column(column).to_numpy() for b in _iter(files, [column], ROW_BATCH)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _unique_ids(files: list[Path], column: str) -> np.ndarray:
    """Sorted distinct ids of a column, merged batch by batch (memory ~ distinct ids, not rows)."""
    acc = np.zeros(0, dtype=np.int64)
    pending: list[np.ndarray] = []
    n_pending = 0
    for batch in _iter(files, [column], ROW_BATCH):
        u = np.unique(batch.column(column).to_numpy().astype(np.int64))
        pending.append(u)
        n_pending += len(u)
        if n_pending > 4 * ROW_BATCH:
            acc = np.unique(np.concatenate([acc, *pending]))
            pending, n_pending = [], 0
    return np.unique(np.concatenate([acc, *pending])) if pending else acc


def decode_labels(labels: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
    """One-hot ``[no click, click]`` lists -> int8 labels (1 click). Raises DataError on anything else."""
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks()
    lengths = pc.list_value_length(labels).to_numpy(zero_copy_only=False)
    if labels.null_count or np.any(lengths != 2):
        bad = int(np.flatnonzero((lengths != 2) | np.asarray(labels.is_null()))[0])
        raise DataError(
            f"{where}: label_0 row {bad} is {labels[bad].as_py()!r}, expected a one-hot pair [0,1]/[1,0]"
        )
    pairs = labels.flatten().to_numpy().reshape(-1, 2)
    valid = ((pairs == 0) | (pairs == 1)).all(axis=1) & (pairs.sum(axis=1) == 1)
    if not valid.all():
        bad = int(np.flatnonzero(~valid)[0])
        raise DataError(f"{where}: label_0 row {bad} is {pairs[bad].tolist()}, expected a one-hot pair")
    return pairs[:, 1].astype(np.int8)


def _positions(lists: pa.ListArray) -> pa.ListArray:
    """For each list, the list of its positions 0..n-1 (the times of a history without timestamps)."""
    offsets = lists.offsets.to_numpy().astype(np.int64)
    starts = offsets[:-1] - offsets[0]
    total = int(offsets[-1] - offsets[0])
    lengths = np.diff(offsets)
    values = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
    return pa.ListArray.from_arrays(pa.array(offsets - offsets[0], type=pa.int32()), pa.array(values))


def import_taobao_mm(
    settings: Settings,
    raw_dir: str | Path,
    name: str = "taobao-mm",
    *,
    register: bool = True,
    progress: bool = False,
) -> Dataset:
    """Convert the raw Taobao-MM files in ``raw_dir`` into dataset ``name`` (replacing it) and
    register it when the database is migrated.

    Raises:
        NotFoundError: ``raw_dir`` or a required table is missing (item_features, samples, user features).
        DataError: a file lacks the expected columns or holds malformed labels/vectors.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise NotFoundError(f"Taobao-MM folder {str(raw_dir)!r} does not exist")
    name = check_name(name)
    files = {stem: find_raw_files(raw_dir, stem) for stem in RAW_TABLES}
    for stems in (
        ("item_features",),
        ("train_samples", "test_samples"),
        ("train_user_features", "test_user_features"),
    ):
        if not any(files[s] for s in stems):
            raise NotFoundError(
                f"{raw_dir}: no {' or '.join(stems)} parquet files found; expected e.g. {stems[0]}.parquet "
                f"(tables: {', '.join(RAW_TABLES)})"
            )
    for stem, paths in files.items():
        for path in paths:
            _check_columns(path, RAW_TABLES[stem])
    started = time.perf_counter()
    writer = DatasetWriter(
        datasets_root(settings) / name, name, "taobao-mm", rows_per_shard={"histories": 50_000}
    )

    # items ------------------------------------------------------------------------------------------
    items = writer.items_writer()
    item_cols = [ITEM, *ITEM_FEATURES.values()]
    for batch in _iter(files["item_features"], item_cols, ROW_BATCH):
        items.write(
            pa.table(
                {
                    "item_id": batch.column(ITEM),
                    **{ours: batch.column(raw) for ours, raw in ITEM_FEATURES.items()},
                    "title": pa.nulls(batch.num_rows, pa.string()),
                }
            )
        )
    items.close()
    item_ids_sorted = np.sort(_column_ids(files["item_features"], ITEM))

    # users and histories: train then test feature rows (first occurrence of a user wins) ------------
    feature_files = files["train_user_features"] + files["test_user_features"]
    feat_user_ids = _column_ids(feature_files, USER)
    _, first_index = np.unique(feat_user_ids, return_index=True)
    keep = np.zeros(len(feat_user_ids), dtype=bool)
    keep[first_index] = True
    n_duplicates = int((~keep).sum())
    if n_duplicates:
        log.warning(
            "%d duplicate user-feature rows (same user in several rows): the first one is kept", n_duplicates
        )
    users = writer.users_writer()
    hist_users, hist_lengths = [], []
    row = 0
    n_behaviours = 0
    cols = [USER, *USER_FEATURES, HIST_ITEMS, HIST_CATS]
    bar = tqdm(total=len(feat_user_ids), desc="user histories", unit="user", disable=not progress)
    for batch in _iter(feature_files, cols, USER_BATCH):
        mask = keep[row : row + batch.num_rows]
        row += batch.num_rows
        bar.update(batch.num_rows)
        if not mask.all():
            batch = batch.filter(pa.array(mask))
        item_lists, cat_lists = batch.column(HIST_ITEMS), batch.column(HIST_CATS)
        lengths = pc.list_value_length(item_lists).fill_null(0).to_numpy(zero_copy_only=False)
        cat_lengths = pc.list_value_length(cat_lists).fill_null(0).to_numpy(zero_copy_only=False)
        if np.any(lengths != cat_lengths):
            bad = int(np.flatnonzero(lengths != cat_lengths)[0])
            raise DataError(
                f"user {batch.column(USER)[bad].as_py()}: {HIST_ITEMS} has {lengths[bad]} entries but "
                f"{HIST_CATS} has {cat_lengths[bad]}"
            )
        item_lists = pc.if_else(item_lists.is_null(), pa.scalar([], pa.list_(pa.int64())), item_lists)
        cat_lists = pc.if_else(cat_lists.is_null(), pa.scalar([], pa.list_(pa.int64())), cat_lists)
        user_col = batch.column(USER)
        users.write(
            pa.table(
                {"user_id": user_col, **{f"f{i + 1}": batch.column(c) for i, c in enumerate(USER_FEATURES)}}
            )
        )
        writer.write_histories(
            pa.table(
                {
                    "user_id": user_col,
                    "item_ids": item_lists,
                    "categories": cat_lists,
                    "times": _positions(item_lists),
                }
            )
        )
        hist_users.append(user_col.to_numpy().astype(np.int64))
        hist_lengths.append(lengths.astype(np.int64))
        n_behaviours += int(lengths.sum())
    bar.close()

    # sample users without a feature row: zero features and an empty history -----------------------
    sample_files = {"train": files["train_samples"], "test": files["test_samples"]}
    sample_users = _unique_ids(files["train_samples"] + files["test_samples"], USER)
    known = np.concatenate(hist_users) if hist_users else np.zeros(0, dtype=np.int64)
    missing_users = np.setdiff1d(sample_users, known)
    if len(missing_users):
        log.warning("%d sample users have no user-feature row: empty history, hist_len 0", len(missing_users))
        zeros = np.zeros(len(missing_users), dtype=np.int64)
        users.write(pa.table({"user_id": missing_users, **{f"f{i}": zeros for i in range(1, 6)}}))
        empty = pa.array([[]] * len(missing_users), type=pa.list_(pa.int64()))
        writer.write_histories(
            pa.table({"user_id": missing_users, "item_ids": empty, "categories": empty, "times": empty})
        )
    users.close()

    # impressions: decoded labels, hist_len = the user's full history length -------------------------
    order = np.argsort(known, kind="stable")
    known_sorted = known[order]
    lengths_sorted = (np.concatenate(hist_lengths) if hist_lengths else np.zeros(0, dtype=np.int64))[order]
    n_imp_without_history = n_imp_items_without_features = 0
    n_clicks = 0
    for split, paths in sample_files.items():
        for path in paths:
            for batch in _iter([path], [LABEL, USER, ITEM], ROW_BATCH):
                labels = decode_labels(batch.column(LABEL), str(path))
                uid = batch.column(USER).to_numpy().astype(np.int64)
                pos = np.minimum(np.searchsorted(known_sorted, uid), max(len(known_sorted) - 1, 0))
                found = (known_sorted[pos] == uid) if len(known_sorted) else np.zeros(len(uid), dtype=bool)
                hist_len = np.where(found, lengths_sorted[pos] if len(known_sorted) else 0, 0).astype(
                    np.int32
                )
                iid = batch.column(ITEM).to_numpy().astype(np.int64)
                ipos = np.minimum(np.searchsorted(item_ids_sorted, iid), max(len(item_ids_sorted) - 1, 0))
                n_imp_items_without_features += (
                    int((item_ids_sorted[ipos] != iid).sum()) if len(item_ids_sorted) else len(iid)
                )
                n_imp_without_history += int((~found).sum())
                n_clicks += int(labels.sum())
                writer.write_impressions(
                    pa.table(
                        {
                            "user_id": uid,
                            "item_id": iid,
                            "label": labels,
                            "split": pa.array([split] * len(uid), type=pa.string()),
                            "time": hist_len.astype(np.int64),
                            "hist_len": hist_len,
                        }
                    )
                )

    # SCL vectors, dequantised ------------------------------------------------------------------------
    n_vectors, dim = 0, None
    if files["scl_embedding_int8_p90"]:
        emb = writer.embeddings_writer(SCL_SOURCE)
        for batch in _iter(files["scl_embedding_int8_p90"], [ITEM, SCL_VECTOR], ROW_BATCH):
            vec = batch.column(SCL_VECTOR)
            lengths = pc.list_value_length(vec).to_numpy(zero_copy_only=False)
            dim = int(lengths[0]) if dim is None and len(lengths) else dim
            if vec.null_count or np.any(lengths != dim):
                raise DataError(
                    f"{SCL_VECTOR}: vectors of unequal length {sorted(set(lengths.tolist()))}, expected {dim}"
                )
            values = vec.flatten().to_numpy().astype(np.float32) / np.float32(SCL_SCALE)
            offsets = pa.array(np.arange(0, (batch.num_rows + 1) * dim, dim, dtype=np.int32))
            emb.write(
                pa.table(
                    {
                        "item_id": batch.column(ITEM),
                        "vector": pa.ListArray.from_arrays(offsets, pa.array(values)),
                    }
                )
            )
            n_vectors += batch.num_rows
        emb.close()
    else:
        log.warning("%s: no scl_embedding_int8_p90 files; the %s source will be absent", raw_dir, SCL_SOURCE)

    n_impressions = writer.shards["impressions"].n_rows
    dataset = writer.finish(
        n_behaviours=n_behaviours,
        has_images=False,
        has_titles=False,
        has_search_sessions=False,
        raw_dir=str(raw_dir.resolve()),
        raw_columns={
            "item_id": ITEM,
            **ITEM_FEATURES,
            "user_id": USER,
            **{f"f{i + 1}": c for i, c in enumerate(USER_FEATURES)},
            "item_ids": HIST_ITEMS,
            "categories": HIST_CATS,
            "label": LABEL,
        },
        n_clicks=n_clicks,
        n_duplicate_user_rows=n_duplicates,
        n_users_without_features=int(len(missing_users)),
        n_impressions_without_history=n_imp_without_history,
        n_impression_items_without_features=n_imp_items_without_features,
        embeddings={SCL_SOURCE: {"n_items": n_vectors, "dim": dim, "scale": SCL_SCALE}} if n_vectors else {},
    )
    log.info(
        "taobao-mm %s: %d items, %d users (%d without features), %d behaviours, %d impressions, "
        "%d SCL vectors in %.1fs",
        name,
        dataset.n_items,
        dataset.n_users,
        len(missing_users),
        n_behaviours,
        n_impressions,
        n_vectors,
        time.perf_counter() - started,
    )
    if register:
        from muse.data.registry import register_if_ready

        register_if_ready(settings, dataset)
    return dataset
