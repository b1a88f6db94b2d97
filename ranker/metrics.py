"""CTR metrics: AUC, GAUC (per-user AUC weighted by impressions, one-class users skipped), logloss,
overall and on slices (long-tail targets, users with long histories).

:class:`PredictionStream` takes predictions batch by batch and computes every metric exactly,
whatever their number: predictions go to a spill file on disk; the GAUC is computed over buckets of
whole users, the AUC over buckets of score ranges in increasing order, the logloss and the GAUC's
weighted sum with :class:`ranker.exact.ExactSum`; no bucket holds more than ``bucket_rows``
predictions in RAM. Each quantity is exact (integer counts, exact sums rounded once) or a function of
one user's rows only, so the result is the same float however the predictions are split: one array,
a stream, buckets, or the ranks of a distributed evaluation. The array functions (:func:`auc`,
:func:`gauc`, :func:`logloss`, :func:`evaluate_predictions`) are the same computation on one bucket.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from muse.errors import DataError
from ranker.exact import AucCounter, ExactSum, per_group_auc, quantile_from_histogram

#: A target is long-tail when it was an impression target fewer than this many times in train
#: (the embedding evaluation's long tail counts history occurrences instead:
#: ``indexer.pairs.LONG_TAIL_IMPRESSIONS_COUNT``).
LONG_TAIL_IMPRESSIONS = 5
#: Impressions whose history is at least this quantile of the evaluated histories form the slice
#: "long_history".
LONG_HISTORY_QUANTILE = 0.75
#: Probabilities are clipped to [EPS, 1 - EPS] in the logloss.
EPS = 1e-7
#: At most this many predictions are held in RAM at once by a :class:`PredictionStream` (22 bytes
#: each; the metrics over one bucket take a few times that: about 0.1 GB at this size).
BUCKET_ROWS = 1_000_000
#: One spilled prediction.
RECORD = np.dtype([("user", "<i8"), ("prob", "<f8"), ("hist", "<i4"), ("label", "i1"), ("tail", "i1")])
SLICES = ("overall", "long_tail", "long_history")
_READ_ROWS = 1 << 20


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


def _loss_terms(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, EPS, 1 - EPS)
    return -(labels * np.log(p) + (1 - labels) * np.log(1 - p))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (ties count half); NaN when only one class is present."""
    labels, scores = _check(labels, scores)
    counter = AucCounter()
    counter.add(labels, scores)
    return counter.value()


