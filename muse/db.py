"""The metadata database: engine, sessions and Alembic migrations. The one module that owns them."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from muse.errors import BackendUnavailable
from muse.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


@functools.lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")  # concurrent readers while a worker writes
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})


def get_engine(settings: Settings) -> Engine:
    """The (cached) engine for ``settings.database_url``."""
    return _engine_for(settings.database_url)


def check_database(settings: Settings) -> None:
    """Connect once; raise :class:`BackendUnavailable` naming ``MUSE_DATABASE_URL`` if that fails."""
    try:
        with get_engine(settings).connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as e:
        raise BackendUnavailable(
            f"MUSE_DATABASE_URL={settings.database_url!r}: cannot connect: {e.orig}"
        ) from e


@contextlib.contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    factory = sessionmaker(bind=get_engine(settings), expire_on_commit=False)
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config(settings: Settings):  # noqa: ANN201 - alembic.config.Config, imported lazily
    """An Alembic config pointing at this project's migrations and the settings' database."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", settings.database_url.replace("%", "%%"))
    return cfg


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (creating the SQLite file if needed)."""
    from alembic import command

    check_database(settings)
    command.upgrade(alembic_config(settings), revision)
    log.info("database %s upgraded to %s", settings.database_url, revision)


def downgrade(settings: Settings, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(settings), revision)


def current_revision(settings: Settings) -> str | None:
    """The revision the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    check_database(settings)
    with get_engine(settings).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(settings: Settings) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(settings)).get_current_head()
