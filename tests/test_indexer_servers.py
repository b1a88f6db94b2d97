"""Indexer end to end on the server deployment: a real Redis broker, real Celery worker
subprocesses, the Milvus 2.3 server and PostgreSQL. Covers exact counts, vectors equal to a direct
encode, a worker killed with SIGKILL mid-job then resumed, and a corrupt image."""

from __future__ import annotations

import numpy as np
import pytest
from test_indexer_helpers import (
    SOURCE,
    corrupt_image,
    expected_behaviours,
    make_tiny_world,
    ref_of,
    register_random_encoder,
    wait_for_job,
    worker_log,
)

from indexer import jobs, worker_context
from indexer.celery_app import WorkerProcess
from muse.data.simworld import generate_simworld
from muse.settings import load_settings
from muse.vectorstore import VectorStore

SOURCE_2 = "i2i"
pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.milvus_server, pytest.mark.slow]


@pytest.fixture
def server_settings(tmp_path, postgres_url, milvus_server_uri, redis_url, unique_prefix):
    """Server settings; the queues get a per-test prefix so tests never take each other's messages."""
    settings = load_settings(
        env={}, data_dir=tmp_path / "muse-data", device="cpu", database_url=postgres_url,
        queue_prefix=f"{unique_prefix}-",
        milvus_uri=milvus_server_uri, milvus_prefix=unique_prefix, broker_url=redis_url,
        backfill_lease_s=5.0,  # the SIGKILLed worker's chunk is re-sent 5 s after its last renewal
    )
    store = VectorStore(settings)
    try:
        yield settings
    finally:
        for name in store.list_collections():  # every collection of this test's prefix
            store.client.drop_collection(name)
        store.close()
        worker_context.reset()
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{unique_prefix}-*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def start_worker(server_settings, tmp_path):
    """Start worker subprocesses with the test's settings; every one is stopped at the end."""
    started: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(server_settings, pool="prefork", concurrency=1, log_path=log_path)
        started.append(worker)
        return worker.start()

    try:
        yield start
    finally:
        for worker in started:
            worker.stop(timeout=20)


def _assert_vectors_match_direct_encode(settings, dataset, store, source, item_ids):
    from indexer.encode import encode_items

    found, stored = store.get_item_vectors(ref_of(settings, dataset.name, source), item_ids)
    direct = encode_items(settings, source, dataset, item_ids)
    assert found.tolist() == list(item_ids)
    np.testing.assert_allclose(stored, direct.vectors, atol=1e-5)


def test_backfill_then_sigkill_resume_with_a_corrupt_image(server_settings, start_worker):
    """Two phases sharing the first worker (worker start-up dominates the run time):

    1. ``openclip`` on the clean tiny dataset: exact counts, vectors equal a direct encode, a
       finished job is a no-op to re-run;
    2. ``i2i`` on a second tiny dataset with one corrupt image: the worker is SIGKILLed mid-job,
       a new worker is started, the job resumed: exact counts (no duplicates), the item reported.
    """
    settings = server_settings
    dataset = make_tiny_world(settings)
    worker = start_worker()

    # -- phase 1 ----------------------------------------------------------------------------------
    job_id = jobs.create_job(settings, SOURCE, dataset.name, chunk_size=150, user_chunk_size=20)
    assert jobs.enqueue_job(settings, job_id) == 4
    progress = wait_for_job(settings, job_id, timeout=240)
    assert progress.status == "done", worker_log(worker.log_path)
    ref = ref_of(settings, dataset.name, SOURCE)
    with VectorStore(settings) as store:
        assert store.count_items(ref) == dataset.n_items == progress.items_written
        assert store.count_behaviours(ref) == dataset.meta["n_behaviours"] == expected_behaviours(dataset)
        assert progress.behaviours_written == dataset.meta["n_behaviours"]
        first_user = dataset.histories_table().slice(0, 1).to_pylist()[0]
        assert store.count_behaviours(ref, first_user["user_id"]) == len(first_user["item_ids"])
        _assert_vectors_match_direct_encode(settings, dataset, store, SOURCE, dataset.item_ids()[[0, 151, 599]])
    assert progress.items_failed == 0 and progress.failed_items == []
    assert jobs.enqueue_job(settings, job_id) == 0  # re-running a finished job is a no-op
    assert jobs.job_progress(settings, job_id).chunks == {"done": sum(progress.chunks.values())}

    # -- phase 2 ----------------------------------------------------------------------------------
    other = generate_simworld(settings, size="tiny", seed=1)
    register_random_encoder(settings, SOURCE_2)
    bad_item = int(other.item_ids()[250])
    corrupt_image(other, bad_item)
    job_id = jobs.create_job(settings, SOURCE_2, other.name, chunk_size=30, user_chunk_size=15)
    jobs.enqueue_job(settings, job_id)
    wait_for_job(settings, job_id, timeout=120, until=lambda p: p.items_processed >= 30)
    worker.kill()
    killed = jobs.job_progress(settings, job_id)
    assert killed.status == "running" and killed.items_processed < killed.items_total

    worker = start_worker()
    jobs.enqueue_job(settings, job_id)
    progress = wait_for_job(settings, job_id, timeout=240)
    assert progress.status == "done", worker_log(worker.log_path)

    n_behaviours = expected_behaviours(other, {bad_item})
    assert progress.items_written == other.n_items - 1
    assert [fi[0] for fi in progress.failed_items] == [bad_item]
    assert progress.behaviours_written == n_behaviours
    ref_2 = ref_of(settings, other.name, SOURCE_2)
    with VectorStore(settings) as store:
        # Exact counts: chunks that ran twice upserted the same primary keys.
        assert store.count_items(ref_2) == other.n_items - 1
        assert store.count_behaviours(ref_2) == n_behaviours
        assert len(store.get_item_vectors(ref_2, [bad_item])[0]) == 0
        _assert_vectors_match_direct_encode(settings, other, store, SOURCE_2, other.item_ids()[[0, 299]])
        assert store.count_items(ref) == dataset.n_items  # the other source is untouched
