"""The project's dataset format (``docs/dataset-format.md``, format 2): schemas, the streaming writer
and the :class:`Dataset` reader that everything downstream uses.

A dataset is one folder: ``meta.json``, ``items.parquet``, ``users.parquet`` (the tables a process may
hold whole: they are sized by the vocabularies), image shards ``images/part-NNNNN.parquet``, and the
parts that grow with the data as memory-mapped arrays of :mod:`muse.ondisk`: ``histories/`` (a CSR
of item and category positions), ``impressions/<split>/`` (columns) and ``embeddings/<source>/``
(shipped vectors in their storage dtype); optional ``search_sessions.parquet`` and ``truth/``.
``meta.json`` is written last, so a folder without it is an unfinished write.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muse.arrays import lookup_sorted
from muse.errors import DataError, NotFoundError
from muse.ondisk import CSR, Columns, ColumnsWriter, CSRWriter, open_array, write_array
from muse.settings import Settings

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
KINDS = ("taobao-mm", "simworld")
#: The splits of the impressions as the dataset stores them (one folder each under ``impressions/``).
IMPRESSION_SPLITS = ("train", "test")
META_FILE = "meta.json"
#: History batches of at least this many entries map their items and categories in two threads.
PARALLEL_LOOKUP_MIN = 1 << 16
COMPRESSION = "zstd"

ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.int64()),
        ("category", pa.int64()),
        ("feat_a", pa.int64()),
        ("feat_b", pa.int64()),
        ("title", pa.string()),
    ]
)
IMAGES_SCHEMA = pa.schema([("item_id", pa.int64()), ("image", pa.binary())])
USERS_SCHEMA = pa.schema([("user_id", pa.int64())] + [(f"f{i}", pa.int64()) for i in range(1, 6)])
#: What :meth:`Dataset.iter_histories` yields (and :meth:`DatasetWriter.write_histories` takes).
HISTORIES_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_ids", pa.list_(pa.int64())),
        ("categories", pa.list_(pa.int64())),
        ("times", pa.list_(pa.int64())),
    ]
)
#: What :meth:`Dataset.iter_impressions` yields (and :meth:`DatasetWriter.write_impressions` takes).
IMPRESSIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("label", pa.int8()),
        ("split", pa.string()),
        ("time", pa.int64()),
        ("hist_len", pa.int32()),
    ]
)
SEARCH_SESSIONS_SCHEMA = pa.schema(
    [
        ("session_id", pa.int64()),
        ("user_id", pa.int64()),
        ("time", pa.int64()),
        ("query", pa.string()),
        ("clicked", pa.list_(pa.int64())),
        ("purchased", pa.int64()),
    ]
)
#: The older, parquet form of shipped vectors (``embeddings/<source>.parquet``), still read.
EMBEDDINGS_SCHEMA = pa.schema([("item_id", pa.int64()), ("vector", pa.list_(pa.float32()))])

#: On-disk columns of one split's impressions (``impressions/<split>/``); ``time`` only with timestamps.
IMPRESSION_COLUMNS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "user_id": (np.int64, ()),
    "item_id": (np.int64, ()),
    "label": (np.int8, ()),
    "hist_len": (np.int32, ()),
}
#: Entry columns of the history CSR (``histories/``); ``times`` only with timestamps.
HISTORY_ENTRIES: dict[str, Any] = {"items": np.int32, "categories": np.int32}
EMBEDDING_META = "embedding.json"

META_REQUIRED = (
    "name",
    "kind",
    "format_version",
    "seed",
    "n_items",
    "n_users",
    "n_impressions",
    "n_behaviours",
    "has_images",
    "has_titles",
    "has_search_sessions",
    "item_feature_names",
    "user_feature_names",
)


def datasets_root(settings: Settings) -> Path:
    """The folder holding every dataset: ``$MUSE_DATA_DIR/datasets``."""
    return settings.path("datasets")


def check_name(name: str) -> str:
    """Validate a dataset name (used as a folder name and in the database)."""
    ok = name and len(name) <= 128 and all(c.isalnum() or c in "-_." for c in name) and name[0] != "."
    if not ok:
        raise DataError(f"dataset name {name!r} is invalid: use 1-128 letters, digits, '-', '_' or '.'")
    return name


def _conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """Select and cast ``table``'s columns to ``schema``; raise DataError naming missing columns."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise DataError(f"{what}: missing columns {missing}; have {table.column_names}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{what}: columns do not match {schema}: {e}") from e


_POOL: Any = None
#: Item ids per lookup task of :func:`_positions_side_by_side` (a few milliseconds of work).
LOOKUP_CHUNK = 1 << 17


