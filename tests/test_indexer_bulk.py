"""Behaviour backfill through Milvus bulk import (``indexer.bulk``, ``muse backfill --bulk``).

On the CI's Milvus 2.3 server: a bulk job gives exact counts and no duplicate primary keys
(``count(*)``, which counts duplicates, against the distinct keys), also after a chunk is imported
a second time; a worker SIGKILLed while its import task runs, then the job resumed: the same.
On Milvus Lite: ``--bulk`` says in one sentence that it upserts instead, and does.
The Milvus restart mid-import is in the fault suite's style (its own server, marker ``faults``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_indexer_helpers import expected_behaviours, worker_log

from indexer import backfill, bulk, jobs, worker_context
from indexer.celery_app import WorkerProcess, settings_env
from muse import db, models
from muse.db import session_scope
from muse.settings import load_settings
from muse.vectorstore import BEHAVIOURS_KIND, VectorStore

SOURCE = "scl-taobao"  # an imported source: random vectors shipped with the dataset, no encoder
DIM = 16


def make_world(settings):  # noqa: ANN001, ANN201 - a muse.data.format.Dataset
    """The ``tiny`` simworld (600 items, 60 users, 10,914 behaviours) shipping random ``scl-taobao`` vectors."""
    from muse.data.format import EMBEDDINGS_SCHEMA
    from muse.data.simworld import generate_simworld

    db.upgrade(settings)
    dataset = generate_simworld(settings, size="tiny")
    ids = dataset.item_ids()
    vectors = np.random.default_rng(0).standard_normal((len(ids), DIM)).astype(np.float32)
    (dataset.path / "embeddings").mkdir(exist_ok=True)
    pq.write_table(pa.table({"item_id": ids, "vector": list(vectors)}, schema=EMBEDDINGS_SCHEMA),
                   dataset.path / "embeddings" / f"{SOURCE}.parquet")
    return dataset


def rows_and_keys(settings, dataset, ref) -> tuple[int, int]:  # noqa: ANN001
    """``count(*)`` of the behaviour collection and its number of distinct primary keys."""
    with VectorStore(settings) as store:
        name = store.behaviour_collection(ref)
        keys: set[int] = set()
        for user in dataset.histories_table().column("user_id").to_pylist():
            rows = store.client.query(name, filter=f"user_id == {int(user)}", output_fields=["pk"], limit=16384)
            keys |= {int(r["pk"]) for r in rows}
        return store.count_behaviours(ref), len(keys)


def muse_cli(settings, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:  # noqa: ANN001
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSE_")}
    env.update(settings_env(settings))
    return subprocess.run([sys.executable, "-m", "muse_cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def chunk_ids(settings, job_id: int) -> list[tuple[int, str]]:  # noqa: ANN001
    with session_scope(settings) as session:
        return [(c.id, c.kind) for c in session.get(models.BackfillJob, job_id).chunks]


# -- choosing the path (no server) ------------------------------------------------------------------
def test_choose_bulk_or_upserts(tmp_path: Path):
    lite = load_settings(env={}, data_dir=tmp_path)
    server = load_settings(env={}, data_dir=tmp_path, milvus_uri="http://milvus:19530", bulk_min_rows=1000)
    assert bulk.choose(server, 999) == bulk.BulkChoice(False, None)
    auto = bulk.choose(server, 1000)
    assert auto.bulk and "MUSE_BULK_MIN_ROWS=1,000" in auto.note
    assert bulk.choose(server, 10, requested=True) == bulk.BulkChoice(True, None)
    assert bulk.choose(server, 10**9, requested=False) == bulk.BulkChoice(False, None)
    fallback = bulk.choose(lite, 10, requested=True)
    assert not fallback.bulk and fallback.note.startswith("Milvus Lite has no bulk import")
    assert fallback.note.count(".") == 1  # one sentence
    assert not bulk.choose(lite, 10**9).bulk  # automatic on Lite: upserts, and it says so
    assert "MUSE_BULK_MIN_ROWS" in bulk.choose(lite, 10**9).note
    assert server.bulk_url == (tmp_path / "bulk").absolute().as_uri()


# -- the CI's Milvus server -------------------------------------------------------------------------
@pytest.fixture
def bulk_settings(settings, milvus_server_uri, unique_prefix):  # noqa: ANN001
    """SQLite metadata (chunks run in this process) and the Milvus 2.3 server."""
    s = load_settings(env={}, data_dir=settings.data_dir, device="cpu", milvus_uri=milvus_server_uri,
                      milvus_prefix=unique_prefix)
    try:
        yield s
    finally:
        worker_context.reset()
        with VectorStore(s) as store:
            for name in store.list_collections():
                store.client.drop_collection(name)


@pytest.mark.milvus_server
@pytest.mark.slow
def test_bulk_job_exact_counts_and_a_chunk_imported_twice(bulk_settings):
    settings = bulk_settings
    dataset = make_world(settings)
    job_id = bulk.create_job(settings, SOURCE, dataset.name, chunk_size=1000, user_chunk_size=30)
    chunks = chunk_ids(settings, job_id)
    assert [k for _, k in chunks] == ["import", "behaviours", "behaviours"]
    for chunk_id, _ in chunks:  # the chunks' plain functions, in this process (the workers run the same)
        backfill.run_chunk(settings, chunk_id)
    # A second run of a done chunk (a redelivery) right away, before its imported rows are even
    # visible to queries: its earlier task completed, so the chunk's keys are deleted (by key,
    # which reaches rows not yet visible) and it is imported again.
    first = next(cid for cid, kind in chunks if kind == "behaviours")
    with session_scope(settings) as session:
        session.get(models.BackfillChunk, first).status = "pending"
    again = backfill.run_chunk(settings, first)
    assert again.n_written == _chunks(settings, job_id)[1].n_written
    jobs.advance_job(settings, job_id, app=object())
    progress = jobs.job_progress(settings, job_id)
    n = expected_behaviours(dataset)
    assert progress.status == "done" and progress.behaviours_written == n == dataset.meta["n_behaviours"]
    verified = bulk.verify_job(settings, job_id)
    assert (verified.found, verified.expected) == (n, n)
    ref = bulk_ref(settings, job_id)
    assert rows_and_keys(settings, dataset, ref) == (n, n)
    assert not any((settings.data_dir / "bulk").rglob("*.npy"))  # the files are removed once imported

    # The stored behaviour vectors are the item vectors, as the upsert path writes them.
    user = dataset.histories_table().slice(0, 1).to_pylist()[0]
    with VectorStore(settings) as store:
        got = store.fetch_user_behaviours(ref, user["user_id"])
        assert got.item_ids.tolist() == user["item_ids"]
        _, item_vectors = store.get_item_vectors(ref, got.item_ids)
        np.testing.assert_allclose(got.vectors, item_vectors, atol=1e-6)
        completed = sorted(t.row_count for t in store.import_tasks(ref, BEHAVIOURS_KIND) if t.completed)
    written = [c.n_written for c in _chunks(settings, job_id) if c.kind == "behaviours"]
    assert completed == sorted(written + written[:1])  # one task per chunk, the first chunk's twice


def bulk_ref(settings, job_id: int):  # noqa: ANN001, ANN201
    from muse.versions import job_ref

    return job_ref(settings, job_id)


def _chunks(settings, job_id: int) -> list[models.BackfillChunk]:  # noqa: ANN001
    with session_scope(settings) as session:
        out = list(session.get(models.BackfillJob, job_id).chunks)
        session.expunge_all()
        return sorted(out, key=lambda c: c.id)


@pytest.fixture
def server_settings(tmp_path, postgres_url, milvus_server_uri, redis_url, unique_prefix):  # noqa: ANN001
    """PostgreSQL, Redis (per-test queue prefix) and the Milvus 2.3 server; leases of 5 s."""
    settings = load_settings(
        env={}, data_dir=tmp_path / "muse-data", device="cpu", database_url=postgres_url,
        queue_prefix=f"{unique_prefix}-", milvus_uri=milvus_server_uri, milvus_prefix=unique_prefix,
        broker_url=redis_url, backfill_lease_s=5.0, backfill_backoff_s=0.5,
    )
    try:
        yield settings
    finally:
        worker_context.reset()
        with VectorStore(settings) as store:
            for name in store.list_collections():
                store.client.drop_collection(name)
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{unique_prefix}-*"))
        if keys:
            client.delete(*keys)
        client.close()


def kill_during_an_import(settings, job_id: int, worker: WorkerProcess, timeout: float = 120) -> int:  # noqa: ANN001
    """SIGKILL ``worker`` as soon as one of the job's import tasks is running on the server; returns
    that task's id."""
    ref = bulk_ref(settings, job_id)
    deadline = time.monotonic() + timeout
    with VectorStore(settings) as store:
        while time.monotonic() < deadline:
            if store.has_collections(ref):
                running = [t for t in store.import_tasks(ref, BEHAVIOURS_KIND) if not t.finished]
                if running:
                    worker.kill()
                    return running[0].task_id
            time.sleep(0.05)
    raise AssertionError(f"no import task of job {job_id} seen running within {timeout} s: "
                         f"{jobs.job_progress(settings, job_id)}\n{worker_log(worker.log_path)}")


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.milvus_server
@pytest.mark.slow
def test_cli_bulk_worker_killed_mid_import_then_resumed(server_settings, tmp_path):
    settings = server_settings
    dataset = make_world(settings)
    created = muse_cli(settings, "backfill", "--source", SOURCE, "--dataset", dataset.name, "--bulk",
                       "--chunk-size", "1000", "--user-chunk-size", "20", "--detach")
    assert created.returncode == 0, created.stdout + created.stderr
    assert "behaviours through Milvus bulk import" in created.stdout
    job_id = jobs.find_job(settings, SOURCE, dataset.name)
    workers = [WorkerProcess(settings, pool="prefork", concurrency=1, log_path=tmp_path / "worker-0.log").start()]
    try:
        killed_task = kill_during_an_import(settings, job_id, workers[0])
        killed = jobs.job_progress(settings, job_id)
        assert killed.status == "running" and killed.users_processed < killed.users_total
        workers.append(WorkerProcess(settings, pool="prefork", concurrency=1,
                                     log_path=tmp_path / "worker-1.log").start())
        resumed = muse_cli(settings, "backfill", "resume", str(job_id))
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr + worker_log(workers[1].log_path)
    finally:
        for worker in workers:
            worker.stop(timeout=20)
    n = expected_behaviours(dataset)
    assert f"verified: {settings.milvus_prefix}_" in resumed.stdout and f"{n:,} behaviour rows" in resumed.stdout
    progress = jobs.job_progress(settings, job_id)
    assert progress.status == "done" and progress.behaviours_written == n
    ref = bulk_ref(settings, job_id)
    assert rows_and_keys(settings, dataset, ref) == (n, n)
    with VectorStore(settings) as store:  # the killed worker's task went on without it; its rows were replaced
        assert store.import_task(killed_task).finished
    assert max(c.attempts for c in _chunks(settings, job_id) if c.kind == "behaviours") >= 2
    assert "deleting the chunk's keys before importing it again" in (tmp_path / "worker-1.log").read_text()


