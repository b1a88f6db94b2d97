"""The version lifecycle of a (dataset, embedding source): versions beside each other, one live.

Every backfill of a source version for a dataset writes that version's own pair of collections
(:class:`muse.vectorstore.CollectionRef`, ``<prefix>_<dataset>_<source>_v<N>_items|_behaviours``).
The *live* version is the one readers use unless they ask for another: it is recorded in the
metadata database (``live_versions``, with the versions that were live before it) and mirrored by
two Milvus aliases ``<prefix>_<dataset>_<source>_items|_behaviours`` (Milvus Lite and 2.3+ servers
both support aliases). Readers (:class:`retriever.client.Retriever`) resolve the alias.

Lifecycle: ``muse backfill`` writes version N beside the live one (the first version of a pair
becomes live when its job is done) -> ``muse source list`` / :func:`check_promotable` ->
:func:`promote` (one alias switch per collection kind) -> :func:`rollback` to the previous live
version -> :func:`drop` of a version that is not live. Collections of the old naming
(``<prefix>_<source>_items``) are found by :func:`legacy_report` and kept by :func:`adopt`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from muse import models
from muse.db import session_scope
from muse.errors import ConfigurationError, NotFoundError
from muse.models import utcnow
from muse.settings import Settings

log = logging.getLogger(__name__)

#: A version that stopped being live less than this many seconds ago is not dropped: readers
#: follow a switch within their ``refresh_s`` (2 s by default) and may still be searching it.
DROP_GRACE_S = 10.0


@dataclass
class VersionInfo:
    """One version of a (dataset, source), as ``muse source list`` shows it."""

    dataset: str
    source: str
    version: int
    items_collection: str
    behaviours_collection: str
    in_milvus: bool  # both collections exist
    items: int | None  # rows in Milvus (None when not counted or absent)
    behaviours: int | None
    job_id: int | None  # newest backfill job of this version
    job_status: str | None
    live: bool
    promoted_at: str | None  # last time it became live (ISO 8601)
    adopted_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SwitchResult:
    """What :func:`promote` or :func:`rollback` did, and how long the switch took."""

    dataset: str
    source: str
    version: int
    previous: int | None
    items_collection: str
    behaviours_collection: str
    check_s: float  # checks before the switch (job status, row counts)
    switch_s: float  # the alias switch and the database record
    problems_ignored: list[str] = field(default_factory=list)  # with force=True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ref(dataset: str, source: str, version: int) -> Any:
    from muse.vectorstore import CollectionRef

    return CollectionRef(dataset, source, version)


def _dataset_row(session: Any, name: str) -> models.Dataset:
    row = session.scalars(select(models.Dataset).where(models.Dataset.name == name)).first()
    if row is None:
        raise NotFoundError(f"dataset {name!r} is not registered (see `muse data list`)")
    return row


def job_ref(settings: Settings, job_id: int) -> Any:
    """The :class:`muse.vectorstore.CollectionRef` a backfill job writes."""
    with session_scope(settings) as session:
        row = session.execute(
            select(models.Dataset.name, models.EmbeddingSource.name, models.EmbeddingSource.version)
            .join(models.BackfillJob, models.BackfillJob.dataset_id == models.Dataset.id)
            .join(models.EmbeddingSource, models.EmbeddingSource.id == models.BackfillJob.source_id)
            .where(models.BackfillJob.id == int(job_id))
        ).first()
    if row is None:
        raise NotFoundError(f"backfill job {job_id} does not exist")
    return _ref(row[0], row[1], int(row[2]))


def _version_row(session: Any, dataset_id: int, source: str, version: int) -> models.SourceVersionRecord | None:
    return session.scalars(
        select(models.SourceVersionRecord).where(
            models.SourceVersionRecord.dataset_id == dataset_id,
            models.SourceVersionRecord.source_name == source,
            models.SourceVersionRecord.version == version,
        )
    ).first()


def _record_version(
    session: Any, store: Any, dataset_id: int, ref: Any, job_id: int | None = None, adopted_from: str | None = None
) -> models.SourceVersionRecord:
    row = _version_row(session, dataset_id, ref.source, ref.version)
    if row is None:
        row = models.SourceVersionRecord(
            dataset_id=dataset_id, source_name=ref.source, version=ref.version,
            items_collection=store.item_collection(ref), behaviours_collection=store.behaviour_collection(ref),
        )
        session.add(row)
    if job_id is not None:
        row.job_id = int(job_id)
    if adopted_from is not None:
        row.adopted_from = adopted_from
    return row


def live_record(settings: Settings, dataset: str, source: str) -> int | None:
    """The live version of (dataset, source) as the database records it (None: none yet)."""
    with session_scope(settings) as session:
        ds = session.scalars(select(models.Dataset.id).where(models.Dataset.name == dataset)).first()
        if ds is None:
            return None
        live = session.get(models.LiveVersion, (ds, source))
        return None if live is None else int(live.version)


def _newest_job(session: Any, dataset_id: int, source: str, version: int) -> models.BackfillJob | None:
    return session.scalars(
        select(models.BackfillJob)
        .join(models.EmbeddingSource, models.EmbeddingSource.id == models.BackfillJob.source_id)
        .where(
            models.BackfillJob.dataset_id == dataset_id,
            models.EmbeddingSource.name == source,
            models.EmbeddingSource.version == version,
        )
        .order_by(models.BackfillJob.id.desc())
    ).first()


# -- backfill hook ---------------------------------------------------------------------------------
def on_backfill_done(settings: Settings, job_id: int, store: Any) -> None:
    """Called when a backfill job finished ``done``: records the version, and makes it live when
    its (dataset, source) has no live version yet (later versions wait for :func:`promote`)."""
    ref = job_ref(settings, job_id)
    with session_scope(settings) as session:
        ds = _dataset_row(session, ref.dataset)
        _record_version(session, store, ds.id, ref, job_id=job_id)
        live = session.get(models.LiveVersion, (ds.id, ref.source))
        dataset_id = ds.id
    if live is not None:
        log.info("job %d wrote %s beside the live v%d", job_id, ref, live.version)
        return
    alias = store.live_version(ref.dataset, ref.source)
    if alias is None:
        store.set_live(ref)
        alias = ref.version
        log.info("job %d: %s is the first version of %s/%s and is live", job_id, ref, ref.dataset, ref.source)
    with session_scope(settings) as session:
        if session.get(models.LiveVersion, (dataset_id, ref.source)) is None:
            session.add(models.LiveVersion(dataset_id=dataset_id, source_name=ref.source, version=alias, previous=[]))
            row = _version_row(session, dataset_id, ref.source, alias)
            if row is not None:
                row.promoted_at = utcnow()


# -- checks and switches ---------------------------------------------------------------------------
def _expected_counts(location: str) -> tuple[int, int]:
    """Items and behaviours of the dataset stored at ``location``."""
    from muse.data.format import Dataset

    ds = Dataset(Path(location))
    behaviours = ds.meta.get("n_behaviours") or 0
    if not behaviours:
        behaviours = int(ds.histories().offsets[-1]) if ds.n_users else 0
    return ds.n_items, int(behaviours)


def check_promotable(settings: Settings, store: Any, dataset: str, source: str, version: int) -> list[str]:
    """Why version ``version`` of (dataset, source) may not become live: each problem in words
    (an empty list: it may). Checks that the collections exist, that the version's newest backfill
    job is ``done``, and that its item and behaviour counts equal the dataset's."""
    ref = _ref(dataset, source, version)
    problems: list[str] = []
    with session_scope(settings) as session:
        ds = _dataset_row(session, dataset)
        location = ds.location
        job = _newest_job(session, ds.id, source, version)
        record = _version_row(session, ds.id, source, version)
        job_desc = None
        if job is not None:
            pending = [c for c in job.chunks if c.status != "done"]
            job_desc = (job.id, job.status, len(pending), len(job.chunks))
        adopted = record is not None and record.adopted_from is not None
    if not store.has_collections(ref):
        versions = store.versions(dataset, source)
        return [f"{ref} has no collections in Milvus ({store.item_collection(ref)}, "
                f"{store.behaviour_collection(ref)}); versions present: {versions or 'none'}"]
    if job_desc is None:
        if not adopted:
            problems.append(f"no backfill job wrote {ref}: run `muse backfill --source {source} --dataset {dataset} "
                            f"--version {version}`")
    elif job_desc[1] != "done":
        problems.append(f"backfill job {job_desc[0]} of {ref} is {job_desc[1]}, not done: {job_desc[2]} of "
                        f"{job_desc[3]} chunks unfinished (`muse backfill resume {job_desc[0]}`)")
    want_items, want_behaviours = _expected_counts(location)
    items, behaviours = store.count_items(ref), store.count_behaviours(ref)
    if items != want_items:
        problems.append(f"{store.item_collection(ref)} holds {items} items, dataset {dataset!r} has {want_items} "
                        f"({want_items - items} missing)")
    if behaviours != want_behaviours:
        problems.append(f"{store.behaviour_collection(ref)} holds {behaviours} behaviours, dataset {dataset!r} has "
                        f"{want_behaviours} ({want_behaviours - behaviours} missing)")
    return problems


