"""``muse backfill``: fill Milvus with a source's item and behaviour vectors through the worker queues.

``muse backfill --source NAME --dataset NAME [--version N]`` creates a job (or continues the
unfinished one for the same source version and dataset), enqueues its chunks, shows a progress bar
read from the database and ends with a summary. The job writes the collections of (dataset,
source, version), beside the live version; the first version of a (dataset, source) becomes live
when its job is done, later ones with ``muse source promote``. With the embedded filesystem broker it runs its own worker subprocess (the
only process that opens the Milvus Lite file) and stops it at the end.
"""

from __future__ import annotations

import argparse
from typing import Any

POLL_S = 0.5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backfill",
        help="backfill item and behaviour embeddings into Milvus (status, resume, cancel)",
        description="Without an action: create (or continue) a backfill job of --source for --dataset, "
        "enqueue it and follow it. Actions: status, resume, cancel, list.",
    )
    p.add_argument("--source", help="embedding source (scl, i2i, openclip, id, scl-taobao)")
    p.add_argument("--dataset", help="dataset name (see `muse data list`)")
    p.add_argument("--version", type=int, default=None,
                   help="source version to write (default: the newest; see `muse embed list`)")
    p.add_argument("--chunk-size", type=int, default=512, help="items per chunk (default: 512)")
    p.add_argument("--user-chunk-size", type=int, default=None,
                   help="users per behaviour chunk (default: 64; with bulk import about 1M behaviours a chunk)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--bulk", dest="bulk", action="store_true", default=None,
                      help="write the behaviours through Milvus bulk import (files the server imports); "
                           "default: automatic from MUSE_BULK_MIN_ROWS behaviours on a Milvus server")
    mode.add_argument("--no-bulk", dest="bulk", action="store_false", help="write the behaviours with upserts")
    p.add_argument("--items-only", action="store_true", help="skip the behaviour collection")
    p.add_argument("--users", type=int, default=None, metavar="N",
                   help="behaviours of the first N users only (a slice for trials and benchmarks)")
    p.add_argument("--new", action="store_true", help="start a new job even if one exists for this source+dataset")
    p.add_argument("--detach", action="store_true", help="enqueue and return at once (the job continues)")
    p.set_defaults(func=_run)
    actions = p.add_subparsers(dest="backfill_command", metavar="ACTION")
    st = actions.add_parser("status", help="progress of a job")
    st.add_argument("job", type=int, help="job id (see `muse backfill list`)")
    st.add_argument("--json", action="store_true", help="print the progress as JSON")
    st.set_defaults(func=_status)
    rs = actions.add_parser("resume", help="re-enqueue the chunks of a job that are not done")
    rs.add_argument("job", type=int, help="job id (see `muse backfill list`)")
    rs.add_argument("--detach", action="store_true", help="enqueue and return at once")
    rs.set_defaults(func=_resume)
    cn = actions.add_parser("cancel", help="cancel a job (resume continues it)")
    cn.add_argument("job", type=int, help="job id (see `muse backfill list`)")
    cn.set_defaults(func=_cancel)
    ls = actions.add_parser("list", help="the newest jobs")
    ls.add_argument("--limit", type=int, default=20, help="show at most this many jobs (default 20)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_list)


def _run(args: argparse.Namespace) -> int:
    from indexer import jobs
    from muse.errors import ConfigurationError
    from muse.settings import load_settings

    if not args.source or not args.dataset:
        raise ConfigurationError("muse backfill needs --source NAME and --dataset NAME (or an ACTION)")
    settings = load_settings()
    ref = _target(settings, args.source, args.dataset, args.version)
    job_id = None if args.new else jobs.find_job(settings, args.source, args.dataset, ref.version)
    if job_id is not None:
        progress = jobs.job_progress(settings, job_id)
        if progress.status == "done":
            print(f"job {job_id} ({ref}) is already done; nothing to do (--new to rerun)")
            _print_summary(progress)
            _print_version(settings, ref)
            return 0
        print(f"continuing job {job_id} ({progress.status}{_mode(settings, job_id)})")
    else:
        job_id = _create(settings, args, ref)
    _print_version(settings, ref, before=True)
    code = _drive(settings, job_id, args.detach)
    if not args.detach:
        code = _verify(settings, job_id, code)
        _print_version(settings, ref)
    return code


def _create(settings: Any, args: argparse.Namespace, ref: Any) -> int:
    """Create the job: behaviours by bulk import or by upserts (``indexer.bulk.choose``, which says
    when Milvus Lite makes it upserts)."""
    from indexer import bulk, jobs
    from muse.data.format import Dataset

    options = dict(chunk_size=args.chunk_size, behaviours=not args.items_only, version=ref.version,
                   max_users=args.users)
    choice = bulk.BulkChoice(False, None)
    if not args.items_only:
        n_behaviours = int(Dataset.open(settings, args.dataset).meta.get("n_behaviours") or 0)
        choice = bulk.choose(settings, n_behaviours, args.bulk)
    if choice.note:
        print(choice.note)
    if choice.bulk:
        job_id = bulk.create_job(settings, args.source, args.dataset, user_chunk_size=args.user_chunk_size, **options)
    else:
        size = jobs.DEFAULT_USER_CHUNK_SIZE if args.user_chunk_size is None else args.user_chunk_size
        job_id = jobs.create_job(settings, args.source, args.dataset, user_chunk_size=size, **options)
    print(f"created job {job_id}: {args.source} v{ref.version} on {args.dataset}{_mode(settings, job_id)}")
    return job_id


def _mode(settings: Any, job_id: int) -> str:
    from indexer import bulk

    return "; behaviours through Milvus bulk import" if bulk.is_bulk_job(settings, job_id) else ""


def _verify(settings: Any, job_id: int, code: int) -> int:
    """After a bulk job is done: wait until the behaviour collection shows exactly the rows written."""
    from indexer import bulk

    if code != 0 or not bulk.is_bulk_job(settings, job_id):
        return code
    found = bulk.verify_job(settings, job_id)
    print(f"verified: {found.collection} holds {found.found:,} behaviour rows, the {found.expected:,} the job "
          f"imported (visible after {found.waited_s:.1f} s)")
    return code



def _target(settings: Any, source: str, dataset: str, version: int | None) -> Any:
    """The CollectionRef a backfill of ``source`` (version ``version``, the newest when None) writes."""
    from indexer import jobs
    from muse import models
    from muse.data.format import Dataset
    from muse.db import session_scope
    from muse.vectorstore import CollectionRef

    source_id = jobs.resolve_source(settings, source, Dataset.open(settings, dataset), version)
    with session_scope(settings) as session:
        row = session.get(models.EmbeddingSource, source_id)
        return CollectionRef(dataset, source, int(row.version))


def _print_version(settings: Any, ref: Any, before: bool = False) -> None:
    """Which collections the job writes and where the version stands (the database record only:
    the embedded Milvus Lite file belongs to the worker while it runs)."""
    from muse import versions
    from muse.vectorstore import VectorStore

    store = VectorStore(settings)  # names only: no connection
    names = f"{store.item_collection(ref)}, {store.behaviour_collection(ref)}"
    live = versions.live_record(settings, ref.dataset, ref.source)
    pair = f"{ref.dataset}/{ref.source}"
    if before:
        if live is None:
            state = f"the first version of {pair}: live once the job is done"
        elif live == ref.version:
            state = f"the live version of {pair}"
        else:
            state = f"beside the live v{live} of {pair}; readers switch with `muse source promote {ref.dataset} " \
                    f"{ref.source} {ref.version}`"
        print(f"writing {ref} into collections {names} ({state})")
        return
    if live == ref.version:
        print(f"{ref} is live (collections {names})")
    else:
        state = f"live: v{live}" if live is not None else "no version is live"
        print(f"{ref} is not live ({state}); check `muse source list --dataset {ref.dataset}`, then "
              f"`muse source promote {ref.dataset} {ref.source} {ref.version}`")
    try:
        with VectorStore(settings) as store:
            for line in versions.legacy_report(settings, store, ref.source):
                print(f"note: {line}")
    except Exception as e:  # the hint must never fail a finished backfill
        import logging

        logging.getLogger(__name__).debug("legacy check skipped: %s", e)


def _drive(settings: Any, job_id: int, detach: bool) -> int:
    """Enqueue a job's pending chunks and follow it; the embedded deployment runs its own worker."""
    from indexer import jobs
    from indexer.celery_app import WorkerProcess, is_embedded_broker

    if not is_embedded_broker(settings):
        sent = jobs.enqueue_job(settings, job_id)
        print(f"enqueued {sent} chunk(s) on {settings.broker_url}; workers: `muse worker --queues gpu,cpu`")
        if detach:
            print(f"detached; follow with `muse backfill status {job_id}`")
            return 0
        return _follow(settings, job_id, None)
    if detach:
        return _detach_embedded(settings, job_id)
    worker = WorkerProcess(settings, pool="solo", log_path=settings.path("logs", f"backfill-{job_id}-worker.log"))
    worker.start()
    try:
        jobs.enqueue_job(settings, job_id)
        return _follow(settings, job_id, worker)
    finally:
        worker.stop()


def _detach_embedded(settings: Any, job_id: int) -> int:
    """Run ``muse backfill resume JOB`` in the background: it owns the worker and stops it at the end."""
    import os
    import subprocess
    import sys

    from indexer.celery_app import settings_env

    log_path = settings.path("logs", f"backfill-{job_id}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "muse_cli", "backfill", "resume", str(job_id)],
            env={**os.environ, **settings_env(settings)}, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    print(f"job {job_id} runs in the background (pid {proc.pid}, log {log_path}); "
          f"follow with `muse backfill status {job_id}`")
    return 0


def _follow(settings: Any, job_id: int, worker: Any) -> int:
    """Show a progress bar from the job table until the job finishes; print the summary."""
    import time

    from tqdm import tqdm

    from indexer import jobs
    from muse.errors import BackendUnavailable

    stall_s = float(settings.backfill_stall_s)
    recover_every = max(1.0, settings.backfill_lease_s / 2)
    progress = jobs.job_progress(settings, job_id)
    last_change, last_seen, last_recover = time.monotonic(), _signature(progress), 0.0
    failed_at = -float("inf")  # the last failed pass: leases get one lease period to be renewed after it
    with tqdm(total=progress.units_total, unit="row", desc=f"job {job_id}", dynamic_ncols=True) as bar:
        while True:
            now = time.monotonic()
            try:
                if now - last_recover >= recover_every:  # dead workers' chunks, lost messages
                    last_recover = now
                    jobs.recover_jobs(settings, job_id=job_id, judge_leases=now - failed_at > settings.backfill_lease_s)
                progress = jobs.job_progress(settings, job_id)
            except BackendUnavailable as e:  # the database or broker is down: keep waiting
                failed_at = now
                bar.set_postfix_str(f"waiting: {e}"[:80])
                progress = None
            if progress is not None:
                bar.n = progress.units_done
                bar.set_postfix(
                    items=progress.items_written, failed=progress.items_failed,
                    behaviours=progress.behaviours_written, refresh=False,
                )
                bar.refresh()
                if progress.finished:
                    break
                waiting = progress.waiting_for and (progress.waiting_s or 0) < settings.backfill_outage_s + stall_s
                if _signature(progress) != last_seen or waiting:
                    # Progress, or a wait for a backend that the workers report (not a stall:
                    # the job fails by itself past MUSE_BACKFILL_OUTAGE_S).
                    last_seen, last_change = _signature(progress), now
                if progress.waiting_for:
                    bar.set_postfix_str(f"waiting for {progress.waiting_for} ({progress.waiting_s or 0:.0f} s)"[:80])
            if worker is not None and not worker.alive():
                raise BackendUnavailable(
                    f"the backfill worker exited with code {worker.proc.returncode} before job {job_id} "
                    f"finished; see {worker.log_path}; continue with `muse backfill resume {job_id}`"
                )
            if stall_s and now - last_change > stall_s:
                raise BackendUnavailable(_stall_message(job_id, progress, stall_s))
            time.sleep(POLL_S)
    _print_summary(progress)
    return 0 if progress.status == "done" else 1


def _signature(p: Any) -> tuple[Any, ...]:
    """What changes whenever a chunk makes progress (counts per status, attempts, rows done)."""
    return (p.units_done, tuple(sorted(p.chunks.items())), p.items_written, p.behaviours_written,
            tuple(sorted(p.workers.items())))


def _stall_message(job_id: int, progress: Any, stall_s: float) -> str:
    if progress is None:
        state = "the database did not answer"
    else:
        dead = f"; dead workers: {', '.join(progress.dead_workers)}" if progress.dead_workers else ""
        state = f"chunks {progress.chunks}{dead}"
    return (
        f"job {job_id} made no progress for {stall_s:.0f} s ({state}); is a worker running "
        f"(`muse worker`) and are the servers up? The job is kept: workers continue it when they "
        f"run, `muse backfill status {job_id}` shows it (MUSE_BACKFILL_STALL_S sets this wait)"
    )


def _fmt_rate(rate: float | None) -> str:
    return f"{rate:,.1f}/s" if rate else "-"


def _print_summary(p: Any) -> None:
    print(f"job {p.job_id} {p.status}: source {p.source} on dataset {p.dataset}")
    print(f"  items:      {p.items_written:>10,} written  {p.items_failed:>6,} failed   {_fmt_rate(p.items_per_s)}")
    print(
        f"  behaviours: {p.behaviours_written:>10,} written  {p.behaviours_skipped:>6,} skipped  "
        f"{_fmt_rate(p.behaviours_per_s)}  (skipped: item has no vector)"
    )
    if p.elapsed_s is not None:
        print(f"  elapsed:    {p.elapsed_s:.1f} s; chunks: {p.chunks}")
    if p.failed_items:
        print(f"  failed items ({p.items_failed}):")
        for item_id, reason in p.failed_items[:20]:
            print(f"    {item_id}: {reason}")
        if p.items_failed > 20:
            print(f"    ... {p.items_failed - 20} more (`muse backfill status {p.job_id} --json`)")
    for err in p.errors[:10]:
        print(f"  error: {err}")
    if p.waiting:
        print(f"  {p.waiting}")
    for name, state in p.workers.items():
        print(f"  worker {name}: {state}")


def _status(args: argparse.Namespace) -> int:
    import json

    from indexer import jobs
    from muse.settings import load_settings

    settings = load_settings()
    progress = jobs.job_progress(settings, args.job)
    if args.json:
        print(json.dumps(progress.to_dict(), indent=2))
    else:
        done = f"{progress.units_done}/{progress.units_total} rows"
        print(f"{done}{_mode(settings, args.job)}")
        _print_summary(progress)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from indexer import jobs
    from muse.settings import load_settings

    settings = load_settings()
    progress = jobs.job_progress(settings, args.job)
    if progress.status == "done":
        print(f"job {args.job} is already done; nothing to do")
        _print_summary(progress)
        return 0
    code = _drive(settings, args.job, args.detach)
    return code if args.detach else _verify(settings, args.job, code)


def _cancel(args: argparse.Namespace) -> int:
    from indexer import jobs
    from muse.settings import load_settings

    jobs.cancel_job(load_settings(), args.job)
    print(f"job {args.job} cancelled (`muse backfill resume {args.job}` continues it)")
    return 0


def _list(args: argparse.Namespace) -> int:
    from indexer import jobs
    from muse.settings import load_settings

    rows = jobs.list_jobs(load_settings(), args.limit)
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no backfill jobs yet: `muse backfill --source scl --dataset NAME`")
        return 0
    print(f"{'job':>5}  {'status':<10} {'source':<12} {'dataset':<24} created")
    for r in rows:
        print(f"{r['job_id']:>5}  {r['status']:<10} {r['source']:<12} {r['dataset']:<24} {r['created_at']}")
    return 0
