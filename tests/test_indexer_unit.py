"""Indexer without servers: the Celery configuration, job and chunk bookkeeping, and the chunk
functions run in-process against SQLite and Milvus Lite (the embedded deployment)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from test_indexer_helpers import SOURCE, corrupt_image, expected_behaviours, make_tiny_world, ref_of

from indexer import backfill, jobs, worker_context
from indexer.celery_app import (
    BEHAVIOURS_TASK,
    ENCODE_TASK,
    celery_config,
    queue_name,
    settings_env,
)
from muse import models
from muse.db import session_scope
from muse.errors import ConfigurationError, NotFoundError
from muse.settings import load_settings


def test_celery_config_is_reliable_and_embedded(settings):
    assert settings.queue_prefix == ""
    conf = celery_config(settings)
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["result_backend"] is None
    assert conf["task_routes"][ENCODE_TASK]["queue"] == "gpu"
    assert conf["task_routes"][BEHAVIOURS_TASK]["queue"] == "cpu"
    opts = conf["broker_transport_options"]
    assert conf["broker_url"] == "filesystem://localhost/"  # a host: kombu warns about a missing one
    for key in ("data_folder_in", "data_folder_out", "processed_folder"):
        assert opts[key].startswith(str(settings.broker_dir.absolute()))
    prefixed = load_settings(env={"MUSE_QUEUE_PREFIX": "t1-"}, data_dir=settings.data_dir, device="cpu")
    assert prefixed.queue_prefix == "t1-"
    assert celery_config(prefixed)["task_routes"][ENCODE_TASK]["queue"] == "t1-gpu"
    assert celery_config(settings, queue_prefix="t2-")["task_routes"][ENCODE_TASK]["queue"] == "t2-gpu"
    assert queue_name("cpu", prefixed.queue_prefix) == "t1-cpu"
    with pytest.raises(ConfigurationError, match="'tpu'"):
        queue_name("tpu")


def test_settings_env_round_trips(settings):
    assert load_settings(env=settings_env(settings)) == settings


@pytest.fixture
def world(settings):
    dataset = make_tiny_world(settings)
    try:
        yield settings, dataset
    finally:
        worker_context.reset()  # closes the Milvus clients: releases the Milvus Lite file


def _chunks(settings, job_id):
    with session_scope(settings) as session:
        rows = session.get(models.BackfillJob, job_id).chunks
        return [(c.id, c.kind, c.start, c.stop, c.status, c.attempts) for c in rows]


def test_create_job_chunks_cover_the_dataset(world):
    settings, dataset = world
    job_id = jobs.create_job(settings, SOURCE, dataset.name, chunk_size=128, user_chunk_size=25)
    chunks = _chunks(settings, job_id)
    items = [(lo, hi) for _, kind, lo, hi, _, _ in chunks if kind == "items"]
    users = [(lo, hi) for _, kind, lo, hi, _, _ in chunks if kind == "behaviours"]
    assert items[0][0] == 0 and items[-1][1] == dataset.n_items
    assert all(a[1] == b[0] for a, b in zip(items, items[1:], strict=False))
    assert max(hi - lo for lo, hi in items) == 128
    assert users == [(0, 25), (25, 50), (50, dataset.n_users)]
    assert {c[4] for c in chunks} == {"pending"}
    with pytest.raises(ConfigurationError, match="'nope'"):
        jobs.create_job(settings, "nope", dataset.name)
    with pytest.raises(NotFoundError, match="'scl'"):
        jobs.create_job(settings, "scl", dataset.name)
    with pytest.raises(ConfigurationError, match="chunk sizes"):
        jobs.create_job(settings, SOURCE, dataset.name, chunk_size=0)


def test_create_job_max_users_backfills_a_slice_of_users(world):
    settings, dataset = world
    job_id = jobs.create_job(settings, SOURCE, dataset.name, chunk_size=128, user_chunk_size=25, max_users=40)
    chunks = _chunks(settings, job_id)
    assert [(lo, hi) for _, kind, lo, hi, _, _ in chunks if kind == "behaviours"] == [(0, 25), (25, 40)]
    assert [hi for _, kind, _, hi, _, _ in chunks if kind == "items"][-1] == dataset.n_items  # every item still
    everyone = jobs.create_job(settings, SOURCE, dataset.name, user_chunk_size=1000, max_users=10**6)
    assert [(lo, hi) for _, kind, lo, hi, _, _ in _chunks(settings, everyone) if kind == "behaviours"] == [
        (0, dataset.n_users)]
    with pytest.raises(ConfigurationError, match="max_users"):
        jobs.create_job(settings, SOURCE, dataset.name, max_users=0)


def test_chunks_in_process_are_idempotent_and_fail_only_the_corrupt_item(world):
    settings, dataset = world
    bad_item = int(dataset.item_ids()[7])
    corrupt_image(dataset, bad_item)
    job_id = jobs.create_job(settings, SOURCE, dataset.name, chunk_size=200, user_chunk_size=30)
    chunks = _chunks(settings, job_id)
    for chunk_id, *_ in chunks:  # items first, then behaviours: the canonical order
        assert backfill.run_chunk(settings, chunk_id) is not None
    jobs.advance_job(settings, job_id)  # nothing left to enqueue: closes the job

    progress = jobs.job_progress(settings, job_id)
    assert progress.status == "done"
    assert progress.items_written == dataset.n_items - 1
    assert [fi[0] for fi in progress.failed_items] == [bad_item]
    assert "decode" in progress.failed_items[0][1].lower() or "image" in progress.failed_items[0][1].lower()
    n_bhv = expected_behaviours(dataset, {bad_item})
    assert progress.behaviours_written == n_bhv
    assert progress.behaviours_skipped == expected_behaviours(dataset) - n_bhv

    store = backfill.get_store(settings)
    ref = ref_of(settings, dataset.name)
    assert store.count_items(ref) == dataset.n_items - 1
    assert store.count_behaviours(ref) == n_bhv
    assert store.live_version(dataset.name, SOURCE) == ref.version  # the first version is live at once

    # A duplicate delivery of a done chunk is skipped; a chunk left "running" by a dead worker
    # runs again and rewrites the same rows.
    first_items = chunks[0][0]
    assert backfill.run_chunk(settings, first_items) is None
    behaviour_chunk = next(c[0] for c in chunks if c[1] == "behaviours")
    with session_scope(settings) as session:
        for chunk_id in (first_items, behaviour_chunk):
            session.get(models.BackfillChunk, chunk_id).status = backfill.RUNNING
    assert backfill.run_chunk(settings, first_items).n_written == 199
    backfill.run_chunk(settings, behaviour_chunk)
    assert store.count_items(ref) == dataset.n_items - 1
    assert store.count_behaviours(ref) == n_bhv
    attempts = {c[0]: c[5] for c in _chunks(settings, job_id)}
    assert attempts[first_items] == 2

    # The stored vector is the encoder's output for that item.
    from indexer.encode import encode_items

    ids = dataset.item_ids()[:3]
    found, stored = store.get_item_vectors(ref, ids)
    direct = encode_items(settings, SOURCE, dataset, ids)
    assert found.tolist() == ids.tolist()
    np.testing.assert_allclose(stored, direct.vectors, atol=1e-5)

    # A finished job is a no-op to re-run.
    assert jobs.enqueue_job(settings, job_id) == 0
    assert queued_messages(settings) == []


def queued_messages(settings, consume: bool = False) -> list[tuple[str, int]]:
    """(task name, chunk id) of the messages waiting in the filesystem broker's queue folder."""
    folder = settings.broker_dir / "queue"
    out = []
    for path in sorted(folder.glob("*.msg")) if folder.exists() else []:
        message = json.loads(path.read_text())
        args = json.loads(base64.b64decode(message["body"]))[0]
        out.append((message["headers"]["task"], int(args[0])))
        if consume:
            path.unlink()
    return out