def _switch(
    settings: Settings, store: Any, ref: Any, previous_stack: list[int] | None, check_s: float,
    ignored: list[str],
) -> SwitchResult:
    """Point the aliases at ``ref`` and record it live; ``previous_stack`` replaces the history
    (None: push the current live version onto it)."""
    t0 = time.perf_counter()
    old_alias = store.live_version(ref.dataset, ref.source)
    switched = False
    try:
        with session_scope(settings) as session:
            ds = _dataset_row(session, ref.dataset)
            # the row stays locked (PostgreSQL) until the aliases and the record agree: two
            # promotes of one pair at once are serialised instead of leaving them apart
            live = session.get(models.LiveVersion, (ds.id, ref.source), with_for_update=True)
            old = None if live is None else int(live.version)
            store.set_live(ref)
            switched = True
            if live is None:
                live = models.LiveVersion(dataset_id=ds.id, source_name=ref.source, version=ref.version, previous=[])
                session.add(live)
            if previous_stack is not None:
                live.previous = list(previous_stack)
            elif old is not None and old != ref.version:
                live.previous = [*[v for v in live.previous if v != old], old]
            live.version = ref.version
            live.promoted_at = utcnow()
            row = _record_version(session, store, ds.id, ref)
            row.promoted_at = live.promoted_at
    except BaseException:
        if switched and old_alias is not None and old_alias != ref.version:  # keep alias and record agreeing
            store.set_live(_ref(ref.dataset, ref.source, old_alias))
        raise
    switch_s = time.perf_counter() - t0
    log.info("%s/%s: live v%s -> v%d in %.3f s", ref.dataset, ref.source, old, ref.version, switch_s)
    return SwitchResult(
        ref.dataset, ref.source, ref.version, old, store.item_collection(ref), store.behaviour_collection(ref),
        check_s, switch_s, ignored,
    )


