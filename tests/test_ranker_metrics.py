"""AUC, GAUC and logloss against brute-force definitions; slices."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from muse.errors import DataError
from ranker.metrics import LONG_TAIL_IMPRESSIONS, auc, evaluate_predictions, gauc, logloss


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_equals_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200).astype(float)
    scores = np.round(rng.random(200), 1)  # many ties
    assert auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)
    assert auc(np.array([0, 0, 1, 1.0]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert math.isnan(auc(np.ones(3), np.arange(3.0)))


def test_gauc_weights_users_by_impressions_and_skips_one_class_users() -> None:
    rng = np.random.default_rng(1)
    users = rng.integers(0, 12, 300)
    labels = rng.integers(0, 2, 300).astype(float)
    labels[users == 3] = 1.0  # one-class user: skipped
    scores = rng.random(300)
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if labels[m].min() == labels[m].max():
            continue
        num += _pairwise_auc(labels[m], scores[m]) * m.sum()
        den += m.sum()
    assert gauc(users, labels, scores) == pytest.approx(num / den, abs=1e-12)


def test_logloss_and_bad_input() -> None:
    labels, probs = np.array([1.0, 0.0]), np.array([0.8, 0.3])
    assert logloss(labels, probs) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    with pytest.raises(DataError, match="0 or 1"):
        auc(np.array([2.0, 0.0]), np.array([0.1, 0.2]))
    with pytest.raises(DataError, match="NaN"):
        auc(np.array([1.0, 0.0]), np.array([np.nan, 0.2]))


def test_slices_select_long_tail_targets_and_long_histories() -> None:
    users = np.array([1, 1, 2, 2, 3, 3, 4, 4])
    items = np.array([10, 11, 10, 12, 13, 11, 10, 12])
    labels = np.array([1, 0, 0, 1, 1, 0, 1, 0.0])
    probs = np.linspace(0.1, 0.8, 8)
    hist = np.array([5, 5, 9, 9, 100, 100, 200, 200])
    counts = {10: 50, 11: LONG_TAIL_IMPRESSIONS - 1, 12: 1}  # 13 never seen
    out = evaluate_predictions(users, items, labels, probs, hist, counts)
    assert out["overall"]["n"] == 8
    assert out["long_tail"]["n"] == 5  # items 11, 12, 13
    assert out["long_history"]["min_history"] == 125  # 0.75 quantile of hist, linear interpolation
    assert out["long_history"]["n"] == 2  # the two impressions with 200 behaviours


@pytest.mark.parametrize("bucket_rows", [1_000_000, 97, 5])
def test_streamed_metrics_equal_the_in_ram_ones_exactly(bucket_rows: int) -> None:
    """Predictions spilled to disk in batches and evaluated in buckets (users, score ranges, a tied
    score too big for a bucket) give the very same floats as the arrays evaluated at once."""
    from ranker.metrics import PredictionStream

    rng = np.random.default_rng(3)
    n = 2_000
    users = rng.integers(0, 150, n)
    items = rng.integers(0, 40, n)
    labels = rng.integers(0, 2, n).astype(float)
    probs = np.round(rng.random(n), 2)  # many ties across users
    probs[:300] = 0.125  # one score shared by 300 predictions (more than a small bucket)
    hist = rng.integers(0, 1_000, n)
    counts = {i: int(c) for i, c in enumerate(rng.integers(0, 10, 40))}
    whole = evaluate_predictions(users, items, labels, probs, hist, counts)
    tail = np.array([counts.get(int(i), 0) < LONG_TAIL_IMPRESSIONS for i in items])
    with PredictionStream(with_tail=True, bucket_rows=bucket_rows) as stream:
        for lo in range(0, n, 333):
            sl = slice(lo, lo + 333)
            stream.add(users[sl], labels[sl], probs[sl], hist[sl], tail[sl])
        streamed = stream.metrics()
    assert streamed == whole
    assert whole["overall"]["auc"] == pytest.approx(_pairwise_auc(labels, probs), abs=1e-15)
    assert whole["long_history"]["min_history"] == int(np.quantile(hist, 0.75))
    terms = -(labels * np.log(np.clip(probs, 1e-7, 1 - 1e-7)) + (1 - labels) * np.log(1 - np.clip(probs, 1e-7, 1 - 1e-7)))
    assert whole["overall"]["logloss"] == pytest.approx(math.fsum(terms) / n, rel=1e-15)


def test_exact_sum_is_order_independent() -> None:
    from ranker.exact import ExactSum

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=10_000) * 10.0 ** rng.integers(-30, 30, 10_000), [1e300, -1e300, 1e-300]])
    a, b = ExactSum(), ExactSum()
    a.add(values)
    for part in np.array_split(rng.permutation(values), 7):
        b.add(part)
    assert a.value() == b.value() == math.fsum(values)
