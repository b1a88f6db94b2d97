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

from muse.arrays import lookup_sorted
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


USER_COLUMNS = [USER, *USER_FEATURES, HIST_ITEMS, HIST_CATS]


def _first_rows(ids: np.ndarray) -> np.ndarray:
    """Mask of the first occurrence of each id."""
    _, first = np.unique(ids, return_index=True)
    keep = np.zeros(len(ids), dtype=bool)
    keep[first] = True
    return keep


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wrapping arithmetic)."""
    x = np.asarray(x).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _history_lists(batch: pa.RecordBatch) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """Item and category history lists (nulls as empty lists) and their lengths; DataError if they differ."""
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
    return item_lists, cat_lists, lengths.astype(np.int64)


def _row_hashes(batch: pa.RecordBatch, limits: np.ndarray) -> np.ndarray:
    """A 64-bit digest per row of (user features, the first ``limits[row]`` history entries, that length)."""
    item_lists, cat_lists, lengths = _history_lists(batch)
    n = np.minimum(lengths, limits).astype(np.uint64)
    h = _mix(n + np.uint64(0x51ED))
    with np.errstate(over="ignore"):
        for j, c in enumerate(USER_FEATURES):
            h = h + _mix(batch.column(c).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
                         ^ _mix(np.uint64(j + 1)))
        pos = pc.list_flatten(_positions(item_lists)).to_numpy().astype(np.uint64)
        items = pc.list_flatten(item_lists).to_numpy().astype(np.int64).view(np.uint64)
        cats = pc.list_flatten(cat_lists).to_numpy().astype(np.int64).view(np.uint64)
        rows = np.repeat(np.arange(len(lengths)), lengths)
        part = _mix(items ^ _mix(pos * np.uint64(2) + np.uint64(1000))) + _mix(
            cats ^ _mix(pos * np.uint64(2) + np.uint64(1001))
        )
        part = np.where(pos < n[rows], part, np.uint64(0))
        csum = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(part, dtype=np.uint64)])
        ends = np.cumsum(lengths)
        h = h + (csum[ends] - csum[ends - lengths])
    return h


def _digests(
    files: list[Path], prefix_of: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per user-feature row: user id, history length, digest of the whole row and, with ``prefix_of``
    = (sorted user ids, their lengths), the digest of the row cut to that user's length there."""
    uids, lens, full, prefix = [], [], [], []
    for batch in _iter(files, USER_COLUMNS, USER_BATCH):
        uid = batch.column(USER).to_numpy().astype(np.int64)
        length = pc.list_value_length(batch.column(HIST_ITEMS)).fill_null(0).to_numpy(zero_copy_only=False)
        everything = np.full(len(uid), np.iinfo(np.int64).max)
        uids.append(uid)
        lens.append(length.astype(np.int64))
        full.append(_row_hashes(batch, everything))
        if prefix_of is not None:
            pos, found = lookup_sorted(prefix_of[0], uid)
            prefix.append(_row_hashes(batch, np.where(found, prefix_of[1][pos], everything)))
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dtype=dt)  # noqa: E731
    return cat(uids, np.int64), cat(lens, np.int64), cat(full, np.uint64), cat(prefix, np.uint64)