def gauc(user_ids: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC weighted by the user's impressions; users with one class are skipped."""
    labels, scores = _check(labels, scores)
    num, den = ExactSum(), ExactSum()
    per_user, n = per_group_auc(np.asarray(user_ids, np.int64), labels, scores)
    ok = ~np.isnan(per_user)
    num.add(per_user[ok] * n[ok])
    den.add(n[ok])
    return num.value() / den.value() if den.value() else float("nan")


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy of click probabilities (the exact mean, rounded once)."""
    labels, probs = _check(labels, probs)
    total = ExactSum()
    total.add(_loss_terms(labels, probs))
    return total.mean()


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
    LONG_HISTORY_QUANTILE quantile); the in-RAM form of :class:`PredictionStream`."""
    tail = None
    if train_item_counts is not None:
        seen = np.fromiter((train_item_counts.get(int(i), 0) for i in item_ids), np.int64, len(item_ids))
        tail = seen < LONG_TAIL_IMPRESSIONS
    stream = PredictionStream(with_tail=tail is not None, spill=False)
    stream.add(user_ids, labels, probs, hist_lens, tail)
    return stream.metrics()


class PredictionStream:
    """Predictions added batch by batch; :meth:`metrics` computes every metric exactly (see the module
    docstring). ``spill=False`` keeps them in RAM (small sets); otherwise they go to a file under
    ``folder`` (default: a temporary folder), removed by :meth:`close`.

    Args:
        with_tail: predictions carry a long-tail flag (the ``long_tail`` slice is reported).
        bucket_rows: at most this many predictions are loaded at once.
    """

    def __init__(self, with_tail: bool = True, spill: bool = True, folder: Path | None = None,
                 bucket_rows: int | None = None) -> None:
        self.with_tail = with_tail
        self.bucket_rows = max(1, int(BUCKET_ROWS if bucket_rows is None else bucket_rows))
        self.n = 0
        self.hist_counts = np.zeros(1, np.int64)
        self._ram: list[np.ndarray] | None = None if spill else []
        self._dir: Path | None = None
        self._owned = False
        if spill:
            if folder is None:
                self._dir, self._owned = Path(tempfile.mkdtemp(prefix="muse-eval-")), True
            else:
                self._dir = Path(folder)
                self._dir.mkdir(parents=True, exist_ok=True)
            self._spill = open(self._dir / "predictions.bin", "wb")

    def add(self, user_ids: np.ndarray, labels: np.ndarray, probs: np.ndarray, hist_lens: np.ndarray,
            tail: np.ndarray | None = None) -> None:
        labels, probs = _check(labels, probs)
        rec = np.empty(len(labels), RECORD)
        rec["user"], rec["prob"], rec["label"] = np.asarray(user_ids, np.int64), probs, labels.astype(np.int8)
        hist = np.asarray(hist_lens, np.int64)
        if len(hist) and hist.min() < 0:
            raise DataError("hist_lens must be >= 0")
        rec["hist"] = hist
        rec["tail"] = np.asarray(tail, bool) if tail is not None else False
        self.add_records(rec)

    def add_records(self, rec: np.ndarray) -> None:
        """Add spilled records (``RECORD``) as they are, e.g. another process's predictions."""
        if len(rec) == 0:
            return
        counts = np.bincount(rec["hist"].astype(np.int64))
        if len(counts) > len(self.hist_counts):
            self.hist_counts = np.concatenate([self.hist_counts, np.zeros(len(counts) - len(self.hist_counts), np.int64)])
        self.hist_counts[: len(counts)] += counts
        self.n += len(rec)
        if self._ram is not None:
            self._ram.append(rec)
        else:
            self._spill.write(rec.tobytes())

    # reading back -----------------------------------------------------------------------------
    def records(self) -> Iterator[np.ndarray]:
        """The added records (``RECORD``) in chunks, in the order they were added (e.g. to send them to
        another process, which adds them with :meth:`add_records`)."""
        return self._chunks()

    def _chunks(self) -> Iterator[np.ndarray]:
        if self._ram is not None:
            yield from self._ram
            return
        self._spill.flush()
        yield from _read_file(self._dir / "predictions.bin")

    def metrics(self) -> dict[str, Any]:
        """``overall``, ``long_history`` and (``with_tail``) ``long_tail``: each ``{auc, gauc, logloss, n}``."""
        threshold = int(quantile_from_histogram(self.hist_counts, LONG_HISTORY_QUANTILE)) if self.n else 0
        slices = [s for s in SLICES if s != "long_tail" or self.with_tail]
        acc = {s: _SliceAccumulator() for s in slices}

        def masks(rec: np.ndarray) -> dict[str, np.ndarray]:
            m = {"overall": np.ones(len(rec), bool), "long_history": rec["hist"] >= threshold}
            if self.with_tail:
                m["long_tail"] = rec["tail"].astype(bool)
            return m

        if self.n <= self.bucket_rows:  # one bucket: everything at once
            rec = np.concatenate(list(self._chunks())) if self.n else np.empty(0, RECORD)
            for s, m in masks(rec).items():
                acc[s].add_users(rec[m])
                acc[s].add_scores(rec[m])
                acc[s].add_loss(rec[m])
        else:
            self._bucketed(acc, masks)
        out: dict[str, Any] = {s: acc[s].result() for s in slices}
        if self.with_tail:
            out["long_tail"]["max_seen"] = LONG_TAIL_IMPRESSIONS - 1
        if self.n:
            out["long_history"]["min_history"] = threshold
        else:
            out.pop("long_history")
        return out

    def _bucketed(self, acc: dict[str, _SliceAccumulator], masks: Any) -> None:
        """Logloss over the stream; GAUC over buckets of whole users; AUC over score ranges in order."""
        work = Path(tempfile.mkdtemp(prefix="buckets-", dir=self._dir))
        try:
            n_user_buckets = -(-self.n // self.bucket_rows)
            users = _BucketFiles(work / "users", n_user_buckets)
            for rec in self._chunks():
                for s, m in masks(rec).items():
                    acc[s].add_loss(rec[m])
                users.write(_user_bucket(rec["user"], n_user_buckets), rec)
            users.close()
            for b in range(n_user_buckets):
                rec = users.read(b)
                for s, m in masks(rec).items():
                    acc[s].add_users(rec[m])
            users.remove()
            for piece in _by_score(self._chunks, work / "scores", self.bucket_rows, shift=36):
                if isinstance(piece, np.ndarray):
                    for s, m in masks(piece).items():
                        acc[s].add_scores(piece[m])
                    continue
                tied = {s: [0, 0] for s in acc}  # one score value, too many rows to load: count them
                for rec in piece():
                    for s, m in masks(rec).items():
                        pos = int(rec["label"][m].sum())
                        tied[s][0] += pos
                        tied[s][1] += int(m.sum()) - pos
                for s, (pos, neg) in tied.items():
                    acc[s].auc.add_tie(pos, neg)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def close(self) -> None:
        if self._dir is not None and not self._spill.closed:
            self._spill.close()
        if self._owned and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PredictionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SliceAccumulator:
    """The exact pieces of one slice's metrics."""

    def __init__(self) -> None:
        self.loss = ExactSum()
        self.gauc_num, self.gauc_den = ExactSum(), ExactSum()
        self.auc = AucCounter()
        self.n = 0

    def add_loss(self, rec: np.ndarray) -> None:
        self.loss.add(_loss_terms(rec["label"].astype(np.float64), rec["prob"]))
        self.n += len(rec)

    def add_users(self, rec: np.ndarray) -> None:
        per_user, n = per_group_auc(rec["user"], rec["label"].astype(np.float64), rec["prob"])
        ok = ~np.isnan(per_user)
        self.gauc_num.add(per_user[ok] * n[ok])
        self.gauc_den.add(n[ok])

    def add_scores(self, rec: np.ndarray) -> None:
        self.auc.add(rec["label"].astype(np.float64), rec["prob"])

    def result(self) -> dict[str, float | int]:
        den = self.gauc_den.value()
        return {"auc": self.auc.value(), "gauc": self.gauc_num.value() / den if den else float("nan"),
                "logloss": self.loss.mean(), "n": int(self.n)}


def _read_file(path: Path, rows: int = _READ_ROWS) -> Iterator[np.ndarray]:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = np.memmap(path, dtype=RECORD, mode="r")
    for lo in range(0, len(data), rows):
        yield np.array(data[lo:lo + rows])
    del data


def _user_bucket(users: np.ndarray, n: int) -> np.ndarray:
    """A well-mixed bucket number of each user id (splitmix64's finaliser)."""
    x = users.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(n)).astype(np.int64)


class _BucketFiles:
    """``n`` append-only record files."""

    def __init__(self, folder: Path, n: int) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.files = [open(folder / f"{b}.bin", "wb") for b in range(n)]
        self.sizes = np.zeros(n, np.int64)

    def write(self, bucket: np.ndarray, rec: np.ndarray) -> None:
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(len(self.files) + 1))
        for b in np.flatnonzero(np.diff(bounds)):
            part = rec[order[bounds[b]:bounds[b + 1]]]
            self.files[b].write(part.tobytes())
            self.sizes[b] += len(part)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def read(self, b: int) -> np.ndarray:
        return np.fromfile(self.folder / f"{b}.bin", dtype=RECORD)

    def chunks(self, b: int) -> Iterator[np.ndarray]:
        yield from _read_file(self.folder / f"{b}.bin")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _score_key(probs: np.ndarray, shift: int) -> np.ndarray:
    """A key that orders probabilities as they are ordered (they are >= 0): their bits, shifted."""
    return (probs + 0.0).view(np.int64) >> shift  # + 0.0: -0.0 becomes 0.0


