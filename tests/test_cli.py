"""The ``muse`` console script: fast help, every command group present, db commands work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from muse_cli.main import COMMAND_MODULES


def _muse(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MUSE_DATA_DIR": str(data_dir), "MUSE_DEVICE": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "muse_cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_command_without_heavy_imports(tmp_path: Path):
    res = _muse(["--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    for name in ("db", "data", "embed", "worker", "backfill", "retrieve", "rank", "compare", "quickstart"):
        assert f"    {name}" in res.stdout, name
    # lazy imports: building the parser must not import torch, pymilvus or celery
    probe = (
        "import sys; from muse_cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'pymilvus', 'celery', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert len(COMMAND_MODULES) == len(set(COMMAND_MODULES))


def test_db_upgrade_and_current(tmp_path: Path):
    res = _muse(["db", "current"], tmp_path)
    assert res.returncode == 0 and "current: none (no database at" in res.stdout  # said, not created
    assert not list(tmp_path.glob("*.sqlite"))
    res = _muse(["db", "upgrade"], tmp_path)
    assert res.returncode == 0, res.stderr
    res = _muse(["db", "current"], tmp_path)
    assert "up to date" in res.stdout


def test_bad_setting_is_a_clear_error(tmp_path: Path):
    env = {**os.environ, "MUSE_DATA_DIR": str(tmp_path), "MUSE_BROKER_URL": "kafka://x"}
    res = subprocess.run(
        [sys.executable, "-m", "muse_cli", "db", "current"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert "MUSE_BROKER_URL" in res.stderr and "Traceback" not in res.stderr


def test_version(tmp_path: Path):
    import muse

    res = _muse(["--version"], tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == f"muse {muse.__version__}"


def _walk(parser, path="muse"):  # noqa: ANN001, ANN202 - argparse internals
    """(path, parser, action) of every argument and (path, None, subparsers-action) of every command."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in action._choices_actions}
            for name, child in action.choices.items():
                yield f"{path} {name}", None, helps.get(name)
                yield from _walk(child, f"{path} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.help is None:
            yield path, parser, action


def test_every_command_and_argument_has_help_text():
    from muse_cli.main import build_parser

    missing = []
    for path, parser, item in _walk(build_parser()):
        if parser is None:
            if not item:
                missing.append(f"{path} (command)")
        elif not item.help:
            missing.append(f"{path} {'/'.join(item.option_strings) or item.dest}")
    assert not missing, missing


def test_every_listing_command_has_json():
    from muse_cli.main import build_parser

    listing = {path: parser for path, parser, _ in _walk(build_parser())
               if parser is not None and path.rsplit(" ", 1)[-1] in ("list", "models")}
    assert {"muse data list", "muse embed list", "muse embed models", "muse backfill list", "muse rank list"} <= set(listing)
    for path, parser in listing.items():
        assert any("--json" in a.option_strings for a in parser._actions), path


def test_unmigrated_database_says_run_db_upgrade(tmp_path: Path):
    for args in (["rank", "list"], ["backfill", "list"], ["backfill", "status", "99"], ["rank", "eval", "99"],
                 ["rank", "score", "1", "--user", "1", "--items", "1,2"], ["embed", "list"]):
        res = _muse(args, tmp_path)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "run `muse db upgrade`" in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)
    verbose = _muse(["-v", "rank", "list"], tmp_path)  # -v adds the traceback
    assert "Traceback" in verbose.stderr and "run `muse db upgrade`" in verbose.stderr


def test_other_database_errors_are_one_sentence(tmp_path: Path):
    from sqlalchemy.exc import OperationalError

    from muse_cli.main import database_error_message

    err = OperationalError("SELECT 1", {}, Exception("disk I/O error\nmore detail"))
    msg = database_error_message(err)
    assert msg is not None and msg.endswith("failed: disk I/O error") and "\n" not in msg
    missing = OperationalError("SELECT 1", {}, Exception('relation "ranker_runs" does not exist'))
    assert "muse db upgrade" in database_error_message(missing)
    assert database_error_message(ValueError("x")) is None


def test_impossible_device_names_the_setting():
    import pytest

    from muse.errors import ConfigurationError
    from muse.settings import load_settings

    settings = load_settings(env={"MUSE_DEVICE": "cuda:99"})
    with pytest.raises(ConfigurationError, match=r"MUSE_DEVICE='cuda:99'.*set MUSE_DEVICE=cpu"):
        settings.resolve_device()
    assert load_settings(env={"MUSE_DEVICE": "cpu"}).resolve_device() == "cpu"


def test_unknown_source_is_rejected_before_anything_else(tmp_path: Path):
    res = _muse(["retrieve", "search", "--source", "sclx", "--dataset", "d", "--user", "1", "--items", "1"], tmp_path)
    assert res.returncode == 2
    assert "'sclx' is unknown" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "milvus.db").exists()  # no Milvus Lite file was opened