def test_enqueue_cancel_resume_bookkeeping(world):
    settings, dataset = world
    job_id = jobs.create_job(settings, SOURCE, dataset.name, chunk_size=300, user_chunk_size=30)
    assert jobs.enqueue_job(settings, job_id) == 2  # item chunks only: behaviours wait for them
    sent = queued_messages(settings, consume=True)
    assert [name for name, _ in sent] == [ENCODE_TASK, ENCODE_TASK]
    assert jobs.job_progress(settings, job_id).chunks == {"queued": 2, "pending": 2}

    jobs.cancel_job(settings, job_id)
    assert jobs.job_progress(settings, job_id).status == "cancelled"
    assert backfill.run_chunk(settings, sent[0][1]) is None  # workers skip a cancelled job

    assert jobs.enqueue_job(settings, job_id) == 2
    for _, chunk_id in queued_messages(settings, consume=True):
        backfill.run_chunk(settings, chunk_id)
        jobs.advance_job(settings, job_id)
    behaviour_messages = queued_messages(settings, consume=True)
    assert [name for name, _ in behaviour_messages] == [BEHAVIOURS_TASK, BEHAVIOURS_TASK]
    jobs.advance_job(settings, job_id)  # a second advance never enqueues them twice
    assert queued_messages(settings) == []
    for _, chunk_id in behaviour_messages:
        backfill.run_chunk(settings, chunk_id)
        jobs.advance_job(settings, job_id)
    progress = jobs.job_progress(settings, job_id)
    assert progress.status == "done"
    assert progress.items_written == dataset.n_items
    assert progress.behaviours_written == expected_behaviours(dataset)
    assert jobs.enqueue_job(settings, job_id) == 0
    assert queued_messages(settings) == []


