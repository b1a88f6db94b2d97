"""``muse demo``: the whole pipeline in one command on the embedded deployment (no server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from muse import db
from muse.models import BackfillJob, RankerRun
from muse.settings import load_settings
from muse.vectorstore import VectorStore


def test_demo_runs_every_stage_end_to_end(tmp_path: Path):
    data_dir = tmp_path / "muse-data"
    env = {**os.environ, "MUSE_DATA_DIR": str(data_dir), "MUSE_DEVICE": "cpu"}
    for var in ("MUSE_DATABASE_URL", "MUSE_MILVUS_URI", "MUSE_BROKER_URL", "MUSE_QUEUE_PREFIX"):
        env.pop(var, None)
    res = subprocess.run(
        [sys.executable, "-m", "muse.cli.main", "demo", "--epochs", "1"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "demo finished" in res.stdout
    assert "simtier" in res.stdout  # the GSU step printed a user's top-K with its tiers

    settings = load_settings(env={"MUSE_DATA_DIR": str(data_dir)})
    with db.session_scope(settings) as session:
        job = session.scalars(select(BackfillJob)).one()
        run = session.scalars(select(RankerRun)).one()
        assert job.status == "done"
        assert (run.model, run.source_name, run.status) == ("muse", "scl", "done")
        assert 0.0 < run.metrics["overall"]["gauc"] < 1.0
    from indexer.sources import get_version
    from muse.vectorstore import CollectionRef

    ref = CollectionRef("demo-tiny-0", "scl", get_version(settings, "scl").version)
    with VectorStore(settings) as store:
        assert store.count_items(ref) > 0 and store.count_behaviours(ref) > 0
