"""The metadata database: engine, sessions and Alembic migrations. The one module that owns them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from muse.errors import BackendUnavailable, ConfigurationError
from muse.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


_engines: dict[str, Engine] = {}


def _engine_for(url: str) -> Engine:
    if url not in _engines:
        _engines[url] = _make_engine(url)
    return _engines[url]


_engine_for.cache_clear = _engines.clear  # type: ignore[attr-defined]  # tests reset engines this way


def _make_engine(url: str) -> Engine:
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
    try:
        with factory() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                try:
                    session.rollback()
                except DBAPIError as e:  # the connection is gone; the original error matters
                    log.debug("rollback failed: %s", e)
                raise
    except DBAPIError as e:
        if schema_missing(e):  # SQLite reports a missing table as an OperationalError: not an outage
            raise ConfigurationError(
                f"the database at {_safe_url(settings.database_url)} is not migrated to this version "
                f"({_first_line(e.orig or e)}); run `muse db upgrade`"
            ) from e
        if not _is_outage(e):
            raise
        raise BackendUnavailable(
            f"the database at {_safe_url(settings.database_url)} is unavailable: {_first_line(e.orig or e)}"
        ) from e


#: OperationalError texts that are about the schema, not the server (the CLI says `muse db upgrade`).
_SCHEMA_ERRORS = ("no such table", "no such column", "does not exist", "syntax error")


def _is_outage(e: DBAPIError) -> bool:
    """True when the database could not be reached or dropped the connection (worth a retry)."""
    if e.connection_invalidated or isinstance(e, InterfaceError):
        return True
    return isinstance(e, OperationalError) and not any(w in str(e.orig or e).lower() for w in _SCHEMA_ERRORS)


def dispose_engines() -> None:
    """Drop pooled connections inherited from a parent process (call after a fork)."""
    for url in list(_engines):
        _engines[url].dispose(close=False)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is shown as given (it holds no password then)
        return url


#: Fragments of driver messages that mean a table or column of the schema is missing (SQLite, PostgreSQL).
_SCHEMA_MISSING = ("no such table", "no such column", "undefinedtable", "undefinedcolumn")


def schema_missing(exc: BaseException) -> bool:
    """Whether a SQLAlchemy/driver error says a table or column is missing: the database is not
    migrated (or is behind the code), which ``muse db upgrade`` fixes."""
    orig = getattr(exc, "orig", None) or exc
    probe = f"{type(orig).__name__} {_first_line(orig)}".lower()
    return any(f in probe for f in _SCHEMA_MISSING) or (
        "does not exist" in probe and ("relation " in probe or "column " in probe)
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
