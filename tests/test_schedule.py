"""The small-set rule (ranker.schedule: at least 100 optimiser steps per epoch when the batch size is
not given, recorded with the run) and the undertrained verdict, said in words by ``rank train``,
``rank list``, ``rank show``, ``compare`` and the quickstart's table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muse.settings import Settings, load_settings
from ranker.schedule import (
    DEFAULT_BATCH_SIZE,
    MIN_BATCH_SIZE,
    MIN_STEPS_PER_EPOCH,
    base_rate,
    batch_size_for,
    loss_trend,
    undertrained,
)

SOURCE = "scl-taobao"
FAST = {"tower": [32, 16], "k": 20, "recent_len": 10}


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """One intra-op thread for the whole module (the shared fixture in conftest)."""


def test_the_rule() -> None:
    small = batch_size_for(10_000)  # the 500-user set of issue 22: 39 steps at 256
    assert (small.batch_size, small.steps_per_epoch, small.chosen) == (100, 100, "small set")
    large = batch_size_for(30_000)
    assert (large.batch_size, large.steps_per_epoch, large.chosen) == (DEFAULT_BATCH_SIZE, 118, "default")
    assert batch_size_for(DEFAULT_BATCH_SIZE * MIN_STEPS_PER_EPOCH).batch_size == DEFAULT_BATCH_SIZE
    assert batch_size_for(DEFAULT_BATCH_SIZE * MIN_STEPS_PER_EPOCH - 1).batch_size < DEFAULT_BATCH_SIZE
    tiny = batch_size_for(1_206)  # never below the floor: fewer steps then, and the record says so
    assert (tiny.batch_size, tiny.steps_per_epoch) == (MIN_BATCH_SIZE, 38)
    given = batch_size_for(10_000, 256)
    assert (given.batch_size, given.steps_per_epoch, given.chosen) == (256, 40, "given")
    assert "100" in given.rule and given.to_dict()["n_train"] == 10_000


def test_the_verdict_in_words() -> None:
    ok = {"overall": {"n": 100, "logloss": 0.50}, "base_rate": {"split": "test", "n": 100, "logloss": 0.55},
          "train": {"loss_start": 0.69, "loss_end": 0.52, "steps": 100}}
    assert undertrained(ok) is None
    flat = {**ok, "overall": {"n": 100, "logloss": 0.60}}
    assert undertrained(flat) == ("undertrained: test logloss 0.6000 is no better than the base rate's 0.5500 "
                                  "after 100 steps")
    rising = {**ok, "train": {"loss_start": 0.6, "loss_end": 0.7}}
    assert "the training loss never fell (0.6000 -> 0.7000)" in undertrained(rising)
    other_slice = {**flat, "base_rate": {**flat["base_rate"], "n": 50}}  # re-evaluated on fewer impressions
    assert undertrained(other_slice) is None
    assert undertrained({}) is None  # too little to tell
    assert loss_trend([1.0, 0.9, 0.5, 0.4]) == {"loss_start": pytest.approx(0.95), "loss_end": pytest.approx(0.45)}
    assert loss_trend([]) == {"loss_start": None, "loss_end": None}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, str]:
    """The tiny simworld (1,206 train impressions) with shipped vectors, migrated."""
    from muse import db
    from muse.data.simworld import generate_simworld

    settings = load_settings(env={}, data_dir=tmp_path_factory.mktemp("schedule") / "muse-data", device="cpu")
    db.upgrade(settings)
    ds = generate_simworld(settings, size="tiny", seed=0)
    ids = ds.item_ids()
    vectors = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32)
    (ds.path / "embeddings").mkdir(exist_ok=True)
    pq.write_table(pa.table({"item_id": ids, "vector": pa.array(list(vectors), type=pa.list_(pa.float32()))}),
                   ds.path / "embeddings" / f"{SOURCE}.parquet")
    return settings, ds.name


def test_base_rate_is_the_best_constant(world) -> None:
    from muse.data.format import Dataset
    from ranker.metrics import logloss

    settings, name = world
    ds = Dataset.open(settings, name)
    labels = np.concatenate([b.column("label").to_numpy() for b in ds.iter_impressions(split="test")])[:200]
    got = base_rate(ds, "test", 200)
    assert got["n"] == 200 and got["ctr"] == pytest.approx(labels.mean())
    assert got["logloss"] == pytest.approx(logloss(labels, np.full(200, labels.mean())))


@pytest.mark.slow
def test_rule_recorded_and_undertrained_said_everywhere(world, monkeypatch: pytest.MonkeyPatch, capsys,
                                                        tmp_path: Path) -> None:
    """A run left at the defaults gets the rule's batch size (recorded); a run forced to a handful of
    steps is called undertrained by every command that shows it."""
    from muse_cli.main import main
    from muse_cli.quickstart import _rows, _status, _table
    from ranker.runs import get_run

    settings, dataset = world
    monkeypatch.setenv("MUSE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("MUSE_DEVICE", "cpu")
    sets = [x for k, v in FAST.items() for x in ("--set", f"{k}={json.dumps(v)}")]

    # the defaults on a small train split: the rule's batch size, in the run's record
    assert main(["rank", "train", "--model", "din", "--esu", "ta", "--dataset", dataset, "--max-eval", "200",
                 *sets, "--json"]) == 0
    run = get_run(settings, json.loads(capsys.readouterr().out)["run"])
    n_train = run.config["schedule"]["n_train"]
    assert run.config["schedule"] == {**batch_size_for(n_train).to_dict()} and run.config["train"]["batch_size"] == 32
    assert run.metrics["train"]["steps"] == math.ceil(n_train / 32) and run.metrics["train"]["threads"] == 1

    # a handful of steps: undertrained, in words
    few = ["--dataset", dataset, "--max-train", "128", "--batch-size", "64", "--max-eval", "200", *sets]
    assert main(["rank", "train", "--model", "muse", "--source", SOURCE, *few]) == 0
    printed = capsys.readouterr().out
    assert "undertrained: test logloss" in printed and "not a result" in printed and "after 2 steps" in printed
    under = get_run(settings, int(printed.split()[1].rstrip(":")))
    assert undertrained(under.metrics) is not None
    assert main(["rank", "list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split()[0] == str(under.id))
    assert line.endswith("undertrained: not a result")
    assert main(["rank", "show", str(under.id)]) == 0
    shown = capsys.readouterr().out
    assert "undertrained: test logloss" in shown and "batch 64 (given)" in shown and "2 steps" in shown

    assert main(["compare", "--models", "muse", "--sources", SOURCE, "--threads", "1", "--out", str(tmp_path),
                 *few]) == 0
    out = capsys.readouterr().out
    assert f"run {under.id} (reused): GAUC" in out and "undertrained: test logloss" in out
    assert "| undertrained, not a result (test logloss" in out  # the table's note
    cid = int(out.split("\ncomparison ", 1)[1].split()[0])
    from ranker.compare import get_comparison

    result = get_comparison(settings, cid)
    assert result["cells"][0]["undertrained"]
    # the quickstart's table and verdict read the same cells
    rows = _rows(result)
    assert _status(rows[0], {}).startswith("undertrained (not a result): 1 of 1 runs")
    assert "undertrained (not a result)" in _table(rows, {}, 200)