def _positions_side_by_side(items: IdIndex, item_ids: np.ndarray, cats: IdIndex,
                            categories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``items.positions(item_ids)`` and ``cats.positions(categories)`` in two threads: the lookup
    thread takes chunks of the item ids while this one maps the categories, then both take the
    chunks left (an item lookup costs about three category lookups: the item table is larger, so a
    fixed split would leave one thread waiting). Ids new to the item index are numbered afterwards
    by this thread, in order, as :meth:`IdIndex.positions` numbers them."""
    item_ids = np.asarray(item_ids, np.int64)
    items.build()
    found = np.empty(len(item_ids), np.int64)
    starts = range(0, len(item_ids), LOOKUP_CHUNK)
    claim = itertools.count()  # next() on it is atomic: each chunk is taken by one thread

    def take() -> None:
        while (k := next(claim)) < len(starts):
            lo = starts[k]
            found[lo : lo + LOOKUP_CHUNK] = items.find(item_ids[lo : lo + LOOKUP_CHUNK])

    pending = _lookup_pool().submit(take)
    try:
        cat_positions = cats.positions(categories)
        take()
    finally:
        pending.result()
    miss = found < 0
    if miss.any():
        found[miss] = items.positions(item_ids[miss])
    elif items.n_base + items.n_extra > np.iinfo(np.int32).max:
        raise DataError(f"more than {np.iinfo(np.int32).max} distinct ids: int32 positions overflow")
    return found.astype(np.int32), cat_positions


def in_lookup_thread(fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` in the writer's lookup thread (a future): a hash lookup that releases the
    GIL beside one this thread does. ``fn`` must not change what this thread reads meanwhile."""
    return _lookup_pool().submit(fn, *args)


def _lookup_pool() -> Any:
    """One worker thread for the item lookups of :meth:`DatasetWriter.append_histories` (pandas' hash
    lookups release the GIL, so they run beside the category lookups of the calling thread)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(1, thread_name_prefix="muse-lookup")
    return _POOL


class IdIndex:
    """Raw int64 ids -> int32 positions: a fixed base (``base_ids``, position = first row of the id)
    followed by ids met later, numbered in order of first appearance (``extra_ids``).

    Lookups go through hash indexes (pandas), so mapping a billion history entries costs tens of
    nanoseconds each; the extras are kept in a few segments merged as they grow (lookups stay
    O(log segments) whatever the order ids arrive in). Memory: about 16 bytes per distinct id.
    """

    def __init__(self, base_ids: np.ndarray | None = None, extra_ids: np.ndarray | None = None) -> None:
        import pandas as pd

        self._pd = pd
        base = np.asarray(base_ids if base_ids is not None else np.zeros(0), np.int64)
        self.n_base = len(base)
        self._base_ids = base
        index = pd.Index(base)
        if index.is_unique:  # the usual case: the indexer's answer is the position itself
            self._base: tuple[Any, np.ndarray | None] = (index, None)
        else:  # repeated ids: the first row of each
            uniq, first = np.unique(base, return_index=True)
            self._base = (pd.Index(uniq), first.astype(np.int64))
        self._segments: list[tuple[Any, int]] = []  # (index of ids, position of its first id): a run
        self._extra: list[np.ndarray] = []
        self.n_extra = 0
        if extra_ids is not None and len(extra_ids):
            self._add(np.asarray(extra_ids, np.int64))

    def _add(self, new: np.ndarray) -> None:
        first = self.n_base + self.n_extra
        self._extra.append(new)
        self.n_extra += len(new)
        self._segments.append((self._pd.Index(new), first))
        # merged segments stay runs of consecutive positions: extras are numbered as they are added
        while len(self._segments) > 1 and len(self._segments[-2][0]) <= 2 * len(self._segments[-1][0]):
            (a, first_a), (b, _) = self._segments[-2], self._segments[-1]
            self._segments[-2:] = [(a.append(b), first_a)]

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids`` (int64), -1 where an id is not known. Read-only: threads may call it
        side by side (pandas' lookups release the GIL) once the index is built."""
        ids = np.asarray(ids, np.int64)
        index, base_pos = self._base
        out: np.ndarray | None = None
        if self.n_base:
            out = index.get_indexer(ids).astype(np.int64, copy=False)
            if base_pos is not None:
                out = np.where(out >= 0, base_pos[out] if len(base_pos) else 0, -1)
        for index, first in self._segments:
            if out is None:  # no base ids (the categories): the first segment answers for every id
                out = index.get_indexer(ids).astype(np.int64, copy=False)  # -1 or the position (first = 0)
                continue
            miss = np.flatnonzero(out < 0)
            if len(miss) == 0:
                break
            hit = index.get_indexer(ids[miss])
            out[miss[hit >= 0]] = first + hit[hit >= 0]
        return out if out is not None else np.full(len(ids), -1, np.int64)

    def build(self) -> IdIndex:
        """Build the hash tables now (pandas builds them on the first lookup), so that threads can
        then look up side by side; returns the index."""
        for index in [self._base[0], *(seg for seg, _ in self._segments)]:
            index.get_indexer(np.zeros(1, np.int64))
        return self

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids`` as int32; ids not known yet become extras (first appearance first)."""
        out = self.find(ids)
        miss = out < 0
        if miss.any():
            new = self._pd.unique(np.asarray(ids, np.int64)[miss])  # in order of appearance
            self._add(np.asarray(new, np.int64))
            out[miss] = self.find(np.asarray(ids, np.int64)[miss])
        if self.n_base + self.n_extra > np.iinfo(np.int32).max:
            raise DataError(f"more than {np.iinfo(np.int32).max} distinct ids: int32 positions overflow")
        return out.astype(np.int32)

    def extra_ids(self) -> np.ndarray:
        return np.concatenate(self._extra) if self._extra else np.zeros(0, np.int64)

    def id_table(self) -> np.ndarray:
        """Raw id of every position (the base ids, then the extras)."""
        return np.concatenate([self._base_ids, self.extra_ids()])


class ShardWriter:
    """Writes ``part-NNNNN.parquet`` files into one folder, a new shard every ``rows_per_shard`` rows
    (the item images). Each :meth:`write` call becomes (at least) one row group."""

    def __init__(
        self,
        folder: Path,
        schema: pa.Schema,
        rows_per_shard: int,
        what: str,
        rows_per_group: int | None = None,
    ) -> None:
        if rows_per_shard < 1 or (rows_per_group is not None and rows_per_group < 1):
            raise DataError(
                f"rows_per_shard={rows_per_shard} and rows_per_group={rows_per_group} must be >= 1"
            )
        self.rows_per_group = rows_per_group  # None: one row group per write
        self.folder = folder
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.what = what
        self.n_rows = 0
        self.n_shards = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        table = _conform(table, self.schema, self.what)
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                path = self.folder / f"part-{self.n_shards:05d}.parquet"
                self._writer = pq.ParquetWriter(path, self.schema, compression=COMPRESSION)
                self.n_shards += 1
                self._rows_in_shard = 0
            take = min(table.num_rows - offset, self.rows_per_shard - self._rows_in_shard)
            self._writer.write_table(table.slice(offset, take), row_group_size=self.rows_per_group)
            offset += take
            self._rows_in_shard += take
            self.n_rows += take
            if self._rows_in_shard >= self.rows_per_shard:
                self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        """Finish the current shard; an empty writer leaves one empty shard so readers see the schema."""
        if self.n_shards == 0:
            pq.write_table(
                self.schema.empty_table(), self.folder / "part-00000.parquet", compression=COMPRESSION
            )
            self.n_shards = 1
        self._close_shard()


class FileWriter:
    """Streams conformed tables into one parquet file (e.g. ``items.parquet`` of a huge catalogue)."""

    def __init__(self, path: Path, schema: pa.Schema, what: str) -> None:
        self.path, self.schema, self.what = path, schema, what
        self.n_rows = 0
        self._writer = pq.ParquetWriter(path, schema, compression=COMPRESSION)

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        self._writer.write_table(_conform(table, self.schema, self.what))
        self.n_rows += table.num_rows

    def close(self) -> None:
        self._writer.close()


class EmbeddingWriter:
    """Writes shipped vectors ``embeddings/<source>/`` (item_id, vector in its storage dtype) and
    ``embedding.json`` (dtype, dim, ``scale``: the vector = stored value / scale; None: 1)."""

    def __init__(self, folder: Path, dim: int, dtype: Any = np.float32, scale: float | None = None,
                 resume_rows: int | None = None) -> None:
        self.folder, self.dim, self.dtype, self.scale = Path(folder), int(dim), np.dtype(dtype), scale
        self.columns = ColumnsWriter(self.folder, {"item_id": (np.int64, ()), "vector": (self.dtype, (self.dim,))},
                                     resume_rows)

    @property
    def n_rows(self) -> int:
        return self.columns.n_rows

    def write(self, item_ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(item_ids):
            raise DataError(f"{self.folder.name}: {len(item_ids)} ids with vectors {vectors.shape}, "
                            f"expected [{len(item_ids)}, {self.dim}]")
        self.columns.append({"item_id": np.asarray(item_ids, np.int64), "vector": vectors.astype(self.dtype)})

    def close(self) -> None:
        self.columns.close()
        doc = {"dtype": self.dtype.name, "dim": self.dim, "scale": self.scale, "n_items": self.n_rows}
        (self.folder / EMBEDDING_META).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


class DatasetWriter:
    """Creates a dataset folder part by part. :meth:`finish` writes ``meta.json`` and returns the Dataset.

    Items come first (``write_items`` or ``items_writer``): history entries are stored as positions in
    the item table. Histories are appended as a CSR (``histories/``), impressions per split
    (``impressions/<split>/``), each with bounded memory. ``history_times=False`` stores no times (they
    are the positions, as in Taobao-MM). Any existing folder of the same name is replaced unless
    ``resume`` (a :meth:`state`) reopens an unfinished write at that point.
    """

    def __init__(
        self,
        path: Path,
        name: str,
        kind: str,
        *,
        history_times: bool = True,
        images_per_shard: int = 20_000,
        resume: dict[str, Any] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise DataError(f"dataset kind {kind!r} is unknown; valid: {', '.join(KINDS)}")
        self.path = Path(path)
        self.name = check_name(name)
        self.kind = kind
        self.history_times = history_times
        if resume is None:
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
        self._resume = resume or {}
        self.images = ShardWriter(self.path / "images", IMAGES_SCHEMA, images_per_shard, "images", 1_024)
        self._items: IdIndex | None = None
        self._categories: IdIndex | None = None
        self._histories: CSRWriter | None = None
        self._impressions: dict[str, ColumnsWriter] = {}
        self._embeddings: dict[str, EmbeddingWriter] = {}
        if resume is not None:
            self._reopen(resume)

    # items, users, images, sessions: small or streamed parquet -----------------------------------------
    def write_items(self, table: pa.Table) -> None:
        pq.write_table(
            _conform(table, ITEMS_SCHEMA, "items"), self.path / "items.parquet", compression=COMPRESSION
        )

    def items_writer(self) -> FileWriter:
        """Stream ``items.parquet`` batch by batch (caller closes it)."""
        return FileWriter(self.path / "items.parquet", ITEMS_SCHEMA, "items")

    def write_users(self, table: pa.Table) -> None:
        pq.write_table(
            _conform(table, USERS_SCHEMA, "users"), self.path / "users.parquet", compression=COMPRESSION
        )

    def users_writer(self) -> FileWriter:
        """Stream ``users.parquet`` batch by batch (caller closes it)."""
        return FileWriter(self.path / "users.parquet", USERS_SCHEMA, "users")

    def write_images(self, table: pa.Table) -> None:
        self.images.write(table)

    def write_search_sessions(self, table: pa.Table) -> None:
        table = _conform(table, SEARCH_SESSIONS_SCHEMA, "search_sessions")
        pq.write_table(table, self.path / "search_sessions.parquet", compression=COMPRESSION)

    def truth_path(self, name: str) -> Path:
        """Where the generator writes ground-truth table ``name`` (simworld only)."""
        (self.path / "truth").mkdir(exist_ok=True)
        return self.path / "truth" / f"{name}.parquet"

    # histories ----------------------------------------------------------------------------------------
    def item_index(self) -> IdIndex:
        """Raw item id -> position (the items' canonical order, then ids met only in histories)."""
        if self._items is None:
            path = self.path / "items.parquet"
            if not path.exists():
                raise DataError("write the items before the histories (history entries are item positions)")
            ids = pq.ParquetFile(path).read(columns=["item_id"]).column("item_id").to_numpy().astype(np.int64)
            extra = self._resume.get("extra_items")
            self._items = IdIndex(ids, None if extra is None else self._load_extra("extra_item_ids", extra))
        return self._items

    def category_index(self) -> IdIndex:
        """Raw category id -> position in ``histories/category_ids.npy`` (first appearance first)."""
        if self._categories is None:
            n = self._resume.get("categories")
            self._categories = IdIndex(None, None if n is None else self._load_extra("category_ids", n))
        return self._categories

    def _load_extra(self, name: str, n: int) -> np.ndarray:
        path = self.path / "histories" / f"{name}.part.npy"
        return open_raw(path, np.int64)[:n].copy() if n else np.zeros(0, np.int64)

    def history_writer(self) -> CSRWriter:
        if self._histories is None:
            entries = dict(HISTORY_ENTRIES, **({"times": np.int64} if self.history_times else {}))
            self._histories = CSRWriter(self.path / "histories", entries, self._resume.get("histories"))
        return self._histories

    def append_histories(self, user_ids: np.ndarray, lengths: np.ndarray, item_ids: np.ndarray,
                         categories: np.ndarray, times: np.ndarray | None = None) -> None:
        """Append users' histories given as flat arrays (``lengths`` entries per user, oldest first)."""
        items, cats = self.item_index(), self.category_index()
        if len(item_ids) >= PARALLEL_LOOKUP_MIN:  # hash lookups that release the GIL: in two threads
            item_positions, cat_positions = _positions_side_by_side(items, item_ids, cats, categories)
            entries = {"items": item_positions, "categories": cat_positions}
        else:
            entries = {"items": items.positions(item_ids), "categories": cats.positions(categories)}
        if self.history_times:
            if times is None:
                raise DataError("this dataset stores history times: give them")
            entries["times"] = np.asarray(times, np.int64)
        self.history_writer().append(user_ids, lengths, entries)

    def write_histories(self, table: pa.Table) -> None:
        """Append history rows (``user_id``, ``item_ids``, ``categories``, ``times`` lists)."""
        table = _conform(table, HISTORIES_SCHEMA, "histories").combine_chunks()
        if table.num_rows == 0:
            return
        items = table.column("item_ids").chunk(0)
        cats = table.column("categories").chunk(0)
        times = table.column("times").chunk(0)
        lengths = np.diff(items.offsets.to_numpy())
        for name, col in (("categories", cats), ("times", times)):
            if not np.array_equal(np.diff(col.offsets.to_numpy()), lengths):
                raise DataError(f"histories: {name} lists differ in length from item_ids lists")
        self.append_histories(table.column("user_id").to_numpy(), lengths, items.flatten().to_numpy(),
                              cats.flatten().to_numpy(), times.flatten().to_numpy())

    # impressions --------------------------------------------------------------------------------------
    def impressions_writer(self, split: str) -> ColumnsWriter:
        if split not in IMPRESSION_SPLITS:
            raise DataError(f"split {split!r} is unknown; valid: {', '.join(IMPRESSION_SPLITS)}")
        if split not in self._impressions:
            spec = dict(IMPRESSION_COLUMNS, **({"time": (np.int64, ())} if self.history_times else {}))
            self._impressions[split] = ColumnsWriter(self.path / "impressions" / split, spec,
                                                     self._resume.get("impressions", {}).get(split))
        return self._impressions[split]

    def append_impressions(self, split: str, columns: dict[str, np.ndarray]) -> None:
        """Append one split's impressions as arrays (``user_id``, ``item_id``, ``label``, ``hist_len``,
        and ``time`` when the dataset has timestamps)."""
        writer = self.impressions_writer(split)
        writer.append({k: v for k, v in columns.items() if k in writer.spec})

    def write_impressions(self, table: pa.Table) -> None:
        """Append labelled impressions (``IMPRESSIONS_SCHEMA``), routed to their split."""
        table = _conform(table, IMPRESSIONS_SCHEMA, "impressions")
        split = table.column("split").to_numpy(zero_copy_only=False)
        bad = ~np.isin(split, IMPRESSION_SPLITS)
        if bad.any():
            raise DataError(f"impressions: split {split[bad][0]!r} is unknown; valid: {', '.join(IMPRESSION_SPLITS)}")
        cols = {c: table.column(c).to_numpy() for c in ("user_id", "item_id", "label", "hist_len", "time")}
        for s in IMPRESSION_SPLITS:
            keep = split == s
            if keep.any():
                self.append_impressions(s, {c: v[keep] for c, v in cols.items()})

    # shipped vectors ----------------------------------------------------------------------------------
    def embeddings_writer(self, source: str, dim: int, dtype: Any = np.float32,
                          scale: float | None = None) -> EmbeddingWriter:
        """A writer for ``embeddings/<source>/`` (closed by :meth:`finish`)."""
        check_name(source)
        if source not in self._embeddings:
            self._embeddings[source] = EmbeddingWriter(
                self.path / "embeddings" / source, dim, dtype, scale,
                self._resume.get("embeddings", {}).get(source))
        return self._embeddings[source]

    # resuming -----------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything written so far, as counts: the point :class:`DatasetWriter` ``resume=`` reopens at.
        The extra ids are saved beside the histories so that a resumed write numbers ids the same way."""
        state: dict[str, Any] = {"impressions": {s: w.n_rows for s, w in self._impressions.items()},
                                 "embeddings": {s: w.n_rows for s, w in self._embeddings.items()}}
        for w in (*self._impressions.values(), *(e.columns for e in self._embeddings.values())):
            for a in w.writers.values():
                a.flush()
        if self._histories is not None:
            for a in (self._histories.row_ids, self._histories.offsets, *self._histories.entries.values()):
                a.flush()
            state["histories"] = list(self._histories.state())
        for key, name, index in (("extra_items", "extra_item_ids", self._items),
                                 ("categories", "category_ids", self._categories)):
            if index is not None:
                ids = index.extra_ids()
                write_raw(self.path / "histories" / f"{name}.part.npy", ids)
                state[key] = len(ids)
        return state

    def _reopen(self, state: dict[str, Any]) -> None:
        if "histories" in state:
            self.history_writer()
        for split in state.get("impressions", {}):
            self.impressions_writer(split)

    # finishing ----------------------------------------------------------------------------------------
    def finish(self, **meta: Any) -> Dataset:
        """Close every part and write ``meta.json`` (counts default to what was written)."""
        self.images.close()
        csr = self.history_writer()
        categories = self.category_index().extra_ids()
        extra_items = self.item_index().extra_ids() if (self.path / "items.parquet").exists() else np.zeros(0, np.int64)
        csr.close()
        write_array(self.path / "histories" / "category_ids.npy", categories)
        write_array(self.path / "histories" / "extra_item_ids.npy", extra_items)
        for name in ("category_ids", "extra_item_ids"):
            (self.path / "histories" / f"{name}.part.npy").unlink(missing_ok=True)
        for split in IMPRESSION_SPLITS:
            self.impressions_writer(split).close()
        for w in self._embeddings.values():
            w.close()
        n_impressions = sum(w.n_rows for w in self._impressions.values())
        doc: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "seed": None,
            "n_items": pq.ParquetFile(self.path / "items.parquet").metadata.num_rows,
            "n_users": csr.n_rows,
            "n_impressions": n_impressions,
            "n_behaviours": csr.n_entries,
            "has_images": self.images.n_rows > 0,
            "has_titles": False,
            "has_search_sessions": (self.path / "search_sessions.parquet").exists(),
            "has_history_times": self.history_times,
            "n_history_items_without_features": int(len(extra_items)),
            "item_feature_names": ["category", "feat_a", "feat_b"],
            "user_feature_names": [f"f{i}" for i in range(1, 6)],
        }
        doc.update(meta)
        (self.path / META_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        log.info("dataset %s written to %s", self.name, self.path)
        return Dataset(self.path)


def write_raw(path: Path, values: np.ndarray) -> None:
    """A small array as raw bytes (atomically replaced): the writer's resume side files."""
    tmp = path.with_suffix(".tmp")
    np.ascontiguousarray(values).tofile(tmp)
    tmp.replace(path)


def open_raw(path: Path, dtype: Any) -> np.ndarray:
    return np.fromfile(path, dtype=dtype) if path.exists() else np.zeros(0, dtype)


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


@dataclass(frozen=True)
class ShippedVectors:
    """Vectors shipped with a dataset (Taobao-MM's int8 SCL): ``item_ids [m]``, ``vectors [m, d]`` in
    their storage dtype (memory-mapped), and ``scale`` (the vector = stored value / scale; None: 1)."""

    item_ids: np.ndarray
    vectors: np.ndarray
    scale: float | None

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def float_rows(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Rows (all by default) as float32, de-quantised (not normalised)."""
        raw = self.vectors if rows is None else self.vectors[rows]
        out = np.asarray(raw).astype(np.float32)
        if self.scale is not None:
            out /= np.float32(self.scale)
        return out


class Dataset:
    """Read access to one dataset folder. What grows with the data is memory-mapped or streamed;
    nothing loads it whole unless a method says so (``histories_table``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._image_idx: tuple[list[Path], np.ndarray, np.ndarray, np.ndarray] | None = None
        self._csr: CSR | None = None
        self._item_table: np.ndarray | None = None
        self._impressions: dict[str, Columns] = {}
        meta_path = self.path / META_FILE
        if not meta_path.exists():
            raise NotFoundError(f"no dataset at {self.path} ({META_FILE} missing: not written or unfinished)")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path} is not valid JSON: {e}") from e
        missing = [k for k in META_REQUIRED if k not in self.meta]
        if missing:
            raise DataError(f"{meta_path}: missing keys {missing}")
        if self.meta["format_version"] == 1:
            raise DataError(
                f"{meta_path}: dataset {self.meta['name']!r} is in format 1 (parquet histories); this version "
                f"reads format {FORMAT_VERSION} (memory-mapped arrays): import or generate it again "
                "(muse data taobao-mm / muse data simworld)"
            )
        if self.meta["format_version"] != FORMAT_VERSION:
            raise DataError(
                f"{meta_path}: format_version {self.meta['format_version']!r} is not supported "
                f"(this code reads {FORMAT_VERSION})"
            )

    @classmethod
    def open(cls, settings: Settings, name: str) -> Dataset:
        """Open dataset ``name`` under ``$MUSE_DATA_DIR/datasets``.

        Raises:
            NotFoundError: no such dataset (the message lists the ones present).
        """
        root = datasets_root(settings)
        path = root / check_name(name)
        if not (path / META_FILE).exists():
            have = sorted(p.name for p in root.glob("*") if (p / META_FILE).exists()) if root.exists() else []
            raise NotFoundError(f"dataset {name!r} not found under {root}; available: {have or 'none'}")
        return cls(path)

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, kind={self.kind!r}, path={str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def n_users(self) -> int:
        """Number of user rows in ``histories/`` (the canonical user order)."""
        return int(self.meta["n_users"])

    @property
    def n_items(self) -> int:
        return int(self.meta["n_items"])

    # items and users ---------------------------------------------------------------------------
    def items(self, columns: list[str] | None = None) -> pa.Table:
        """All item rows (``item_id``, ``category``, ``feat_a``, ``feat_b``, ``title``; or only ``columns``)
        in canonical order."""
        return pq.ParquetFile(self.path / "items.parquet").read(columns=columns)

    def item_ids(self) -> np.ndarray:
        """Item ids (int64) in canonical order."""
        col = pq.ParquetFile(self.path / "items.parquet").read(columns=["item_id"]).column("item_id")
        return col.to_numpy().astype(np.int64, copy=False)

    def users(self) -> pa.Table:
        """All user profile rows (``user_id``, ``f1``..``f5``)."""
        return pq.ParquetFile(self.path / "users.parquet").read()

    # images ------------------------------------------------------------------------------------
    def iter_images(self, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
        """Stream ``(item_id, image)`` record batches over all image shards."""
        for shard in _shards(self.path / "images"):
            yield from pq.ParquetFile(shard).iter_batches(batch_size=batch_size)

    def _image_index(self) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray]:
        """(shards, sorted item ids, shard number, row group) of every image; built once per Dataset."""
        if self._image_idx is None:
            shards = _shards(self.path / "images")
            ids, shard_no, groups = [], [], []
            for s, shard in enumerate(shards):
                pf = pq.ParquetFile(shard)
                for rg in range(pf.metadata.num_row_groups):
                    col = pf.read_row_group(rg, columns=["item_id"]).column("item_id").to_numpy()
                    ids.append(col.astype(np.int64))
                    shard_no.append(np.full(len(col), s, dtype=np.int32))
                    groups.append(np.full(len(col), rg, dtype=np.int32))
            all_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
            order = np.argsort(all_ids, kind="stable")
            self._image_idx = (
                shards,
                all_ids[order],
                (np.concatenate(shard_no) if ids else np.zeros(0, np.int32))[order],
                (np.concatenate(groups) if ids else np.zeros(0, np.int32))[order],
            )
        return self._image_idx

    def load_images(self, item_ids: Sequence[int] | np.ndarray) -> dict[int, bytes]:
        """Image bytes of the given items; items without an image are absent from the result.
        Only the row groups holding the requested items are read.
        """
        wanted = np.unique(np.asarray(item_ids, dtype=np.int64))
        shards, ids, shard_no, groups = self._image_index()
        out: dict[int, bytes] = {}
        if len(wanted) == 0 or len(ids) == 0:
            return out
        pos, hit = lookup_sorted(ids, wanted)
        targets = sorted(set(zip(shard_no[pos[hit]].tolist(), groups[pos[hit]].tolist())))
        value_set = pa.array(wanted[hit])
        for s, rg in targets:
            table = pq.ParquetFile(shards[s]).read_row_group(rg)
            table = table.filter(pc.is_in(table.column("item_id"), value_set=value_set))
            for iid, img in zip(table.column("item_id").to_pylist(), table.column("image").to_pylist()):
                out[int(iid)] = img
        return out

    # histories ---------------------------------------------------------------------------------
    def histories(self) -> CSR:
        """Every user's history as a memory-mapped CSR (``row_ids``, ``offsets``, ``items`` and
        ``categories`` positions, ``times`` when the data has timestamps), in canonical user order."""
        if self._csr is None:
            self._csr = CSR(self.path / "histories")
        return self._csr

    def history_item_ids(self) -> np.ndarray:
        """Raw item id of each item position: the items' canonical order, then the ids met only in
        histories (``histories/extra_item_ids.npy``). Sized by the item vocabulary."""
        if self._item_table is None:
            extra = open_array(self.path / "histories" / "extra_item_ids.npy", mmap=False)
            self._item_table = np.concatenate([self.item_ids(), extra])
        return self._item_table

    def category_ids(self) -> np.ndarray:
        """Raw category id of each category position of the histories."""
        return open_array(self.path / "histories" / "category_ids.npy", mmap=False)

    def has_history_times(self) -> bool:
        return bool(self.meta.get("has_history_times", True))

    def iter_histories(
        self,
        batch_size: int = 1024,
        start: int = 0,
        stop: int | None = None,
        columns: Sequence[str] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Stream history rows ``start <= row < stop`` (canonical user order) as record batches of at
        most ``batch_size`` rows (``HISTORIES_SCHEMA``, or the named ``columns``), read from the CSR."""
        stop = self.n_users if stop is None else min(stop, self.n_users)
        if start < 0 or batch_size < 1:
            raise DataError(
                f"iter_histories: start={start} and batch_size={batch_size} must be >= 0 and >= 1"
            )
        names = list(columns) if columns else HISTORIES_SCHEMA.names
        unknown = [c for c in names if c not in HISTORIES_SCHEMA.names]
        if unknown:
            raise DataError(f"iter_histories: unknown columns {unknown}; valid: {HISTORIES_SCHEMA.names}")
        csr = self.histories()
        items = self.history_item_ids() if "item_ids" in names else None
        cats = self.category_ids() if "categories" in names else None
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            off = np.asarray(csr.offsets[lo : hi + 1])
            first, last = int(off[0]), int(off[-1])
            rel = pa.array((off - first).astype(np.int32))
            arrays = {}
            for name in names:
                if name == "user_id":
                    arrays[name] = pa.array(np.asarray(csr.row_ids[lo:hi]))
                    continue
                if name == "item_ids":
                    values = items[np.asarray(csr.entries("items")[first:last])]
                elif name == "categories":
                    values = cats[np.asarray(csr.entries("categories")[first:last])]
                elif self.has_history_times():
                    values = np.array(csr.entries("times")[first:last])
                else:  # the positions 0..n-1 of each row
                    values = np.arange(last - first, dtype=np.int64) - np.repeat(off[:-1] - first, np.diff(off))
                arrays[name] = pa.ListArray.from_arrays(rel, pa.array(values, pa.int64()))
            yield pa.RecordBatch.from_pydict(arrays, schema=pa.schema([HISTORIES_SCHEMA.field(n) for n in names]))

    def histories_table(self) -> pa.Table:
        """All histories at once (for small datasets only)."""
        batches = list(self.iter_histories(batch_size=65_536))
        return pa.Table.from_batches(batches, schema=HISTORIES_SCHEMA)

    # impressions -------------------------------------------------------------------------------
    def impressions(self, split: str) -> Columns:
        """One split's impressions as memory-mapped columns (``user_id``, ``item_id``, ``label``,
        ``hist_len``, ``time`` with timestamps)."""
        if split not in IMPRESSION_SPLITS:
            raise DataError(f"split {split!r} is unknown; valid: {', '.join(IMPRESSION_SPLITS)} (or None for all)")
        if split not in self._impressions:
            self._impressions[split] = Columns(self.path / "impressions" / split)
        return self._impressions[split]

    def n_impressions(self, split: str | None = None) -> int:
        splits = IMPRESSION_SPLITS if split is None else (split,)
        return sum(len(self.impressions(s)) for s in splits)

    def iter_impressions(
        self, split: str | None = None, batch_size: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """Stream labelled impressions (``IMPRESSIONS_SCHEMA``) of one split, or of both (train first)."""
        if split is not None and split not in IMPRESSION_SPLITS:
            raise DataError(f"split {split!r} is unknown; valid: {', '.join(IMPRESSION_SPLITS)} (or None for all)")
        for s in IMPRESSION_SPLITS if split is None else (split,):
            cols = self.impressions(s)
            for part in cols.iter_slices(batch_size):
                n = len(part["label"])
                time = part["time"] if "time" in part else part["hist_len"].astype(np.int64)
                yield pa.RecordBatch.from_pydict(
                    {"user_id": part["user_id"], "item_id": part["item_id"], "label": part["label"],
                     "split": pa.array([s] * n, pa.string()), "time": time, "hist_len": part["hist_len"]},
                    schema=IMPRESSIONS_SCHEMA)

    # optional parts ----------------------------------------------------------------------------
    def search_sessions(self) -> pa.Table | None:
        """The search sessions table, or None when the source has none."""
        path = self.path / "search_sessions.parquet"
        return pq.read_table(path) if path.exists() else None

    def embeddings_path(self, source: str) -> Path | None:
        """Where vectors shipped with the data for ``source`` are (``embeddings/<source>/``, or an
        older ``embeddings/<source>.parquet``), or None."""
        folder = self.path / "embeddings" / source
        if (folder / EMBEDDING_META).exists():
            return folder
        path = self.path / "embeddings" / f"{source}.parquet"
        return path if path.exists() else None

    def embeddings(self, source: str) -> ShippedVectors | None:
        """The vectors shipped for ``source`` (memory-mapped, in their storage dtype), or None."""
        path = self.embeddings_path(source)
        if path is None:
            return None
        if path.is_dir():
            doc = json.loads((path / EMBEDDING_META).read_text())
            cols = Columns(path)
            return ShippedVectors(cols.column("item_id"), cols.column("vector"), doc.get("scale"))
        table = pq.read_table(path)  # the parquet form: float32 lists (small, shipped by tests and benches)
        ids = table.column("item_id").to_numpy().astype(np.int64)
        flat = table.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False).astype(np.float32)
        if len(ids) and len(flat) % len(ids):
            raise DataError(f"{path}: vectors have unequal lengths")
        return ShippedVectors(ids, flat.reshape(len(ids), -1) if len(ids) else np.zeros((0, 0), np.float32), None)

    def truth_path(self, name: str) -> Path | None:
        """Path of the generator's ground-truth table ``truth/<name>.parquet`` (simworld), or None."""
        path = self.path / "truth" / f"{name}.parquet"
        return path if path.exists() else None
