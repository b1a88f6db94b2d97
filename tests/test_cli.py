"""The ``muse`` console script: fast help, every command group present, db commands work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from muse.cli.main import COMMAND_MODULES


def _muse(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MUSE_DATA_DIR": str(data_dir), "MUSE_DEVICE": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "muse.cli.main", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_command_without_heavy_imports(tmp_path: Path):
    res = _muse(["--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    for name in ("db", "data", "embed", "worker", "backfill", "retrieve", "rank", "compare", "quickstart"):
        assert f"    {name}" in res.stdout, name
    # lazy imports: building the parser must not import torch, pymilvus or celery
    probe = (
        "import sys; from muse.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'pymilvus', 'celery', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert len(COMMAND_MODULES) == len(set(COMMAND_MODULES))


def test_db_upgrade_and_current(tmp_path: Path):
    res = _muse(["db", "current"], tmp_path)
    assert res.returncode == 0 and "base (empty)" in res.stdout
    res = _muse(["db", "upgrade"], tmp_path)
    assert res.returncode == 0, res.stderr
    res = _muse(["db", "current"], tmp_path)
    assert "up to date" in res.stdout


def test_bad_setting_is_a_clear_error(tmp_path: Path):
    env = {**os.environ, "MUSE_DATA_DIR": str(tmp_path), "MUSE_BROKER_URL": "kafka://x"}
    res = subprocess.run(
        [sys.executable, "-m", "muse.cli.main", "db", "current"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert "MUSE_BROKER_URL" in res.stderr and "Traceback" not in res.stderr