def test_worker_cli_rejects_bad_options(settings, capsys, monkeypatch):
    from muse_cli.main import main

    assert main(["worker", "--queues", "gpu,tpu"]) == 2
    assert "'tpu'" in capsys.readouterr().err
    assert main(["worker", "--concurrency", "0"]) == 2
    assert "--concurrency" in capsys.readouterr().err
    monkeypatch.setenv("MUSE_DATA_DIR", str(settings.data_dir))
    monkeypatch.delenv("MUSE_MILVUS_URI", raising=False)
    assert main(["worker", "--concurrency", "2"]) == 2  # Milvus Lite: one process only
    assert "Milvus Lite" in capsys.readouterr().err


def test_the_worker_is_started_through_the_indexer_stage(caplog):
    """Workers run ``python -m indexer.worker`` (no dependency on the CLI); it checks its options
    like ``muse worker`` does."""
    from indexer.celery_app import worker_command
    from indexer.worker import main

    cmd = worker_command(("gpu",), concurrency=2, pool="solo")
    assert cmd[1:3] == ["-m", "indexer.worker"] and "muse_cli" not in " ".join(cmd)
    assert cmd[3:] == ["--queues", "gpu", "--concurrency", "2", "--pool", "solo", "--loglevel", "INFO"]
    assert main(["--queues", "gpu,tpu"]) == 2
    assert "'tpu'" in caplog.text


def test_process_state_is_one_worker_context(world):
    """The encoder is loaded once per process (one cache, shared by the encoding API and the
    backfill), like the Milvus client, the dataset and the producer app; start() begins afresh."""
    from indexer.encode import load_encoder

    settings, dataset = world
    ctx = worker_context.current()
    assert worker_context.current() is ctx
    encoder = backfill.get_encoder(settings, SOURCE)
    assert load_encoder(settings, SOURCE) is encoder and len(ctx.encoders) == 1
    assert backfill.get_store(settings) is ctx.store(settings)
    assert jobs.get_app(settings) is jobs.get_app(settings) and len(ctx.apps) == 1
    assert ctx.dataset(str(dataset.path)) is ctx.dataset(str(dataset.path))
    ids, cats = ctx.item_table(str(dataset.path))
    np.testing.assert_array_equal(ids, dataset.item_ids())
    np.testing.assert_array_equal(backfill.categories_of(str(dataset.path), np.array([ids[5], -7])), [cats[5], -1])
    ctx.close_stores()
    fresh = worker_context.start()
    assert fresh is not ctx and worker_context.current() is fresh and not fresh.encoders