def promote(settings: Settings, store: Any, dataset: str, source: str, version: int, force: bool = False) -> SwitchResult:
    """Make ``version`` the live version of (dataset, source): both aliases switch, readers follow.

    Raises:
        ConfigurationError: the version may not become live (the message names every problem:
        missing collections, an unfinished job, counts short of the dataset's); ``force`` skips
        the job and count checks (never the existence of the collections).
        NotFoundError: unknown dataset.
    """
    ref = _ref(dataset, source, version)
    t0 = time.perf_counter()
    problems = check_promotable(settings, store, dataset, source, version)
    if problems and (not force or not store.has_collections(ref)):
        raise ConfigurationError(f"cannot promote {ref}: " + "; ".join(problems))
    if problems:
        log.warning("promoting %s despite: %s", ref, "; ".join(problems))
    return _switch(settings, store, ref, None, time.perf_counter() - t0, problems)


def rollback(settings: Settings, store: Any, dataset: str, source: str) -> SwitchResult:
    """Go back to the version that was live before the current one.

    Raises:
        ConfigurationError: no earlier live version, or its collections were dropped.
    """
    with session_scope(settings) as session:
        ds = _dataset_row(session, dataset)
        live = session.get(models.LiveVersion, (ds.id, source))
        if live is None:
            raise ConfigurationError(f"{dataset}/{source} has no live version to roll back from")
        stack = list(live.previous)
        current = int(live.version)
    if not stack:
        raise ConfigurationError(f"{dataset}/{source} v{current} is the only version that was ever live: "
                                 "nothing to roll back to")
    target = _ref(dataset, source, int(stack[-1]))
    if not store.has_collections(target):
        raise ConfigurationError(f"cannot roll back {dataset}/{source} to v{target.version}: its collections were dropped")
    return _switch(settings, store, target, stack[:-1], 0.0, [])


