"""Shared fixtures. Unit tests force CPU and need no server; integration tests talk to the real
PostgreSQL, Milvus 2.3 server (``milvus-server``) and Redis of this machine.

A test that needs a server *fails* instead of skipping when ``CI`` is set and the server is
missing, so that CI can never pass by skipping its integration tests.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from muse.settings import Settings, load_settings

os.environ.setdefault("MUSE_DEVICE", "cpu")

POSTGRES_ADMIN_URL = os.environ.get("MUSE_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
MILVUS_SERVER_URI = os.environ.get("MUSE_TEST_MILVUS_URI", "http://127.0.0.1:19530")
REDIS_URL = os.environ.get("MUSE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# The ten-row Taobao-MM demo files, copied from the official release (Hugging Face
# TaoBao-MM/Taobao-MM, Apache-2.0); see tests/data/README.md.
TAOBAO_DEMO_DIR = Path(__file__).resolve().parent / "data" / "taobao_mm_demo"


def _port_open(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def require_server(name: str, available: bool) -> None:
    """Skip when a server is missing on a developer machine; fail under CI."""
    if available:
        return
    msg = f"{name} is not reachable"
    if os.environ.get("CI"):
        pytest.fail(f"{msg} (CI is set: integration tests must run, not skip)")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tests share 2 CPUs with others: one intra-op thread avoids spin-waiting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded settings under a temporary data dir: SQLite, Milvus Lite, filesystem broker, CPU."""
    return load_settings(env={}, data_dir=tmp_path / "muse-data", device="cpu")


@pytest.fixture
def migrated_settings(settings: Settings) -> Settings:
    """Embedded settings whose SQLite database is migrated to head."""
    from muse import db

    db.upgrade(settings)
    return settings


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (dropped afterwards)."""
    require_server("PostgreSQL at " + POSTGRES_ADMIN_URL, _port_open(POSTGRES_ADMIN_URL, 5432))
    from sqlalchemy import create_engine, text

    name = f"muse_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        from muse import db

        db._engine_for.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def milvus_server_uri() -> str:
    require_server("Milvus server at " + MILVUS_SERVER_URI, _port_open(MILVUS_SERVER_URI, 19530))
    return MILVUS_SERVER_URI


@pytest.fixture
def redis_url() -> str:
    require_server("Redis at " + REDIS_URL, _port_open(REDIS_URL, 6379))
    return REDIS_URL


@pytest.fixture
def unique_prefix() -> str:
    """A collection-name prefix unique to one test, so tests never see each other's collections."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["lite", "server"])
def milvus_settings(request: pytest.FixtureRequest, settings: Settings, unique_prefix: str) -> Settings:
    """Settings for Milvus Lite (embedded file) and for the real Milvus 2.3 server, in turn."""
    if request.param == "lite":
        return load_settings(env={}, data_dir=settings.data_dir, device="cpu", milvus_prefix=unique_prefix)
    uri = request.getfixturevalue("milvus_server_uri")
    return load_settings(
        env={}, data_dir=settings.data_dir, device="cpu", milvus_uri=uri, milvus_prefix=unique_prefix
    )


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    """The fault suite's closing figures (tests/test_faults.py), when it ran."""
    lines = getattr(config, "muse_fault_figures", None)
    if lines:
        terminalreporter.section("fault suite")
        for line in lines:
            terminalreporter.write_line(line)