def _by_score(chunks: Any, folder: Path, bucket_rows: int, shift: int) -> Iterator[Any]:
    """The records of ``chunks()`` in pieces of increasing score ranges (equal scores in one piece):
    arrays of at most ``bucket_rows`` records, or, for a single score value with more rows than that,
    a callable giving its records in chunks."""
    keys: dict[int, int] = {}
    for rec in chunks():
        k, c = np.unique(_score_key(rec["prob"], shift), return_counts=True)
        for key, count in zip(k.tolist(), c.tolist(), strict=True):
            keys[key] = keys.get(key, 0) + count
    if not keys:
        return
    order = np.array(sorted(keys), np.int64)
    counts = np.array([keys[k] for k in order.tolist()], np.int64)
    starts = [0]  # key ranges [order[starts[i]], order[starts[i+1]]) of at most bucket_rows rows each
    size = 0
    for i, c in enumerate(counts.tolist()):
        if size and size + c > bucket_rows:
            starts.append(i)
            size = 0
        size += c
    bounds = order[starts]
    files = _BucketFiles(folder / f"shift{shift}", len(bounds))
    for rec in chunks():
        files.write(np.searchsorted(bounds, _score_key(rec["prob"], shift), side="right") - 1, rec)
    files.close()
    for b in range(len(bounds)):
        if files.sizes[b] <= bucket_rows:
            yield files.read(b)
        elif shift == 0:  # one score value only
            yield lambda b=b: files.chunks(b)
        else:
            yield from _by_score(lambda b=b: files.chunks(b), folder / f"b{b}", bucket_rows, max(0, shift - 16))
    files.remove()
