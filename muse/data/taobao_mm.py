"""Reader of the raw Taobao-MM parquet files into the project's dataset format (format 2).

Raw schema (see ``docs/method.md``): ``train_samples``/``test_samples`` (``label_0`` one-hot list<int8>,
``129_1`` user, ``205`` target item), ``train_user_features``/``test_user_features`` (``129_1``,
``130_1``..``130_5``, ``150_2_180`` item history, ``151_2_180`` category history, oldest first),
``item_features`` (``205``, ``206`` category, ``213``, ``214``) and ``scl_embedding_int8_p90``
(``205``, ``205_c`` list<int8>[128], quantised as trunc(x * 127)).

The import reads every input once, in order, in units of rows (``UNIT_ROWS``), and appends to the
dataset's memory-mapped arrays (:mod:`muse.ondisk`); after each unit it commits a journal (the row
counts of every output file and its counters), so an import that is killed resumes at the last
committed unit and writes the same bytes as one that was never interrupted.

What it holds in RAM, by design (sized by the vocabularies, not by samples or behaviours): the item
id index (about 16 bytes per item), the category index, and per user-feature row its user id, history
length and first-occurrence flag (about 25 bytes per row). History lists are mapped to int32 item and
category positions through hash indexes, a batch of users at a time.

Users: train samples join the train user file and test samples the test user file (as the release
does). The test file is written first. A user whose train row is a prefix of (or equal to) their test
row, with the same features, is stored once: train impressions see the prefix (``hist_len`` = the train
length); this is the normal case and is not warned about. A train row that differs otherwise is stored
as its own row, and the test row gets an alias user id that only the test impressions use. A user
repeated within one file keeps its first row (a warning counts them). Sample users without a feature
row get a row with zero features and an empty history (``hist_len`` 0). The data has no timestamps:
history times are the positions and an impression's ``time`` is its ``hist_len``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muse.ahead import ahead
from muse.arrays import lookup_sorted
from muse.data.format import Dataset, DatasetWriter, IdIndex, check_name, datasets_root, in_lookup_thread
from muse.errors import DataError, NotFoundError
from muse.ondisk import Columns, ColumnsWriter
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
#: Rows per committed unit of each kind of table: an interrupted import resumes at a unit boundary.
UNIT_ROWS = {"users": 16_384, "rows": 2_097_152}
USER_COLUMNS = [USER, *USER_FEATURES, HIST_ITEMS, HIST_CATS]
JOURNAL = "import-journal.json"
#: the order of the import's phases (each a list of units over its files)
PHASES = ("test_user_features", "train_user_features", "train_samples", "test_samples", "scl_embedding_int8_p90")
USER_COLUMNS_SPEC = {"user_id": (np.int64, ()), "features": (np.int64, (len(USER_FEATURES),))}


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
    if pairs.dtype.kind in "iu":  # [0, 1] or [1, 0]: both bits in {0, 1}, exactly one set
        a, b = pairs[:, 0], pairs[:, 1]
        valid = ((a | b) == 1) & ((a & b) == 0)
    else:
        valid = ((pairs == 0) | (pairs == 1)).all(axis=1) & (pairs.sum(axis=1) == 1)
    if not valid.all():
        bad = int(np.flatnonzero(~valid)[0])
        raise DataError(f"{where}: label_0 row {bad} is {pairs[bad].tolist()}, expected a one-hot pair")
    return pairs[:, 1].astype(np.int8)


# -- reading in units -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Unit:
    """Rows ``lo:hi`` of file ``file`` of a phase (the unit numbered ``index`` in the whole import)."""

    index: int
    phase: str
    file: int
    lo: int
    hi: int


def _plan(files: dict[str, list[Path]]) -> list[_Unit]:
    units: list[_Unit] = []
    for phase in PHASES:
        step = UNIT_ROWS["users" if phase.endswith("user_features") else "rows"]
        for f, path in enumerate(files[phase]):
            n = pq.ParquetFile(path).metadata.num_rows
            for lo in range(0, n, step):
                units.append(_Unit(len(units), phase, f, lo, min(lo + step, n)))
    return units


def _read_units(files: dict[str, list[Path]], units: list[_Unit], columns: dict[str, list[str]],
                batch_rows: dict[str, int]) -> Iterator[tuple[_Unit, pa.RecordBatch | None, int, bool]]:
    """``(unit, batch, row of the batch's first row in its file, last batch of the unit?)`` for every
    unit, batch by batch (a unit with no rows yields one ``None`` batch); files are read once front to
    back (the first file of a resumed import from the row group holding its first unit)."""
    current: tuple[str, int] | None = None
    stream: Iterator[pa.RecordBatch] | None = None
    pending: pa.RecordBatch | None = None
    at = 0  # row index of the first row of `pending` (or of the next batch) in the file
    for unit in units:
        key = (unit.phase, unit.file)
        if key != current:
            current = key
            pf = pq.ParquetFile(files[unit.phase][unit.file], buffer_size=1 << 22, pre_buffer=False)
            first_group, start = 0, 0
            for g in range(pf.metadata.num_row_groups):  # skip whole row groups before the unit
                n = pf.metadata.row_group(g).num_rows
                if start + n > unit.lo:
                    break
                start += n
                first_group = g + 1
            groups = list(range(first_group, pf.metadata.num_row_groups))
            stream = pf.iter_batches(batch_size=batch_rows[unit.phase], columns=columns[unit.phase],
                                     row_groups=groups) if groups else iter(())
            pending, at = None, start
        out: tuple[pa.RecordBatch, int] | None = None
        while at < unit.hi:
            if pending is None:
                pending = next(stream)
            lo, hi = max(at, unit.lo), min(at + pending.num_rows, unit.hi)
            piece = pending.slice(lo - at, hi - lo) if lo < hi else None
            if at + pending.num_rows <= unit.hi:
                at += pending.num_rows
                pending = None
            else:
                pending = pending.slice(unit.hi - at)
                at = unit.hi
            if piece is not None:
                if out is not None:
                    yield unit, out[0], out[1], False
                out = (piece, lo)
        yield unit, (out[0] if out else None), (out[1] if out else unit.lo), True


# -- the per-user state ---------------------------------------------------------------------------------
def _user_ids(files: list[Path]) -> np.ndarray:
    parts = [b.column(USER).to_numpy().astype(np.int64)
             for path in files for b in pq.ParquetFile(path).iter_batches(batch_size=ROW_BATCH, columns=[USER])]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _first_rows(ids: np.ndarray) -> np.ndarray:
    """Mask of the first occurrence of each id."""
    _, first = np.unique(ids, return_index=True)
    keep = np.zeros(len(ids), dtype=bool)
    keep[first] = True
    return keep


def _fresh_ids(taken: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` distinct int64 ids (never 0) absent from ``taken`` (sorted)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(0, dtype=np.int64)
    while len(out) < n:
        cand = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=2 * n, dtype=np.int64)
        cand = cand[(cand != 0) & ~lookup_sorted(taken, cand)[1]]
        out = np.unique(np.concatenate([out, cand]))
    return rng.permutation(out)[:n]


def prefix_equal(lengths: np.ndarray, row_start: np.ndarray, items: np.ndarray, cats: np.ndarray, ok: np.ndarray,
                 starts: np.ndarray, stored_items: np.ndarray, stored_cats: np.ndarray, item_table: np.ndarray,
                 cat_table: np.ndarray) -> np.ndarray:
    """Whether each batch row ``ok[j]`` (flat ``items``/``cats`` from ``row_start``, ``lengths`` entries)
    equals, as raw ids, the first ``lengths[ok[j]]`` stored entries from ``starts[j]`` (positions
    through ``item_table``/``cat_table``); bool ``[len(ok)]``.

    The usual case, rows in the order of the stored rows (the same order in both user files), reads
    one contiguous stretch of the stored entries and masks out the tails; otherwise every entry is
    gathered by index (the reference).
    """
    n = lengths[ok]
    good = np.ones(len(ok), bool)
    nz = np.flatnonzero(n > 0)  # an empty list is everyone's prefix
    if len(nz) == 0:
        return good
    s, m = starts[nz], n[nz]
    if len(nz) == 1 or bool(np.all(s[1:] >= s[:-1] + m[:-1])):
        lo, hi = int(s[0]), int(s[-1] + m[-1])
        # the stretch is runs of m[j] compared entries, each followed by the gap to the next run
        runs = np.empty(2 * len(s), np.int64)
        runs[0::2] = m
        runs[1:-1:2] = s[1:] - (s[:-1] + m[:-1])
        runs[-1] = 0
        inside = np.repeat(np.tile(np.array([True, False]), len(s)), runs)  # [hi - lo]
        stored_i, stored_c = np.asarray(stored_items[lo:hi])[inside], np.asarray(stored_cats[lo:hi])[inside]
        take = np.zeros(len(lengths), bool)
        take[ok[nz]] = True
        src: np.ndarray = np.repeat(take, lengths)  # a mask of the batch's entries, in the same order
    else:
        rel = np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)
        src = np.repeat(row_start[ok[nz]], m) + rel
        dst = np.repeat(s, m) + rel
        stored_i, stored_c = stored_items[dst], stored_cats[dst]
    # entries come row after row (the rows of nz, m entries each) on both sides
    equal = (item_table[stored_i] == items[src]) & (cat_table[stored_c] == cats[src])
    good[nz] = np.logical_and.reduceat(equal, np.cumsum(m) - m)
    return good


class _Rows:
    """user id -> (row, history length) for a set of rows (ids unique), looked up in batches through a
    hash index (about 16 bytes per user)."""

    def __init__(self, user_ids: np.ndarray, rows: np.ndarray, lengths: np.ndarray) -> None:
        self.ids, self.rows, self.lengths = user_ids, rows, lengths
        self.index = IdIndex(user_ids)

    def lookup(self, uid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = self.index.find(uid)
        found = pos >= 0
        if len(self.ids) == 0:
            return found, np.zeros(len(uid), np.int64), np.zeros(len(uid), np.int64)
        pos = np.where(found, pos, 0)
        return found, self.rows[pos], self.lengths[pos]


# -- the import -----------------------------------------------------------------------------------------
def _fingerprint(files: dict[str, list[Path]]) -> list[list[Any]]:
    out = []
    for stem in sorted(files):
        for p in files[stem]:
            st = p.stat()
            out.append([stem, str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _validate(raw_dir: Path) -> dict[str, list[Path]]:
    if not raw_dir.is_dir():
        raise NotFoundError(f"Taobao-MM folder {str(raw_dir)!r} does not exist")
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
    return files


class _Import:
    """One run of the import (fresh or resumed); see the module docstring."""

    def __init__(self, settings: Settings, raw_dir: Path, name: str, files: dict[str, list[Path]],
                 progress: bool) -> None:
        self.raw_dir, self.name, self.files, self.progress = raw_dir, name, files, progress
        self.path = datasets_root(settings) / name
        self.units = _plan(files)
        self.fingerprint = _fingerprint(files)
        self.journal: dict[str, Any] | None = self._read_journal()
        self.counters: dict[str, int] = {
            "n_duplicate_user_rows": 0, "n_test_users_extending_train": 0, "n_test_users_same_as_train": 0,
            "n_test_user_aliases": 0, "n_users_without_features": 0, "n_impressions_without_history": 0,
            "n_impressions_from_other_split_features": 0, "n_impression_items_without_features": 0,
            "n_clicks": 0, "n_vectors": 0}
        self.dim: int | None = None

    # journal ----------------------------------------------------------------------------------------
    def _read_journal(self) -> dict[str, Any] | None:
        path = self.path / JOURNAL
        if not path.exists() or (self.path / "meta.json").exists():
            return None
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if doc.get("fingerprint") != self.fingerprint or doc.get("unit_rows") != UNIT_ROWS:
            log.warning("%s: an unfinished import of other files (or other unit sizes) is there; starting over",
                        self.path)
            return None
        return doc

    def _commit(self, next_unit: int) -> None:
        state = self.writer.state()
        state["users"] = self.users.n_rows
        for w in self.users.writers.values():
            w.flush()
        for w in self.side.values():
            w.flush()
        doc = {"fingerprint": self.fingerprint, "unit_rows": UNIT_ROWS, "next_unit": next_unit, "writer": state,
               "side": {k: w.n_rows for k, w in self.side.items()}, "counters": self.counters, "dim": self.dim}
        tmp = self.path / (JOURNAL + ".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path / JOURNAL)

    # set-up -----------------------------------------------------------------------------------------
    def _open(self) -> int:
        """Open the writers (fresh, or at the journal's point); returns the first unit to run."""
        j = self.journal
        resume = None if j is None else j["writer"]
        if j is None:
            self.writer = DatasetWriter(self.path, self.name, "taobao-mm", history_times=False)
            self._write_items()
        else:
            self.writer = DatasetWriter(self.path, self.name, "taobao-mm", history_times=False, resume=resume)
            self.counters.update(j["counters"])
            self.dim = j.get("dim")
        side_rows = None if j is None else j["side"]
        self.users = ColumnsWriter(self.path / "users-rows", USER_COLUMNS_SPEC,
                                   None if j is None else resume["users"])
        # append-only side records: (test row, train length) of merged users; (test row, alias id)
        self.side = {
            "merged": ColumnsWriter(self.path / "import-merged", {"row": (np.int64, ()), "train_len": (np.int64, ())},
                                    None if side_rows is None else side_rows["merged"]),
            "aliases": ColumnsWriter(self.path / "import-aliases", {"row": (np.int64, ()), "alias": (np.int64, ())},
                                     None if side_rows is None else side_rows["aliases"]),
        }
        self.writer.history_writer()
        self.writer.item_index()
        return 0 if j is None else int(j["next_unit"])

    def _write_items(self) -> None:
        items = self.writer.items_writer()
        cols = [ITEM, *ITEM_FEATURES.values()]
        for path in self.files["item_features"]:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=ROW_BATCH, columns=cols):
                items.write(pa.table({"item_id": batch.column(ITEM),
                                      **{ours: batch.column(raw) for ours, raw in ITEM_FEATURES.items()},
                                      "title": pa.nulls(batch.num_rows, pa.string())}))
        items.close()

    def _user_state(self) -> None:
        """Which user-feature rows are kept (first occurrence per file), and the test users' rows."""
        self.test_ids = _user_ids(self.files["test_user_features"])
        self.train_ids = _user_ids(self.files["train_user_features"])
        self.keep = {"test_user_features": _first_rows(self.test_ids),
                     "train_user_features": _first_rows(self.train_ids)}
        kept_test = self.test_ids[self.keep["test_user_features"]]
        # test rows are written first, in file order: the i-th kept test row is CSR row i
        self.test_rows = _Rows(kept_test, np.arange(len(kept_test), dtype=np.int64),
                               np.zeros(len(kept_test), np.int64))
        self.taken = np.union1d(self.test_ids, self.train_ids)
        self.n_dup_test = int((~self.keep["test_user_features"]).sum())
        self.n_dup_train = int((~self.keep["train_user_features"]).sum())

    # phases -----------------------------------------------------------------------------------------
    def _user_unit(self, unit: _Unit, batch: pa.RecordBatch, lo: int) -> None:
        offset = self._file_offsets[unit.phase][unit.file] + lo
        mask = self.keep[unit.phase][offset : offset + batch.num_rows]
        if not mask.all():
            batch = batch.filter(pa.array(mask))
        if batch.num_rows:
            (self._test_batch if unit.phase == "test_user_features" else self._train_batch)(batch, unit)

    def _lists(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat item ids, flat category ids and per-row lengths of a user batch (nulls: empty)."""
        items, cats = batch.column(HIST_ITEMS), batch.column(HIST_CATS)
        lengths = pc.list_value_length(items).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        cat_lengths = pc.list_value_length(cats).fill_null(0).to_numpy(zero_copy_only=False)
        if np.any(lengths != cat_lengths):
            bad = int(np.flatnonzero(lengths != cat_lengths)[0])
            raise DataError(f"user {batch.column(USER)[bad].as_py()}: {HIST_ITEMS} has {lengths[bad]} entries "
                            f"but {HIST_CATS} has {cat_lengths[bad]}")
        return (pc.list_flatten(items).to_numpy().astype(np.int64, copy=False),
                pc.list_flatten(cats).to_numpy().astype(np.int64, copy=False), lengths)

    @staticmethod
    def _features(batch: pa.RecordBatch) -> np.ndarray:
        return np.stack([batch.column(c).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
                         for c in USER_FEATURES], axis=1)

    def _append_rows(self, user_ids: np.ndarray, features: np.ndarray, lengths: np.ndarray,
                     items: np.ndarray, cats: np.ndarray) -> None:
        self.writer.append_histories(user_ids, lengths, items, cats)
        self.users.append({"user_id": user_ids, "features": features})

    def _test_batch(self, batch: pa.RecordBatch, unit: _Unit) -> None:
        items, cats, lengths = self._lists(batch)
        self._append_rows(batch.column(USER).to_numpy().astype(np.int64), self._features(batch), lengths, items, cats)

    def _id_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Raw item and category id of every position so far (rebuilt when new ids appeared)."""
        items, cats = self.writer.item_index(), self.writer.category_index()
        key = (items.n_extra, cats.n_extra)
        if getattr(self, "_tables_key", None) != key:
            self._tables = (items.id_table(), cats.id_table())
            self._tables_key = key
        return self._tables

    def _train_batch(self, batch: pa.RecordBatch, unit: _Unit) -> None:
        uid = batch.column(USER).to_numpy().astype(np.int64)
        feats = self._features(batch)
        items, cats, lengths = self._lists(batch)
        row_start = np.concatenate([[0], np.cumsum(lengths)])
        in_test, test_row, _ = self.test_rows.lookup(uid)
        same = np.zeros(len(uid), bool)
        cand = np.flatnonzero(in_test)
        if len(cand):
            csr = self.writer.history_writer()
            offsets = csr.offsets.view()
            starts, stops = offsets[test_row[cand]], offsets[test_row[cand] + 1]
            del offsets
            fits = lengths[cand] <= (stops - starts)
            users = self.users.writers["features"].view()
            fits &= (users[test_row[cand]] == feats[cand]).all(axis=1)
            del users
            ok = cand[fits]
            if len(ok):  # compare the train lists with the test rows' prefixes, entry by entry, as raw ids
                item_table, cat_table = self._id_tables()
                stored_items, stored_cats = csr.entries["items"].view(), csr.entries["categories"].view()
                same[ok[prefix_equal(lengths, row_start, items, cats, ok, starts[fits], stored_items, stored_cats,
                                     item_table, cat_table)]] = True
                del stored_items, stored_cats
        # merged: the train row is the test row's prefix (or equal): no row of its own
        merged = np.flatnonzero(same)
        if len(merged):
            test_len = self._test_length(test_row[merged])
            self.side["merged"].append({"row": test_row[merged], "train_len": lengths[merged]})
            self.counters["n_test_users_extending_train"] += int((lengths[merged] < test_len).sum())
            self.counters["n_test_users_same_as_train"] += int((lengths[merged] == test_len).sum())
        conflict = np.flatnonzero(in_test & ~same)
        if len(conflict):  # the test row gets an alias id, used by the test impressions only
            alias = _fresh_ids(self.taken, len(conflict), seed=unit.index)
            self.taken = np.union1d(self.taken, alias)
            self.side["aliases"].append({"row": test_row[conflict], "alias": alias})
            self.counters["n_test_user_aliases"] += len(conflict)
        own = ~same
        if own.any():
            take = np.repeat(own, lengths)
            self._append_rows(uid[own], feats[own], lengths[own], items[take], cats[take])

    def _test_length(self, rows: np.ndarray) -> np.ndarray:
        off = self.writer.history_writer().offsets.view()
        out = np.asarray(off[rows + 1] - off[rows])
        del off
        return out

    def _maps(self) -> None:
        """user id -> (row, history length) per split, from what the user phases wrote."""
        csr = self.writer.history_writer()
        n_rows = self._n_feature_rows
        off = np.asarray(csr.offsets.view()[: n_rows + 1])
        all_ids = np.asarray(csr.row_ids.view())
        row_ids = all_ids[:n_rows]
        lengths = np.diff(off)
        n_test = len(self.test_rows.ids)
        merged = {k: np.asarray(v.view()) for k, v in self.side["merged"].writers.items()}
        aliases = {k: np.asarray(v.view()) for k, v in self.side["aliases"].writers.items()}
        test_user_of_row = row_ids[:n_test].copy()
        self.row_user = row_ids.copy()
        self.row_user[aliases["row"]] = aliases["alias"]  # the id the test impressions carry
        if len(self.row_user) == 0:
            self.row_user = np.zeros(1, np.int64)
        test_rows = np.arange(n_test, dtype=np.int64)
        self.maps = {
            # test samples: the test row (its impressions carry the alias where there is one)
            "test": _Rows(test_user_of_row, test_rows, lengths[:n_test]),
            # train samples: their own row, or the test row they were merged into (its prefix)
            "train": _Rows(np.concatenate([row_ids[n_test:], test_user_of_row[merged["row"]]]),
                           np.concatenate([np.arange(n_test, len(row_ids), dtype=np.int64), merged["row"]]),
                           np.concatenate([lengths[n_test:], merged["train_len"]])),
        }
        self.missing = IdIndex(None, all_ids[n_rows:])  # sample-only users met so far (a resumed import)

    def _sample_unit(self, unit: _Unit, batch: pa.RecordBatch, lo: int) -> None:
        split = "train" if unit.phase == "train_samples" else "test"
        own, other = self.maps[split], self.maps["test" if split == "train" else "train"]
        path = self.files[unit.phase][unit.file]
        labels = decode_labels(batch.column(LABEL), str(path))
        uid = batch.column(USER).to_numpy().astype(np.int64)
        iid = batch.column(ITEM).to_numpy().astype(np.int64)
        items = self.writer.item_index().build()
        item_pos = in_lookup_thread(items.find, iid)  # beside the user lookups
        found, row, hist_len = own.lookup(uid)
        fallback = np.zeros(len(uid), bool)
        miss = np.flatnonzero(~found)
        if len(miss):  # the other split's row, looked up only for those without one of their own
            found2, row2, hist_len2 = other.lookup(uid[miss])
            fallback[miss] = found2
            row[miss] = np.where(found2, row2, 0)
            hist_len[miss] = np.where(found2, hist_len2, 0)
        pos = item_pos.result()
        absent = ~found & ~fallback
        user = np.where(absent, uid, self.row_user[np.where(absent, 0, row)])
        if absent.any():  # sample users without a feature row: an empty history of their own
            before = self.missing.n_extra
            self.missing.positions(uid[absent])  # new ids numbered in order of first appearance
            new = self.missing.extra_ids()[before:]
            if len(new):
                self.writer.append_histories(new, np.zeros(len(new), np.int64), np.zeros(0, np.int64),
                                             np.zeros(0, np.int64))
                self.users.append({"user_id": new, "features": np.zeros((len(new), len(USER_FEATURES)), np.int64)})
        self.counters["n_impression_items_without_features"] += int(((pos < 0) | (pos >= items.n_base)).sum())
        self.counters["n_impressions_without_history"] += int(absent.sum())
        self.counters["n_impressions_from_other_split_features"] += int(fallback.sum())
        self.counters["n_clicks"] += int(labels.sum())
        self.writer.append_impressions(split, {"user_id": user, "item_id": iid, "label": labels,
                                               "hist_len": hist_len.astype(np.int32)})

    def _scl_unit(self, unit: _Unit, batch: pa.RecordBatch, lo: int) -> None:
        vec = batch.column(SCL_VECTOR)
        lengths = pc.list_value_length(vec).to_numpy(zero_copy_only=False)
        if self.dim is None and len(lengths):
            self.dim = int(lengths[0])
        if vec.null_count or np.any(lengths != self.dim):
            raise DataError(
                f"{SCL_VECTOR}: vectors of unequal length {sorted(set(lengths.tolist()))}, expected {self.dim}"
            )
        values = pc.list_flatten(vec).to_numpy(zero_copy_only=False).astype(np.int8).reshape(-1, self.dim)
        self.writer.embeddings_writer(SCL_SOURCE, self.dim, np.int8, SCL_SCALE).write(
            batch.column(ITEM).to_numpy().astype(np.int64), values)
        self.counters["n_vectors"] += batch.num_rows

    # the run ----------------------------------------------------------------------------------------
    def run(self) -> Dataset:
        started = time.perf_counter()
        first = self._open()
        self._user_state()
        self._file_offsets = {
            phase: np.concatenate([[0], np.cumsum([pq.ParquetFile(p).metadata.num_rows for p in self.files[phase]])])
            for phase in ("test_user_features", "train_user_features")}
        self._n_feature_rows = None  # set when the user phases are done
        if first:
            log.info("%s: resuming the import at unit %d of %d", self.name, first, len(self.units))
        if self.dim is not None:
            self.writer.embeddings_writer(SCL_SOURCE, self.dim, np.int8, SCL_SCALE)
        bar = _bar(self.units, first, self.progress)
        columns = {"test_user_features": USER_COLUMNS, "train_user_features": USER_COLUMNS,
                   "train_samples": [LABEL, USER, ITEM], "test_samples": [LABEL, USER, ITEM],
                   "scl_embedding_int8_p90": [ITEM, SCL_VECTOR]}
        batch_rows = {p: USER_BATCH if p.endswith("user_features") else ROW_BATCH for p in PHASES}
        batch_rows["scl_embedding_int8_p90"] = max(1, ROW_BATCH // 16)  # 128 values a row
        todo = self.units[first:]
        feature_units = [u for u in self.units if u.phase.endswith("user_features")]
        if not todo or todo[0].phase not in ("test_user_features", "train_user_features"):
            self._after_users(feature_units)
        for unit, batch, lo, last in ahead(_read_units(self.files, todo, columns, batch_rows)):
            if unit.phase.endswith("user_features"):
                if batch is not None:
                    self._user_unit(unit, batch, lo)
            else:
                if self._n_feature_rows is None:
                    self._after_users(feature_units)
                if batch is not None:
                    (self._sample_unit if unit.phase.endswith("samples") else self._scl_unit)(unit, batch, lo)
            if bar is not None and batch is not None:
                bar.update(batch.num_rows)
            if last:
                self._commit(unit.index + 1)
        if self._n_feature_rows is None:
            self._after_users(feature_units)
        if bar is not None:
            bar.close()
        return self._finish(started)

    def _after_users(self, feature_units: list[_Unit]) -> None:
        if self._n_feature_rows is None:
            # rows written by the user phases; sample-only users come after them
            rows = self.journal_rows_after_users()
            self._n_feature_rows = rows
            self._maps()

    def journal_rows_after_users(self) -> int:
        """CSR rows the user-feature phases wrote (the rest are sample-only users)."""
        path = self.path / "users-phase.json"
        if path.exists():
            return int(json.loads(path.read_text())["rows"])
        rows = self.writer.history_writer().n_rows
        path.write_text(json.dumps({"rows": rows}))
        return rows

    def _finish(self, started: float) -> Dataset:
        self.counters["n_duplicate_user_rows"] = self.n_dup_test + self.n_dup_train
        self.counters["n_users_without_features"] = self.writer.history_writer().n_rows - self._n_feature_rows
        c = self.counters
        if c["n_duplicate_user_rows"]:
            log.warning("%d user-feature rows repeat a user already seen in the same file: the first row is kept",
                        c["n_duplicate_user_rows"])
        if c["n_test_user_aliases"]:
            log.warning("%d users have different train and test feature rows: the test rows are stored under "
                        "alias user ids used by the test impressions only", c["n_test_user_aliases"])
        if c["n_users_without_features"]:
            log.warning("%d sample users have no user-feature row: empty history, hist_len 0",
                        c["n_users_without_features"])
        if c["n_impressions_from_other_split_features"]:
            log.warning("%d impressions' users have no row in their split's user file: the other file's row is "
                        "used", c["n_impressions_from_other_split_features"])
        if not self.files["scl_embedding_int8_p90"]:
            log.warning("%s: no scl_embedding_int8_p90 files; the %s source will be absent", self.raw_dir, SCL_SOURCE)
        # the alias ids go into the rows (CSR and users), then users.parquet is written from the rows
        self.users.close()
        for w in self.side.values():
            w.close()
        csr = self.writer.history_writer()
        aliases = Columns(self.path / "import-aliases")
        csr.close()
        row_ids = np.load(self.path / "histories" / "row_ids.npy", mmap_mode="r+")
        row_ids[aliases.column("row")] = aliases.column("alias")
        row_ids.flush()
        del row_ids
        users = Columns(self.path / "users-rows")
        uw = self.writer.users_writer()
        user_ids = np.load(self.path / "histories" / "row_ids.npy", mmap_mode="r")
        for lo in range(0, len(users), ROW_BATCH):
            hi = min(lo + ROW_BATCH, len(users))
            f = np.asarray(users.column("features")[lo:hi])
            uw.write(pa.table({"user_id": np.asarray(user_ids[lo:hi]),
                               **{f"f{i + 1}": f[:, i] for i in range(len(USER_FEATURES))}}))
        uw.close()
        del user_ids, users, aliases
        n_behaviours = csr.n_entries
        dataset = self.writer.finish(
            n_behaviours=n_behaviours,
            has_images=False,
            has_titles=False,
            has_search_sessions=False,
            raw_dir=str(self.raw_dir.resolve()),
            raw_columns={
                "item_id": ITEM, **ITEM_FEATURES, "user_id": USER,
                **{f"f{i + 1}": c for i, c in enumerate(USER_FEATURES)},
                "item_ids": HIST_ITEMS, "categories": HIST_CATS, "label": LABEL,
            },
            **{k: v for k, v in c.items() if k not in ("n_vectors",)},
            embeddings={SCL_SOURCE: {"n_items": c["n_vectors"], "dim": self.dim, "scale": SCL_SCALE,
                                     "dtype": "int8"}} if c["n_vectors"] else {},
        )
        for leftover in ("users-rows", "import-merged", "import-aliases"):
            _remove_tree(self.path / leftover)
        for leftover in (JOURNAL, "users-phase.json"):
            (self.path / leftover).unlink(missing_ok=True)
        log.info("taobao-mm %s: %d items, %d users (%d without features), %d behaviours, %d impressions, "
                 "%d SCL vectors in %.1fs", self.name, dataset.n_items, dataset.n_users,
                 c["n_users_without_features"], n_behaviours, dataset.meta["n_impressions"], c["n_vectors"],
                 time.perf_counter() - started)
        return dataset


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _bar(units: list[_Unit], first: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    total = sum(u.hi - u.lo for u in units)
    done = sum(u.hi - u.lo for u in units[:first])
    desc = f"import (resumed at unit {first} of {len(units)})" if first else "import"
    return tqdm(total=total, initial=done, unit="row", unit_scale=True, desc=desc, smoothing=0.05)


def import_taobao_mm(
    settings: Settings,
    raw_dir: str | Path,
    name: str = "taobao-mm",
    *,
    register: bool = True,
    progress: bool = False,
    fresh: bool = False,
) -> Dataset:
    """Convert the raw Taobao-MM files in ``raw_dir`` into dataset ``name`` (replacing it) and
    register it when the database is migrated. An unfinished import of the same files into ``name``
    is resumed where it stopped (``fresh=True`` starts over).

    Raises:
        NotFoundError: ``raw_dir`` or a required table is missing (item_features, samples, user features).
        DataError: a file lacks the expected columns or holds malformed labels/vectors.
    """
    raw_dir = Path(raw_dir)
    name = check_name(name)
    files = _validate(raw_dir)
    job = _Import(settings, raw_dir, name, files, progress)
    if fresh:
        job.journal = None
    dataset = job.run()
    if register:
        from muse.data.registry import register_if_ready

        register_if_ready(settings, dataset)
    return dataset
