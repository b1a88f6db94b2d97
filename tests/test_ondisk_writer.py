"""muse.ondisk.ArrayWriter with blocks reserved ahead of its writes: the file holds exactly its rows
once closed or cut back, whatever was reserved, and an unfinished file resumes to the same bytes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from muse.ondisk import HEADER_BYTES, ArrayWriter, open_array


def _rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(-1000, 1000, size=(n, 3)).astype(np.float16)


def test_reserved_tail_is_cut_at_close(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "a.npy"
    w = ArrayWriter(path, np.float16, (3,), reserve_bytes=4096)
    parts = [_rows(rng, n) for n in (5, 0, 700, 1, 2_000)]  # past several reservation steps
    for i, part in enumerate(parts):
        w.append(part)
        if i == 0 and hasattr(os, "posix_fallocate"):
            assert path.stat().st_size >= 4096  # reserved ahead of the 30 bytes written
        assert np.array_equal(w.view(), np.concatenate(parts[: i + 1]))
    w.close()
    want = np.concatenate(parts)
    assert path.stat().st_size == HEADER_BYTES + want.nbytes
    got = open_array(path)
    assert got.shape == want.shape and np.array_equal(got, want)


def test_an_unfinished_file_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    parts = [_rows(rng, n) for n in (300, 250, 400, 90)]
    whole = tmp_path / "whole.npy"
    w = ArrayWriter(whole, np.float16, (3,), reserve_bytes=1 << 20)
    for part in parts:
        w.append(part)
    w.close()
    cut = tmp_path / "cut.npy"
    w = ArrayWriter(cut, np.float16, (3,), reserve_bytes=1 << 20)
    for part in parts[:3]:
        w.append(part)
    w.flush()  # killed here: the file is longer than its rows (the reservation)
    del w
    committed = len(parts[0]) + len(parts[1])  # the journal's last commit
    w = ArrayWriter(cut, np.float16, (3,), resume_rows=committed, reserve_bytes=1 << 20)
    assert cut.stat().st_size == HEADER_BYTES + committed * 6
    w.append(parts[2])
    w.append(parts[3])
    w.close()
    assert cut.read_bytes() == whole.read_bytes()


def test_no_reservation_writes_the_same_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    parts = [_rows(rng, n) for n in (10, 3_000, 7)]
    files = []
    for reserve in (0, 64):
        path = tmp_path / f"r{reserve}.npy"
        w = ArrayWriter(path, np.float16, (3,), reserve_bytes=reserve)
        for part in parts:
            w.append(part)
        w.close()
        files.append(path.read_bytes())
    assert files[0] == files[1]
