"""Training of the CTR models: one loop for every model, with the sparse/dense optimiser split of
the paper (embeddings at 2e-3, dense weights at 2e-4), NaN checks, a checkpoint and a
``ranker_runs`` row per run."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muse.configs import config_from_dict
from muse.errors import ConfigurationError, DataError
from muse.settings import Settings
from ranker.data import BatchBuilder, ItemVectorsLike, background, iter_impression_batches, open_builder
from ranker.models import CTRModel, FeatureSpec, build_model, make_config, model_class
from ranker.schedule import base_rate, loss_trend, plan_schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankTrainConfig:
    """How to train (the model's own settings live in its model config)."""

    epochs: int = 1  # passes over the train split (the paper: one)
    batch_size: int | None = None  # impressions per step; None: 256, lower on small sets (ranker.schedule)
    lr_embedding: float = 2e-3  # learning rate of the embedding tables
    lr_dense: float = 2e-4  # learning rate of every other weight
    seed: int = 0  # seeds the weights and the shuffle
    max_train: int | None = None  # stop each epoch after this many train impressions
    max_eval: int | None = None  # evaluate on at most this many test impressions
    eval_batch_size: int = 1024  # impressions per evaluation batch

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigurationError(f"{name}={getattr(self, name)!r} must be >= 1")
        for name in ("lr_embedding", "lr_dense"):
            if not float(getattr(self, name)) > 0:
                raise ConfigurationError(f"{name}={getattr(self, name)!r} must be > 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RankTrainConfig:
        return config_from_dict(cls, {k: v for k, v in values.items() if v is not None})


@dataclass
class TrainResult:
    """What a training run produced."""

    run_id: int | None
    metrics: dict[str, Any]
    checkpoint: Path | None
    losses: list[float]
    samples_per_s: float


def make_optimisers(model: CTRModel, cfg: RankTrainConfig) -> list[torch.optim.Optimizer]:
    """The embedding tables at ``lr_embedding`` (SparseAdam for sparse-gradient tables, Adam for the
    rest) and every other weight with Adam at ``lr_dense``."""
    tables = [m for m in model.embeddings.tables.values()]
    sparse = [t.weight for t in tables if t.sparse]
    dense_tables = [t.weight for t in tables if not t.sparse]
    optimisers: list[torch.optim.Optimizer] = [torch.optim.Adam(model.dense_parameters(), lr=cfg.lr_dense)]
    if dense_tables:
        optimisers.append(torch.optim.Adam(dense_tables, lr=cfg.lr_embedding))
    if sparse:
        optimisers.append(torch.optim.SparseAdam(sparse, lr=cfg.lr_embedding))
    return optimisers


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (the same dict's tensors when they are there already)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters (cpu for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def train_steps(model: CTRModel, builder: BatchBuilder, batches: Any, cfg: RankTrainConfig,
                progress: Any = None, sync: Any = None) -> tuple[list[float], int, float]:
    """Train on raw impression ``batches``; return (losses per step, samples, seconds). Batches are
    built on the CPU and moved to the model's device.

    ``sync`` (a :class:`ranker.distributed.StepSync`): this process is one rank of a distributed run;
    the forward goes through DDP, the loss is weighted by the rank's share of the step's global batch
    and the sparse embedding gradients are reduced across ranks (batches: ``rank_batches``).

    Raises:
        DataError: the loss or a gradient became NaN/inf (names the step).
    """
    model.train()
    device = model_device(model)
    optimisers = make_optimisers(model, cfg)
    forward = model if sync is None else sync.forward
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses: list[float] = []
    n_samples, started = 0, time.perf_counter()
    # BatchNorm in Dice needs two rows (a distributed plan guarantees them: every rank takes every step)
    usable = batches if sync is not None else (raw for raw in batches if len(raw["label"]) >= 2)

    def build(raw: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        batch = builder.build(raw["user_id"], raw["item_id"], raw["hist_len"], raw["label"])
        return batch if device.type == "cpu" else to_device(batch, device)

    for step, (raw, batch) in enumerate(background(usable, build)):
        loss = loss_fn(forward(batch)["logit"], batch["label"])
        if not torch.isfinite(loss):
            raise DataError(f"training loss is {loss.item()} at step {step}: lower the learning rates or check the data")
        for opt in optimisers:
            opt.zero_grad(set_to_none=True)
        (loss if sync is None else sync.weight(loss, raw)).backward()
        if sync is not None:
            sync.reduce_sparse()
        for opt in optimisers:
            opt.step()
        losses.append(loss.item())
        n_samples += len(raw["label"])
        if progress is not None:
            progress.update(len(raw["label"]))
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    return losses, n_samples, time.perf_counter() - started


def model_needs_vectors(model: str, esu: str | None = None, model_overrides: dict[str, Any] | None = None) -> bool:
    """Whether ``model`` with this ESU and config overrides reads item vectors (its GSU or its ESU),
    so that a caller fetches them only then."""
    overrides = dict(model_overrides or {})
    if esu is not None:
        overrides["esu"] = esu
    return bool(make_config(model, **overrides).needs_vectors)


def train_model_config(model: str, esu: str | None = None, model_overrides: dict[str, Any] | None = None,
                       source: str | None = None) -> Any:
    """The model config :func:`train` trains ``model`` with (``esu`` and ``model_overrides`` applied).

    Raises:
        ConfigurationError: unknown model, ESU or keys, or a model that reads vectors without a ``source``.
    """
    overrides = dict(model_overrides or {})
    if esu is not None:
        overrides["esu"] = esu
    config = make_config(model, **overrides)
    if config.needs_vectors and source is None:
        hint = "" if config.gsu_needs_vectors else f" for its {config.esu} ESU (or --esu ta for the ID-only ESU)"
        raise ConfigurationError(f"model {model!r} needs an embedding source{hint} (e.g. source='scl')")
    return config


def train(settings: Settings, model: str, dataset: str, source: str | None = None, esu: str | None = None,
          train_config: RankTrainConfig | None = None, model_overrides: dict[str, Any] | None = None,
          progress: bool = False, record: bool = True, vectors: ItemVectorsLike | None = None,
          dist: Any = None) -> TrainResult:
    """Train ``model`` on ``dataset`` (GSU source ``source`` for muse), evaluate it on the test split,
    save a checkpoint and record the run. The model and its batches are on ``settings.resolve_device()``.

    With ``dist`` (a :class:`ranker.distributed.Dist`) this process is one rank of a distributed run
    (see :mod:`ranker.distributed`): ``batch_size`` is the global batch, each rank trains on its own
    impressions and evaluates its share, rank 0 records the run (with ``config["distributed"]``: world
    size, global batch, every rank's threads) and writes the checkpoint; every rank returns the metrics.

    Args:
        source: the embedding source's name (recorded with the run; scoring opens its retriever).
        vectors: that source's item vectors on ``dataset`` (the caller loads them, e.g. the CLI with
            the embedding stage's ``item_vectors``); needed when the model reads vectors
            (:func:`model_needs_vectors`), ignored otherwise.
        esu: ESU variant (see :data:`ranker.models.ESU_VARIANTS`; default: the model's, as the paper
            sets it up; ``"ta"`` is the classic ID-only ESU).
        model_overrides: model config keys (e.g. ``{"k": 20}``); unknown keys are rejected.
        progress: show a tqdm progress bar (CLI).
        record: write a ``ranker_runs`` row and a checkpoint (needs a migrated database).

    Raises:
        ConfigurationError: unknown model/ESU/keys, or a model reading vectors without a source or
            without its vectors.
        NotFoundError: the dataset does not exist.
        DataError: NaN loss.
    """
    from muse.data.format import Dataset
    from ranker.evaluate import evaluate, train_item_counts
    from ranker.runs import checkpoint_path, create_run, finish_run, save_checkpoint

    cfg = train_config or RankTrainConfig()
    cls = model_class(model)
    config = train_model_config(model, esu, model_overrides, source)
    if config.needs_vectors and vectors is None:
        raise ConfigurationError(
            f"model {model!r} reads the item vectors of source {source!r}: pass them as vectors= "
            "(the embedding stage's item_vectors(settings, source, dataset))"
        )
    used_source = source if config.needs_vectors else None
    ds = Dataset.open(settings, dataset)
    cfg, schedule = plan_schedule(cfg, ds)  # the batch size (ranker.schedule's rule), recorded below
    device = settings.resolve_device() if dist is None else dist.device
    main = dist is None or dist.is_main  # the process that records the run and writes the checkpoint
    plan = None
    if dist is not None:
        from ranker.distributed import StepSync, evaluate_sharded, plan_epoch, rank_batches

        n_train = ds.n_impressions("train")
        plan = plan_epoch(n_train if cfg.max_train is None else min(n_train, max(0, cfg.max_train)), dist.world,
                          cfg.batch_size)
    torch.manual_seed(cfg.seed)
    builder = open_builder(ds, cls.retrieval, config, vectors if config.needs_vectors else None)
    space = builder.space
    net = build_model(model, FeatureSpec(space.vocab_sizes(), space.user_fields), config).to(device)
    log.info("training %s on %s", model, device)
    run_id = None
    if record and main:
        run_config = {"model": config.to_dict(), "train": dataclasses.asdict(cfg), "schedule": schedule.to_dict()}
        if dist is not None:
            run_config["distributed"] = dist.describe(plan)
        run_id = create_run(settings, model=model, esu=config.esu, source=used_source,
                            dataset=dataset, seed=cfg.seed, config=run_config)
    if dist is not None:
        run_id = dist.broadcast(run_id)
        dist.note_run(run_id)
    try:
        losses: list[float] = []
        n_samples, seconds = 0, 0.0
        sync = None if dist is None else StepSync(dist, net)
        coverage = []
        bar = _progress_bar(ds, cfg, plan) if progress and main else None
        for epoch in range(cfg.epochs):
            if sync is None:
                batches = iter_impression_batches(ds, "train", cfg.batch_size, shuffle=True, seed=cfg.seed + epoch,
                                                  limit=cfg.max_train)
            else:
                sync.begin_epoch(plan)
                batches = rank_batches(ds, "train", plan, dist.rank, seed=cfg.seed + epoch)
            ep_losses, n, s = train_steps(net, builder, batches, cfg, bar, **({} if sync is None else {"sync": sync}))
            if sync is not None:
                coverage.append(sync.end_epoch())
            losses += ep_losses
            n_samples, seconds = n_samples + n, seconds + s
            log.info("epoch %d: %d samples, mean loss %.4f", epoch, n, float(np.mean(ep_losses or [np.nan])))
        if bar is not None:
            bar.close()
        counts = train_item_counts(ds, space, cfg.max_train)
        if dist is None:
            metrics = evaluate(net, builder, ds, "test", cfg.eval_batch_size, cfg.max_eval, counts)
        else:
            sync.share_buffers()
            metrics = evaluate_sharded(dist, net, builder, ds, "test", cfg.eval_batch_size, cfg.max_eval, counts)
            n_samples, seconds = sync.totals(n_samples, seconds)
        metrics["train"] = {"samples": n_samples, "seconds": seconds, "samples_per_s": n_samples / max(seconds, 1e-9),
                            "first_loss": losses[0] if losses else None,
                            "last_loss": float(np.mean(losses[-20:])) if losses else None,
                            "steps": len(losses), "threads": torch.get_num_threads(), **loss_trend(losses)}
        metrics["base_rate"] = base_rate(ds, "test", cfg.max_eval)  # what ranker.schedule.undertrained reads
        if dist is not None:  # samples: every rank's; seconds: the slowest rank's; losses: rank 0's
            metrics["train"]["distributed"] = {"world_size": dist.world, "epochs": coverage}
        ckpt = None
        net.cpu()  # checkpoints hold CPU tensors: they load anywhere
        if record and main:
            ckpt = save_checkpoint(checkpoint_path(settings, run_id), net, space, source=used_source,
                                   dataset=dataset, train_config=dataclasses.asdict(cfg))
            finish_run(settings, run_id, status="done", metrics=metrics, checkpoint=ckpt)
    except BaseException as e:
        if run_id is not None and main:
            finish_run(settings, run_id, status="failed", metrics={"error": f"{type(e).__name__}: {e}"})
        raise
    return TrainResult(run_id, metrics, ckpt, losses, n_samples / max(seconds, 1e-9))


def _progress_bar(ds: Any, cfg: RankTrainConfig, plan: Any = None) -> Any:
    """A bar over the train impressions (of rank 0 only in a distributed run: ``plan``)."""
    from tqdm import tqdm

    total = ds.n_impressions("train")
    if cfg.max_train is not None:
        total = min(total, cfg.max_train)
    desc = "train"
    if plan is not None:
        total, desc = plan.counts[0], f"train (rank 0 of {plan.world})"
    total *= cfg.epochs
    return tqdm(total=total, unit="imp", desc=desc)
