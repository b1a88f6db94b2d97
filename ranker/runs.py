"""Ranker runs: the ``ranker_runs`` rows and the checkpoint files they point to.

A checkpoint (``$MUSE_DATA_DIR/ranker/run-<id>.pt``) holds everything needed to score again:
the model name, its config, the feature spec and vocabularies, the source name and the weights.
A run started by ``muse rank train`` also keeps the options it was started with (the ``--config``
file merged with the flags): in its row (``config["cli"]``) and as ``run-<id>.toml`` beside the
checkpoint, a file ``--config`` accepts again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from muse import models
from muse.db import session_scope
from muse.errors import NotFoundError
from muse.settings import Settings
from ranker.data import FeatureSpace
from ranker.models import CTRModel, FeatureSpec, build_model, make_config

log = logging.getLogger(__name__)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """Plain JSON values; NaN (e.g. the AUC of a one-class slice) becomes null, which PostgreSQL's
    JSON type accepts."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.loads(json.dumps(clean(d), default=str))


def dataset_id(settings: Settings, name: str) -> int:
    """The registered id of dataset ``name``; NotFoundError when it is not registered."""
    with session_scope(settings) as session:
        row = session.scalars(select(models.Dataset).where(models.Dataset.name == name)).first()
        if row is None:
            raise NotFoundError(f"dataset {name!r} is not registered in {settings.database_url} (run `muse data ...`)")
        return row.id


def source_row(session: Any, name: str, dataset: str) -> models.EmbeddingSource | None:
    """The version of embedding source ``name`` that a run on ``dataset`` reads (the one the embedding
    stage's ``item_vectors(settings, name, dataset)`` gives): the newest version of a trained source;
    for an imported source (versions numbered per dataset) the newest of ``dataset``'s own."""
    rows = session.scalars(
        select(models.EmbeddingSource).where(models.EmbeddingSource.name == name)
        .order_by(models.EmbeddingSource.version.desc(), models.EmbeddingSource.id.desc())
    ).all()
    if any(r.kind == "imported" for r in rows):
        ds_id = session.scalar(select(models.Dataset.id).where(models.Dataset.name == dataset))
        rows = [r for r in rows if (ds_id is not None and r.dataset_id == ds_id)
                or (r.config or {}).get("dataset") == dataset]
    return rows[0] if rows else None


def source_id(settings: Settings, name: str | None, dataset: str) -> int | None:
    """Id of the version of embedding source ``name`` that a run on ``dataset`` reads
    (:func:`source_row`; None when absent or not given)."""
    if name is None:
        return None
    with session_scope(settings) as session:
        row = source_row(session, name, dataset)
        return None if row is None else row.id


def create_run(settings: Settings, *, model: str, esu: str | None, source: str | None, dataset: str,
               seed: int, config: dict[str, Any]) -> int:
    """Insert a ``running`` row and return its id; its source version is the one the run reads on
    ``dataset`` (:func:`source_id`)."""
    with session_scope(settings) as session:
        row = models.RankerRun(model=model, esu=esu, source_name=source, source_id=source_id(settings, source, dataset),
                               dataset_id=dataset_id(settings, dataset), seed=seed, status="running",
                               config=_jsonable(config))
        session.add(row)
        session.flush()
        return row.id


def finish_run(settings: Settings, run_id: int, *, status: str, metrics: dict[str, Any] | None = None,
               checkpoint: Path | None = None) -> None:
    """Set a run's status (``done``/``failed``), metrics and checkpoint path."""
    with session_scope(settings) as session:
        row = session.get(models.RankerRun, run_id)
        if row is None:
            raise NotFoundError(f"ranker run {run_id} does not exist")
        row.status = status
        if metrics is not None:
            row.metrics = _jsonable(metrics)
        if checkpoint is not None:
            row.checkpoint_path = str(checkpoint)
        row.finished_at = dt.datetime.now(dt.timezone.utc)


def options_path(settings: Settings, run_id: int) -> Path:
    """Where run ``run_id`` keeps the options it was started with (TOML, beside its checkpoint)."""
    return settings.path("ranker", f"run-{run_id}.toml")


