"""The Milvus backend of the GSU: filtered vector search on a source's behaviour collection.

All targets of a request go in one ``search`` call filtered on ``user_id == u`` (a typed int),
limit K. Behaviours stored without a vector (all-zero rows) must rank last, as in the kernels;
Milvus Lite returns them with an exact 0.0 cosine and the 2.3 server leaves them out, so hits with
an exact 0.0 (or NaN) score are dropped and the search is widened until K real hits are found or
the history is exhausted. (A real behaviour exactly orthogonal to the target would be dropped too,
as in the MUSE release, which maps an exact 0 similarity to the missing score.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MilvusTopK:
    """Per target, best first: ``positions``/``item_ids`` int64[n], ``scores`` float32[n] (n <= K)."""

    positions: list[np.ndarray]
    item_ids: list[np.ndarray]
    scores: list[np.ndarray]


def _real(hits: list[Any]) -> list[Any]:
    return [h for h in hits if h.score != 0.0 and not math.isnan(h.score)]


def milvus_topk(
    store: Any, ref: Any, user_id: int, targets: np.ndarray, k: int, consistency_level: str | None = None
) -> MilvusTopK:
    """Cosine top-``k`` of each target over one user's behaviours, through Milvus.

    Args:
        store: a :class:`muse.vectorstore.VectorStore`.
        ref: the :class:`muse.vectorstore.CollectionRef` (dataset, source, version) searched.
        user_id: the user (an int; never pasted as text).
        targets: ``[B, d]`` float32 target vectors.
        k: results per target (1..``muse.vectorstore.MAX_QUERY_WINDOW``).
        consistency_level: None = the collection's ``Strong`` (sees every finished write, but on a
            server waits 200-400 ms for the time tick first); ``Bounded`` / ``Eventually`` skip the
            wait and may miss the last seconds of writes.

    Raises:
        ValueError: ``k`` out of range or an unknown consistency level (from the store).
    """
    from muse.vectorstore import MAX_QUERY_WINDOW

    t = np.atleast_2d(np.asarray(targets, dtype=np.float32))  # [B, d]
    limit = k
    while True:
        raw = store.search_behaviours(ref, int(user_id), t, limit, consistency_level=consistency_level)
        real = [_real(hits) for hits in raw]
        # Widen only when missing-vector hits took slots that real behaviours might fill.
        short = any(len(r) < k and len(h) == limit for r, h in zip(real, raw, strict=True))
        if not short or limit >= MAX_QUERY_WINDOW:
            break
        dropped = max(len(h) - len(r) for r, h in zip(real, raw, strict=True))
        limit = min(MAX_QUERY_WINDOW, max(2 * limit, k + 2 * dropped))
        log.debug("user %d: %d missing-vector hits, widening the search to %d", user_id, dropped, limit)
    real = [r[:k] for r in real]
    return MilvusTopK(
        positions=[np.fromiter((h.position for h in r), np.int64, len(r)) for r in real],
        item_ids=[np.fromiter((h.item_id for h in r), np.int64, len(r)) for r in real],
        scores=[np.fromiter((h.score for h in r), np.float32, len(r)) for r in real],
    )
