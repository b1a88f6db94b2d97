"""Registration from a child process (muse.data.registrar): the same outcome as in this process,
its logs and errors carried back, no child left behind."""

from __future__ import annotations

import logging
import shutil

import pytest
from sqlalchemy import func, select
from test_data_format import _write

from muse import models
from muse.data.registrar import BackgroundRegistration
from muse.db import session_scope
from muse.errors import BackendUnavailable, NotFoundError
from muse.settings import Settings, load_settings


def test_registers_in_a_child_process(migrated_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    ds = _write(migrated_settings)
    caplog.set_level(logging.INFO, logger="muse")
    with BackgroundRegistration(migrated_settings) as registration:
        child = registration._proc
        assert child is not None and child.poll() is None  # started at once, waiting for the dataset
        dataset_id = registration.finish(ds)
    assert child.returncode == 0
    with session_scope(migrated_settings) as s:
        assert s.get(models.Dataset, dataset_id).name == "toy"
        assert s.scalar(select(func.count()).select_from(models.Item).where(models.Item.dataset_id == dataset_id)) == 4
    assert any(r.name == "muse.data.registry" and "registered with id" in r.getMessage() for r in caplog.records)


def test_a_database_not_migrated_gives_none_and_the_childs_warning(settings: Settings,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    ds = _write(settings)
    with BackgroundRegistration(settings) as registration:
        assert registration.finish(ds) is None
    assert any(r.levelno == logging.WARNING and "is not migrated" in r.getMessage() for r in caplog.records)


def test_errors_come_back_as_the_same_class(settings: Settings) -> None:
    ds = _write(settings)
    down = load_settings(env={}, data_dir=settings.data_dir, device="cpu",
                         database_url="postgresql+psycopg2://muse@127.0.0.1:9/nowhere")
    with BackgroundRegistration(down) as registration, pytest.raises(BackendUnavailable, match="127.0.0.1:9"):
        registration.finish(ds)
    from muse import db

    db.upgrade(settings)
    shutil.rmtree(ds.path)  # the dataset vanished before it was registered
    with BackgroundRegistration(settings) as registration, pytest.raises(NotFoundError, match="meta.json"):
        registration.finish(ds)


def test_leaving_without_a_dataset_stops_the_child(settings: Settings) -> None:
    with BackgroundRegistration(settings) as registration:
        child = registration._proc
    assert child is not None and child.returncode == 0
    with pytest.raises(ZeroDivisionError), BackgroundRegistration(settings) as registration:  # the import failed
        child = registration._proc
        1 / 0  # noqa: B018
    assert child.returncode == 0
