"""Intrinsic evaluation of embedding sources on the held-out users of a dataset.

Metrics (each overall and on the long-tail slice, i.e. target items seen fewer than
:data:`indexer.pairs.LONG_TAIL_HISTORY_COUNT` times in the training histories):

- ``q2p_recall@10`` / ``q2p_recall@50``: a search query's vector ranks every item of the dataset;
  a hit when the purchased item is in the top K. Needs a text tower trained on text, so it is
  ``None`` for ``i2i`` (image-only training), ``id`` and imported sources.
- ``i2i_recall@10``: an item's vector ranks every other item; a hit when the item that co-occurs
  with it (within the co-occurrence window of a held-out history) is in the top 10.
  Long-tail here means the query item is long-tail (the GSU case: a niche target item).

A ``random`` baseline scores random unit vectors the same way. Items without a vector under a
source never rank (they count as misses), so missing vectors cost recall instead of vanishing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from indexer import pairs as pairs_mod
from indexer.encode import ensure_imported, load_encoder, open_dataset
from indexer.item_vectors import ItemVectors, item_vectors
from indexer.source_registry import IMPORTED_SOURCES, get_version, update_metrics
from muse.arrays import l2_normalise, lookup
from muse.settings import Settings

log = logging.getLogger(__name__)

Q2P_KS = (10, 50)
I2I_K = 10
RANDOM = "random"
#: A mean cosine between random different items above this means the encoder collapsed: every item
#: points the same way, so GSU scores are all ~1 and carry no relevance signal.
COLLAPSE_COSINE = 0.9
#: Fewer held-out queries or pairs than this and one hit moves recall by more than 0.02: too few for
#: recall to tell sources apart.
MIN_EVAL_SAMPLES = 50
#: Sources whose text tower was trained on text (titles or queries), so queries can be encoded.
TEXT_TRAINED_SOURCES = ("scl", "openclip")


@dataclass(frozen=True)
class EvalData:
    """The held-out queries and pairs of one dataset, shared by every source evaluated on it."""

    queries: list[str]  # [nq] held-out search queries
    purchased: np.ndarray  # int64 [nq]
    pairs: np.ndarray  # int64 [np, 2] held-out (item, co-occurring item)
    seen: dict[int, int]  # item id -> times seen in training histories


def load_eval_data(dataset: Any, max_queries: int = 2000, max_pairs: int = 2000, seed: int = 0) -> EvalData:
    """Held-out search sessions (with a purchase) and co-occurrence pairs, subsampled to the caps."""
    rng = np.random.default_rng(seed)
    if dataset.search_sessions() is not None:
        sp = pairs_mod.search_pairs(dataset, "test", max_hard=1)
        keep = np.sort(rng.choice(len(sp.purchased), size=min(max_queries, len(sp.purchased)), replace=False))
        queries, purchased = [sp.queries[i] for i in keep], sp.purchased[keep]
    else:
        queries, purchased = [], np.zeros(0, np.int64)
    pairs = pairs_mod.cooccurrence_pairs(dataset, "test", window=1, max_pairs=max_pairs, seed=seed)
    return EvalData(queries, purchased, pairs, pairs_mod.item_seen_counts(dataset))


def mean_pair_cosine(vectors: np.ndarray, present: np.ndarray | None = None, n_pairs: int = 1000,
                     seed: int = 0) -> float | None:
    """Mean cosine of ``n_pairs`` random pairs of different rows of ``vectors`` (``[n, d]``, unit rows).

    Random unit vectors in 128-d score ~0; a collapsed encoder scores near 1 (see :data:`COLLAPSE_COSINE`).
    ``present`` (bool ``[n]``) drops rows without a vector. None when fewer than 2 rows are left.
    """
    v = np.asarray(vectors, dtype=np.float32)
    if present is not None:
        v = v[np.asarray(present, bool)]
    if len(v) < 2:
        return None
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(v), n_pairs)
    b = (a + rng.integers(1, len(v), n_pairs)) % len(v)  # never the same row
    return round(float(np.mean(np.sum(v[a] * v[b], axis=1))), 4)


def collapse_note(mean_cosine: float | None) -> str | None:
    """A sentence for the user when ``mean_cosine`` says the encoder collapsed, else None."""
    if mean_cosine is None or mean_cosine <= COLLAPSE_COSINE:
        return None
    return (f"mean cosine between random items is {mean_cosine:.2f} (> {COLLAPSE_COSINE}): the encoder has "
            "collapsed (every item points the same way), so its retrieval scores carry no signal")


def small_set_notes(metrics: dict[str, Any]) -> list[str]:
    """Sentences saying which recalls of one source rest on too few held-out samples to mean anything."""
    notes = []
    for metric, key, what in (
        ("q2p_recall@10", "n_queries", "q2p recall: {n} held-out queries"),
        ("q2p_recall@10_tail", "n_queries_tail", "q2p tail recall: {n} long-tail queries"),
        ("i2i_recall@10", "n_pairs", "i2i recall: {n} held-out pairs"),
        ("i2i_recall@10_tail", "n_pairs_tail", "i2i tail recall: {n} long-tail pairs"),
    ):
        n = metrics.get(key)
        if metrics.get(metric) is None or n is None or n >= MIN_EVAL_SAMPLES:
            continue
        step = f"one hit moves it by {1 / n:.3f}" if n else "nothing to score"
        notes.append(f"{what.format(n=n)} (< {MIN_EVAL_SAMPLES}): {step}, too few to compare sources")
    return notes


def _long_tail(seen: dict[int, int], item_ids: np.ndarray) -> np.ndarray:
    return np.fromiter((seen.get(int(i), 0) < pairs_mod.LONG_TAIL_HISTORY_COUNT for i in item_ids), bool,
                       count=len(item_ids))


def rank_hits(
    queries: np.ndarray, corpus: np.ndarray, valid: np.ndarray, targets: np.ndarray, k: int,
    exclude: np.ndarray | None = None, batch: int = 1024,
) -> np.ndarray:
    """bool ``[nq]``: whether ``targets[i]`` (a corpus row, -1 = absent) is in the top ``k`` of query i.

    Args:
        queries: ``[nq, d]`` unit vectors; corpus: ``[n, d]`` unit vectors; valid: ``[n]`` bool
            (invalid corpus rows never rank); exclude: ``[nq]`` corpus row to drop per query (-1: none).
    """
    c = torch.as_tensor(corpus, dtype=torch.float32)  # [n, d]
    invalid = torch.as_tensor(~valid)  # [n]
    hits = np.zeros(len(queries), bool)
    k_eff = min(k, len(corpus))
    for start in range(0, len(queries), batch):
        q = torch.as_tensor(queries[start : start + batch], dtype=torch.float32)  # [b, d]
        scores = (q @ c.T).masked_fill(invalid, float("-inf"))  # [b, n]
        if exclude is not None:
            ex = torch.as_tensor(exclude[start : start + batch])  # [b]
            rows = torch.nonzero(ex >= 0).squeeze(1)
            scores[rows, ex[rows]] = float("-inf")
        top = scores.topk(k_eff, dim=1).indices  # [b, k]
        t = torch.as_tensor(targets[start : start + batch]).view(-1, 1)  # [b, 1]
        hits[start : start + len(q)] = ((top == t).any(dim=1) & (t.squeeze(1) >= 0)).numpy()
    return hits


def _rate(hits: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    sel = hits if mask is None else hits[mask]
    return round(float(sel.mean()), 4) if len(sel) else None


def _rows(table: ItemVectors, item_ids: np.ndarray) -> np.ndarray:
    """Corpus row of each item id (-1 when not in the dataset)."""
    return lookup(table.item_ids, item_ids)


def score_vectors(
    data: EvalData, table: ItemVectors, query_vectors: np.ndarray | None
) -> dict[str, float | int | None]:
    """All metrics for one item-vector table (and query vectors, when the source has a text tower)."""
    out: dict[str, float | int | None] = {}
    if query_vectors is not None and len(data.queries):
        targets = _rows(table, data.purchased)
        tail = _long_tail(data.seen, data.purchased)
        for k in Q2P_KS:
            hits = rank_hits(query_vectors, table.vectors, table.present, targets, k)
            out[f"q2p_recall@{k}"] = _rate(hits)
            out[f"q2p_recall@{k}_tail"] = _rate(hits, tail)
        out["n_queries_tail"] = int(tail.sum())
    else:
        for k in Q2P_KS:
            out[f"q2p_recall@{k}"] = out[f"q2p_recall@{k}_tail"] = None
    if len(data.pairs):
        anchors, targets = _rows(table, data.pairs[:, 0]), _rows(table, data.pairs[:, 1])
        ok = anchors >= 0
        q = np.zeros((len(anchors), table.vectors.shape[1]), np.float32)
        q[ok] = table.vectors[anchors[ok]]
        has_vec = ok & table.present[np.maximum(anchors, 0)]
        hits = rank_hits(q, table.vectors, table.present, targets, I2I_K, exclude=anchors) & has_vec
        tail = _long_tail(data.seen, data.pairs[:, 0])
        out[f"i2i_recall@{I2I_K}"] = _rate(hits)
        out[f"i2i_recall@{I2I_K}_tail"] = _rate(hits, tail)
        out["n_pairs_tail"] = int(tail.sum())
    out["n_queries"] = len(data.queries)
    out["n_pairs"] = int(len(data.pairs))
    out["coverage"] = round(float(table.present.mean()), 4) if len(table.present) else 0.0
    out["mean_cosine"] = mean_pair_cosine(table.vectors, table.present)
    return out


def random_baseline(dataset: Any, data: EvalData, dim: int = 128, seed: int = 0) -> dict[str, Any]:
    """The metrics of random unit vectors for items and queries (what "no signal" scores)."""
    rng = np.random.default_rng(seed)
    ids = dataset.item_ids()
    vecs = l2_normalise(rng.standard_normal((len(ids), dim)).astype(np.float32))
    table = ItemVectors(ids, vecs, np.ones(len(ids), bool))
    qv = l2_normalise(rng.standard_normal((len(data.queries), dim)).astype(np.float32))
    return score_vectors(data, table, qv)


def evaluate_source(
    settings: Settings, source: str, dataset: Any, version: int | None = None,
    data: EvalData | None = None, store: bool = True,
) -> dict[str, Any]:
    """Evaluate one source version on ``dataset``; store the result in the row's ``metrics["eval"]``.

    Returns the metrics dict (see the module docstring), plus ``source`` and ``version``.
    """
    dataset = open_dataset(settings, dataset)
    data = data or load_eval_data(dataset)
    if source in IMPORTED_SOURCES and version is None:
        row = ensure_imported(settings, source, dataset)
    else:
        row = get_version(settings, source, version, dataset=dataset.name)
    table = item_vectors(settings, source, dataset, version=row.version).as_float()
    query_vectors = None
    if source in TEXT_TRAINED_SOURCES and data.queries:
        query_vectors = load_encoder(settings, source, row.version).encode_texts(data.queries)
    metrics = score_vectors(data, table, query_vectors)
    note = collapse_note(metrics["mean_cosine"])
    if note:
        log.warning("%s v%d on %s: %s", source, row.version, dataset.name, note)
    if store:
        evals = dict(row.metrics.get("eval", {}))
        evals[dataset.name] = metrics
        update_metrics(settings, row.id, "eval", evals)
    log.info("%s v%d on %s: %s", source, row.version, dataset.name, metrics)
    return {"source": source, "version": row.version, **metrics}
