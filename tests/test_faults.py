"""Fault suite: each fault of a backfill's life injected into a real job, then the job must reach
``done`` with no manual step (no ``resume``, no worker restart by hand), exact item and behaviour
counts and no duplicate primary keys (``count(*)``, which counts duplicates on Milvus 2.3, equals
the number of distinct keys).

The suite starts servers of its own, so it can kill them: a Milvus 2.3 server
(:class:`tests.milvus_process.MilvusProcess`), a PostgreSQL cluster and a Redis server
(:mod:`tests.fault_servers`), each on free ports, stopped by PID. Real Celery worker subprocesses
run the chunks. The job: the ``tiny`` simworld (600 items, 60 users) with 60 item chunks and 20
behaviour chunks, so each fault lands mid-job. Leases are 3 s here (60 s by default).

At the end the suite prints its closing figures: faults injected, jobs recovered with no manual
step, rows expected / found / duplicated.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_indexer_helpers import SOURCE, expected_behaviours, make_tiny_world, ref_of, worker_log

from indexer import jobs, worker_context
from indexer.celery_app import WorkerProcess
from muse.errors import BackendUnavailable, MuseError
from muse.settings import Settings, load_settings
from muse.vectorstore import VectorStore
from tests.fault_servers import PostgresProcess, RedisProcess
from tests.milvus_process import MilvusProcess

pytestmark = [pytest.mark.faults, pytest.mark.slow]

CHUNK, USER_CHUNK = 10, 3  # 60 item and 20 behaviour chunks: every fault lands mid-job
JOB_TIMEOUT_S = 150.0
FAULT_SETTINGS: dict[str, Any] = {
    "backfill_lease_s": 3.0,
    "backfill_retries": 8,  # 0.5 s doubling: ~127 s of outage covered
    "backfill_backoff_s": 0.5,
    "milvus_timeout_s": 10.0,
    "milvus_search_timeout_s": 3.0,
}
FIGURES: dict[str, Any] = {"faults": [], "jobs": 0, "recovered": 0, "expected": 0, "found": 0, "duplicated": 0}


class _NoProgress:
    chunks: dict[str, int] = {}


class Servers:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.milvus = MilvusProcess(root / "milvus")
        self.postgres = PostgresProcess()
        self.redis = RedisProcess(root / "redis")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Servers]:
    s = Servers(Path(tmp_path_factory.mktemp("faults")))
    try:
        s.postgres.init()
        s.redis.start()
        s.milvus.start()
    except (FileNotFoundError, OSError, RuntimeError) as e:
        pytest.fail(f"the fault suite cannot start its servers: {e}")
    try:
        yield s
    finally:
        for stop in (s.milvus.stop, s.redis.stop, s.postgres.stop):
            try:
                stop()
            except Exception as e:  # keep stopping the others
                print(f"stopping a fault server failed: {e}")
        _print_figures(request)


def _print_figures(request: pytest.FixtureRequest) -> None:
    f = FIGURES
    lines = [
        "fault suite closing figures:",
        f"  faults injected: {len(f['faults'])} ({', '.join(f['faults'])})",
        f"  jobs recovered with no manual step: {f['recovered']}/{f['jobs']}",
        f"  rows expected {f['expected']:,}, found {f['found']:,}, duplicated {f['duplicated']:,}",
    ]
    request.config.muse_fault_figures = lines  # printed in the terminal summary (tests/conftest.py)
    print("\n".join(lines))


@pytest.fixture(scope="module")
def world(servers: Servers, tmp_path_factory: pytest.TempPathFactory):
    """One database and one tiny dataset (with its random openclip encoder) for every test."""
    data_dir = Path(tmp_path_factory.mktemp("faults-data"))
    settings = _settings(servers, data_dir, "setup")
    dataset = make_tiny_world(settings)
    return data_dir, dataset


def _settings(servers: Servers, data_dir: Path, prefix: str, **overrides: Any) -> Settings:
    return load_settings(
        env={}, data_dir=data_dir, device="cpu", database_url=servers.postgres.url,
        milvus_uri=servers.milvus.uri, milvus_prefix=prefix, broker_url=servers.redis.url,
        queue_prefix=f"{prefix}-", **{**FAULT_SETTINGS, **overrides},
    )


class Run:
    """One test's backfill: its settings (own collection and queue prefix), workers and job."""

    def __init__(self, servers: Servers, world: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.servers, (self.data_dir, self.dataset) = servers, world
        self.prefix = f"f{uuid.uuid4().hex[:8]}"
        self.settings = _settings(servers, self.data_dir, self.prefix)
        self.ref = ref_of(self.settings, self.dataset.name)
        self.tmp_path = tmp_path
        # Worker logs outlive pytest's temporary folders (MUSE_FAULT_LOGS, default under the temp dir).
        import os
        import tempfile

        root = Path(os.environ.get("MUSE_FAULT_LOGS", Path(tempfile.gettempdir()) / "muse-fault-logs"))
        self.log_dir = root / f"{time.strftime('%H%M%S')}-{self.prefix}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.workers: list[WorkerProcess] = []
        self.job_id: int | None = None
        self.faults: list[str] = []

    def worker(self, **overrides: Any) -> WorkerProcess:
        settings = _settings(self.servers, self.data_dir, self.prefix, **overrides)
        w = WorkerProcess(settings, pool="prefork", concurrency=1,
                          log_path=self.log_dir / f"worker-{len(self.workers)}.log")
        self.workers.append(w)
        return w.start()

    def start_job(self) -> int:
        self.job_id = jobs.create_job(self.settings, SOURCE, self.dataset.name, chunk_size=CHUNK,
                                      user_chunk_size=USER_CHUNK)
        jobs.enqueue_job(self.settings, self.job_id)
        return self.job_id

    def progress(self) -> Any:
        """The job's progress, or None while the database does not answer."""
        try:
            return jobs.job_progress(self.settings, self.job_id)
        except BackendUnavailable:
            return None

    def wait(self, until: Callable[[Any], bool], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.progress()
            if p is not None and until(p):
                return p
            time.sleep(0.25)
        raise AssertionError(f"job {self.job_id}: {what} not reached in {timeout:.0f} s: {self.progress()}\n"
                             + "\n".join(worker_log(w.log_path) for w in self.workers))

    def kill_a_worker_holding_a_chunk(self) -> WorkerProcess:
        """SIGKILL the worker (its whole process group) that holds a running chunk: the worker is
        frozen first and the chunk checked to be still its, so the kill lands mid-chunk."""
        import os
        import signal

        from sqlalchemy import select

        from muse import models
        from muse.db import session_scope

        def holders() -> list[tuple[int, str]]:
            with session_scope(self.settings) as session:
                return [tuple(r) for r in session.execute(
                    select(models.BackfillChunk.id, models.BackfillChunk.worker).where(
                        models.BackfillChunk.job_id == self.job_id, models.BackfillChunk.status == "running",
                        models.BackfillChunk.worker.is_not(None)))]

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for chunk_id, holder in holders():
                try:
                    group = os.getpgid(int(holder.rsplit(":", 1)[1]))
                except (ProcessLookupError, ValueError):
                    continue
                for w in self.workers:
                    if w.pid != group or not w.alive():
                        continue
                    os.killpg(group, signal.SIGSTOP)
                    if (chunk_id, holder) in holders():
                        w.kill()
                        return w
                    os.killpg(group, signal.SIGCONT)
            time.sleep(0.02)
        raise AssertionError("no worker was seen holding a running chunk")

    def mid_job(self) -> Any:
        return self.wait(lambda p: 2 * CHUNK <= p.items_processed and p.chunks.get("running", 0) >= 1,
                         60, "mid-job (2 item chunks done, one running)")

    def fault(self, name: str) -> None:
        """Count one injected fault of this run's job."""
        self.faults.append(name)
        FIGURES["faults"].append(name)

    def more_progress(self, chunks: int = 2) -> Any:
        """Wait until ``chunks`` more chunks are done (the job is still mid-way: the next fault)."""
        done = (self.progress() or _NoProgress()).chunks.get("done", 0)
        return self.wait(lambda p: p.chunks.get("done", 0) >= done + chunks and not p.finished, 90,
                         f"{chunks} more chunks done")

    def finish(self, fault: str | None = None) -> Any:
        """Wait for ``done`` (no manual step), then check exact, duplicate-free counts."""
        if fault is not None:
            self.fault(fault)
        fault = " + ".join(self.faults)
        p = self.wait(lambda p: p.finished, JOB_TIMEOUT_S, "a finished job")
        logs = "\n".join(worker_log(w.log_path) for w in self.workers)
        assert p.status == "done", f"{fault}: job ended {p.status}: {p.errors}\n{logs}"
        n_items, n_behaviours = self.dataset.n_items, expected_behaviours(self.dataset)
        found_items, unique_items, found_bhv, unique_bhv = count_rows(self.settings, self.dataset, self.ref)
        FIGURES["jobs"] += 1
        FIGURES["recovered"] += 1
        FIGURES["expected"] += n_items + n_behaviours
        FIGURES["found"] += found_items + found_bhv
        FIGURES["duplicated"] += (found_items - unique_items) + (found_bhv - unique_bhv)
        assert (found_items, unique_items) == (n_items, n_items), fault
        assert (found_bhv, unique_bhv) == (n_behaviours, n_behaviours), fault
        assert p.items_written == n_items and p.behaviours_written == n_behaviours
        return p

    def close(self) -> None:
        for w in self.workers:
            w.stop(timeout=15)
        try:
            with VectorStore(self.settings) as store:
                for name in store.list_collections():  # every collection of this test's prefix
                    store.client.drop_collection(name)
        except MuseError:
            pass
        worker_context.reset()


def count_rows(settings: Settings, dataset: Any, ref: Any) -> tuple[int, int, int, int]:
    """``count(*)`` and distinct primary keys of the item and behaviour collections."""
    with VectorStore(settings) as store:
        items_name, bhv_name = store.item_collection(ref), store.behaviour_collection(ref)
        found_items = store.count_items(ref)
        rows = store.client.query(items_name, filter="item_id >= -9223372036854775807",
                                  output_fields=["item_id"], limit=16384)
        unique_items = len({r["item_id"] for r in rows})
        found_bhv = store.count_behaviours(ref)
        unique_bhv = 0
        for user in dataset.histories_table().column("user_id").to_pylist():
            res = store.client.query(bhv_name, filter=f"user_id == {int(user)}", output_fields=["pk"], limit=16384)
            unique_bhv += len({r["pk"] for r in res})
        return found_items, unique_items, found_bhv, unique_bhv


@pytest.fixture
def run(servers, world, tmp_path, monkeypatch) -> Iterator[Run]:
    r = Run(servers, world, tmp_path, monkeypatch)
    try:
        yield r
    finally:
        if servers.milvus.proc is None or servers.milvus.proc.poll() is not None:
            servers.milvus.start()
        r.close()


# -- the faults ---------------------------------------------------------------------------------------
def test_worker_sigkilled_mid_job(run: Run) -> None:
    """The dead worker's chunk keeps its lease until it expires; the other worker's watchdog re-sends
    it; ``status`` shows the dead worker as dead meanwhile."""
    run.worker(), run.worker()
    run.start_job()
    run.mid_job()
    run.kill_a_worker_holding_a_chunk()
    p = run.finish("worker SIGKILL")
    assert p.dead_workers, f"`status` does not show the killed worker as dead: {p.workers}"


def test_resume_while_chunks_run_then_collections_dropped(run: Run) -> None:
    """``resume`` during a run re-sends no chunk a live worker holds (every chunk ran once); then
    the collections are dropped under the long-lived workers and a new job refills them."""
    run.worker(), run.worker()
    run.start_job()
    run.mid_job()
    for _ in range(3):
        jobs.enqueue_job(run.settings, run.job_id)
        time.sleep(0.5)
    run.finish("resume during a run")
    from muse import models
    from muse.db import session_scope

    with session_scope(run.settings) as session:
        attempts = [c.attempts for c in session.get(models.BackfillJob, run.job_id).chunks]
    assert max(attempts) == 1, f"a chunk ran more than once: attempts {attempts}"

    with VectorStore(run.settings) as store:
        store.drop_live(run.dataset.name, SOURCE)
        store.drop_collections(run.ref)
    run.faults = []
    run.start_job()
    run.finish("collections dropped under running workers")


def test_milvus_frozen_then_killed_and_restarted(run: Run) -> None:
    """Two Milvus faults in one job. Frozen (SIGSTOP): each call in flight ends at its deadline
    (search: 3 s here). Then killed and started again: chunks retry through the outage, after the
    restart the collections are loaded again (code 101); a client meanwhile only sees MuseErrors."""
    run.worker()
    run.start_job()
    run.mid_job()
    store = VectorStore(run.settings)
    target = np.ones((1, store.dim(run.ref)), np.float32)
    store.search_behaviours(run.ref, 1, target, k=5)  # connected, collection known: only the search is left
    run.servers.milvus.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable):
            store.search_behaviours(run.ref, 1, target, k=5)
        took = time.monotonic() - t0
        time.sleep(max(0.0, 4.0 - took))
    finally:
        run.servers.milvus.resume()
        store.close()
    assert took < FAULT_SETTINGS["milvus_search_timeout_s"] + 4.0, f"a frozen search took {took:.1f} s"
    if run.servers.milvus.proc.poll() is not None:  # 2.3 standalone may exit when its etcd lease lapsed
        run.servers.milvus.start()
    run.fault("Milvus frozen")
    run.more_progress()
    run.servers.milvus.kill()
    seen = _client_errors_during(run.settings, run.ref, 4.0)
    run.servers.milvus.start()
    seen += _client_errors_during(run.settings, run.ref, 3.0)
    assert all(isinstance(e, MuseError) for e in seen), [type(e) for e in seen]
    run.fault("Milvus killed and restarted")
    run.finish()


def test_postgres_down_past_the_retry_budget_then_redis_restarted(run: Run) -> None:
    """Two faults in one job. The worker's retry budget here is ~0.5 s and PostgreSQL stays down
    8 s: no failure can be recorded, so the messages are kept (retried) until the database is back.
    Then the broker is killed for 5 s and started again: the worker's watchdog sees it come back
    and has the supervisor start a fresh Celery child (Celery's Redis consumer can stay wedged)."""
    run.worker(backfill_retries=1)
    run.start_job()
    run.mid_job()
    run.servers.postgres.kill()
    time.sleep(8)
    run.servers.postgres.start()
    run.fault("PostgreSQL down past the retry budget")
    run.more_progress()
    run.servers.redis.kill()
    time.sleep(5)
    run.servers.redis.start()
    run.fault("Redis killed and restarted")
    run.finish()


def test_behaviour_chunks_not_sent_when_item_chunks_failed(run: Run) -> None:
    """Item chunks failed: the behaviour chunks are marked failed with the reason and never sent."""
    from sqlalchemy import update

    from muse import models
    from muse.db import session_scope

    job_id = jobs.create_job(run.settings, SOURCE, run.dataset.name, chunk_size=300, user_chunk_size=30)
    with session_scope(run.settings) as session:
        session.execute(update(models.BackfillJob).where(models.BackfillJob.id == job_id).values(status="running"))
        session.execute(
            update(models.BackfillChunk)
            .where(models.BackfillChunk.job_id == job_id, models.BackfillChunk.kind != "behaviours")
            .values(status="failed", error="DataError: test")
        )
    app = jobs.get_app(run.settings)
    jobs.advance_job(run.settings, job_id, app)
    p = jobs.job_progress(run.settings, job_id)
    assert p.status == "failed" and p.chunks == {"failed": 4}
    assert any("not run: 2 item chunk(s) failed" in e for e in p.errors)
    assert sum(jobs._queue_sizes(app).values()) == 0


def _client_errors_during(settings: Settings, ref: Any, seconds: float) -> list[BaseException]:
    """Search and count in a loop for ``seconds``; the exceptions seen (each must be a MuseError)."""
    seen: list[BaseException] = []
    deadline = time.monotonic() + seconds
    store = VectorStore(settings)
    try:
        while time.monotonic() < deadline:
            try:
                store.count_items(ref)
                store.search_behaviours(ref, 1, np.ones((1, store.dim(ref)), np.float32), k=3)
            except Exception as e:  # collected: the test asserts they are all MuseErrors
                seen.append(e)
            time.sleep(0.3)
    finally:
        try:
            store.close()
        except Exception as e:
            seen.append(e)
    return seen


def test_foreground_backfill_without_workers_stops_waiting(run: Run) -> None:
    """No worker at all: the foreground ``muse backfill`` says so after MUSE_BACKFILL_STALL_S."""
    import os
    import subprocess
    import sys

    from indexer.celery_app import settings_env

    env = {**os.environ, **settings_env(run.settings), "MUSE_BACKFILL_STALL_S": "4"}
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "muse_cli", "backfill", "--source", SOURCE, "--dataset", run.dataset.name,
         "--new", "--chunk-size", "300"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2, res
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "made no progress for 4 s" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 60
