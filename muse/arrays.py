"""Small array helpers every stage uses: id lookups, row normalisation and the ``k`` check.

One copy of each, so that the stages agree on edge cases (empty tables, unknown ids, ``k`` as bool).
"""

from __future__ import annotations

import numpy as np

from muse.errors import ConfigurationError


def lookup_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``ids`` in the ascending array ``sorted_ids`` and whether each was found.

    Returns ``(positions int64 [n], found bool [n])``; a position where ``found`` is False is a valid
    index (clipped into range, 0 for an empty table) that must not be used as a match.
    """
    ids = np.asarray(ids, dtype=np.int64)
    sorted_ids = np.asarray(sorted_ids, dtype=np.int64)
    if len(sorted_ids) == 0:
        return np.zeros(ids.shape, dtype=np.int64), np.zeros(ids.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1).astype(np.int64)
    return pos, sorted_ids[pos] == ids


def lookup(table_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row of each of ``ids`` in ``table_ids`` (any order), -1 where it is not in the table."""
    table_ids = np.asarray(table_ids, dtype=np.int64)
    order = np.argsort(table_ids, kind="stable")
    pos, found = lookup_sorted(table_ids[order], ids)
    return np.where(found, order[pos] if len(order) else 0, -1).astype(np.int64)


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Row-wise (last axis) L2 normalisation computed in float64, so 1e30-sized vectors keep their
    direction, returned as float32; all-zero rows stay zero."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def check_k(k: object, limit: int | None = None) -> int:
    """``k`` as an int in ``1..limit`` (no upper bound when ``limit`` is None); ConfigurationError
    (a ValueError) naming the value otherwise. A bool is refused even though it is an int."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or (limit is not None and k > limit):
        wanted = f"an integer in 1..{limit}" if limit is not None else "a positive integer"
        raise ConfigurationError(f"k must be {wanted}, got {k!r}")
    return int(k)
