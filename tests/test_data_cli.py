"""`muse data ...` end to end through the console entry point (embedded settings in a temp dir)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from muse_cli.main import main
from tests.conftest import TAOBAO_DEMO_DIR


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("MUSE_CONFIG", "MUSE_DATABASE_URL", "MUSE_MILVUS_URI", "MUSE_BROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MUSE_DATA_DIR", str(tmp_path / "muse-data"))
    return tmp_path / "muse-data"


def test_simworld_list_stats(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "upgrade"]) == 0
    assert main(["data", "simworld", "--size", "tiny", "--seed", "2", "--name", "w"]) == 0
    out = capsys.readouterr().out
    assert (
        "dataset w (simworld)" in out and "600 items, 60 users" in out and "registered in the database" in out
    )
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "w " in out and "on disk, registered" in out
    assert main(["data", "stats", "w", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["name"] == "w" and stats["n_items"] == 600 and "long_history" in stats
    assert (data_dir / "datasets" / "w" / "stats.png").stat().st_size > 1000
    assert json.loads((data_dir / "datasets" / "w" / "stats.json").read_text()) == stats
    assert main(["data", "stats", "w"]) == 0
    assert "absent from the recent 50" in capsys.readouterr().out
    assert main(["data", "list", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["w"]


def test_taobao_import_and_errors(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "taobao-mm", str(TAOBAO_DEMO_DIR), "--name", "tb"]) == 0
    out = capsys.readouterr().out
    assert "10 items, 23 users" in out and "3 sample users without a user-feature row" in out
    assert "10 scl-taobao vectors" in out and "not registered" in out
    assert main(["data", "stats", "tb", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (
        stats["impressions_with_empty_history"] == 20 and stats["ctr"] == 0.05 and "long_history" not in stats
    )
    assert main(["data", "stats", "missing"]) == 2
    assert "dataset 'missing' not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "simworld", "--size", "huge"])