def drop(settings: Settings, store: Any, dataset: str, source: str, version: int) -> None:
    """Drop a version's collections and its record; the live version is refused.

    Raises:
        ConfigurationError: ``version`` is live (in the record or the alias).
    """
    ref = _ref(dataset, source, version)
    live = live_record(settings, dataset, source)
    alias = store.live_version(dataset, source)
    if version in (live, alias):
        raise ConfigurationError(
            f"{ref} is the live version of {dataset}/{source}; promote another version (or roll back) first"
        )
    with session_scope(settings) as session:
        ds = _dataset_row(session, dataset)
        live_row = session.get(models.LiveVersion, (ds.id, source))
        # the version the last switch replaced: the most recently promoted one that is not live
        replaced = session.scalars(
            select(models.SourceVersionRecord.version)
            .where(models.SourceVersionRecord.dataset_id == ds.id, models.SourceVersionRecord.source_name == source,
                   models.SourceVersionRecord.promoted_at.is_not(None),
                   models.SourceVersionRecord.version != (live_row.version if live_row is not None else -1))
            .order_by(models.SourceVersionRecord.promoted_at.desc())
        ).first()
        if live_row is not None and replaced == version:
            promoted = live_row.promoted_at
            promoted = promoted if promoted.tzinfo else promoted.replace(tzinfo=utcnow().tzinfo)
            ago = (utcnow() - promoted).total_seconds()
            if ago < DROP_GRACE_S:
                raise ConfigurationError(
                    f"{ref} was live until {ago:.1f} s ago and readers may still be on it (they follow a switch "
                    f"within their refresh interval); drop it in {DROP_GRACE_S - ago:.0f} s"
                )
    if not store.has_collections(ref) and ref.version not in store.versions(dataset, source):
        with session_scope(settings) as session:
            ds = _dataset_row(session, dataset)
            known = _version_row(session, ds.id, source, version) is not None
        if not known:
            raise NotFoundError(f"{ref} has no collections and no record")
    with session_scope(settings) as session:  # a running backfill must not write the collections again
        ds = _dataset_row(session, dataset)
        job = _newest_job(session, ds.id, source, version)
        if job is not None and job.status in ("pending", "running"):
            job.status = "cancelled"
            log.info("cancelled backfill job %d of %s", job.id, ref)
    store.drop_collections(ref)
    with session_scope(settings) as session:
        ds = _dataset_row(session, dataset)
        session.execute(delete(models.SourceVersionRecord).where(
            models.SourceVersionRecord.dataset_id == ds.id, models.SourceVersionRecord.source_name == source,
            models.SourceVersionRecord.version == version))
        live_row = session.get(models.LiveVersion, (ds.id, source))
        if live_row is not None and version in live_row.previous:
            live_row.previous = [v for v in live_row.previous if v != version]
    log.info("dropped %s", ref)


