"""Checkpoint files of the embedding sources: writing, reading and rebuilding the models.

A checkpoint is ``<source dir>/encoder.pt`` holding plain tensors and primitives (it loads with
``weights_only=True``): ``format``, ``source``, ``encoder`` (the :class:`EncoderConfig`, None for
``id``), ``dim`` and the ``state_dict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from indexer.encoders import ClipEncoder, EncoderConfig, build_clip_encoder, register_model_configs
from indexer.id_embedding import IdEmbedding
from indexer.source_registry import SourceVersion, next_version, register_version, source_dir
from muse.errors import DataError, NotFoundError
from muse.settings import Settings

CHECKPOINT_FILE = "encoder.pt"
CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, *, source: str, model: torch.nn.Module, encoder: EncoderConfig | None) -> None:
    """Write a source checkpoint (plain tensors and primitives: loads with ``weights_only=True``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "source": source,
        "encoder": encoder.to_dict() if encoder else None,
        "dim": int(model.dim),
        "state_dict": model.state_dict(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a checkpoint


def register_untrained_encoder(
    settings: Settings, name: str, *, seed: int = 0, metrics: dict[str, Any] | None = None
) -> SourceVersion:
    """Save a seeded, randomly initialised default encoder as the next version of source ``name``.

    A baseline for evaluation and a stand-in where the weights do not matter (queue throughput,
    tests of the backfill mechanics).
    """
    register_model_configs()
    config = EncoderConfig()
    torch.manual_seed(seed)
    model = build_clip_encoder(config)
    version = next_version(settings, name)
    path = source_dir(settings, name, version) / CHECKPOINT_FILE
    save_checkpoint(path, source=name, model=model, encoder=config)
    return register_version(
        settings, name, version, kind="trained", dim=model.dim, dataset_name=None,
        checkpoint_path=path, config=config.to_dict(), metrics=metrics or {"note": "random init"},
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of a source checkpoint.

    Raises:
        NotFoundError: no such file.
        DataError: the file cannot be read or is not a MUSE encoder checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"checkpoint {p} does not exist")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as e:
        raise DataError(f"checkpoint {p} cannot be read: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"checkpoint {p} is not a MUSE encoder checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def load_clip_checkpoint(path: str | Path) -> tuple[ClipEncoder, EncoderConfig]:
    """Rebuild a trained :class:`ClipEncoder` from its checkpoint (no pretrained file needed)."""
    payload = read_checkpoint(path)
    cfg = EncoderConfig.from_dict({**payload["encoder"], "pretrained": None})
    model = build_clip_encoder(cfg)
    model.load_state_dict(payload["state_dict"])
    return model, cfg


def load_id_checkpoint(path: str | Path) -> IdEmbedding:
    """Rebuild an ``id`` source's :class:`IdEmbedding` (eval mode) from its checkpoint."""
    payload = read_checkpoint(path)
    state = payload["state_dict"]
    model = IdEmbedding(state["item_ids"].numpy(), int(payload["dim"]))
    model.load_state_dict(state)
    return model.eval()


def checkpoint_of(row: SourceVersion) -> str:
    """The checkpoint path of a source version (DataError when the row has none)."""
    if not row.checkpoint_path:
        raise DataError(f"embedding source {row.name} v{row.version} has no checkpoint path")
    return row.checkpoint_path
