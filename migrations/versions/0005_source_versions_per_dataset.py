"""imported sources' versions numbered per dataset; runs and comparisons repaired to their dataset's version

Until this revision an imported source (``scl-taobao``) got a new global version for every dataset it
was imported into, and a ranker run recorded the newest version of the source by name, whatever its
dataset: after a second dataset was imported, runs recorded another dataset's version. From here on
an imported source's versions are numbered per dataset (the unique key becomes (name, dataset_id,
version)), and this revision repairs what is recorded:

- every imported ``embedding_sources`` row notes its dataset's name in ``config["dataset"]``;
- a run on an imported source whose recorded version is not its own dataset's gets its dataset's
  version when the dataset has exactly one; otherwise its source version is cleared and the run is
  marked (``config["provenance"]``, shown by ``muse rank show``);
- a comparison's intrinsic-metrics block names its dataset's version the same way (or is marked).

Existing version numbers are kept (their Milvus collections and vector caches carry them); only new
imports are numbered per dataset. Runs on trained sources recorded the newest version, which is the
one they read: they are right and unchanged.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

#: What a run or comparison whose version cannot be derived is marked with.
UNKNOWN = ("source version unknown: recorded before versions were kept per dataset (migration 0005), "
           "and dataset {dataset!r} has {n} imported versions of {source!r}")

_sources = sa.table(
    "embedding_sources",
    sa.column("id", sa.Integer), sa.column("name", sa.String), sa.column("version", sa.Integer),
    sa.column("kind", sa.String), sa.column("dataset_id", sa.Integer), sa.column("config", sa.JSON),
    sa.column("metrics", sa.JSON),
)
_runs = sa.table(
    "ranker_runs",
    sa.column("id", sa.Integer), sa.column("source_id", sa.Integer), sa.column("source_name", sa.String),
    sa.column("dataset_id", sa.Integer), sa.column("config", sa.JSON),
)
_comparisons = sa.table(
    "comparisons", sa.column("id", sa.Integer), sa.column("dataset_id", sa.Integer), sa.column("result", sa.JSON),
)
_datasets = sa.table("datasets", sa.column("id", sa.Integer), sa.column("name", sa.String))


def upgrade() -> None:
    with op.batch_alter_table("embedding_sources", schema=None) as batch_op:
        batch_op.drop_constraint("uq_embedding_sources_name_version", type_="unique")
        batch_op.create_unique_constraint("uq_embedding_sources_name_dataset_id_version",
                                          ["name", "dataset_id", "version"])
    repair(op.get_bind())


def repair(conn: Any) -> dict[str, int]:
    """Point runs and comparisons on imported sources at their own dataset's version (see the module
    docstring); returns how many rows were repaired and marked."""
    names = dict(conn.execute(sa.select(_datasets.c.id, _datasets.c.name)).all())
    imported = [r._asdict() for r in conn.execute(sa.select(_sources).where(_sources.c.kind == "imported"))]
    for row in imported:
        config = dict(row["config"] or {})
        if row["dataset_id"] in names and config.get("dataset") != names[row["dataset_id"]]:
            config["dataset"] = names[row["dataset_id"]]
            conn.execute(sa.update(_sources).where(_sources.c.id == row["id"]).values(config=config))
    by_id = {r["id"]: r for r in imported}
    imported_names = {r["name"] for r in imported}

    def own(source: str, dataset_id: int) -> list[dict[str, Any]]:
        return [r for r in imported if r["name"] == source and r["dataset_id"] == dataset_id]

    counts = {"runs_repaired": 0, "runs_marked": 0, "comparisons_repaired": 0, "comparisons_marked": 0}
    for run in conn.execute(sa.select(_runs).where(_runs.c.source_name.in_(imported_names))).all():
        recorded = by_id.get(run.source_id)
        if recorded is not None and recorded["dataset_id"] == run.dataset_id:
            continue  # already its own dataset's version
        candidates = own(run.source_name, run.dataset_id)
        config = dict(run.config or {})
        if len(candidates) == 1:
            values: dict[str, Any] = {"source_id": candidates[0]["id"]}
            counts["runs_repaired"] += 1
        else:
            config["provenance"] = UNKNOWN.format(dataset=names.get(run.dataset_id, "?"), n=len(candidates),
                                                  source=run.source_name)
            values = {"source_id": None, "config": config}
            counts["runs_marked"] += 1
        conn.execute(sa.update(_runs).where(_runs.c.id == run.id).values(**values))
    for comp in conn.execute(sa.select(_comparisons)).all():
        result = dict(comp.result or {})
        intrinsic = dict(result.get("intrinsic") or {})
        changed = False
        for source, info in intrinsic.items():
            if source not in imported_names:
                continue
            candidates = own(source, comp.dataset_id)
            info = dict(info or {})
            if len(candidates) == 1:
                row = candidates[0]
                if info.get("version") != row["version"]:
                    info["version"] = row["version"]
                    info["eval"] = ((row["metrics"] or {}).get("eval") or {}).get(names.get(comp.dataset_id))
                    counts["comparisons_repaired"] += 1
                    changed = True
            else:
                info["version"] = None
                info["provenance"] = UNKNOWN.format(dataset=names.get(comp.dataset_id, "?"), n=len(candidates),
                                                    source=source)
                counts["comparisons_marked"] += 1
                changed = True
            intrinsic[source] = info
        if changed:
            result["intrinsic"] = intrinsic
            conn.execute(sa.update(_comparisons).where(_comparisons.c.id == comp.id).values(result=result))
    return counts


def downgrade() -> None:
    conn = op.get_bind()
    clash = conn.execute(
        sa.select(_sources.c.name, _sources.c.version).group_by(_sources.c.name, _sources.c.version)
        .having(sa.func.count() > 1)
    ).first()
    if clash is not None:
        raise RuntimeError(f"cannot downgrade below 0005: {clash.name} v{clash.version} exists for several datasets "
                           "(imported versions are numbered per dataset since 0005)")
    with op.batch_alter_table("embedding_sources", schema=None) as batch_op:
        batch_op.drop_constraint("uq_embedding_sources_name_dataset_id_version", type_="unique")
        batch_op.create_unique_constraint("uq_embedding_sources_name_version", ["name", "version"])
