"""Exact, order-independent building blocks of the CTR metrics, so that a metric computed over
predictions split into any pieces (chunks of a stream, buckets on disk, ranks of a distributed
evaluation) is the very same float as over one array:

- :class:`ExactSum`: the exact sum of float64 values (integer arithmetic on their mantissas),
  rounded once at the end;
- :class:`AucCounter`: the integer pair counts behind the AUC, fed range by range of score;
- :func:`per_group_auc`: the AUC of every group (user) of predictions, which depends only on that
  group's rows;
- :func:`quantile_from_histogram`: numpy's linear quantile of integer values from their histogram.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from muse.errors import DataError

#: float64 mantissas are split into a high and a low half of this many bits, so int64 sums of up to
#: 2**35 halves cannot overflow.
_HALF_BITS = 27
_EXP_MIN, _EXP_MAX = -1080, 1030  # np.frexp exponents of finite float64 values lie inside


class ExactSum:
    """The exact sum of float64 values, added in any order and any number of pieces.

    Each value is ``m * 2**(e - 53)`` with an integer ``m`` (``np.frexp``); the ``m`` are summed per
    exponent as integers, so the result is the true sum, rounded to float once (:meth:`value`).
    """

    def __init__(self) -> None:
        self._acc: dict[int, int] = {}
        self.n = 0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        if len(v) == 0:
            return
        if not np.isfinite(v).all():
            raise DataError("ExactSum: values contain NaN or infinity")
        mant, exp = np.frexp(v)
        m = (mant * float(2**53)).astype(np.int64)  # exact: |m| < 2**53
        hi = m >> _HALF_BITS
        lo = m - (hi << _HALF_BITS)
        for start in range(0, len(v), 1 << 30):  # int64 bins never overflow within a piece
            sl = slice(start, start + (1 << 30))
            bins_hi = np.zeros(_EXP_MAX - _EXP_MIN, np.int64)
            bins_lo = np.zeros(_EXP_MAX - _EXP_MIN, np.int64)
            np.add.at(bins_hi, exp[sl] - _EXP_MIN, hi[sl])
            np.add.at(bins_lo, exp[sl] - _EXP_MIN, lo[sl])
            for b in np.flatnonzero(bins_hi | bins_lo):
                e = int(b) + _EXP_MIN
                self._acc[e] = self._acc.get(e, 0) + (int(bins_hi[b]) << _HALF_BITS) + int(bins_lo[b])
        self.n += len(v)

    def merge(self, other: ExactSum) -> None:
        for e, m in other._acc.items():
            self._acc[e] = self._acc.get(e, 0) + m
        self.n += other.n

    def fraction(self) -> Fraction:
        if not self._acc:
            return Fraction(0)
        low = min(self._acc)
        total = sum(m << (e - low) for e, m in self._acc.items())
        shift = low - 53
        return Fraction(total * 2**shift) if shift >= 0 else Fraction(total, 2**-shift)

    def value(self) -> float:
        return float(self.fraction())

    def mean(self) -> float:
        """The correctly rounded mean of the values added (NaN when none were)."""
        return float(self.fraction() / self.n) if self.n else float("nan")


def _int_dot(a: np.ndarray, b: np.ndarray) -> int:
    """Exact ``sum(a * b)`` of non-negative int64 arrays whose products fit in int64."""
    p = a.astype(np.int64) * b.astype(np.int64)
    pad = (-len(p)) % 1024
    blocks = np.concatenate([p, np.zeros(pad, np.int64)]).reshape(-1, 1024).sum(axis=1)  # < 2**63 each
    return sum(int(x) for x in blocks)


class AucCounter:
    """Exact AUC over predictions fed in increasing ranges of score (each call's scores all >= the
    previous call's, with equal scores in one call): integer counts of won and tied pairs."""

    def __init__(self) -> None:
        self.wins2 = 0  # 2 x (pairs won) + (pairs tied)
        self.neg_below = 0  # negatives seen so far (all score below the current range)
        self.pos = 0

    def add(self, labels: np.ndarray, scores: np.ndarray) -> None:
        if len(scores) == 0:
            return
        order = np.argsort(scores, kind="stable")
        s, y = scores[order], labels[order] > 0.5
        new = np.r_[True, s[1:] != s[:-1]]
        tie = np.cumsum(new) - 1  # distinct-score id
        pos = np.bincount(tie, weights=y).astype(np.int64)
        neg = np.bincount(tie).astype(np.int64) - pos
        neg_before = np.concatenate([[0], np.cumsum(neg)[:-1]]) + self.neg_below  # negatives strictly below
        # each positive beats every negative below it and ties with the negatives at its score
        self.wins2 += 2 * _int_dot(pos, neg_before) + _int_dot(pos, neg)
        self.neg_below += int(neg.sum())
        self.pos += int(pos.sum())

    def add_tie(self, n_pos: int, n_neg: int) -> None:
        """Add ``n_pos`` positives and ``n_neg`` negatives that all have the same score, above every
        score added so far."""
        self.wins2 += 2 * n_pos * self.neg_below + n_pos * n_neg
        self.neg_below += n_neg
        self.pos += n_pos

    def value(self) -> float:
        if self.pos == 0 or self.neg_below == 0:
            return float("nan")
        return float(Fraction(self.wins2, 2 * self.pos * self.neg_below))


def per_group_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group AUC (Mann-Whitney with average ranks for ties) of every distinct group.

    Returns:
        ``(auc [G], n [G])`` in increasing group order (NaN AUC where the group has one class). A
        group's values depend only on its own rows (and their order), whatever else is in the arrays.
    """
    order = np.lexsort((scores, groups))  # by group, then score (stable)
    g, s, y = groups[order], scores[order], labels[order]
    n = len(g)
    if n == 0:
        return np.zeros(0), np.zeros(0)
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


def quantile_from_histogram(counts: np.ndarray, q: float) -> float:
    """``np.quantile(values, q)`` (linear method) of the integer values whose histogram is ``counts``
    (``counts[v]`` = how many values equal ``v``), without the values."""
    n = int(counts.sum())
    if n == 0:
        return float("nan")
    cum = np.cumsum(counts)
    virtual = q * (n - 1)
    lo = math.floor(virtual)
    t = virtual - lo
    a = float(np.searchsorted(cum, lo, side="right"))  # the value at sorted index lo
    b = float(np.searchsorted(cum, min(lo + 1, n - 1), side="right"))
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t
