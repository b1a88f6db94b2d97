"""The on-disk arrays every stage reads: ``.npy`` columns written once, in chunks, and memory-mapped.

What grows with the data (behaviours, impressions, item vectors) lives in files of this module's
making and is never loaded whole: a reader maps the file and touches only the rows it needs; the
operating system's page cache decides what stays in RAM.

- :class:`ArrayWriter` appends rows to one ``.npy`` file. The header is written with a placeholder
  shape and fixed up by :meth:`ArrayWriter.close`, so a file of any size is written with bounded
  memory; :meth:`ArrayWriter.truncate` cuts it back to a row count (an interrupted import resumes
  from its last committed unit and writes the same bytes again). The file's blocks are reserved
  ahead of the writes in large steps (``posix_fallocate``) and the unused tail is cut at close: on
  ext4 an append that allocates as it goes wrote 430 MB/s here, one into reserved blocks 1.9 GB/s.
- :class:`Columns` is a folder of equal-length columns (``<name>.npy``) with ``columns.json``; a
  split's impressions are one. :class:`ColumnsWriter` writes one.
- :class:`CSR` is a ragged table (one row per user, a variable number of entries per row): ``row_ids``
  (int64), ``offsets`` (int64, rows + 1) and entry columns such as item positions (int32) and category
  positions (int32). The histories are one.
- :func:`open_array` maps a finished ``.npy`` file read-only.

Layout of a dataset (format 2, see ``docs/dataset-format.md``)::

    histories/   CSR: row_ids.npy, offsets.npy, items.npy (int32 item positions), categories.npy
                 (int32 category positions), times.npy (int64, only when the data has timestamps),
                 category_ids.npy (the category vocabulary), extra_item_ids.npy (ids absent from items)
    impressions/<split>/  Columns: user_row (int32), item_id (int64), label (int8), hist_len (int32),
                 time (int64, only with timestamps)
    embeddings/<source>/  Columns: item_id (int64), vector (storage dtype, [n, d])
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from muse.errors import DataError

MAGIC = b"\x93NUMPY\x01\x00"
#: Every file of this module has a header of this many bytes (magic, length, padded dict), so a file's
#: size tells its row count and a header can be rewritten in place.
HEADER_BYTES = 128
COLUMNS_FILE = "columns.json"
#: A writer reserves its file's blocks this many bytes (or an eighth of the file, if more) ahead.
RESERVE_BYTES = 64 << 20


def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    body = HEADER_BYTES - len(MAGIC) - 2
    if len(text) + 1 > body:
        raise DataError(f"npy header for shape {shape} does not fit in {HEADER_BYTES} bytes")
    text = text.ljust(body - 1) + "\n"
    return MAGIC + len(text).to_bytes(2, "little") + text.encode("latin1")


def read_header(path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape a ``.npy`` file of this module declares."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[: len(MAGIC)] != MAGIC:
        raise DataError(f"{path} is not an .npy file written by muse.ondisk")
    meta = ast.literal_eval(head[len(MAGIC) + 2 :].decode("latin1").strip())
    return np.dtype(meta["descr"]), tuple(meta["shape"])


class ArrayWriter:
    """Appends rows (``row_shape`` each, ``dtype``) to one ``.npy`` file.

    While it is open the file may be longer than its rows (blocks reserved ahead of the writes, zeros
    until written); :meth:`close` and :meth:`truncate` cut it to the rows' exact size, and readers of
    an unfinished file go by the row count (:meth:`view`), never by the size.

    Args:
        path: the file; created, or reopened at ``resume_rows`` rows (cut back to that many).
        dtype, row_shape: what one row is (``row_shape=(128,)`` for a vector column).
        resume_rows: None to start a new file; a row count to reopen an unfinished one.
        reserve_bytes: the least step of the reservation ahead of the writes (0: none).
    """

    def __init__(self, path: Path, dtype: Any, row_shape: tuple[int, ...] = (), resume_rows: int | None = None,
                 reserve_bytes: int = RESERVE_BYTES) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        self._reserve = reserve_bytes if hasattr(os, "posix_fallocate") else 0
        self._reserved = 0  # the file's length up to which blocks are allocated
        if resume_rows is None:
            self._f = open(self.path, "wb")
            self._f.write(_header(self.dtype, (0, *self.row_shape)))
            self.n_rows = 0
        else:
            self._f = open(self.path, "r+b")
            self.truncate(resume_rows)

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if values.shape[1:] != self.row_shape:
            raise DataError(f"{self.path.name}: rows of shape {values.shape[1:]}, expected {self.row_shape}")
        end = HEADER_BYTES + (self.n_rows + len(values)) * self.row_bytes
        if end > self._reserved and self._reserve:
            self._reserve_to(end)
        self._f.write(memoryview(values).cast("B") if values.size else b"")
        self.n_rows += len(values)

    def _reserve_to(self, end: int) -> None:
        """Allocate the file's blocks up to at least ``end`` bytes, a large step at a time (a file
        system without preallocation just writes as it goes)."""
        size = max(end, self._reserved + max(self._reserve, self._reserved // 8))
        try:
            os.posix_fallocate(self._f.fileno(), 0, size)
        except OSError as e:
            import errno

            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            self._reserve = 0
            return
        self._reserved = size

    def truncate(self, n_rows: int) -> None:
        """Cut the file back to its first ``n_rows`` rows and continue writing after them."""
        self._f.flush()
        size = os.fstat(self._f.fileno()).st_size
        want = HEADER_BYTES + n_rows * self.row_bytes
        if size < want:
            raise DataError(f"{self.path} holds {(size - HEADER_BYTES) // max(self.row_bytes, 1)} rows, "
                            f"cannot resume at {n_rows}")
        self._f.truncate(want)
        self._f.seek(want)
        self._reserved = want
        self.n_rows = n_rows

    def flush(self) -> None:
        self._f.flush()

    def view(self) -> np.ndarray:
        """The rows written so far, memory-mapped (valid until the next append)."""
        self._f.flush()
        if self.n_rows == 0:
            return np.zeros((0, *self.row_shape), self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=HEADER_BYTES,
                         shape=(self.n_rows, *self.row_shape))

    def close(self) -> None:
        """Write the final shape into the header and close the file."""
        if self._f.closed:
            return
        self._f.flush()
        self._f.truncate(HEADER_BYTES + self.n_rows * self.row_bytes)  # the reserved tail
        self._f.seek(0)
        self._f.write(_header(self.dtype, (self.n_rows, *self.row_shape)))
        self._f.close()


def write_array(path: Path, values: np.ndarray) -> None:
    """Write a whole (small) array in this module's format."""
    values = np.asarray(values)
    w = ArrayWriter(path, values.dtype, values.shape[1:])
    w.append(values)
    w.close()


