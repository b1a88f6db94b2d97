"""Co-occurrence pairs from behaviour histories: the positives of I2I embedding training (two items
a user interacted with close together in time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow.compute as pc

from muse.data.format import Dataset
from muse.errors import DataError


def iter_cooccurrence_pairs(
    dataset: Dataset,
    window: int = 3,
    batch_size: int = 512,
    start: int = 0,
    stop: int | None = None,
    keep_users: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[np.ndarray]:
    """Stream int64 ``[n, 2]`` arrays of (earlier item, later item) pairs: two behaviours of the same
    user at most ``window`` positions apart, on different items. Users ``start <= row < stop`` in
    canonical order, ``batch_size`` users at a time (memory stays bounded), one array per batch
    (pairs 1 apart, then 2 apart, ...); batches without pairs yield nothing. ``keep_users`` (user
    ids int64 ``[b]`` -> bool ``[b]``) keeps only the histories of the users it marks.

    Raises:
        DataError: ``window`` < 1.
    """
    if window < 1:
        raise DataError(f"window must be >= 1, got {window}")
    columns = ["item_ids"] if keep_users is None else ["user_id", "item_ids"]
    for batch in dataset.iter_histories(batch_size=batch_size, start=start, stop=stop, columns=columns):
        col = batch.column("item_ids")
        flat = col.flatten().to_numpy()
        lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
        row = np.repeat(np.arange(len(lengths)), lengths)  # [n] user row of each behaviour
        if keep_users is not None:
            kept = np.asarray(keep_users(batch.column("user_id").to_numpy().astype(np.int64)), dtype=bool)
            flat, row = flat[kept[row]], row[kept[row]]
        if len(flat) < 2:
            continue
        parts = []
        for k in range(1, min(window, len(flat) - 1) + 1):
            a, b = flat[:-k], flat[k:]
            keep = (row[:-k] == row[k:]) & (a != b)
            parts.append(np.stack([a[keep], b[keep]], axis=1))  # [m, 2]
        pairs = np.concatenate(parts)
        if len(pairs):
            yield pairs.astype(np.int64, copy=False)
