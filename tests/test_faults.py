"""Fault suite: each fault of a backfill's life injected into a real job, then the job must reach
``done`` with no manual step (no ``resume``, no worker restart by hand), exact item and behaviour
counts and no duplicate primary keys (``count(*)``, which counts duplicates on Milvus 2.3, equals
the number of distinct keys).

The suite starts servers of its own, so it can kill them: a Milvus 2.3 server
(:class:`tests.milvus_process.MilvusProcess`), a PostgreSQL cluster and a Redis server
(:mod:`tests.fault_servers`), each on free ports, stopped by PID. Real Celery worker subprocesses
run the chunks. The job: the ``tiny`` simworld (600 items, 60 users) with 60 item chunks and 20
behaviour chunks, so each fault lands mid-job. Leases are 3 s here (60 s by default).

Outages: Milvus down for 150 s (past what retries alone once covered) during a backfill, which must
end ``done`` with no ``resume``; Milvus killed while behaviour chunks run (none may skip an item the
job wrote or be recorded done short of rows); an outage past ``MUSE_BACKFILL_OUTAGE_S`` failing the job with a
sentence; a worker waiting out a retry of its own failure never reported dead; Milvus frozen for
20 s while clients search on both retriever backends, every call within its deadline.

At the end the suite prints its closing figures: faults injected, jobs recovered with no manual
step, rows expected / found / duplicated, and the table of faults and outages with their measured
times (docs/indexer.md and docs/retriever.md carry it).
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
FIGURES: dict[str, Any] = {"faults": [], "jobs": 0, "recovered": 0, "expected": 0, "found": 0, "duplicated": 0,
                           "timings": []}


def timing(fault: str, outcome: str, measured: str) -> None:
    """One row of the closing table of faults and outages with their measured times."""
    FIGURES["timings"].append((fault, outcome, measured))
    print(f"fault timing: {fault} | {outcome} | {measured}")


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
    if f["timings"]:
        lines.append("  | fault | outcome | measured |")
        lines.append("  |---|---|---|")
        lines += [f"  | {a} | {b} | {c} |" for a, b, c in f["timings"]]
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
        self.events: list[tuple[Any, str]] = []  # (UTC time, what happened): kills and restarts

    def worker(self, **overrides: Any) -> WorkerProcess:
        settings = _settings(self.servers, self.data_dir, self.prefix, **overrides)
        w = WorkerProcess(settings, pool="prefork", concurrency=1,
                          log_path=self.log_dir / f"worker-{len(self.workers)}.log")
        self.workers.append(w)
        return w.start()

    def start_job(self, user_chunk_size: int = USER_CHUNK) -> int:
        self.job_id = jobs.create_job(self.settings, SOURCE, self.dataset.name, chunk_size=CHUNK,
                                      user_chunk_size=user_chunk_size)
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
        assert (found_items, unique_items) == (n_items, n_items), (
            f"{fault}: items: found {found_items} (count(*)), unique {unique_items}, expected {n_items}; the job "
            f"wrote {p.items_written}, failed {p.items_failed}")
        if (found_bhv, unique_bhv) != (n_behaviours, n_behaviours) or p.behaviours_written != n_behaviours:
            raise AssertionError(f"{fault}: " + behaviour_report(self.settings, self.dataset, self.ref, p, self.events))
        assert p.items_written == n_items and p.behaviours_written == n_behaviours
        return p

    def event(self, what: str) -> None:
        """Note a moment of the test (a kill, a restart) for the failure report (UTC, as the worker logs)."""
        import datetime as dt

        self.events.append((dt.datetime.now(dt.timezone.utc), what))

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


def behaviour_report(settings: Settings, dataset: Any, ref: Any, p: Any, events: list[tuple[Any, str]],
                     recount_after_s: float = 30.0) -> str:
    """Where behaviour rows went, for a failed count: count(*) against distinct keys against what the
    job says it wrote and skipped, then per chunk (its users, rows expected from the dataset, rows
    found per user, what the chunk recorded, when it finished against the test's kills and restarts);
    the rows are counted again after ``recount_after_s`` (missing then too: lost, not late)."""
    import pyarrow.compute as pc
    from sqlalchemy import select

    from muse import models
    from muse.db import session_scope

    table = dataset.histories_table()
    users = table.column("user_id").to_pylist()
    lengths = pc.list_value_length(table.column("item_ids")).to_pylist()
    expected = sum(lengths)

    def per_user(store: VectorStore) -> list[int]:
        name = store.behaviour_collection(ref)
        return [len({r["pk"] for r in store.client.query(name, filter=f"user_id == {int(u)}", output_fields=["pk"],
                                                         limit=16384)}) for u in users]

    with VectorStore(settings) as store:
        found, found_users = store.count_behaviours(ref), per_user(store)
    time.sleep(recount_after_s)
    with VectorStore(settings) as store:
        later, later_users = store.count_behaviours(ref), per_user(store)
    lines = [
        f"behaviours: expected {expected:,} (dataset), count(*) {found:,}, unique (per-user queries) "
        f"{sum(found_users):,}; {recount_after_s:.0f} s later count(*) {later:,}, unique {sum(later_users):,}; "
        f"the job: status {p.status}, behaviours_written {p.behaviours_written:,}, behaviours_skipped "
        f"{p.behaviours_skipped:,}, items_written {p.items_written:,}",
        "events: " + ", ".join(f"{what} at {t:%H:%M:%S.%f}"[:-3] for t, what in events),
    ]
    with session_scope(settings) as session:
        chunks = session.execute(
            select(models.BackfillChunk).where(models.BackfillChunk.job_id == p.job_id,
                                               models.BackfillChunk.kind == "behaviours")
            .order_by(models.BackfillChunk.index)).scalars().all()
        for c in chunks:
            rows = range(int(c.start), int(c.stop))
            want = sum(lengths[i] for i in rows)
            have, have_later = sum(found_users[i] for i in rows), sum(later_users[i] for i in rows)
            short = [f"{users[i]} ({later_users[i]}/{lengths[i]})" for i in rows if later_users[i] != lengths[i]]
            if have == have_later == want and c.n_written == want and not c.n_failed:
                continue
            lines.append(
                f"  chunk behaviours#{c.index} (users {c.start}:{c.stop}, id {c.id}): expected {want}, found {have}, "
                f"{recount_after_s:.0f} s later {have_later}; recorded {c.status}, n_written {c.n_written}, "
                f"n_failed {c.n_failed}, attempts {c.attempts}, started {c.started_at:%H:%M:%S.%f}, finished "
                f"{c.finished_at:%H:%M:%S.%f}, worker {c.worker}; users short (found/expected): {', '.join(short)}"
                if c.started_at and c.finished_at else
                f"  chunk behaviours#{c.index} (users {c.start}:{c.stop}): expected {want}, found {have}; "
                f"recorded {c.status}, n_written {c.n_written}, n_failed {c.n_failed}"
            )
    return "\n".join(lines)


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
    run.event("Milvus killed")
    seen = _client_errors_during(run.settings, run.ref, 4.0)
    run.servers.milvus.start()
    run.event("Milvus started again")
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
    t0 = time.monotonic()
    time.sleep(8)
    run.servers.postgres.start()
    back = time.monotonic()
    run.fault("PostgreSQL down past the retry budget")
    run.more_progress()
    timing("PostgreSQL down 8 s (retries: 1)", "chunks wait for the database; `status` cannot read it meanwhile "
           "(one sentence); the job continues", f"down {back - t0:.0f} s; 2 more chunks done "
           f"{time.monotonic() - back:.0f} s after it was back")
    run.servers.redis.kill()
    t0 = time.monotonic()
    seen = _watch(run, 6.0, period=0.5)
    run.servers.redis.start()
    back = time.monotonic()
    run.fault("Redis killed and restarted")
    p = run.finish()
    waits = [q.waiting for q in seen if q is not None and q.waiting]
    if not any("waiting for the broker at" in w for w in waits):  # what the job and the watchdog did meanwhile
        states = [None if q is None else (q.status, q.chunks, q.waiting) for q in seen]
        watchdog = [line for w in run.workers for line in worker_log(w.log_path).splitlines()
                    if "watchdog" in line or "broker" in line]
        raise AssertionError(f"no 'waiting for the broker' in {len(seen)} reads while Redis was down: {states}; "
                             "worker log (watchdog, broker):\n" + "\n".join(watchdog[-40:]))
    timing("Redis (the broker) down 6 s", "`status`: waiting for the broker; the worker restarts its consumer "
           "when the broker is back; job `done`", f"down {back - t0:.0f} s; job done {time.monotonic() - back:.0f} s "
           f"later ({p.elapsed_s:.0f} s in all)")


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


# -- outages: no person, and deadlines that hold -------------------------------------------------------
def _watch(run: Run, seconds: float, period: float = 1.0) -> list[Any]:
    """Poll the job's progress for ``seconds``; every progress read (None while the database is down)."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(run.progress())
        time.sleep(period)
    return seen


def _attempts(run: Run) -> list[int]:
    from muse import models
    from muse.db import session_scope

    with session_scope(run.settings) as session:
        return [c.attempts for c in session.get(models.BackfillJob, run.job_id).chunks]


def test_milvus_down_150_s_during_a_backfill(run: Run) -> None:
    """Milvus killed for 150 s mid-job (longer than the ~126 s that retries alone covered): the
    chunks wait for Milvus without spending attempts, their workers keep their leases (``status``
    says "waiting for Milvus", never "dead"), and the job ends ``done`` with exact counts, no resume."""
    run.worker(), run.worker()
    run.start_job()
    run.mid_job()
    run.servers.milvus.kill()
    run.event("Milvus killed")
    t0 = time.monotonic()
    seen = _watch(run, 150.0)
    run.servers.milvus.start()
    run.event("Milvus started again")
    back = time.monotonic()
    p = run.finish("Milvus down 150 s")
    done_after = time.monotonic() - back
    waits = [q.waiting for q in seen if q is not None and q.waiting]
    states = [st for q in seen if q is not None for st in q.workers.values()]
    assert waits and "waiting for Milvus at" in waits[-1], waits[-3:]
    assert any("waiting for Milvus" in st for st in states), states[-5:]
    assert not any(st.startswith("dead") for st in states), [st for st in states if st.startswith("dead")]
    assert all(q is None or q.chunks.get("failed", 0) == 0 for q in seen)
    assert not p.dead_workers and p.waiting is None
    attempts = _attempts(run)
    assert max(attempts) <= 2, f"the outage spent attempts: {attempts}"
    timing("Milvus down 150 s during a backfill (2 workers)",
           f"job `done` with exact counts, no resume; chunks waited without spending attempts (max {max(attempts)}); "
           "`status`: waiting for Milvus, workers alive",
           f"outage {back - t0:.0f} s (restart incl.); job done {done_after:.0f} s after Milvus was back")


def test_milvus_killed_while_behaviour_chunks_run(run: Run) -> None:
    """Milvus SIGKILLed while behaviour chunks run (some recorded done, writes in flight) and
    started again 10 s later. Right after a restart the 2.3 server may answer before it shows every
    row it acknowledged: a behaviour chunk must never skip an item the job wrote ("item has no
    vector") nor be recorded done short of its rows, and the job checks every chunk's rows before
    it is done. Exact counts, no resume."""
    run.worker(), run.worker()
    run.start_job(user_chunk_size=1)  # 60 behaviour chunks: the kill lands among them
    run.wait(lambda p: p.users_processed >= 3 and not p.finished, 120, "behaviour chunks running")
    run.servers.milvus.kill()
    run.event("Milvus killed")
    t0 = time.monotonic()
    time.sleep(10)
    run.servers.milvus.start()
    run.event("Milvus started again")
    back = time.monotonic()
    p = run.finish("Milvus killed during the behaviour chunks")
    assert p.behaviours_skipped == 0, p
    timing("Milvus killed while behaviour chunks run (2 workers)",
           "job `done` with exact counts, no behaviour skipped, no resume",
           f"outage {back - t0:.0f} s (restart incl.); job done {time.monotonic() - back:.0f} s after Milvus was back")


def test_outage_past_its_budget_fails_the_job_with_a_sentence(run: Run) -> None:
    """An outage longer than MUSE_BACKFILL_OUTAGE_S (8 s here) fails the job at once with one
    sentence naming the backend and how long; no chunk spent an attempt on it."""
    run.worker(backfill_outage_s=8.0)
    run.start_job()
    run.mid_job()
    run.servers.milvus.kill()
    t0 = time.monotonic()
    p = run.wait(lambda p: p.finished, 90, "the job failing past its outage budget")
    took = time.monotonic() - t0
    run.servers.milvus.start()
    assert p.status == "failed", p
    assert any("Milvus at" in e and "MUSE_BACKFILL_OUTAGE_S (8 s)" in e for e in p.errors), p.errors
    assert max(_attempts(run)) == 1
    timing("Milvus down past MUSE_BACKFILL_OUTAGE_S (8 s here; 1800 s by default)",
           "job `failed`: 'Milvus at ... was unavailable for N s, longer than MUSE_BACKFILL_OUTAGE_S'; "
           "`resume` continues it", f"failed {took:.0f} s after the kill")


def test_worker_in_a_retry_delay_is_not_reported_dead(run: Run) -> None:
    """A chunk's own failure (a Milvus call past its 1 s timeout while Milvus answers probes: frozen
    for 3 s) is retried after a 6 s backoff, twice the 3 s lease: the worker keeps the lease while it
    waits, ``status`` says "waiting for a retry", never "dead", and the chunk runs again (attempt 2)."""
    run.worker(milvus_timeout_s=1.0, backfill_backoff_s=6.0)
    run.start_job()
    run.mid_job()
    run.servers.milvus.pause()
    time.sleep(3.0)
    run.servers.milvus.resume()
    seen = _watch(run, 12.0, period=0.25)
    states = [st for q in seen if q is not None for st in q.workers.values()]
    if run.servers.milvus.proc.poll() is not None:
        run.servers.milvus.start()
    p = run.finish("a retry delay longer than the lease")
    assert any("waiting for a retry" in st for st in states), states[-5:]
    assert not any(st.startswith("dead") for st in states) and not p.dead_workers, p.workers
    attempts = _attempts(run)
    assert max(attempts) == 2, attempts
    timing("a chunk's own failure retried after a 6 s backoff (lease 3 s)",
           "worker `alive, waiting for a retry` throughout, never `dead`; the chunk's attempt 2 succeeds",
           f"{sum(a - 1 for a in attempts)} retried chunk(s); job done")


def test_milvus_frozen_20_s_while_clients_search(servers: Servers, tmp_path: Path) -> None:
    """Milvus frozen (SIGSTOP) for 20 s while clients loop on both retriever backends: every call
    returns or raises within the search deadline + 1 s; users already cached (with their target
    vectors) are answered from memory in under 1 s each, never failing; after the thaw both backends
    answer again."""
    import threading

    from muse.vectorstore import CollectionRef
    from retriever.client import Retriever

    deadline_s = FAULT_SETTINGS["milvus_search_timeout_s"]
    settings = _settings(servers, tmp_path, f"f{uuid.uuid4().hex[:8]}")
    ref, dim = CollectionRef("frozen-ds", "scl", 1), 16
    rng = np.random.default_rng(5)
    items = np.arange(100, 300, dtype=np.int64)
    vecs = rng.normal(size=(len(items), dim)).astype(np.float32)
    store = VectorStore(settings)
    store.ensure_collections(ref, dim)
    store.upsert_items(ref, items, vecs, np.zeros(len(items), np.int64))
    for user in range(1, 21):
        picked = rng.choice(len(items), 40, replace=False)
        store.upsert_behaviours(ref, np.full(40, user), np.arange(40), items[picked], vecs[picked])
    store.set_live(ref)
    cached, uncached, targets = list(range(1, 11)), list(range(11, 21)), [int(items[0]), int(items[1])]
    calls: dict[str, list[tuple[float, float, BaseException | None]]] = {"cached": [], "uncached": [], "milvus": []}
    stop = threading.Event()
    with (
        Retriever.from_settings("scl", settings, dataset="frozen-ds", backend="cache") as cache,
        Retriever.from_settings("scl", settings, dataset="frozen-ds", backend="milvus") as milvus,
    ):
        cache.prefetch(cached).result(timeout=60)
        for user in cached:
            cache.search(user, targets, k=5)
        milvus.search(1, targets, k=5)

        def loop(name: str, r: Retriever, users: list[int]) -> None:
            i = 0
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r.search(users[i % len(users)], targets, k=5)
                    err = None
                except Exception as e:  # collected: the test asserts they are all MuseErrors
                    err = e
                calls[name].append((t0, time.monotonic() - t0, err))
                i += 1
                time.sleep(0.05)

        threads = [threading.Thread(target=loop, args=a) for a in
                   (("cached", cache, cached), ("uncached", cache, uncached), ("milvus", milvus, cached))]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            servers.milvus.pause()
            frozen_at = time.monotonic()
            time.sleep(20.0)
            servers.milvus.resume()
            thawed_at = time.monotonic()
            if servers.milvus.proc.poll() is not None:  # 2.3 standalone may exit when its etcd lease lapsed
                servers.milvus.start()
            time.sleep(10.0)
        finally:
            stop.set()
            servers.milvus.resume()
            for t in threads:
                t.join(30)
        refresh_failures = cache.refresh_failures
    store.close()

    during = {n: [c for c in cs if frozen_at <= c[0] < thawed_at] for n, cs in calls.items()}
    slowest = {n: max((d for _, d, _ in cs), default=0.0) for n, cs in calls.items()}
    for name, cs in calls.items():
        assert all(d <= deadline_s + 1.0 for _, d, _ in cs), f"{name}: a call took {slowest[name]:.1f} s"
        assert all(e is None or isinstance(e, MuseError) for _, _, e in cs), [e for _, _, e in cs if e][:3]
    assert len(during["cached"]) >= 50 and all(e is None and d < 1.0 for _, d, e in during["cached"])
    assert any(e is not None for _, _, e in during["milvus"]), "the Milvus backend never noticed the freeze"
    ok_after = [t0 + d for t0, d, e in calls["milvus"] if t0 >= thawed_at and e is None]
    assert ok_after, "the Milvus backend did not answer after the thaw"
    cached_ms = sorted(d * 1e3 for _, d, _ in during["cached"])
    timing("Milvus frozen 20 s, clients on both retriever backends (search deadline 3 s)",
           f"cached users answered from memory ({len(during['cached'])} calls, none failed); uncached users and the "
           f"Milvus backend: `BackendUnavailable` at the deadline; live-version checks failed in the background "
           f"({refresh_failures})",
           f"cached p50 {cached_ms[len(cached_ms) // 2]:.1f} ms, max {cached_ms[-1]:.0f} ms; slowest call: cache "
           f"{max(slowest['cached'], slowest['uncached']):.1f} s, Milvus {slowest['milvus']:.1f} s; first Milvus "
           f"answer {ok_after[0] - thawed_at:.1f} s after the thaw")
