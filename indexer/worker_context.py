"""Per-process state of an indexer worker, in one object.

A worker process holds what is expensive to build and safe to reuse between chunks: the loaded
encoders, the Milvus clients and which collections they already created or loaded, the datasets
(each with its image index) and their item tables, and the producer Celery apps. All of it lives
in one :class:`WorkerContext`: :func:`start` makes a fresh one when a worker process starts (the
``worker_process_init`` signal, after the fork: a child must not reuse its parent's clients), and
:func:`current` returns the process's context, creating one on first use (embedded and in-process
use: the CLI, tests, notebooks). :func:`reset` closes and forgets it (tests).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from muse.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What one worker process keeps between chunks (see the module docstring)."""

    encoders: dict[tuple[str, str], Any] = field(default_factory=dict)  # (checkpoint, device) -> ItemEncoder
    stores: dict[tuple[str, str], Any] = field(default_factory=dict)  # (Milvus URI, prefix) -> VectorStore
    ensured: set[tuple[str, str, Any]] = field(default_factory=set)  # (URI, prefix, CollectionRef) made/loaded
    datasets: dict[str, Any] = field(default_factory=dict)  # location -> muse.data.format.Dataset
    item_tables: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # location -> ids, cats
    apps: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # producer key -> Celery app
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # -- encoders ---------------------------------------------------------------------------------
    def encoder(self, checkpoint: str, device: str) -> Any:
        """The :class:`indexer.encoders.ItemEncoder` of a trained checkpoint on ``device``, loaded once."""
        key = (str(checkpoint), str(device))
        with self.lock:
            if key not in self.encoders:
                from indexer.checkpoints import load_clip_checkpoint
                from indexer.encoders import ItemEncoder

                t0 = time.perf_counter()
                model, cfg = load_clip_checkpoint(checkpoint)
                self.encoders[key] = ItemEncoder(model, cfg.model, device=device)
                log.info("loaded encoder %s on %s in %.1fs", checkpoint, device, time.perf_counter() - t0)
            return self.encoders[key]

    # -- Milvus -----------------------------------------------------------------------------------
    def store(self, settings: Settings) -> Any:
        """A :class:`muse.vectorstore.VectorStore` per (Milvus URI, prefix), kept for the process."""
        key = (settings.milvus_uri, settings.milvus_prefix)
        with self.lock:
            if key not in self.stores:
                from muse.vectorstore import VectorStore

                self.stores[key] = VectorStore(settings)
            return self.stores[key]

    def ensure_collections(self, settings: Settings, ref: Any, dim: int) -> Any:
        """The store, with the collections of ``ref`` created or loaded once per process."""
        store = self.store(settings)
        key = (settings.milvus_uri, settings.milvus_prefix, ref)
        if key not in self.ensured:
            store.ensure_collections(ref, dim)
            with self.lock:
                self.ensured.add(key)
        return store

    def forget_collections(self) -> None:
        """Forget which collections were created or loaded (they were dropped under this process)."""
        with self.lock:
            self.ensured.clear()
            for store in self.stores.values():
                store.forget()

    def close_stores(self) -> None:
        """Close the Milvus clients (a Milvus Lite file is released only when closed)."""
        with self.lock:
            stores = list(self.stores.values())
            self.stores.clear()
            self.ensured.clear()
        for store in stores:
            try:
                store.close()
            except Exception as e:  # closing is best effort at shutdown
                log.warning("closing Milvus client failed: %s", e)

    # -- datasets ---------------------------------------------------------------------------------
    def dataset(self, location: str) -> Any:
        """The :class:`muse.data.format.Dataset` at ``location``, opened once (its image index is
        built on first use and kept with it)."""
        with self.lock:
            if location not in self.datasets:
                from muse.data.format import Dataset

                self.datasets[location] = Dataset(Path(location))
            return self.datasets[location]

    def item_table(self, location: str) -> tuple[np.ndarray, np.ndarray]:
        """``(item_ids int64[n], categories int64[n])`` of a dataset in canonical order, read once."""
        with self.lock:
            if location not in self.item_tables:
                import pyarrow.parquet as pq

                table = pq.read_table(Path(location) / "items.parquet", columns=["item_id", "category"])
                self.item_tables[location] = (
                    table.column("item_id").to_numpy().astype(np.int64),
                    table.column("category").to_numpy().astype(np.int64),
                )
            return self.item_tables[location]

    # -- Celery -----------------------------------------------------------------------------------
    def app(self, settings: Settings) -> Any:
        """A producer Celery app for ``settings`` (one per broker, database and queue prefix)."""
        key = (settings.broker_url, str(settings.broker_dir), settings.database_url, settings.queue_prefix)
        with self.lock:
            if key not in self.apps:
                from indexer.celery_app import create_app

                self.apps[key] = create_app(settings)
            return self.apps[key]

    def close(self) -> None:
        """Close what holds resources (the Milvus clients) and forget everything."""
        self.close_stores()
        with self.lock:
            self.encoders.clear()
            self.datasets.clear()
            self.item_tables.clear()
            self.apps.clear()


_current: WorkerContext | None = None
_current_lock = threading.Lock()


def current() -> WorkerContext:
    """This process's context, created on first use."""
    global _current
    with _current_lock:
        if _current is None:
            _current = WorkerContext()
        return _current


def start() -> WorkerContext:
    """A fresh context for a new worker process (the parent's one, inherited by the fork, is dropped
    without closing: its clients belong to the parent)."""
    global _current
    with _current_lock:
        _current = WorkerContext()
        return _current


def reset() -> None:
    """Close this process's context and forget it (the next :func:`current` makes a new one)."""
    global _current
    with _current_lock:
        ctx, _current = _current, None
    if ctx is not None:
        ctx.close()
