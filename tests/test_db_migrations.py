"""Alembic migrations on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, select

from muse import db
from muse.models import Base, Dataset, EmbeddingSource
from muse.settings import Settings, load_settings


@pytest.fixture(params=["sqlite", "postgres"])
def db_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    if request.param == "sqlite":
        return settings
    url = request.getfixturevalue("postgres_url")
    return load_settings(env={}, data_dir=settings.data_dir, database_url=url)


def _tables(s: Settings) -> set[str]:
    return set(inspect(db.get_engine(s)).get_table_names()) - {"alembic_version"}


def test_upgrade_downgrade_upgrade(db_settings: Settings):
    db.upgrade(db_settings)
    assert db.current_revision(db_settings) == db.head_revision(db_settings)
    assert _tables(db_settings) == set(Base.metadata.tables)
    db.downgrade(db_settings, "base")
    assert db.current_revision(db_settings) is None
    assert _tables(db_settings) == set()
    db.upgrade(db_settings)
    assert _tables(db_settings) == set(Base.metadata.tables)

    with db.session_scope(db_settings) as session:
        ds = Dataset(name="d", kind="simworld", location="/x", stats={"n": 1})
        session.add(ds)
        session.flush()
        session.add(EmbeddingSource(name="scl", version=1, kind="trained", dim=128, dataset_id=ds.id))
    with db.session_scope(db_settings) as session:
        row = session.scalars(select(EmbeddingSource)).one()
        assert (row.name, row.version, row.dim) == ("scl", 1, 128)


def test_autogenerate_finds_no_difference(db_settings: Settings):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    db.upgrade(db_settings)
    with db.get_engine(db_settings).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []
