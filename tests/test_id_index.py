"""The id -> position index of the dataset writer (muse.data.format.IdIndex), against a dict."""

from __future__ import annotations

import numpy as np
import pytest

from muse.data import format as fmt
from muse.data.format import IdIndex


class Reference:
    """The same numbering, one id at a time: base ids at their first row, then new ids in order."""

    def __init__(self, base: np.ndarray) -> None:
        self.pos: dict[int, int] = {}
        for i, x in enumerate(base.tolist()):
            self.pos.setdefault(x, i)
        self.next = len(base)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        out = []
        for x in ids.tolist():
            if x not in self.pos:
                self.pos[x] = self.next
                self.next += 1
            out.append(self.pos[x])
        return np.asarray(out, np.int64)


@pytest.mark.parametrize("with_base", [True, False])
def test_positions_match_first_appearance_across_merged_segments(with_base: bool) -> None:
    rng = np.random.default_rng(3)
    universe = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 3_000, dtype=np.int64)
    base = universe[rng.integers(0, 500, 400)] if with_base else None  # repeats: the first row counts
    index = IdIndex(base)
    ref = Reference(base if base is not None else np.zeros(0, np.int64))
    for size in [1, 5, 40, 3, 300, 7, 900, 2, 60, 1_500]:  # new ids in batches of every size: segments merge
        ids = universe[rng.integers(0, min(len(universe), 200 + 3 * size), size)]
        assert np.array_equal(index.positions(ids), ref.positions(ids))
    assert len(index._segments) < 10  # merged as they grew
    probe = np.concatenate([universe, rng.integers(1, 1 << 40, 50)])  # known and unknown ids
    want = np.asarray([ref.pos.get(x, -1) for x in probe.tolist()])
    assert np.array_equal(index.find(probe), want)
    assert np.array_equal(index.id_table()[want[want >= 0]], probe[want >= 0])


def test_side_by_side_lookups_number_new_ids_as_one_thread_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "LOOKUP_CHUNK", 1_000)  # many chunks, taken by both threads
    rng = np.random.default_rng(5)
    base = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 5_000, dtype=np.int64)
    new = rng.integers(1, 1 << 50, 300, dtype=np.int64)  # history items absent from the item table
    cats_universe = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 80, dtype=np.int64)
    one, two = (IdIndex(base), IdIndex()), (IdIndex(base), IdIndex())
    for _ in range(3):
        pool = np.concatenate([base, new])
        items = pool[rng.integers(0, len(pool), 25_000)]
        cats = cats_universe[rng.integers(0, len(cats_universe), 25_000)]
        got_items, got_cats = fmt._positions_side_by_side(one[0], items, one[1], cats)
        assert got_items.dtype == np.int32
        assert np.array_equal(got_items, two[0].positions(items))
        assert np.array_equal(got_cats, two[1].positions(cats))
    assert np.array_equal(one[0].id_table(), two[0].id_table())
    assert np.array_equal(one[1].id_table(), two[1].id_table())
