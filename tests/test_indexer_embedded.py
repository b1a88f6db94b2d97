"""``muse backfill`` on the embedded default (filesystem broker, SQLite, Milvus Lite), no server:
the CLI starts its own worker subprocess, follows the job from the database and stops the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_indexer_helpers import SOURCE, expected_behaviours, make_tiny_world, ref_of

from indexer.celery_app import settings_env
from muse.vectorstore import VectorStore

pytestmark = pytest.mark.slow


def _muse(settings, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSE_")}
    env.update(settings_env(settings))
    env.pop("MUSE_QUEUE_PREFIX", None)
    return subprocess.run(
        [sys.executable, "-m", "muse_cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cli_backfill_embedded(settings):
    dataset = make_tiny_world(settings)
    run = _muse(settings, "backfill", "--source", SOURCE, "--dataset", dataset.name,
                "--chunk-size", "200", "--user-chunk-size", "30")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "job 1 done" in run.stdout
    assert "failed items" not in run.stdout
    assert f"{dataset.n_items:>10,} written" in run.stdout

    status = _muse(settings, "backfill", "status", "1", "--json")
    assert status.returncode == 0, status.stderr
    progress = json.loads(status.stdout)
    assert progress["status"] == "done"
    assert progress["items_written"] == dataset.n_items
    assert progress["behaviours_written"] == expected_behaviours(dataset) == dataset.meta["n_behaviours"]
    assert progress["items_per_s"] > 0 and progress["behaviours_per_s"] > 0

    # The worker is gone: this process can open the Milvus Lite file and count.
    with VectorStore(settings) as store:
        ref = ref_of(settings, dataset.name)
        assert store.count_items(ref) == dataset.n_items
        assert store.count_behaviours(ref) == dataset.meta["n_behaviours"]

    again = _muse(settings, "backfill", "--source", SOURCE, "--dataset", dataset.name)
    assert again.returncode == 0, again.stderr
    assert "already done; nothing to do" in again.stdout
    resumed = _muse(settings, "backfill", "resume", "1")
    assert resumed.returncode == 0 and "already done" in resumed.stdout

    bad = _muse(settings, "backfill", "status", "99")
    assert bad.returncode == 2 and "backfill job 99 does not exist" in bad.stderr