@pytest.mark.slow
def test_cli_bulk_on_milvus_lite_says_so_and_upserts(settings):  # noqa: ANN001
    dataset = make_world(settings)
    run = muse_cli(settings, "backfill", "--source", SOURCE, "--dataset", dataset.name, "--bulk",
                   "--chunk-size", "1000", "--user-chunk-size", "30")
    assert run.returncode == 0, run.stdout + run.stderr
    notes = [line for line in run.stdout.splitlines() if "bulk import" in line]
    assert notes == ["Milvus Lite has no bulk import, so the behaviours are written with upserts despite --bulk."]
    n = expected_behaviours(dataset)
    assert f"{n:>10,} written" in run.stdout
    assert not bulk.is_bulk_job(settings, jobs.find_job(settings, SOURCE, dataset.name))
    with VectorStore(settings) as store:
        assert store.count_behaviours(bulk_ref(settings, 1)) == n


# -- a Milvus restart mid-import (the fault suite's style: a server of its own, killed) -------------
@pytest.mark.faults
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
def test_milvus_restarted_mid_import_recovers_with_no_person(tmp_path, postgres_url, redis_url, unique_prefix):
    from tests.milvus_process import MilvusProcess

    milvus = MilvusProcess(tmp_path / "milvus").start()
    settings = load_settings(
        env={}, data_dir=tmp_path / "muse-data", device="cpu", database_url=postgres_url, broker_url=redis_url,
        queue_prefix=f"{unique_prefix}-", milvus_uri=milvus.uri, milvus_prefix=unique_prefix,
        backfill_lease_s=5.0, backfill_backoff_s=0.5, backfill_retries=10, milvus_timeout_s=20.0,
    )
    worker = None
    try:
        dataset = make_world(settings)
        job_id = bulk.create_job(settings, SOURCE, dataset.name, chunk_size=1000, user_chunk_size=20)
        jobs.enqueue_job(settings, job_id)
        worker = WorkerProcess(settings, pool="prefork", concurrency=1, log_path=tmp_path / "worker.log").start()
        ref = bulk_ref(settings, job_id)
        deadline = time.monotonic() + 120
        running: list = []
        with VectorStore(settings) as store:
            while not running and time.monotonic() < deadline:
                if store.has_collections(ref):
                    running = [t for t in store.import_tasks(ref, BEHAVIOURS_KIND) if not t.finished]
                time.sleep(0.05)
        assert running, worker_log(worker.log_path)
        milvus.kill()  # SIGKILL, as a crash
        milvus.start()
        progress = jobs.job_progress(settings, job_id)
        deadline = time.monotonic() + 300
        while not progress.finished and time.monotonic() < deadline:  # no resume, no restart by hand
            time.sleep(0.5)
            progress = jobs.job_progress(settings, job_id)
        assert progress.status == "done", f"{progress}\n{worker_log(worker.log_path)}"
        n = expected_behaviours(dataset)
        assert progress.behaviours_written == n
        assert bulk.verify_job(settings, job_id).found == n
        assert rows_and_keys(settings, dataset, ref) == (n, n)
        with VectorStore(settings) as store:
            assert store.import_task(running[0].task_id).failed  # the server failed it when it restarted
    finally:
        if worker is not None:
            worker.stop(timeout=20)
        worker_context.reset()
        milvus.stop()
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{unique_prefix}-*"))
        if keys:
            client.delete(*keys)
        client.close()
