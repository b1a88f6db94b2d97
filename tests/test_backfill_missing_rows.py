"""A backfill never ends ``done`` short of behaviour rows: chunks run in-process (SQLite, the
filesystem broker) against Milvus Lite and the real Milvus 2.3 server, no mock of Milvus.

* Item vectors the job wrote that Milvus does not return (a server recovering from a restart
  answers without some rows) fail the behaviour chunk with ``RowsMissing`` (retried) instead of
  being skipped and counted as "item has no vector"; items the job did not write (a failed item,
  an id outside the item table) are still skipped.
* Behaviour rows that disappear after their chunk was recorded ``done`` (a write Milvus acknowledged
  and lost) are found when the job closes: the chunk is sent again and the job stays running; a job
  whose rows keep disappearing fails with a sentence, never ``done``.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_indexer_helpers import SOURCE, corrupt_image, expected_behaviours, make_tiny_world, ref_of

from indexer import backfill, jobs, worker_context
from muse import models
from muse.db import session_scope

pytestmark = pytest.mark.slow


@pytest.fixture
def world(milvus_settings):
    settings = milvus_settings
    dataset = make_tiny_world(settings)
    try:
        yield settings, dataset
    finally:
        store = backfill.get_store(settings)
        for name in store.list_collections():  # every collection of this test's prefix
            store.client.drop_collection(name)
        worker_context.reset()  # closes the Milvus clients: releases the Milvus Lite file


def _chunks(settings, job_id, kind):
    with session_scope(settings) as session:
        return [(c.id, c.start, c.stop) for c in sorted(session.get(models.BackfillJob, job_id).chunks,
                                                        key=lambda c: c.id) if c.kind == kind]


def _chunk(settings, chunk_id):
    with session_scope(settings) as session:
        c = session.get(models.BackfillChunk, chunk_id)
        return c.status, c.n_written, c.n_failed, c.error


def _histories(dataset, start, stop):
    table = dataset.histories_table().slice(start, stop - start)
    return table.column("user_id").to_pylist(), table.column("item_ids").to_pylist()


def test_behaviour_chunk_never_skips_an_item_the_job_wrote(world):
    settings, dataset = world
    bad_item = int(dataset.item_ids()[7])
    corrupt_image(dataset, bad_item)  # a real failure: its entries are rightly skipped
    job_id = jobs.create_job(settings, SOURCE, dataset.name, chunk_size=300, user_chunk_size=30)
    for chunk_id, *_ in _chunks(settings, job_id, "items"):
        backfill.run_chunk(settings, chunk_id)
    store, ref = backfill.get_store(settings), ref_of(settings, dataset.name)
    chunk_id, start, stop = _chunks(settings, job_id, "behaviours")[0]
    users, histories = _histories(dataset, start, stop)
    entries = [i for h in histories for i in h]
    hidden = sorted({i for i in entries if i != bad_item})[:5]  # written by the job, then not returned
    found, vectors = store.get_item_vectors(ref, hidden)
    assert found.tolist() == hidden
    items_name = store.item_collection(ref)
    store.client.delete(items_name, filter=f"item_id in [{', '.join(map(str, hidden))}]")
    assert len(store.get_item_vectors(ref, hidden)[0]) == 0

    with pytest.raises(backfill.RowsMissing, match="returned no vector for 5 item"):
        backfill.run_chunk(settings, chunk_id)
    status, written, _, _ = _chunk(settings, chunk_id)
    assert status == backfill.RUNNING and written == 0  # not recorded done short of rows
    assert jobs.job_progress(settings, job_id).behaviours_skipped == 0

    store.upsert_items(ref, hidden, vectors, np.zeros(len(hidden), np.int64))  # the server caught up
    result = backfill.run_chunk(settings, chunk_id)
    n_bad = entries.count(bad_item)
    assert (result.n_written, result.n_failed) == (len(entries) - n_bad, n_bad)
    assert store.count_behaviours_of(ref, users) == len(entries) - n_bad
    for chunk_id, *_ in _chunks(settings, job_id, "behaviours")[1:]:
        backfill.run_chunk(settings, chunk_id)
    jobs.advance_job(settings, job_id)
    progress = jobs.job_progress(settings, job_id)
    assert progress.status == "done"
    n_bhv = expected_behaviours(dataset, {bad_item})
    assert (progress.behaviours_written, progress.behaviours_skipped) == (n_bhv, expected_behaviours(dataset) - n_bhv)
    assert store.count_behaviours(ref) == n_bhv


def test_job_not_done_while_behaviour_rows_are_missing(world):
    settings, dataset = world
    job_id = jobs.create_job(settings, SOURCE, dataset.name, chunk_size=300, user_chunk_size=30)
    for kind in ("items", "behaviours"):
        for chunk_id, *_ in _chunks(settings, job_id, kind):
            backfill.run_chunk(settings, chunk_id)
    store, ref = backfill.get_store(settings), ref_of(settings, dataset.name)
    bhv_name = store.behaviour_collection(ref)
    chunk_id, start, stop = _chunks(settings, job_id, "behaviours")[1]
    users, histories = _histories(dataset, start, stop)
    n_chunk = sum(len(h) for h in histories)

    def lose_rows() -> None:  # acknowledged rows gone from Milvus after the chunk was recorded done
        store.client.delete(bhv_name, filter=f"user_id in [{', '.join(map(str, users[:2]))}]")
        assert store.count_behaviours_of(ref, users) < n_chunk

    lose_rows()
    jobs.advance_job(settings, job_id)
    progress = jobs.job_progress(settings, job_id)
    assert progress.status == "running", progress
    assert _chunk(settings, chunk_id)[0] == backfill.QUEUED  # sent again
    with session_scope(settings) as session:
        options = session.get(models.BackfillJob, job_id).options
    assert options["behaviours_recopied"] == 1
    assert options["behaviours_recopied_why"].startswith(f"chunk {chunk_id}: wrote {n_chunk}, found "), options
    assert progress.behaviours_written == expected_behaviours(dataset) - n_chunk  # the chunk is not done

    backfill.run_chunk(settings, chunk_id)  # what the worker taking the message does
    jobs.advance_job(settings, job_id)
    progress = jobs.job_progress(settings, job_id)
    assert progress.status == "done", progress
    assert store.count_behaviours(ref) == progress.behaviours_written == expected_behaviours(dataset)

    # Rows that keep disappearing: sent again MAX_RECOPIES times in all, then the job fails, naming it.
    with session_scope(settings) as session:
        session.get(models.BackfillJob, job_id).status = "running"
    for _ in range(jobs.MAX_RECOPIES - 1):
        lose_rows()
        jobs.advance_job(settings, job_id)
        assert jobs.job_progress(settings, job_id).status == "running"
        backfill.run_chunk(settings, chunk_id)
    lose_rows()
    jobs.advance_job(settings, job_id)
    progress = jobs.job_progress(settings, job_id)
    assert progress.status == "failed"
    assert any("fewer rows in Milvus than they wrote" in e for e in progress.errors), progress.errors

    # `resume` starts the count of re-sends afresh: the short chunk is sent again and the job ends done.
    jobs.enqueue_job(settings, job_id)
    assert jobs.job_progress(settings, job_id).status == "running"
    assert _chunk(settings, chunk_id)[0] == backfill.QUEUED
    backfill.run_chunk(settings, chunk_id)
    jobs.advance_job(settings, job_id)
    progress = jobs.job_progress(settings, job_id)
    assert progress.status == "done", progress
    assert store.count_behaviours(ref) == progress.behaviours_written == expected_behaviours(dataset)