def _fresh_ids(taken: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` distinct int64 ids (never 0) absent from ``taken`` (sorted)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(0, dtype=np.int64)
    while len(out) < n:
        cand = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=2 * n, dtype=np.int64)
        cand = cand[(cand != 0) & ~lookup_sorted(taken, cand)[1]]
        out = np.unique(np.concatenate([out, cand]))
    return rng.permutation(out)[:n]


class _UserMap:
    """Sample user id -> (dataset user id, history length) for one split's user file."""

    def __init__(self, sample_ids: np.ndarray, row_ids: np.ndarray, lengths: np.ndarray) -> None:
        order = np.argsort(sample_ids)
        self.ids, self.row_ids, self.lengths = sample_ids[order], row_ids[order], lengths[order]

    def lookup(self, uid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos, found = lookup_sorted(self.ids, uid)
        if len(self.ids) == 0:
            return found, uid, np.zeros(len(uid), dtype=np.int64)
        return found, self.row_ids[pos], self.lengths[pos]


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

    # users and histories ---------------------------------------------------------------------------
    # Train samples join the train user file and test samples the test user file (as the release
    # does). A user in both files is stored once when the test row extends the train row (same
    # features, the train history a prefix of the test one): train impressions see the prefix
    # (hist_len = the train length). A test row that differs otherwise is stored under an alias
    # user id that only the test impressions use.
    train_files, test_files = files["train_user_features"], files["test_user_features"]
    tr_uid, tr_len, tr_hash, _ = _digests(train_files)
    tr_first = _first_rows(tr_uid)
    tr_keys, tr_key_len, tr_key_hash = tr_uid[tr_first], tr_len[tr_first], tr_hash[tr_first]
    order = np.argsort(tr_keys)
    tr_keys, tr_key_len, tr_key_hash = tr_keys[order], tr_key_len[order], tr_key_hash[order]
    te_uid, te_len, _, te_prefix = _digests(test_files, (tr_keys, tr_key_len))
    te_first = _first_rows(te_uid)
    pos, in_train = lookup_sorted(tr_keys, te_uid)
    same_prefix = in_train & (te_len >= tr_key_len[pos]) & (te_prefix == tr_key_hash[pos])
    identical = te_first & same_prefix & (te_len == tr_key_len[pos])
    extends = te_first & same_prefix & (te_len > tr_key_len[pos])
    conflict = te_first & in_train & ~same_prefix
    extended_users = np.sort(te_uid[extends])
    keep_train = tr_first & ~lookup_sorted(extended_users, tr_uid)[1]
    keep_test = te_first & ~identical
    all_ids = np.union1d(tr_uid, te_uid)
    alias = np.zeros(len(te_uid), dtype=np.int64)
    alias[conflict] = _fresh_ids(all_ids, int(conflict.sum()), seed=len(all_ids))
    n_duplicates = int((~tr_first).sum() + (~te_first).sum() + identical.sum())
    if n_duplicates:
        log.warning("%d duplicate user-feature rows (same user and same row again): the first one is kept",
                    n_duplicates)
    if extends.any():
        log.info("%d users' test rows extend their train rows: one history, train impressions see its prefix",
                 int(extends.sum()))
    if conflict.any():
        log.warning("%d users have different train and test feature rows: the test rows are stored under "
                    "alias user ids used by the test impressions only", int(conflict.sum()))

    users = writer.users_writer()
    hist_users = []
    n_behaviours = 0
    n_rows = len(tr_uid) + len(te_uid)
    bar = tqdm(total=n_rows, desc="user histories", unit="user", disable=not progress)
    for split_files, keep, new_ids in ((train_files, keep_train, None), (test_files, keep_test, alias)):
        row = 0
        for batch in _iter(split_files, USER_COLUMNS, USER_BATCH):
            mask = keep[row : row + batch.num_rows]
            renamed = None if new_ids is None else new_ids[row : row + batch.num_rows][mask]
            row += batch.num_rows
            bar.update(batch.num_rows)
            if not mask.all():
                batch = batch.filter(pa.array(mask))
            if batch.num_rows == 0:
                continue
            item_lists, cat_lists, lengths = _history_lists(batch)
            user_col = batch.column(USER).to_numpy().astype(np.int64)
            if renamed is not None:
                user_col = np.where(renamed != 0, renamed, user_col)
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
            hist_users.append(user_col)
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

    # impressions: each split's user file first, the other file when the user has no row there -------
    te_row_id = np.where(alias != 0, alias, te_uid)
    joins = {
        "train": (_UserMap(tr_uid[tr_first], tr_uid[tr_first], tr_len[tr_first]),
                  _UserMap(te_uid[te_first], te_row_id[te_first], te_len[te_first])),
        "test": (_UserMap(te_uid[te_first], te_row_id[te_first], te_len[te_first]),
                 _UserMap(tr_uid[tr_first], tr_uid[tr_first], tr_len[tr_first])),
    }
    n_imp_without_history = n_imp_items_without_features = n_imp_other_split = 0
    n_clicks = 0
    for split, paths in sample_files.items():
        own, other = joins[split]
        for path in paths:
            for batch in _iter([path], [LABEL, USER, ITEM], ROW_BATCH):
                labels = decode_labels(batch.column(LABEL), str(path))
                uid = batch.column(USER).to_numpy().astype(np.int64)
                found, row_uid, hist_len = own.lookup(uid)
                found2, row_uid2, hist_len2 = other.lookup(uid)
                fallback = ~found & found2
                row_uid = np.where(fallback, row_uid2, np.where(found, row_uid, uid))
                hist_len = np.where(fallback, hist_len2, np.where(found, hist_len, 0)).astype(np.int32)
                iid = batch.column(ITEM).to_numpy().astype(np.int64)
                n_imp_items_without_features += int((~lookup_sorted(item_ids_sorted, iid)[1]).sum())
                n_imp_without_history += int((~found & ~found2).sum())
                n_imp_other_split += int(fallback.sum())
                n_clicks += int(labels.sum())
                writer.write_impressions(
                    pa.table(
                        {
                            "user_id": row_uid,
                            "item_id": iid,
                            "label": labels,
                            "split": pa.array([split] * len(uid), type=pa.string()),
                            "time": hist_len.astype(np.int64),
                            "hist_len": hist_len,
                        }
                    )
                )
    if n_imp_other_split:
        log.warning("%d impressions' users have no row in their split's user file: the other file's row is used",
                    n_imp_other_split)

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
        n_test_users_extending_train=int(extends.sum()),
        n_test_user_aliases=int(conflict.sum()),
        n_impressions_from_other_split_features=n_imp_other_split,
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