def open_array(path: Path, mmap: bool = True) -> np.ndarray:
    """A finished ``.npy`` file, memory-mapped read-only (``mmap=False``: read into RAM)."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError as e:
        raise DataError(f"{path} is missing (an unfinished or older dataset: write it again)") from e
    except ValueError as e:
        raise DataError(f"{path} is not a readable .npy file: {e}") from e


def is_mapped(array: np.ndarray) -> bool:
    """Whether ``array`` (or the array it views) is a memory-mapped file, not memory of its own."""
    base = array
    while base is not None:
        if isinstance(base, np.memmap) or type(base).__name__ == "mmap":
            return True
        base = getattr(base, "base", None)
    return False


# -- columns ----------------------------------------------------------------------------------------
class ColumnsWriter:
    """Writes a folder of equal-length columns; ``spec`` maps a name to ``(dtype, row_shape)``."""

    def __init__(self, folder: Path, spec: Mapping[str, tuple[Any, tuple[int, ...]]],
                 resume_rows: int | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.spec = {name: (np.dtype(dt), tuple(shape)) for name, (dt, shape) in spec.items()}
        self.writers = {name: ArrayWriter(self.folder / f"{name}.npy", dt, shape, resume_rows)
                        for name, (dt, shape) in self.spec.items()}

    @property
    def n_rows(self) -> int:
        return next(iter(self.writers.values())).n_rows if self.writers else 0

    def append(self, columns: Mapping[str, np.ndarray]) -> None:
        if set(columns) != set(self.writers):
            raise DataError(f"{self.folder.name}: columns {sorted(columns)}, expected {sorted(self.writers)}")
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise DataError(f"{self.folder.name}: columns of unequal length {sorted(lengths)}")
        for name, values in columns.items():
            self.writers[name].append(values)

    def truncate(self, n_rows: int) -> None:
        for w in self.writers.values():
            w.truncate(n_rows)

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        doc = {"n_rows": self.n_rows,
               "columns": {n: {"dtype": np.lib.format.dtype_to_descr(dt), "row_shape": list(s)}
                           for n, (dt, s) in self.spec.items()}}
        (self.folder / COLUMNS_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


class Columns:
    """A finished folder of equal-length columns, memory-mapped."""

    def __init__(self, folder: Path, mmap: bool = True) -> None:
        self.folder = Path(folder)
        path = self.folder / COLUMNS_FILE
        if not path.exists():
            raise DataError(f"{self.folder} has no {COLUMNS_FILE} (an unfinished write)")
        self.doc = json.loads(path.read_text())
        self.names = tuple(sorted(self.doc["columns"]))
        self._mmap = mmap
        self._cache: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.doc["n_rows"])

    def __contains__(self, name: str) -> bool:
        return name in self.doc["columns"]

    def column(self, name: str) -> np.ndarray:
        if name not in self.doc["columns"]:
            raise DataError(f"{self.folder} has no column {name!r}; has {', '.join(self.names)}")
        if name not in self._cache:
            self._cache[name] = open_array(self.folder / f"{name}.npy", self._mmap)
        return self._cache[name]

    def slice(self, lo: int, hi: int, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Rows ``lo:hi`` of the named columns (all by default), copied into RAM."""
        return {n: np.array(self.column(n)[lo:hi]) for n in (names or self.names)}

    def iter_slices(self, rows: int, lo: int = 0, hi: int | None = None,
                    names: tuple[str, ...] | None = None) -> Iterator[dict[str, np.ndarray]]:
        hi = len(self) if hi is None else min(hi, len(self))
        for start in range(lo, hi, rows):
            yield self.slice(start, min(start + rows, hi), names)