def test_retry_policy():
    from sqlalchemy.exc import OperationalError

    from indexer.outages import BACKOFF_MAX_S, OutageTooLong, backoff_s, is_retriable
    from muse.errors import BackendUnavailable, DataError

    assert is_retriable(BackendUnavailable("milvus down"))
    assert not is_retriable(BackendUnavailable("bad token", retriable=False))
    assert is_retriable(OperationalError("SELECT 1", {}, Exception("connection refused")))
    assert is_retriable(ConnectionResetError())
    assert not is_retriable(DataError("corrupt shard"))
    assert not is_retriable(FileNotFoundError("items.parquet"))
    assert not is_retriable(OutageTooLong("Milvus at x was unavailable for 1801 s"))  # the budget is spent
    assert 1.5 <= backoff_s(0) <= 2.5 and 6.0 <= backoff_s(2) <= 10.0
    assert backoff_s(20) <= BACKOFF_MAX_S * 1.25


def test_failing_chunk_fails_the_job_and_resume_finishes_it(world):
    """The real task (run eagerly by Celery) records a non-retriable error on the chunk and the
    job; after the cause is fixed, resume finishes the job."""
    from indexer.celery_app import create_app

    settings, dataset = world
    job_id = jobs.create_job(settings, SOURCE, dataset.name, chunk_size=1000, behaviours=False)
    items = dataset.path / "items.parquet"
    hidden = items.rename(dataset.path / "items.parquet.hidden")
    app = create_app(settings)
    app.loader.import_default_modules()
    (chunk_id, *_), = _chunks(settings, job_id)
    result = app.tasks[ENCODE_TASK].apply(args=[chunk_id])
    assert result.failed()
    progress = jobs.job_progress(settings, job_id)
    assert progress.status == "failed"
    assert "items.parquet" in progress.errors[0] and "FileNotFoundError" in progress.errors[0]
    assert _chunks(settings, job_id)[0][4] == "failed"

    hidden.rename(items)
    assert jobs.enqueue_job(settings, job_id) == 1
    (_, chunk_id), = queued_messages(settings, consume=True)
    assert app.tasks[ENCODE_TASK].apply(args=[chunk_id]).successful()
    progress = jobs.job_progress(settings, job_id)
    assert progress.status == "done" and progress.items_written == dataset.n_items
    assert _chunks(settings, job_id)[0][5] == 2  # attempts


