"""Start-up of a version's GSU item table: from the local table file, not from a scan of Milvus.

:func:`load_item_table` fills an empty :class:`retriever.cache.ItemTable` for one
:class:`muse.vectorstore.CollectionRef`:

1. from the version's table file (:func:`muse.itemtable.table_dir`, written by the embedding stage
   when the version was backfilled or promoted), when it holds that (dataset, source, version) at
   the collections' width and, if the dataset is on this machine, was written from its current
   ``meta.json``: the rows are read into the storage dtype a block at a time and the persisted id
   -> row index is read (millions of rows a second, ``bench/item_table.py``); an int8 table reads
   the file's int8 form (:func:`muse.itemtable.int8_rows`, written beside it the first time);
2. otherwise, with ``scan_milvus`` (``muse serve``) and the dataset's item ids on this machine: one
   scan of the version's Milvus item collection (thousands of rows a second), written to the table
   file so that the next start is step 1, then step 1; one log line says so. Where the folder cannot
   be written the scanned rows are kept in memory only;
3. otherwise the table starts empty and items are read from Milvus the first time a history needs
   them (one log line says why).

Items written to Milvus after the file (none for a version written by a backfill) are still read on
demand, so a table file never hides an item.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from muse.errors import NotFoundError
from muse.itemtable import check_table, ensure_index, export_from_store, int8_rows, ref_table_dir

log = logging.getLogger(__name__)

#: How a table was filled: the file, a Milvus scan written to the file, a Milvus scan kept in memory
#: (the folder could not be written), or nothing yet (items are read when first needed).
HOW = ("file", "milvus", "milvus-memory", "on-demand")


@dataclass(frozen=True)
class TableLoad:
    """What :func:`load_item_table` did."""

    how: str  # one of HOW
    rows: int  # rows in the table afterwards
    seconds: float
    folder: Path  # the version's table folder (whether or not it exists)
    note: str = ""  # why the file was not used, when it was not

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def dataset_here(settings: Any, name: str) -> Path | None:
    """The folder of dataset ``name`` when it is on this machine, else None."""
    from muse.data.format import Dataset

    try:
        return Path(Dataset.open(settings, name).path)
    except NotFoundError:
        return None


def load_item_table(table: Any, store: Any, ref: Any, *, scan_milvus: bool = False) -> TableLoad:
    """Fill the empty ``table`` (an :class:`retriever.cache.ItemTable`) with the items of ``ref``: from
    the version's table file, else (``scan_milvus``) from one Milvus scan written to that file, else
    nothing (on demand). See the module docstring.

    Raises:
        BackendUnavailable: Milvus does not answer during a scan.
    """
    settings = store.settings
    folder = ref_table_dir(settings, ref)
    t0 = time.perf_counter()
    if len(table):
        return TableLoad("on-demand", len(table), 0.0, folder, "the table already holds items")
    dataset_path = dataset_here(settings, ref.dataset)
    found, reason = check_table(folder, ref.dataset, ref.source, ref.version, table.dim, dataset_path)
    if found is not None:
        rows = _fill(table, folder, found)
        seconds = time.perf_counter() - t0
        log.info("%s: item table from %s: %d rows (%s) in %.2f s, %.0f rows/s", ref, folder, rows,
                 table.storage_dtype, seconds, rows / max(seconds, 1e-9))
        return TableLoad("file", rows, seconds, folder)
    if not scan_milvus or dataset_path is None:
        why = "" if scan_milvus else "; `muse serve` writes it"
        where = "" if dataset_path is not None or not scan_milvus else f"; dataset {ref.dataset!r} is not on this machine"
        log.info("%s: no item table file (%s)%s%s: item vectors are read from Milvus when first needed",
                 ref, reason, why, where)
        return TableLoad("on-demand", 0, time.perf_counter() - t0, folder, reason)
    from muse.data.format import Dataset

    item_ids = Dataset(dataset_path).item_ids()
    log.info("%s: no item table file (%s): reading %d items from Milvus once and writing %s", ref, reason,
             len(item_ids), folder)
    try:
        written = export_from_store(store, ref, item_ids, dataset_path, folder)
    except OSError as e:
        log.warning("%s: cannot write the item table to %s (%s): items scanned into memory only", ref, folder, e)
        rows = table.load(np.asarray(item_ids))
        return TableLoad("milvus-memory", rows, time.perf_counter() - t0, folder, f"{reason}; {e}")
    rows = _fill(table, folder, written)
    return TableLoad("milvus", rows, time.perf_counter() - t0, folder, reason)


def _fill(table: Any, folder: Path, found: Any) -> int:
    """Copy a checked table file into ``table``: its index, and for an int8 table its int8 rows."""
    # an int8 table reads the int8 form; a float table of shipped int8 rows reads their scales
    wants = table.storage_dtype == "int8" or found.vectors.dtype == np.int8
    int8 = int8_rows(folder, found) if wants else None
    return table.load_file(found, ensure_index(folder, found), int8_rows=int8)


__all__ = ["HOW", "TableLoad", "dataset_here", "load_item_table"]
