"""How many optimiser steps a ranker run gets on a dataset of a given size, and whether a finished
run trained enough to be read as a result.

**The rule** (:func:`plan_schedule`, applied once per run by :func:`ranker.train.train` and recorded
with it under ``config["schedule"]``): an epoch has at least :data:`MIN_STEPS_PER_EPOCH` optimiser
steps. When the batch size is not given (``RankTrainConfig.batch_size=None``, the default) it is
:data:`DEFAULT_BATCH_SIZE`, or on a train split too small for that many steps at that size,
``n_train // MIN_STEPS_PER_EPOCH`` impressions (never fewer than :data:`MIN_BATCH_SIZE`). A batch
size given explicitly is used as given; the record then says how many steps per epoch it makes.

Why: the paper's one epoch at batch 256 is thousands of steps on Taobao-MM, but a 500-user set
with 10K train impressions gets 39, which leaves every model near its initial predictions (test
logloss at the base rate) while its GAUC still looks like a result.

**The verdict** (:func:`undertrained`): a run is *undertrained* when its test logloss is no better
than the base rate's (a constant prediction of the split's click rate, :func:`base_rate`) or its
training loss never fell (the mean of its last steps is not below the mean of its first). Every
place that shows a run's metrics says so in words instead of showing it as a plain result.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The batch size when none is given and the train split is large enough.
DEFAULT_BATCH_SIZE = 256
#: Optimiser steps an epoch has at least when the batch size is chosen by the rule.
MIN_STEPS_PER_EPOCH = 100
#: The rule never goes below this many impressions per step.
MIN_BATCH_SIZE = 32
#: The stated rule, as recorded with every run.
RULE = (f"batch size not given: {DEFAULT_BATCH_SIZE}, or n_train // {MIN_STEPS_PER_EPOCH} (at least "
        f"{MIN_BATCH_SIZE}) when that gives an epoch fewer than {MIN_STEPS_PER_EPOCH} optimiser steps")
#: How many steps at the start and at the end of training the loss trend compares (at most).
TREND_STEPS = 20


@dataclass(frozen=True)
class Schedule:
    """The batch size a run trains with and why (``config["schedule"]`` of the run)."""

    batch_size: int
    n_train: int  # train impressions per epoch (after --max-train)
    steps_per_epoch: int
    chosen: str  # "given" (explicit), "default" (256 is enough steps), "small set" (the rule lowered it)
    rule: str = RULE

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def batch_size_for(n_train: int, requested: int | None = None) -> Schedule:
    """The batch size for ``n_train`` train impressions per epoch (:data:`RULE`); ``requested`` (an
    explicit batch size) is kept as given."""
    n_train = max(0, int(n_train))
    if requested is not None:
        batch, chosen = int(requested), "given"
    elif n_train >= DEFAULT_BATCH_SIZE * MIN_STEPS_PER_EPOCH:
        batch, chosen = DEFAULT_BATCH_SIZE, "default"
    else:
        batch, chosen = max(MIN_BATCH_SIZE, n_train // MIN_STEPS_PER_EPOCH), "small set"
    return Schedule(batch, n_train, math.ceil(n_train / batch) if batch else 0, chosen)


def count_train(dataset: Any, limit: int | None = None) -> int:
    """Train impressions of ``dataset`` per epoch: the train split's size, at most ``limit``."""
    n = 0
    for rb in dataset.iter_impressions(split="train"):
        n += rb.num_rows
        if limit is not None and n >= limit:
            return int(limit)
    return n


def plan_schedule(cfg: Any, dataset: Any) -> tuple[Any, Schedule]:
    """``cfg`` (a :class:`ranker.train.RankTrainConfig`) with its batch size set by :func:`batch_size_for`
    on ``dataset``'s train split, and the schedule to record with the run."""
    schedule = batch_size_for(count_train(dataset, cfg.max_train), cfg.batch_size)
    return dataclasses.replace(cfg, batch_size=schedule.batch_size), schedule


def base_rate(dataset: Any, split: str = "test", limit: int | None = None) -> dict[str, Any]:
    """The logloss of the best constant prediction on ``split`` (its own click rate), over the first
    ``limit`` impressions as evaluation reads them: ``{"split", "n", "ctr", "logloss"}``."""
    n, clicks = 0, 0.0
    for rb in dataset.iter_impressions(split=split):
        labels = rb.column("label").to_numpy(zero_copy_only=False).astype(np.float64)
        if limit is not None:
            labels = labels[: max(0, limit - n)]
        n += len(labels)
        clicks += float(labels.sum())
        if limit is not None and n >= limit:
            break
    ctr = clicks / n if n else float("nan")
    if not n or ctr in (0.0, 1.0):
        loss = 0.0 if n else float("nan")
    else:
        loss = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    return {"split": split, "n": n, "ctr": ctr, "logloss": loss}


def loss_trend(losses: list[float]) -> dict[str, float | None]:
    """Mean training loss over the first and over the last steps (up to :data:`TREND_STEPS` each,
    at most half of the steps, so that the two windows never overlap)."""
    if not losses:
        return {"loss_start": None, "loss_end": None}
    w = max(1, min(TREND_STEPS, len(losses) // 2))
    return {"loss_start": float(np.mean(losses[:w])), "loss_end": float(np.mean(losses[-w:]))}


def undertrained(metrics: dict[str, Any]) -> str | None:
    """Why a run's metrics are not a result, in words (None when it trained enough, or when the
    metrics say too little to tell).

    Reads ``metrics["overall"]["logloss"]`` against ``metrics["base_rate"]["logloss"]`` (when both
    cover the same impressions) and ``metrics["train"]``'s ``loss_start``/``loss_end``.
    """
    reasons = []
    overall, base = metrics.get("overall") or {}, metrics.get("base_rate") or {}
    loss, floor = overall.get("logloss"), base.get("logloss")
    same = base.get("n") == overall.get("n") and base.get("split", "test") == metrics.get("split", "test")
    if same and isinstance(loss, (int, float)) and isinstance(floor, (int, float)) and loss >= floor:
        reasons.append(f"test logloss {loss:.4f} is no better than the base rate's {floor:.4f}")
    train = metrics.get("train") or {}
    start, end = train.get("loss_start"), train.get("loss_end")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)) and end >= start:
        reasons.append(f"the training loss never fell ({start:.4f} -> {end:.4f})")
    if not reasons:
        return None
    steps = train.get("steps")
    return "undertrained: " + " and ".join(reasons) + (f" after {steps} steps" if steps else "")
