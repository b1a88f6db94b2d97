"""Helpers shared by the indexer tests (no tests here): a tiny dataset, an encoder source, a corrupt
image, waiting for a job, and the exact counts a backfill must reach."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muse.settings import Settings

SOURCE = "openclip"
CORRUPT_BYTES = b"\x89PNG\r\n\x1a\n this is not a decodable image"


def make_tiny_world(settings: Settings):  # noqa: ANN201 - muse.data.format.Dataset
    """Migrate the database, generate the ``tiny`` simworld and register a (randomly initialised,
    deterministic) ``openclip`` encoder as a trained source version. Returns the Dataset."""
    from muse import db
    from muse.data.simworld import generate_simworld

    db.upgrade(settings)
    dataset = generate_simworld(settings, size="tiny")
    register_random_encoder(settings, SOURCE)
    return dataset


def ref_of(settings: Settings, dataset_name: str, source: str = SOURCE, version: int | None = None):  # noqa: ANN201
    """The CollectionRef a backfill of ``source`` (its latest version unless given) for a dataset writes."""
    from indexer.source_registry import get_version
    from muse.vectorstore import CollectionRef

    return CollectionRef(dataset_name, source, version or get_version(settings, source).version)


def register_random_encoder(settings: Settings, name: str = SOURCE) -> None:
    """Save a seeded, untrained muse-tiny encoder as the next version of source ``name``."""
    from indexer.checkpoints import register_untrained_encoder

    register_untrained_encoder(settings, name, seed=0)


def corrupt_image(dataset, item_id: int) -> None:  # noqa: ANN001
    """Replace one item's image bytes with undecodable bytes, in place in its shard."""
    for shard in sorted((dataset.path / "images").glob("part-*.parquet")):
        table = pq.read_table(shard)
        ids = table.column("item_id").to_numpy()
        if item_id not in ids:
            continue
        images = table.column("image").to_pylist()
        images[int(np.flatnonzero(ids == item_id)[0])] = CORRUPT_BYTES
        table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
        pq.write_table(table, shard)
        return
    raise AssertionError(f"item {item_id} has no image to corrupt")


def expected_behaviours(dataset, without_items: set[int] = frozenset()) -> int:  # noqa: ANN001
    """History entries of the dataset whose item is not in ``without_items``."""
    table = dataset.histories_table()
    items = pc.list_flatten(table.column("item_ids")).to_numpy()
    return int((~np.isin(items, list(without_items))).sum()) if without_items else int(len(items))


def wait_for_job(settings: Settings, job_id: int, timeout: float = 150.0, until=None):  # noqa: ANN001, ANN201
    """Poll the job table until the job finishes (or ``until(progress)`` holds); return the progress."""
    from indexer import jobs

    deadline = time.monotonic() + timeout
    while True:
        progress = jobs.job_progress(settings, job_id)
        if (until(progress) if until else progress.finished):
            return progress
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not there after {timeout}s: {progress}")
        time.sleep(0.2)


def worker_log(path: Path | None) -> str:
    """The tail of a worker's log, for assertion messages."""
    if path is None or not path.exists():
        return "(no log)"
    return path.read_text(errors="replace")[-4000:]
