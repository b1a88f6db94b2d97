"""Offline evaluation: predictions of a model over a split and the metrics of :mod:`ranker.metrics`."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from muse.settings import Settings
from ranker.data import BatchBuilder, VectorsFor, iter_impression_batches, open_builder, run_vectors
from ranker.metrics import evaluate_predictions
from ranker.models import CTRModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Predictions:
    """One row per evaluated impression."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    hist_lens: np.ndarray


@torch.no_grad()
def predict(model: CTRModel, builder: BatchBuilder, batches: Iterable[dict[str, np.ndarray]]) -> Predictions:
    """Click probabilities of ``model`` (switched to eval mode) over raw impression ``batches``."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    cols: dict[str, list[np.ndarray]] = {"user_id": [], "item_id": [], "label": [], "prob": [], "hist_len": []}
    for raw in batches:
        batch = builder.build(raw["user_id"], raw["item_id"], raw["hist_len"])
        if device.type != "cpu":
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        cols["prob"].append(model(batch)["prob"].cpu().numpy().astype(np.float64))
        for c in ("user_id", "item_id", "label", "hist_len"):
            cols[c].append(raw[c])
    arrays = {c: np.concatenate(v) if v else np.zeros(0) for c, v in cols.items()}
    return Predictions(arrays["user_id"].astype(np.int64), arrays["item_id"].astype(np.int64),
                       arrays["label"].astype(np.float64), arrays["prob"], arrays["hist_len"].astype(np.int64))


def train_item_counts(dataset: Any, limit: int | None = None) -> dict[int, int]:
    """How often each item was an impression target in the train split (for the long-tail slice)."""
    counts: dict[int, int] = {}
    seen = 0
    for rb in dataset.iter_impressions(split="train"):
        ids = rb.column("item_id").to_numpy()
        if limit is not None:
            ids = ids[: max(0, limit - seen)]
        seen += len(ids)
        uniq, n = np.unique(ids, return_counts=True)
        for i, c in zip(uniq.tolist(), n.tolist(), strict=True):
            counts[i] = counts.get(i, 0) + c
        if limit is not None and seen >= limit:
            break
    return counts


def evaluate(model: CTRModel, builder: BatchBuilder, dataset: Any, split: str = "test", batch_size: int = 1024,
             limit: int | None = None, item_counts: dict[int, int] | None = None) -> dict[str, Any]:
    """Metrics (overall and slices) of ``model`` on ``split`` of ``dataset``."""
    preds = predict(model, builder, iter_impression_batches(dataset, split, batch_size, limit=limit))
    metrics = evaluate_predictions(preds.user_ids, preds.item_ids, preds.labels, preds.probs, preds.hist_lens,
                                   item_counts)
    metrics["split"] = split
    log.info("%s on %s/%s: %s", model.name, dataset.name, split, metrics["overall"])
    return metrics


def evaluate_run(settings: Settings, run_id: int, split: str = "test", limit: int | None = None,
                 batch_size: int = 1024, vectors_for: VectorsFor | None = None) -> dict[str, Any]:
    """Reload run ``run_id``'s checkpoint, evaluate it on ``split`` and store the metrics in its row.

    ``vectors_for(source, dataset)`` gives the item vectors when the run's model reads them (the
    caller injects it, e.g. the CLI with the embedding stage's ``item_vectors``).
    """
    from muse.data.format import Dataset
    from ranker.runs import finish_run, get_run, load_run

    loaded = load_run(settings, run_id)
    info = get_run(settings, run_id)
    dataset = Dataset.open(settings, loaded.dataset)
    vectors = run_vectors(loaded.model, loaded.source, loaded.dataset, vectors_for)
    builder = open_builder(dataset, loaded.model.retrieval, loaded.model.config, vectors, loaded.space)
    counts = train_item_counts(dataset, loaded.train_config.get("max_train"))
    metrics = evaluate(loaded.model, builder, dataset, split, batch_size, limit, counts)
    finish_run(settings, run_id, status=info.status, metrics={**info.metrics, **metrics})
    return metrics

