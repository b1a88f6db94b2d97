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
from ranker.metrics import LONG_TAIL_IMPRESSIONS, PredictionStream
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


def train_item_counts(dataset: Any, space: Any, limit: int | None = None, rows: int = 1 << 20) -> np.ndarray:
    """How often each item (by ``space``'s item index) was an impression target in the first ``limit``
    train impressions: int64 ``[n_items + 1]`` (index 0, unknown items, stays 0). Streamed; the array
    is sized by the item vocabulary."""
    counts = np.zeros(space.items.size, np.int64)
    cols = dataset.impressions("train")
    n = len(cols) if limit is None else min(len(cols), max(0, limit))
    for lo in range(0, n, rows):
        idx = space.items.lookup(np.asarray(cols.column("item_id")[lo:min(lo + rows, n)]))
        counts += np.bincount(idx, minlength=len(counts))
    counts[0] = 0
    return counts


def evaluate(model: CTRModel, builder: BatchBuilder, dataset: Any, split: str = "test", batch_size: int = 1024,
             limit: int | None = None, item_counts: np.ndarray | None = None, world: int = 1,
             rank: int = 0, stream: PredictionStream | None = None, block: int | None = None) -> dict[str, Any]:
    """Metrics (overall and slices) of ``model`` on ``split`` of ``dataset``, exact and in bounded
    memory (predictions spill to disk, see :class:`ranker.metrics.PredictionStream`).

    ``item_counts`` (:func:`train_item_counts`) gives the long-tail slice. ``world``/``rank``: this
    process predicts only its share (blocks of ``block`` rows, default ``SHUFFLE_BUFFER``; a multiple of
    ``batch_size`` gives every rank the batches one process builds); with ``stream`` given the predictions
    go there (the caller merges the ranks' streams, :func:`ranker.distributed.evaluate_sharded`) and the
    result is empty.
    """
    own = stream is None
    stream = stream or PredictionStream(with_tail=item_counts is not None)
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    try:
        with torch.no_grad():
            for raw in iter_impression_batches(dataset, split, batch_size, limit=limit, world=world, rank=rank,
                                               block=block):
                batch = builder.build(raw["user_id"], raw["item_id"], raw["hist_len"])
                if device.type != "cpu":
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                probs = model(batch)["prob"].cpu().numpy().astype(np.float64)
                tail = None
                if item_counts is not None:
                    tail = item_counts[builder.space.items.lookup(raw["item_id"])] < LONG_TAIL_IMPRESSIONS
                stream.add(raw["user_id"], raw["label"], probs, raw["hist_len"], tail)
        if not own:
            return {}
        metrics = stream.metrics()
    finally:
        if own:
            stream.close()
    metrics["split"] = split
    log.info("%s on %s/%s: %s", model.name, dataset.name, split, metrics["overall"])
    return metrics


def evaluate_run(settings: Settings, run_id: int, split: str = "test", limit: int | None = None,
                 batch_size: int | None = None, vectors_for: VectorsFor | None = None,
                 dist: Any = None) -> dict[str, Any]:
    """Reload run ``run_id``'s checkpoint, evaluate it on ``split`` and store the metrics in its row.

    ``batch_size`` defaults to the run's own evaluation batch (``eval_batch_size``), so that the
    predictions are those of the run's evaluation.

    ``vectors_for(source, dataset)`` gives the item vectors when the run's model reads them (the
    caller injects it, e.g. the CLI with the embedding stage's ``item_vectors``). ``dist`` (a
    :class:`ranker.distributed.Dist`): this process is one rank; the ranks share the split and rank 0
    stores the merged metrics (the same floats as one process).
    """
    from muse.data.format import Dataset
    from ranker.runs import finish_run, get_run, load_run

    loaded = load_run(settings, run_id)
    info = get_run(settings, run_id)
    dataset = Dataset.open(settings, loaded.dataset)
    vectors = run_vectors(loaded.model, loaded.source, loaded.dataset, vectors_for)
    builder = open_builder(dataset, loaded.model.retrieval, loaded.model.config, vectors, loaded.space)
    counts = train_item_counts(dataset, loaded.space, loaded.train_config.get("max_train"))
    batch_size = int(batch_size or loaded.train_config.get("eval_batch_size") or 1024)
    if dist is None:
        metrics = evaluate(loaded.model, builder, dataset, split, batch_size, limit, counts)
    else:
        from ranker.distributed import evaluate_sharded

        metrics = evaluate_sharded(dist, loaded.model, builder, dataset, split, batch_size, limit, counts)
    if dist is None or dist.is_main:
        finish_run(settings, run_id, status=info.status, metrics={**info.metrics, **metrics})
    return metrics

