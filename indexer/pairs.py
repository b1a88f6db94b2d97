"""Training and evaluation pairs of each embedding source, read from a :class:`muse.data.format.Dataset`.

- OpenCLIP: (item, title) for every item with a title.
- I2I and ID: (item, co-occurring item) from behaviour histories: two different items at most
  ``window`` positions apart in one user's history.
- SCL: (query, purchased item, clicked-but-not-purchased items) from search sessions.

Users are split once, by a hash of the user id, into training users and held-out users (about
:data:`HELDOUT_PERCENT` %); training reads only the first, intrinsic evaluation only the second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from muse.data.pairs import iter_cooccurrence_pairs
from muse.errors import ConfigurationError, DataError

log = logging.getLogger(__name__)

HELDOUT_PERCENT = 10
#: Items that occur fewer times than this in the training users' histories count as long-tail
#: (intrinsic evaluation; the ranker's long tail counts train impressions:
#: :data:`ranker.metrics.LONG_TAIL_IMPRESSIONS`).
LONG_TAIL_HISTORY_COUNT = 5
#: The user splits by :func:`is_heldout`: "train" = training users, "test" = held-out users (not the
#: dataset's impression splits, :data:`muse.data.format.IMPRESSION_SPLITS`).
USER_SPLITS = ("train", "test")


def is_heldout(user_ids: np.ndarray) -> np.ndarray:
    """bool ``[n]``: which users belong to the held-out (evaluation) split. Deterministic."""
    h = np.asarray(user_ids, dtype=np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps
    return (h >> np.uint64(40)) % np.uint64(100) < np.uint64(HELDOUT_PERCENT)


def _user_mask(user_ids: np.ndarray, split: str) -> np.ndarray:
    if split not in USER_SPLITS:
        raise ConfigurationError(f"split={split!r} is unknown; valid: {', '.join(USER_SPLITS)}")
    held = is_heldout(user_ids)
    return held if split == "test" else ~held


def _list_column(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list<int64> column -> (flat values int64 [m], row index of each value int64 [m])."""
    col = batch.column(batch.schema.get_field_index(name))
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)[offsets[0] : offsets[-1]]
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return values, rows


@dataclass(frozen=True)
class TitlePairs:
    item_ids: np.ndarray  # int64 [n]
    titles: list[str]  # [n]


def title_pairs(dataset: Any) -> TitlePairs:
    """(item, title) for every item with a non-empty title.

    Raises:
        DataError: the dataset has no titles at all.
    """
    items = dataset.items()
    ids = items.column("item_id").to_numpy().astype(np.int64)
    titles = items.column("title").to_pylist()
    keep = [i for i, t in enumerate(titles) if t]
    if not keep:
        raise DataError(f"dataset {dataset.name!r} has no item titles; the openclip source needs them")
    return TitlePairs(ids[keep], [titles[i] for i in keep])


def cooccurrence_pairs(
    dataset: Any, split: str = "train", window: int = 3, max_pairs: int | None = None, seed: int = 0
) -> np.ndarray:
    """int64 ``[n, 2]``: (item, item within ``window`` positions later) from the split's histories.

    Pairs of an item with itself are dropped. With ``max_pairs`` a uniform random sample is kept.
    """
    if window < 1:
        raise ConfigurationError(f"window={window} must be >= 1")
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    total = 0
    batches = iter_cooccurrence_pairs(dataset, window, batch_size=2048, keep_users=lambda u: _user_mask(u, split))
    for pair in batches:  # [p, 2] per batch of users
        parts.append(pair)
        total += len(pair)
        if max_pairs is not None and total > 4 * max_pairs:  # bound memory on long histories
            merged = np.concatenate(parts)
            parts = [merged[rng.choice(len(merged), size=2 * max_pairs, replace=False)]]
            total = len(parts[0])
    pairs = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = pairs[rng.choice(len(pairs), size=max_pairs, replace=False)]
    log.info("%d co-occurrence pairs (%s split, window %d)", len(pairs), split, window)
    return pairs.astype(np.int64)


def item_seen_counts(dataset: Any) -> dict[int, int]:
    """How often each item occurs in the training users' histories (for the long-tail slice)."""
    counts: dict[int, int] = {}
    uniq_parts: list[tuple[np.ndarray, np.ndarray]] = []
    for batch in dataset.iter_histories(batch_size=4096):
        users = batch.column(batch.schema.get_field_index("user_id")).to_numpy().astype(np.int64)
        values, rows = _list_column(batch, "item_ids")
        values = values[_user_mask(users, "train")[rows]]
        uniq_parts.append(np.unique(values, return_counts=True))
    for ids, n in uniq_parts:
        for i, c in zip(ids.tolist(), n.tolist()):
            counts[i] = counts.get(i, 0) + c
    return counts


@dataclass(frozen=True)
class SearchPairs:
    queries: list[str]  # [n] query text
    purchased: np.ndarray  # int64 [n] item bought at the end of the session
    hard_negatives: np.ndarray  # int64 [n, H] clicked but not purchased; -1 pads


def search_pairs(dataset: Any, split: str = "train", max_hard: int = 4) -> SearchPairs:
    """(query, purchased item, hard negatives) of the split's sessions that ended in a purchase.

    Raises:
        DataError: the dataset has no search sessions.
    """
    sessions = dataset.search_sessions()
    if sessions is None:
        raise DataError(f"dataset {dataset.name!r} has no search sessions; the scl source needs them")
    users = sessions.column("user_id").to_numpy().astype(np.int64)
    purchased = sessions.column("purchased").to_numpy().astype(np.int64)
    keep = _user_mask(users, split) & (purchased >= 0)
    idx = np.flatnonzero(keep)
    queries_all = sessions.column("query").to_pylist()
    clicked_all = sessions.column("clicked").to_pylist()
    hard = np.full((len(idx), max_hard), -1, dtype=np.int64)
    queries: list[str] = []
    for row, i in enumerate(idx.tolist()):
        queries.append(queries_all[i] or "")
        negs = [c for c in dict.fromkeys(clicked_all[i] or []) if c != purchased[i]][:max_hard]
        hard[row, : len(negs)] = negs
    return SearchPairs(queries, purchased[idx], hard)