# -- listing ---------------------------------------------------------------------------------------
def list_versions(
    settings: Settings, store: Any, dataset: str | None = None, source: str | None = None, counts: bool = True
) -> list[VersionInfo]:
    """Every known version (recorded, backfilled by a job, or present in Milvus) of every
    (dataset, source), or of the ones given, with counts, newest job, live flag and promotion time."""
    with session_scope(settings) as session:
        q = (
            select(models.Dataset.name, models.Dataset.id, models.EmbeddingSource.name, models.EmbeddingSource.version)
            .join(models.BackfillJob, models.BackfillJob.dataset_id == models.Dataset.id)
            .join(models.EmbeddingSource, models.EmbeddingSource.id == models.BackfillJob.source_id)
        )
        keys: set[tuple[str, int, str, int]] = {(r[0], r[1], r[2], int(r[3])) for r in session.execute(q)}
        for rec, name in session.execute(
            select(models.SourceVersionRecord, models.Dataset.name)
            .join(models.Dataset, models.Dataset.id == models.SourceVersionRecord.dataset_id)
        ):
            keys.add((name, rec.dataset_id, rec.source_name, rec.version))
        if dataset is not None:
            keys = {k for k in keys if k[0] == dataset}
        if source is not None:
            keys = {k for k in keys if k[2] == source}
        pairs = {(k[0], k[1], k[2]) for k in keys}
        for name, ds_id, src in pairs:  # versions in Milvus that no record or job mentions
            for v in store.versions(name, src):
                keys.add((name, ds_id, src, v))
        out = []
        for name, ds_id, src, v in sorted(keys):
            ref = _ref(name, src, v)
            job = _newest_job(session, ds_id, src, v)
            rec = _version_row(session, ds_id, src, v)
            live = session.get(models.LiveVersion, (ds_id, src))
            present = store.has_collections(ref)
            if not present and rec is None and (job is None or job.status in ("cancelled", "failed")):
                continue  # dropped, or a backfill that never got anywhere
            out.append(VersionInfo(
                dataset=name, source=src, version=v,
                items_collection=store.item_collection(ref), behaviours_collection=store.behaviour_collection(ref),
                in_milvus=present,
                items=store.count_items(ref) if present and counts else None,
                behaviours=store.count_behaviours(ref) if present and counts else None,
                job_id=None if job is None else job.id, job_status=None if job is None else job.status,
                live=live is not None and int(live.version) == v,
                promoted_at=rec.promoted_at.isoformat() if rec is not None and rec.promoted_at else None,
                adopted_from=None if rec is None else rec.adopted_from,
            ))
    return out


# -- legacy collections ----------------------------------------------------------------------------
def legacy_report(settings: Settings, store: Any, source: str | None = None) -> list[str]:
    """One sentence per legacy source found in Milvus (old naming, no dataset or version), each
    with the exact command to run. Empty when there are none."""
    legacy = store.legacy_collections()
    by_source: dict[str, list[str]] = {}
    for c in legacy:
        by_source.setdefault(c.source, []).append(c.name)
    lines = []
    for name_part, names in sorted(by_source.items()):
        real = name_part.replace("_", "-") if source is None else source
        if source is not None and name_part != source.replace("-", "_"):
            continue
        datasets = _datasets_backfilled(settings, name_part)
        head = f"Milvus holds collections of the old naming for source {real!r} ({', '.join(sorted(names))})"
        if len(datasets) == 1:
            ds, version = datasets[0]
            lines.append(f"{head}, written for dataset {ds!r}: run `muse source adopt {real} --dataset {ds} "
                         f"--version {version}` to keep them as {ds}/{real} v{version}, or "
                         f"`muse source adopt {real} --drop` to drop them")
        elif datasets:
            names_ds = ", ".join(repr(d) for d, _ in datasets)
            backfills = "; ".join(f"`muse backfill --source {real} --dataset {d}`" for d, _ in datasets)
            lines.append(f"{head}; they mix datasets {names_ds} and cannot be split: run {backfills}, "
                         f"then `muse source adopt {real} --drop`")
        else:
            lines.append(f"{head}; no backfill job records their dataset: run `muse source adopt {real} "
                         f"--dataset NAME --version N` with the dataset and source version they were written "
                         f"for, or `muse source adopt {real} --drop`")
    return lines


