"""The metadata database: engine, sessions and Alembic migrations. The one module that owns them.

An embedded SQLite database is created by :func:`upgrade` (``muse db upgrade``) only: every other
connection opens the file read-write without creating it (SQLite's ``mode=rw``), so a command run
at a wrong ``MUSE_DATA_DIR`` or ``MUSE_DATABASE_URL`` says there is no database there and creates
neither folders nor an empty file. One sentence per failure: :func:`missing_message` (no SQLite
file), :func:`unavailable_message` (the server cannot be reached), "not migrated" (no table).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

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


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for an in-memory database, a URL with its own query, or
    another database)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1] if "///" in url else ""
    if not path or path == ":memory:" or "?" in path or path.startswith("file:"):
        return None
    return Path(path)


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = sqlite_file(url)
        if path is not None:  # open without creating (mode=rw): only upgrade() creates the file
            url = f"sqlite:///file:{quote(str(path.absolute()))}?mode=rw&uri=true"
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


def database_missing(settings: Settings) -> bool:
    """True when the settings name a SQLite file that does not exist (yet): ``muse db upgrade``
    creates it."""
    path = sqlite_file(settings.database_url)
    return path is not None and not path.exists()


def missing_message(settings: Settings) -> str:
    """The one sentence for a SQLite database file that does not exist."""
    return (f"there is no database at {sqlite_file(settings.database_url)}: run `muse db upgrade` to create "
            "it, or set MUSE_DATA_DIR (MUSE_DATABASE_URL) to where yours is")


def unavailable_message(settings: Settings, exc: BaseException) -> str:
    """The one sentence for a database that cannot be reached (every command words it so)."""
    orig = getattr(exc, "orig", None) or exc
    return (f"the database at {_safe_url(settings.database_url)} (MUSE_DATABASE_URL) is unavailable: "
            f"{_first_line(orig)}")


def check_database(settings: Settings) -> None:
    """Connect once.

    Raises:
        ConfigurationError: a SQLite file that does not exist (nothing is created).
        BackendUnavailable: the database cannot be reached (:func:`unavailable_message`).
    """
    if database_missing(settings):
        raise ConfigurationError(missing_message(settings))
    try:
        with get_engine(settings).connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as e:
        raise BackendUnavailable(unavailable_message(settings, e)) from e


@contextlib.contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session that commits on success and rolls back on error.

    Raises:
        ConfigurationError: no SQLite file at the settings' path, or the schema is not migrated.
        BackendUnavailable: the database cannot be reached.
    """
    if database_missing(settings):
        raise ConfigurationError(missing_message(settings))
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
        raise BackendUnavailable(unavailable_message(settings, e)) from e


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
    """Migrate the database up to ``revision`` (creating the SQLite file and its folder if needed:
    the one place that creates them)."""
    from alembic import command

    path = sqlite_file(settings.database_url)
    if path is not None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        sqlite3.connect(path).close()  # an empty database file
        log.info("created the SQLite database %s", path)
    check_database(settings)
    command.upgrade(alembic_config(settings), revision)
    log.info("database %s upgraded to %s", settings.database_url, revision)


def downgrade(settings: Settings, revision: str = "base") -> None:
    """Migrate the database down to ``revision``."""
    from alembic import command

    check_database(settings)
    command.downgrade(alembic_config(settings), revision)


def current_revision(settings: Settings) -> str | None:
    """The revision the database is at, or None for an empty database.

    Raises:
        ConfigurationError: no SQLite file at the settings' path (nothing is created).
    """
    from alembic.runtime.migration import MigrationContext

    check_database(settings)
    with get_engine(settings).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(settings: Settings) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(settings)).get_current_head()
