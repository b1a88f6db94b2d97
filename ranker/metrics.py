"""CTR metrics: AUC, GAUC (per-user AUC weighted by impressions, one-class users skipped), logloss,
overall and on slices (long-tail targets, users with long histories)."""

from __future__ import annotations

from typing import Any

import numpy as np

from muse.errors import DataError

#: A target is long-tail when it was an impression target fewer than this many times in train
#: (the embedding evaluation's long tail counts history occurrences instead:
#: ``indexer.pairs.LONG_TAIL_HISTORY_COUNT``).
LONG_TAIL_IMPRESSIONS = 5
#: Impressions whose history is at least this quantile of the evaluated histories form the slice
#: "long_history".
LONG_HISTORY_QUANTILE = 0.75
#: Probabilities are clipped to [EPS, 1 - EPS] in the logloss.
EPS = 1e-7


def _grouped_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group AUC (Mann-Whitney with average ranks for ties).

    Returns:
        ``(auc [G], n [G])`` per distinct group (NaN AUC where the group has one class).
    """
    order = np.lexsort((scores, groups))  # by group, then score
    g, s, y = groups[order], scores[order], labels[order]
    n = len(g)
    new_group = np.r_[True, g[1:] != g[:-1]]
    group_id = np.cumsum(new_group) - 1  # [n]
    group_start = np.flatnonzero(new_group)  # [G]
    rank = np.arange(n) - group_start[group_id] + 1.0  # 1-based rank within the group
    new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    rank = (np.bincount(tie_id, weights=rank) / np.bincount(tie_id))[tie_id]  # average rank of ties
    n_g = np.bincount(group_id).astype(np.float64)
    n_pos = np.bincount(group_id, weights=y)
    n_neg = n_g - n_pos
    rank_pos = np.bincount(group_id, weights=rank * y)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc, n_g


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    labels, scores = _check(labels, scores)
    if len(labels) == 0:
        return float("nan")
    value, _ = _grouped_auc(np.zeros(len(labels), np.int64), labels, scores)
    return float(value[0])


def gauc(user_ids: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC weighted by the user's impressions; users with one class are skipped."""
    labels, scores = _check(labels, scores)
    if len(labels) == 0:
        return float("nan")
    per_user, n = _grouped_auc(np.asarray(user_ids, np.int64), labels, scores)
    ok = ~np.isnan(per_user)
    if not ok.any():
        return float("nan")
    return float(np.sum(per_user[ok] * n[ok]) / np.sum(n[ok]))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy of click probabilities."""
    labels, probs = _check(labels, probs)
    p = np.clip(probs, EPS, 1 - EPS)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise DataError(f"labels {labels.shape} and scores {scores.shape} must be 1-D of the same length")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise DataError(f"labels must be 0 or 1, got values {np.unique(labels)[:5].tolist()}")
    if not np.isfinite(scores).all():
        raise DataError("scores contain NaN or infinity")
    return labels, scores


def summary(user_ids: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``{"auc", "gauc", "logloss", "n"}`` of one set of predictions."""
    return {
        "auc": auc(labels, probs),
        "gauc": gauc(user_ids, labels, probs),
        "logloss": logloss(labels, probs) if len(labels) else float("nan"),
        "n": int(len(labels)),
    }


def evaluate_predictions(
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    hist_lens: np.ndarray,
    train_item_counts: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Overall metrics and the slices ``long_tail`` (targets seen < LONG_TAIL_IMPRESSIONS times in train,
    when ``train_item_counts`` is given) and ``long_history`` (history length >= the
    LONG_HISTORY_QUANTILE quantile)."""
    out: dict[str, Any] = {"overall": summary(user_ids, labels, probs)}
    if train_item_counts is not None:
        seen = np.fromiter((train_item_counts.get(int(i), 0) for i in item_ids), np.int64, len(item_ids))
        tail = seen < LONG_TAIL_IMPRESSIONS
        out["long_tail"] = {**summary(user_ids[tail], labels[tail], probs[tail]), "max_seen": LONG_TAIL_IMPRESSIONS - 1}
    if len(hist_lens):
        threshold = int(np.quantile(hist_lens, LONG_HISTORY_QUANTILE))
        long = hist_lens >= threshold
        out["long_history"] = {**summary(user_ids[long], labels[long], probs[long]), "min_history": threshold}
    return out
