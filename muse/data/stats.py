"""Dataset statistics (``muse data stats``): item popularity and its long tail, history lengths,
CTR, search sessions, and for simworld the share of clicks that only the long history explains.
Also draws a PNG of the popularity curve and the history-length distribution.

Everything streams over the shards, so it works on datasets larger than memory (item and user
counters are held as arrays of unique ids).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muse.data.format import Dataset

log = logging.getLogger(__name__)

RARE_THRESHOLD = 5  # "items seen fewer than 5 times"
RECENT = 50  # the short sequence a DIN-style model sees


class _IdCounter:
    """Counts of int64 ids, merged in chunks to keep memory proportional to distinct ids."""

    def __init__(self) -> None:
        self._ids: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._pending = 0

    def add(self, ids: np.ndarray) -> None:
        u, c = np.unique(ids, return_counts=True)
        self._ids.append(u)
        self._counts.append(c)
        self._pending += len(u)
        if self._pending > 5_000_000:
            self._merge()

    def _merge(self) -> None:
        if len(self._ids) > 1:
            ids, inv = np.unique(np.concatenate(self._ids), return_inverse=True)
            counts = np.bincount(inv, weights=np.concatenate(self._counts)).astype(np.int64)
            self._ids, self._counts = [ids], [counts]
        self._pending = len(self._ids[0]) if self._ids else 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(unique ids, counts)."""
        self._merge()
        if not self._ids:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return self._ids[0], self._counts[0].astype(np.int64)


def _popularity(counts_seen: np.ndarray, n_items: int, total: int) -> dict[str, Any]:
    """Long-tail figures from per-item counts (items never seen count as 0)."""
    n_items = max(n_items, len(counts_seen))
    counts = np.sort(np.concatenate([counts_seen, np.zeros(n_items - len(counts_seen), dtype=np.int64)]))[
        ::-1
    ]
    top = max(1, int(np.ceil(0.01 * n_items)))
    rare = counts < RARE_THRESHOLD
    return {
        "n_distinct_items": int(len(counts_seen)),
        "share_on_top1pct_items": round(float(counts[:top].sum() / max(total, 1)), 4),
        "share_on_items_seen_lt5": round(float(counts[rare].sum() / max(total, 1)), 4),
        "share_of_items_seen_lt5": round(float(rare.mean()) if n_items else 0.0, 4),
        "share_of_items_never_seen": round(float((counts == 0).mean()) if n_items else 0.0, 4),
        "max_count": int(counts[0]) if len(counts) else 0,
        "median_count": float(np.median(counts)) if len(counts) else 0.0,
    }


def _distribution(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"n": 0}
    q = np.percentile(values, [10, 25, 50, 75, 90])
    return {
        "n": int(len(values)),
        "min": int(values.min()),
        "p10": float(q[0]),
        "p25": float(q[1]),
        "median": float(q[2]),
        "p75": float(q[3]),
        "p90": float(q[4]),
        "max": int(values.max()),
        "mean": round(float(values.mean()), 2),
    }


def _long_history_share(dataset: Dataset, labels: np.ndarray) -> dict[str, Any] | None:
    """From the generator's truth: how many clicks a lifelong facet explains, and how many of those
    the recent-50 behaviours cannot (the facet's key is absent from them).
    """
    path = dataset.truth_path("impressions")
    if path is None:
        return None
    truth = pq.read_table(path, columns=["explained_by", "match_key", "key_in_recent", "key_in_history"])
    if truth.num_rows != len(labels):
        log.warning("truth/impressions has %d rows but impressions %d: skipped", truth.num_rows, len(labels))
        return None
    clicked = labels == 1
    n_clicks = max(int(clicked.sum()), 1)
    lifelong = pc.equal(truth.column("explained_by"), "lifelong").to_numpy(zero_copy_only=False)
    has_facet = truth.column("match_key").to_numpy() >= 0
    in_recent = truth.column("key_in_recent").to_numpy(zero_copy_only=False)
    in_hist = truth.column("key_in_history").to_numpy(zero_copy_only=False)
    only_long = clicked & lifelong & ~in_recent
    explained = truth.column("explained_by").to_numpy(zero_copy_only=False)
    return {
        "clicks_by_explanation": {
            k: round(float((clicked & (explained == k)).sum() / n_clicks), 4)
            for k in ("lifelong", "recent", "other")
        },
        # the headline number: clicks whose matching lifelong facet is absent from the recent 50
        "share_clicks_facet_absent_from_recent50": round(float(only_long.sum() / n_clicks), 4),
        # of those, how many the visible long history can recover (the facet appears earlier)
        "share_clicks_facet_only_in_long_history": round(float((only_long & in_hist).sum() / n_clicks), 4),
        # clicks on an item matching one of the user's facets (whatever explains them best),
        # that facet absent from the recent 50
        "share_clicks_on_facet_items_absent_from_recent50": round(
            float((clicked & has_facet & ~in_recent).sum() / n_clicks), 4
        ),
        "recent_window": RECENT,
    }