# -- CSR --------------------------------------------------------------------------------------------
class CSRWriter:
    """Writes a ragged table: per row an id and a run of entries in each entry column."""

    def __init__(self, folder: Path, entries: Mapping[str, Any], resume: tuple[int, int] | None = None) -> None:
        """``entries`` maps an entry column's name to its dtype; ``resume`` = (rows, entries) committed."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        rows, n_entries = resume if resume is not None else (None, None)
        self.row_ids = ArrayWriter(self.folder / "row_ids.npy", np.int64, (), rows)
        self.offsets = ArrayWriter(self.folder / "offsets.npy", np.int64, (),
                                   None if rows is None else rows + 1)
        if rows is None:
            self.offsets.append(np.zeros(1, np.int64))
        self.entries = {name: ArrayWriter(self.folder / f"{name}.npy", dt, (), n_entries)
                        for name, dt in entries.items()}
        self.n_entries = 0 if n_entries is None else n_entries

    @property
    def n_rows(self) -> int:
        return self.row_ids.n_rows

    def append(self, row_ids: np.ndarray, lengths: np.ndarray, entries: Mapping[str, np.ndarray]) -> None:
        lengths = np.asarray(lengths, np.int64)
        total = int(lengths.sum())
        for name, values in entries.items():
            if len(values) != total:
                raise DataError(f"{self.folder.name}/{name}: {len(values)} entries for rows totalling {total}")
        self.row_ids.append(np.asarray(row_ids, np.int64))
        self.offsets.append(self.n_entries + np.cumsum(lengths))
        for name, values in entries.items():
            self.entries[name].append(values)
        self.n_entries += total

    def state(self) -> tuple[int, int]:
        return self.n_rows, self.n_entries

    def view(self, name: str) -> np.ndarray:
        return self.entries[name].view()

    def close(self) -> None:
        for w in (self.row_ids, self.offsets, *self.entries.values()):
            w.close()


class CSR:
    """A finished ragged table, memory-mapped: ``row_ids [n]``, ``offsets [n + 1]`` and entry columns."""

    def __init__(self, folder: Path, mmap: bool = True) -> None:
        self.folder = Path(folder)
        self._mmap = mmap
        self.row_ids = open_array(self.folder / "row_ids.npy", mmap)
        self.offsets = open_array(self.folder / "offsets.npy", mmap)
        if len(self.offsets) != len(self.row_ids) + 1:
            raise DataError(f"{self.folder}: {len(self.offsets)} offsets for {len(self.row_ids)} rows")
        self._cache: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.row_ids)

    def has(self, name: str) -> bool:
        return (self.folder / f"{name}.npy").exists()

    def entries(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = open_array(self.folder / f"{name}.npy", self._mmap)
        return self._cache[name]

    def lengths(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        off = np.asarray(self.offsets[lo : (len(self) if hi is None else hi) + 1])
        return np.diff(off)


def read_runs(array: np.ndarray, firsts: np.ndarray, counts: np.ndarray, width: int) -> np.ndarray:
    """Rows ``[B, width]`` of a 1-D ``array``: row ``b`` holds ``array[firsts[b] : firsts[b] + counts[b]]``
    left-aligned, zeros after (``counts <= width``).

    For a memory-mapped ``.npy`` file the runs are read with ``os.preadv`` from the file (through the
    page cache), not through the mapping: a read maps nothing into this process, whereas a fault on a
    mapping maps the whole cached folio around it (up to 2 MiB where the file system caches large
    folios), which for scattered short runs costs hundreds of KiB of resident memory per run. An
    array in RAM is indexed.
    """
    firsts = np.asarray(firsts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros((len(firsts), width), dtype=array.dtype)
    filename = getattr(array, "filename", None)
    if not isinstance(array, np.memmap) or filename is None or not array.flags.c_contiguous:
        cols = np.arange(width)[None, :]
        valid = cols < counts[:, None]
        out[valid] = np.asarray(array)[(firsts[:, None] + cols)[valid]]
        return out
    item = array.dtype.itemsize
    base = int(array.offset)
    fd = os.open(filename, os.O_RDONLY)
    try:
        for b in np.flatnonzero(counts > 0).tolist():
            n = int(counts[b])
            view = memoryview(out[b, :n]).cast("B")
            got = os.preadv(fd, [view], base + int(firsts[b]) * item)
            if got != n * item:
                raise DataError(f"{filename}: short read of {n} entries at {int(firsts[b])} (file truncated?)")
    finally:
        os.close(fd)
    return out


def release(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped ``array`` from this process (they stay in the page cache and
    are read again on the next touch): a long pass over a mapped file then keeps a bounded resident
    size. A no-op for arrays in RAM."""
    import mmap

    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "_mmap", None) or getattr(base, "base", None)
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        try:
            base.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


class PageBudget:
    """Counts the bytes a long pass reads through memory-mapped ``arrays``; once ``budget`` bytes have
    been read their pages are dropped from this process (:func:`release`), so the pass keeps a
    bounded resident size whatever the files' size. A no-op for arrays in RAM."""

    def __init__(self, *arrays: np.ndarray, budget: int) -> None:
        self.arrays = arrays
        self.budget = budget
        self._read = 0

    def read(self, n_bytes: int) -> None:
        """Count ``n_bytes`` read; past the budget the pages are released."""
        self._read += n_bytes
        if self._read >= self.budget:
            self.release()

    def release(self) -> None:
        """Release the pages now (and start counting again)."""
        for array in self.arrays:
            release(array)
        self._read = 0

