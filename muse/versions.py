"""The version lifecycle of (dataset, embedding source) collections: which version is live.

Every backfill of a source version for a dataset writes that version's own collections
(:class:`muse.vectorstore.CollectionRef`). The *live* version is what readers use unless they ask
for another one; Milvus aliases ``<prefix>_<dataset>_<source>_items|_behaviours`` point at it.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select

from muse import models
from muse.db import session_scope
from muse.settings import Settings

log = logging.getLogger(__name__)


def job_ref(settings: Settings, job_id: int) -> Any:
    """The :class:`muse.vectorstore.CollectionRef` a backfill job writes."""
    from muse.errors import NotFoundError
    from muse.vectorstore import CollectionRef

    with session_scope(settings) as session:
        row = session.execute(
            select(models.Dataset.name, models.EmbeddingSource.name, models.EmbeddingSource.version)
            .join(models.BackfillJob, models.BackfillJob.dataset_id == models.Dataset.id)
            .join(models.EmbeddingSource, models.EmbeddingSource.id == models.BackfillJob.source_id)
            .where(models.BackfillJob.id == int(job_id))
        ).first()
    if row is None:
        raise NotFoundError(f"backfill job {job_id} does not exist")
    return CollectionRef(row[0], row[1], int(row[2]))


def on_backfill_done(settings: Settings, job_id: int, store: Any) -> None:
    """Called when a backfill job finished ``done``: the first version of its (dataset, source)
    becomes live at once; later ones wait for ``muse source promote``."""
    ref = job_ref(settings, job_id)
    if store.live_version(ref.dataset, ref.source) is None:
        store.set_live(ref)
        log.info("job %d: %s is the first version of %s/%s and is live", job_id, ref, ref.dataset, ref.source)