def record_run_options(settings: Settings, run_id: int, record: dict[str, Any], text: str | None = None) -> Path | None:
    """Store how a run was started: ``record`` (the command, the ``--config`` file and the effective
    options) goes into the row's config under ``"cli"``, ``text`` (the options as a TOML file) into
    :func:`options_path`. The model and train configs beside it are untouched, so run reuse
    (``ranker.compare.find_reusable_run``) is not affected. Returns the file written (None without text)."""
    with session_scope(settings) as session:
        row = session.get(models.RankerRun, run_id)
        if row is None:
            raise NotFoundError(f"ranker run {run_id} does not exist")
        row.config = {**dict(row.config or {}), "cli": _jsonable(record)}
    if text is None:
        return None
    path = options_path(settings, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    log.info("run %d: options written to %s", run_id, path)
    return path


@dataclass(frozen=True)
class RunInfo:
    """A ``ranker_runs`` row as plain values."""

    id: int
    model: str
    esu: str | None
    source: str | None
    dataset: str
    seed: int
    status: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint_path: str | None
    created_at: dt.datetime
    source_version: int | None = None  # the version of ``source`` the run read (None: no source, or unknown)


def _info(row: models.RankerRun, dataset_name: str, source_version: int | None = None) -> RunInfo:
    return RunInfo(row.id, row.model, row.esu, row.source_name, dataset_name, row.seed, row.status,
                   dict(row.config or {}), dict(row.metrics or {}), row.checkpoint_path, row.created_at,
                   source_version)


def _versions(session: Any) -> dict[int, int]:
    """``embedding_sources`` row id -> version."""
    return dict(session.execute(select(models.EmbeddingSource.id, models.EmbeddingSource.version)).all())


def get_run(settings: Settings, run_id: int) -> RunInfo:
    """The run ``run_id``; NotFoundError naming it when absent."""
    with session_scope(settings) as session:
        row = session.get(models.RankerRun, int(run_id))
        if row is None:
            raise NotFoundError(f"ranker run {run_id} does not exist (see `muse rank list`)")
        version = None if row.source_id is None else _versions(session).get(row.source_id)
        return _info(row, session.get(models.Dataset, row.dataset_id).name, version)


def list_runs(settings: Settings) -> list[RunInfo]:
    """Every run, oldest first."""
    with session_scope(settings) as session:
        names = {d.id: d.name for d in session.scalars(select(models.Dataset))}
        versions = _versions(session)
        rows = session.scalars(select(models.RankerRun).order_by(models.RankerRun.id))
        return [_info(r, names.get(r.dataset_id, "?"), versions.get(r.source_id)) for r in rows]


def checkpoint_path(settings: Settings, run_id: int) -> Path:
    """Where run ``run_id`` keeps its checkpoint."""
    return settings.path("ranker", f"run-{run_id}.pt")


def save_checkpoint(path: Path, model: CTRModel, space: FeatureSpace, *, source: str | None,
                    dataset: str, train_config: dict[str, Any]) -> Path:
    """Write the weights and everything needed to rebuild the model and its feature mapping (through a
    temporary file renamed into place: a process killed while writing leaves no checkpoint at ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({
        "model": model.name,
        "config": model.config.to_dict(),
        "spec": model.spec.to_dict(),
        "space": space.state(),
        "source": source,
        "dataset": dataset,
        "train_config": train_config,
        "state_dict": model.state_dict(),
    }, tmp)
    os.replace(tmp, path)
    return path


@dataclass
class LoadedRun:
    """A checkpoint turned back into a model (eval mode) and its feature space."""

    model: CTRModel
    space: FeatureSpace
    source: str | None
    dataset: str
    train_config: dict[str, Any]


def load_checkpoint(path: Path | str, device: str = "cpu") -> LoadedRun:
    """Rebuild the model and feature space saved by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    saved = dict(ckpt["config"])
    if ckpt["model"] != "muse" and "esu" not in saved:
        saved["esu"] = "ta"  # a checkpoint from before the baselines had the paper's ESU: the ID-only one
    config = make_config(ckpt["model"], **saved)
    model = build_model(ckpt["model"], FeatureSpec.from_dict(ckpt["spec"]), config)
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    return LoadedRun(model, FeatureSpace.from_state(ckpt["space"]), ckpt["source"], ckpt["dataset"],
                     ckpt["train_config"])


def load_run(settings: Settings, run_id: int, device: str = "cpu") -> LoadedRun:
    """Run ``run_id``'s checkpoint rebuilt (:func:`load_checkpoint`).

    Raises:
        NotFoundError: the run does not exist, has no checkpoint (it failed or is running) or its
            checkpoint file is gone.
    """
    info = get_run(settings, run_id)
    if not info.checkpoint_path:
        raise NotFoundError(f"ranker run {run_id} has no checkpoint (status {info.status})")
    return load_checkpoint(info.checkpoint_path, device)