def test_import_source_scl_taobao(world):
    """Precomputed vectors shipped with a dataset are imported as their own source; items without
    a shipped vector have none, and their behaviours are skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from muse.data.format import EMBEDDINGS_SCHEMA

    settings, dataset = world
    ids = dataset.item_ids()[::2]  # every other item has a vector
    rng = np.random.default_rng(0)
    vectors = (np.trunc(rng.uniform(-1, 1, (len(ids), 128)) * 127) / 127).astype(np.float32)
    (dataset.path / "embeddings").mkdir(exist_ok=True)
    table = pa.table({"item_id": ids, "vector": list(vectors)}, schema=EMBEDDINGS_SCHEMA)
    pq.write_table(table, dataset.path / "embeddings" / "scl-taobao.parquet", row_group_size=70)

    job_id = jobs.create_job(settings, "scl-taobao", dataset.name, chunk_size=100, user_chunk_size=30)
    chunks = _chunks(settings, job_id)
    assert [c[1] for c in chunks].count("import") == 3
    for chunk_id, kind, *_ in chunks:
        if kind == "import":
            backfill.run_chunk(settings, chunk_id)

    # A shipped item (row 110: the second chunk, the second row group) that Milvus does not return
    # is one the job wrote: the behaviour chunks holding it fail (retriable), they do not skip it.
    store = backfill.get_store(settings)
    ref = ref_of(settings, dataset.name, "scl-taobao")
    seen = {int(i) for h in dataset.histories_table().column("item_ids").to_pylist() for i in h}
    hidden = next(int(i) for i in ids[110:] if int(i) in seen)
    store.client.delete(store.item_collection(ref), filter=f"item_id in [{hidden}]")
    raised = []
    for chunk_id, kind, *_ in chunks:
        if kind == "behaviours":
            try:
                backfill.run_chunk(settings, chunk_id)
            except backfill.RowsMissing as e:
                raised.append(str(e))
    assert raised and all(f"(e.g. {hidden})" in m for m in raised), raised
    row = int(np.flatnonzero(ids == hidden)[0])
    store.upsert_items(ref, [hidden], vectors[row : row + 1], np.zeros(1, np.int64))  # the server caught up
    for chunk_id, kind, *_ in chunks:
        if kind == "behaviours":
            backfill.run_chunk(settings, chunk_id)
    jobs.advance_job(settings, job_id)
    progress = jobs.job_progress(settings, job_id)
    assert progress.status == "done" and progress.items_written == len(ids)
    n_bhv = expected_behaviours(dataset, set(dataset.item_ids()[1::2].tolist()))
    assert progress.behaviours_written == n_bhv

    assert store.count_items(ref) == len(ids)
    assert store.count_behaviours(ref) == n_bhv
    found, stored = store.get_item_vectors(ref, ids[[0, 150]])
    expected = vectors[[0, 150]] / np.linalg.norm(vectors[[0, 150]], axis=1, keepdims=True)
    np.testing.assert_allclose(stored, expected, atol=1e-6)


def test_item_vectors_equal_the_backfilled_milvus_vectors(world):
    """Training reads a (dataset, source, version)'s vectors through indexer.item_vectors; serving
    reads the backfilled Milvus collection. Both hold the same vectors, and the same items lack one."""
    from indexer.item_vectors import item_vectors
    from muse.arrays import lookup

    settings, dataset = world
    bad_item = int(dataset.item_ids()[11])
    corrupt_image(dataset, bad_item)
    job_id = jobs.create_job(settings, SOURCE, dataset.name, chunk_size=250, behaviours=False)
    for chunk_id, *_ in _chunks(settings, job_id):
        backfill.run_chunk(settings, chunk_id)
    ref = ref_of(settings, dataset.name)
    table = item_vectors(settings, ref)  # the CollectionRef names (dataset, source, version)
    np.testing.assert_array_equal(table.item_ids, dataset.item_ids())
    found, stored = backfill.get_store(settings).get_item_vectors(ref, table.item_ids)
    assert sorted(found.tolist()) == sorted(table.item_ids[table.present].tolist())
    assert bad_item not in found.tolist() and not table.present[lookup(table.item_ids, [bad_item])[0]]
    np.testing.assert_allclose(stored, table.vectors[lookup(table.item_ids, found)], atol=1e-5)


def test_stale_item_vector_cache_is_rebuilt_with_a_warning(world, caplog):
    import logging
    import os
    from pathlib import Path

    from indexer.item_vectors import cache_path, item_vectors
    from indexer.source_registry import get_version

    settings, dataset = world
    row = get_version(settings, SOURCE)
    first = item_vectors(settings, SOURCE, dataset)
    cache = cache_path(settings, row, dataset)
    assert cache.exists()
    caplog.set_level(logging.INFO, logger="indexer.item_vectors")
    again = item_vectors(settings, SOURCE, dataset)
    np.testing.assert_array_equal(again.vectors, first.vectors)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # fresh: read as it is

    # The version's checkpoint was rewritten: the cache no longer matches it.
    ckpt = Path(row.checkpoint_path)
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    caplog.clear()
    rebuilt = item_vectors(settings, SOURCE, dataset)
    stale = [r for r in caplog.records if r.levelno == logging.WARNING and "stale" in r.getMessage()]
    assert stale and "key changed" in stale[0].getMessage() and "checkpoint" in stale[0].getMessage()
    np.testing.assert_allclose(rebuilt.vectors, first.vectors, atol=1e-6)
    caplog.clear()
    item_vectors(settings, SOURCE, dataset)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # rebuilt with the new key

    # A cache whose key matches but whose item ids are not the dataset's is stale too.
    reversed_ids = np.load(cache / "item_ids.npy")[::-1].copy()
    np.save(cache / "item_ids.npy", reversed_ids)
    caplog.clear()
    fixed = item_vectors(settings, SOURCE, dataset)
    assert any("item ids changed" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    np.testing.assert_array_equal(fixed.item_ids, dataset.item_ids())
