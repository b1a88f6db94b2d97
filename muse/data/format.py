"""The project's dataset format (``docs/dataset-format.md``): schemas, the streaming writer and the
:class:`Dataset` reader that everything downstream uses.

A dataset is one folder: ``meta.json``, ``items.parquet``, ``users.parquet``, sharded folders
``images/``, ``histories/``, ``impressions/`` (``part-NNNNN.parquet``), and optional
``search_sessions.parquet``, ``embeddings/<source>.parquet`` and ``truth/``. ``meta.json`` is
written last, so a folder without it is an unfinished write.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muse.arrays import lookup_sorted
from muse.errors import DataError, NotFoundError
from muse.settings import Settings

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("taobao-mm", "simworld")
#: The splits of the impressions as the dataset stores them (column ``split``).
IMPRESSION_SPLITS = ("train", "test")
META_FILE = "meta.json"
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
HISTORIES_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_ids", pa.list_(pa.int64())),
        ("categories", pa.list_(pa.int64())),
        ("times", pa.list_(pa.int64())),
    ]
)
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
EMBEDDINGS_SCHEMA = pa.schema([("item_id", pa.int64()), ("vector", pa.list_(pa.float32()))])

#: Sharded parts of a dataset and their schemas.
SHARDED = {"images": IMAGES_SCHEMA, "histories": HISTORIES_SCHEMA, "impressions": IMPRESSIONS_SCHEMA}

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


class ShardWriter:
    """Writes ``part-NNNNN.parquet`` files into one folder, a new shard every ``rows_per_shard`` rows.

    Each :meth:`write` call becomes (at least) one row group, so readers can stream by row group.
    """

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


class DatasetWriter:
    """Creates a dataset folder part by part. :meth:`finish` writes ``meta.json`` and returns the Dataset.

    Any existing folder of the same name is replaced (the caller decides whether to overwrite).
    """

    def __init__(
        self,
        path: Path,
        name: str,
        kind: str,
        *,
        rows_per_shard: dict[str, int] | None = None,
        rows_per_group: dict[str, int] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise DataError(f"dataset kind {kind!r} is unknown; valid: {', '.join(KINDS)}")
        self.path = Path(path)
        self.name = check_name(name)
        self.kind = kind
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        sizes = {"images": 20_000, "histories": 10_000, "impressions": 1_000_000}
        sizes.update(rows_per_shard or {})
        # small row groups keep row-range reads (backfill chunks over users) cheap
        groups = {"images": 1_024, "histories": 256, "impressions": 262_144}
        groups.update(rows_per_group or {})
        self.shards = {
            part: ShardWriter(self.path / part, schema, sizes[part], part, groups[part])
            for part, schema in SHARDED.items()
        }

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
        self.shards["images"].write(table)

    def write_histories(self, table: pa.Table) -> None:
        self.shards["histories"].write(table)

    def write_impressions(self, table: pa.Table) -> None:
        self.shards["impressions"].write(table)

    def write_search_sessions(self, table: pa.Table) -> None:
        table = _conform(table, SEARCH_SESSIONS_SCHEMA, "search_sessions")
        pq.write_table(table, self.path / "search_sessions.parquet", compression=COMPRESSION)

    def embeddings_writer(self, source: str) -> FileWriter:
        """A writer for ``embeddings/<source>.parquet`` (caller writes batches and closes it)."""
        check_name(source)
        (self.path / "embeddings").mkdir(exist_ok=True)
        return FileWriter(
            self.path / "embeddings" / f"{source}.parquet", EMBEDDINGS_SCHEMA, f"embeddings/{source}"
        )

    def truth_path(self, name: str) -> Path:
        """Where the generator writes ground-truth table ``name`` (simworld only)."""
        (self.path / "truth").mkdir(exist_ok=True)
        return self.path / "truth" / f"{name}.parquet"

    def finish(self, **meta: Any) -> Dataset:
        """Close the shards and write ``meta.json`` (counts default to what was written)."""
        for writer in self.shards.values():
            writer.close()
        doc: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "seed": None,
            "n_items": pq.ParquetFile(self.path / "items.parquet").metadata.num_rows,
            "n_users": self.shards["histories"].n_rows,
            "n_impressions": self.shards["impressions"].n_rows,
            "n_behaviours": 0,
            "has_images": self.shards["images"].n_rows > 0,
            "has_titles": False,
            "has_search_sessions": (self.path / "search_sessions.parquet").exists(),
            "item_feature_names": ["category", "feat_a", "feat_b"],
            "user_feature_names": [f"f{i}" for i in range(1, 6)],
        }
        doc.update(meta)
        (self.path / META_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        log.info("dataset %s written to %s", self.name, self.path)
        return Dataset(self.path)


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


class Dataset:
    """Read access to one dataset folder. Everything streams; nothing loads a whole sharded part
    unless a method says so (``histories_table``).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._image_idx: tuple[list[Path], np.ndarray, np.ndarray, np.ndarray] | None = None
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
    def items(self) -> pa.Table:
        """All item rows (``item_id``, ``category``, ``feat_a``, ``feat_b``, ``title``) in canonical order."""
        return pq.read_table(self.path / "items.parquet")

    def item_ids(self) -> np.ndarray:
        """Item ids (int64) in canonical order."""
        col = pq.read_table(self.path / "items.parquet", columns=["item_id"]).column("item_id")
        return col.to_numpy().astype(np.int64, copy=False)

    def users(self) -> pa.Table:
        """All user profile rows (``user_id``, ``f1``..``f5``)."""
        return pq.read_table(self.path / "users.parquet")

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
    def iter_histories(
        self,
        batch_size: int = 1024,
        start: int = 0,
        stop: int | None = None,
        columns: Sequence[str] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Stream history rows ``start <= row < stop`` (canonical user order) in batches of at most
        ``batch_size`` rows. Row groups wholly outside the range are not read.
        """
        stop = self.n_users if stop is None else min(stop, self.n_users)
        if start < 0 or batch_size < 1:
            raise DataError(
                f"iter_histories: start={start} and batch_size={batch_size} must be >= 0 and >= 1"
            )
        offset = 0  # global row index of the current row group's first row
        for shard in _shards(self.path / "histories"):
            if offset >= stop:
                break
            pf = pq.ParquetFile(shard)
            for rg in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                lo, hi = max(start, offset), min(stop, offset + n)
                if lo < hi:
                    table = pf.read_row_group(rg, columns=list(columns) if columns else None)
                    table = table.slice(lo - offset, hi - lo)
                    yield from table.to_batches(max_chunksize=batch_size)
                offset += n
                if offset >= stop:
                    break

    def histories_table(self) -> pa.Table:
        """All histories at once (for small datasets only)."""
        return pa.concat_tables(pq.read_table(s) for s in _shards(self.path / "histories"))

    # impressions -------------------------------------------------------------------------------
    def iter_impressions(
        self, split: str | None = None, batch_size: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """Stream labelled impressions, optionally of one split (``train``/``test``)."""
        if split is not None and split not in IMPRESSION_SPLITS:
            raise DataError(f"split {split!r} is unknown; valid: {', '.join(IMPRESSION_SPLITS)} (or None for all)")
        for shard in _shards(self.path / "impressions"):
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_size):
                if split is not None:
                    batch = batch.filter(pc.equal(batch.column("split"), split))
                    if batch.num_rows == 0:
                        continue
                yield batch

    # optional parts ----------------------------------------------------------------------------
    def search_sessions(self) -> pa.Table | None:
        """The search sessions table, or None when the source has none."""
        path = self.path / "search_sessions.parquet"
        return pq.read_table(path) if path.exists() else None

    def embeddings_path(self, source: str) -> Path | None:
        """Path of precomputed vectors ``embeddings/<source>.parquet`` shipped with the data, or None."""
        path = self.path / "embeddings" / f"{source}.parquet"
        return path if path.exists() else None

    def truth_path(self, name: str) -> Path | None:
        """Path of the generator's ground-truth table ``truth/<name>.parquet`` (simworld), or None."""
        path = self.path / "truth" / f"{name}.parquet"
        return path if path.exists() else None