def _datasets_backfilled(settings: Settings, name_part: str) -> list[tuple[str, int]]:
    """(dataset, newest source version) of each dataset with a done backfill of the old naming
    (a job without ``options["naming"]``) of a source whose name became ``name_part`` in it."""
    try:
        with session_scope(settings) as session:
            rows = session.execute(
                select(models.Dataset.name, models.EmbeddingSource.name, models.EmbeddingSource.version,
                       models.BackfillJob.options)
                .join(models.BackfillJob, models.BackfillJob.dataset_id == models.Dataset.id)
                .join(models.EmbeddingSource, models.EmbeddingSource.id == models.BackfillJob.source_id)
                .where(models.BackfillJob.status == "done")
            ).all()
    except Exception as e:  # an unmigrated database says nothing about the collections
        log.debug("no backfill jobs to consult: %s", e)
        return []
    newest: dict[str, int] = {}
    for ds, src, version, options in rows:
        if (options or {}).get("naming") == "per-version":  # wrote versioned collections, not these
            continue
        if src.replace("-", "_") == name_part:
            newest[ds] = max(newest.get(ds, 0), int(version))
    return sorted(newest.items())


def adopt(
    settings: Settings, store: Any, source: str, dataset: str | None = None, version: int | None = None,
    drop_legacy: bool = False,
) -> VersionInfo | None:
    """Keep the legacy collections of ``source`` as ``dataset``/``source`` v``version`` (renamed
    to the new names, identity set, recorded; live when the pair has no live version), or drop
    them (``drop_legacy``). Returns the adopted version (None after a drop).

    Raises:
        NotFoundError: no legacy collections of ``source``.
        ConfigurationError: no dataset given, the target version exists already, or the legacy
        collections mix datasets (backfill each dataset again instead).
    """
    legacy = [c for c in store.legacy_collections() if c.source == source.replace("-", "_")]
    if not legacy:
        raise NotFoundError(f"Milvus holds no legacy collections of source {source!r} "
                            f"(prefix {settings.milvus_prefix!r})")
    if drop_legacy:
        store.drop_legacy(legacy)
        log.info("dropped legacy collections %s", [c.name for c in legacy])
        return None
    datasets = _datasets_backfilled(settings, source.replace("-", "_"))
    if dataset is None:
        raise ConfigurationError(f"muse source adopt {source} needs --dataset NAME: "
                                 + (legacy_report(settings, store, source) or ["name the dataset"])[0])
    if len(datasets) > 1:
        raise ConfigurationError(
            f"the legacy collections of {source!r} mix datasets {[d for d, _ in datasets]}: adopting them for "
            f"{dataset!r} would keep the other datasets' rows; backfill each dataset again and drop them "
            f"with `muse source adopt {source} --drop`"
        )
    if version is None:
        known = dict(datasets)
        if dataset in known:
            version = known[dataset]
        else:
            raise ConfigurationError(f"no done backfill of {source!r} for dataset {dataset!r} is recorded: "
                                     f"give the source version the collections hold with --version N")
    ref = _ref(dataset, source, version)
    with session_scope(settings) as session:
        ds = _dataset_row(session, dataset)
        ds_id = ds.id
    store.adopt_legacy(legacy, ref)
    with session_scope(settings) as session:
        job = _newest_job(session, ds_id, source, version)
        _record_version(session, store, ds_id, ref, job_id=None if job is None else job.id,
                        adopted_from=", ".join(sorted(c.name for c in legacy)))
    if live_record(settings, dataset, source) is None and store.live_version(dataset, source) is None:
        if store.has_collections(ref):
            _switch(settings, store, ref, None, 0.0, [])
    return next(v for v in list_versions(settings, store, dataset, source) if v.version == version)