def dataset_stats(dataset: Dataset, plot_path: Path | None = None) -> dict[str, Any]:
    """Compute the statistics of ``dataset``; when ``plot_path`` is given also write the PNG there."""
    imp_counter, beh_counter = _IdCounter(), _IdCounter()
    labels_parts, split_parts, hist_len_parts = [], [], []
    for batch in dataset.iter_impressions(batch_size=262_144):
        imp_counter.add(batch.column("item_id").to_numpy())
        labels_parts.append(batch.column("label").to_numpy())
        split_parts.append(pc.equal(batch.column("split"), "test").to_numpy(zero_copy_only=False))
        hist_len_parts.append(batch.column("hist_len").to_numpy())
    labels = np.concatenate(labels_parts) if labels_parts else np.zeros(0, dtype=np.int8)
    is_test = np.concatenate(split_parts) if split_parts else np.zeros(0, dtype=bool)
    imp_hist_len = np.concatenate(hist_len_parts) if hist_len_parts else np.zeros(0, dtype=np.int32)

    lengths_parts = []
    for batch in dataset.iter_histories(batch_size=4096, columns=["item_ids"]):
        col = batch.column("item_ids")
        lengths_parts.append(pc.list_value_length(col).to_numpy(zero_copy_only=False))
        beh_counter.add(col.flatten().to_numpy())
    lengths = np.concatenate(lengths_parts) if lengths_parts else np.zeros(0, dtype=np.int64)

    n_items = dataset.n_items
    imp_ids, imp_counts = imp_counter.result()
    beh_ids, beh_counts = beh_counter.result()
    n_imp = len(labels)
    stats: dict[str, Any] = {
        "name": dataset.name,
        "kind": dataset.kind,
        "n_items": n_items,
        "n_users": dataset.n_users,
        "n_impressions": n_imp,
        "n_behaviours": int(lengths.sum()),
        "ctr": round(float(labels.mean()), 4) if n_imp else None,
        "splits": {
            split: {"n": int(mask.sum()), "ctr": round(float(labels[mask].mean()), 4) if mask.any() else None}
            for split, mask in (("train", ~is_test), ("test", is_test))
        },
        "impression_popularity": _popularity(imp_counts, n_items, n_imp),
        "behaviour_popularity": _popularity(beh_counts, n_items, int(lengths.sum())),
        "history_length": _distribution(lengths),
        "impression_hist_len": _distribution(imp_hist_len),
        "users_without_history": int((lengths == 0).sum()),
        "impressions_with_empty_history": int((imp_hist_len == 0).sum()),
    }
    sessions = dataset.search_sessions()
    if sessions is not None:
        n_s = sessions.num_rows
        stats["search_sessions"] = {
            "n": n_s,
            "purchase_rate": round(
                float(pc.sum(pc.not_equal(sessions.column("purchased"), -1)).as_py() / n_s), 4
            )
            if n_s
            else None,
            "mean_clicks": round(float(pc.mean(pc.list_value_length(sessions.column("clicked"))).as_py()), 3)
            if n_s
            else None,
        }
    if dataset.kind == "simworld":
        long_share = _long_history_share(dataset, labels)
        if long_share is not None:
            stats["long_history"] = long_share
    if plot_path is not None:
        plot_stats(imp_counts, beh_counts, lengths, Path(plot_path), title=dataset.name)
        stats["plot"] = str(plot_path)
    return stats


def plot_stats(
    imp_counts: np.ndarray, beh_counts: np.ndarray, lengths: np.ndarray, path: Path, title: str
) -> None:
    """Write a two-panel PNG: rank-frequency popularity curves (log-log) and history lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for counts, label in ((imp_counts, "impressions"), (beh_counts, "behaviours")):
        if len(counts):
            c = np.sort(counts)[::-1]
            ax1.loglog(np.arange(1, len(c) + 1), c, label=label)
    ax1.axhline(RARE_THRESHOLD, color="grey", ls=":", lw=1, label=f"{RARE_THRESHOLD} occurrences")
    ax1.set_xlabel("item rank")
    ax1.set_ylabel("occurrences")
    ax1.set_title("item popularity")
    ax1.legend()
    if len(lengths):
        ax2.hist(lengths, bins=50, color="tab:green")
    ax2.set_xlabel("history length (behaviours)")
    ax2.set_ylabel("users")
    ax2.set_title("history lengths")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_stats(dataset: Dataset, stats: dict[str, Any]) -> Path:
    """Save ``stats`` as ``stats.json`` in the dataset folder and return its path."""
    path = dataset.path / "stats.json"
    path.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return path
