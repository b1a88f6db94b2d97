"""The ranker over several processes (``ranker.distributed``, ``muse ... --nproc N``): every training
impression read by exactly one rank per epoch, a checkpoint's metrics identical whether one or two
processes evaluate it, a killed rank failing the run with one sentence and no finished-looking
checkpoint, and ``--nproc`` recorded with the run. The CLI tests start real processes through
torch.distributed's elastic launcher (gloo on the CPU)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from muse.errors import ConfigurationError
from muse_cli.launch import failure_sentence
from ranker.distributed import (
    MIN_LOCAL_BATCH,
    eval_block,
    expected_digest,
    plan_epoch,
    rank_batches,
    row_digest,
)

SPLITS = ("overall", "long_tail", "long_history")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated data dir with ``synth``: 120 users in the raw Taobao-MM schema (2,400 train and 960
    test impressions), imported and registered."""
    from bench.taobao_mm_synth import SynthConfig, generate
    from muse import db
    from muse.data.taobao_mm import import_taobao_mm
    from muse.settings import load_settings

    root = tmp_path_factory.mktemp("ddp")
    generate(root / "raw", SynthConfig(n_users=120, n_items=1_500, train_per_user=20, test_per_user=8))
    settings = load_settings(env={}, data_dir=root / "data", device="cpu")
    db.upgrade(settings)
    import_taobao_mm(settings, root / "raw", name="synth")
    return root / "data"


def _muse(data_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MUSE_DATA_DIR": str(data_dir), "MUSE_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "muse_cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _run_row(data_dir: Path, run_id: int) -> dict:
    with sqlite3.connect(data_dir / "muse.sqlite") as con:
        status, config, metrics, ckpt = con.execute(
            "select status, config, metrics, checkpoint_path from ranker_runs where id = ?", (run_id,)).fetchone()
    return {"status": status, "config": json.loads(config), "metrics": json.loads(metrics or "{}"),
            "checkpoint": ckpt}


# the epoch plan (no processes) --------------------------------------------------------------------


@pytest.mark.parametrize(("n_rows", "world", "batch"), [(2400, 2, 64), (2400, 3, 100), (1000, 2, 7 * 2 + 3),
                                                        (2400, 1, 256)])
def test_every_impression_is_read_by_exactly_one_rank(data_dir: Path, n_rows: int, world: int, batch: int) -> None:
    from muse.data.format import Dataset
    from muse.settings import load_settings

    ds = Dataset.open(load_settings(env={}, data_dir=data_dir, device="cpu"), "synth")
    plan = plan_epoch(n_rows, world, batch)
    assert plan.steps == -(-n_rows // batch)  # as many optimiser steps as one process takes
    rows, per_step = [], np.zeros(plan.steps, np.int64)
    for rank in range(world):
        batches = list(rank_batches(ds, "train", plan, rank, seed=3))
        assert len(batches) == plan.steps  # every rank takes every step: no rank waits for another
        sizes = [len(b["label"]) for b in batches]
        assert min(sizes) >= MIN_LOCAL_BATCH and sizes == plan.local_sizes(rank).tolist()
        per_step += sizes
        cols = ds.impressions("train")
        for b in batches:  # each batch's columns are the rows it names
            assert np.array_equal(b["user_id"], np.asarray(cols.column("user_id"))[b["row"]])
            assert np.array_equal(b["label"], np.asarray(cols.column("label"))[b["row"]])
            rows.append(b["row"])
    seen = np.concatenate(rows)
    assert len(seen) == n_rows and np.array_equal(np.sort(seen), np.arange(n_rows))  # each once
    assert per_step.tolist() == plan.global_sizes().tolist() and per_step.max() <= batch
    # the digest the ranks add up at the end of an epoch
    hi, lo = row_digest(seen)
    assert ((hi << 32) + lo) & ((1 << 64) - 1) == expected_digest(n_rows)
    hi, lo = row_digest(np.concatenate([seen[1:], seen[:1], seen[:1]]))  # one row twice
    assert ((hi << 32) + lo) & ((1 << 64) - 1) != expected_digest(n_rows + 1)


def test_epochs_are_shuffled_differently(data_dir: Path) -> None:
    from muse.data.format import Dataset
    from muse.settings import load_settings

    ds = Dataset.open(load_settings(env={}, data_dir=data_dir, device="cpu"), "synth")
    plan = plan_epoch(2400, 2, 64)
    first = np.concatenate([b["row"] for b in rank_batches(ds, "train", plan, 0, seed=0)])
    again = np.concatenate([b["row"] for b in rank_batches(ds, "train", plan, 0, seed=0)])
    other = np.concatenate([b["row"] for b in rank_batches(ds, "train", plan, 0, seed=1)])
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert np.array_equal(np.sort(first), np.sort(other))  # the same rows: the rank's own


def test_a_global_batch_too_small_for_the_processes_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="--batch-size"):
        plan_epoch(2400, 4, 6)  # 1.5 impressions per rank and step


@pytest.mark.parametrize(("n_rows", "world", "batch"), [(960, 2, 64), (10**7, 8, 1024), (5, 2, 1024)])
def test_evaluation_blocks_hold_whole_batches(n_rows: int, world: int, batch: int) -> None:
    block = eval_block(n_rows, world, batch)
    assert block % batch == 0 and block >= batch


# the launcher's sentence (real ProcessFailure records, as the elastic agent makes them) ----------------


def _failure(tmp_path: Path, rank: int, exitcode: int, message: str | None = None, secondary: bool = False,
             timestamp: int = 100) -> ProcessFailure:
    path = tmp_path / f"error-{rank}.json"
    if message is not None:
        path.write_text(json.dumps({"message": message, "timestamp": timestamp, "muse": {"secondary": secondary}}))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))


def test_the_killed_rank_is_named_not_the_ranks_it_took_down(tmp_path: Path) -> None:
    failures = {0: _failure(tmp_path, 0, 2, "rank 0 was stopped by SIGTERM", secondary=True, timestamp=1),
                1: _failure(tmp_path, 1, -signal.SIGKILL)}
    sentence, code = failure_sentence(failures)
    assert sentence.startswith("rank 1 (pid 1001) failed: killed by SIGKILL") and "1 other rank(s) stopped" in sentence
    assert code == 1


def test_a_rank_with_its_own_error_is_named_with_it(tmp_path: Path) -> None:
    failures = {0: _failure(tmp_path, 0, -signal.SIGTERM),
                1: _failure(tmp_path, 1, 2, "dataset 'x' is not registered")}
    sentence, code = failure_sentence(failures)
    assert sentence == "rank 1 (pid 1001) failed: dataset 'x' is not registered; 1 other rank(s) stopped"
    assert code == 2  # the rank's error was the user's input


# real processes through the elastic launcher --------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_run(data_dir: Path) -> dict:
    """``muse rank train --nproc 2``: MUSE with sparse-gradient embedding tables, two epochs."""
    res = _muse(data_dir, "rank", "train", "--model", "muse", "--source", "scl-taobao", "--dataset", "synth",
                "--nproc", "2", "--batch-size", "64", "--epochs", "2", "--set", "sparse_min_rows=100",
                "--set", "eval_batch_size=64", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    return {"run": out["run"], "metrics": out}


@pytest.mark.slow
def test_two_processes_train_every_impression_once_per_epoch(data_dir: Path, two_process_run: dict) -> None:
    row = _run_row(data_dir, two_process_run["run"])
    assert row["status"] == "done" and Path(row["checkpoint"]).exists()
    d = row["config"]["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and d["global_batch"] == 64
    assert len(d["threads"]) == 2 and all(t >= 1 for t in d["threads"])
    assert sum(d["impressions_per_rank"]) == 2400 and min(d["impressions_per_rank"]) > 0
    epochs = row["metrics"]["train"]["distributed"]["epochs"]
    assert epochs == [{"impressions": 2400, "seen": 2400, "exactly_once": True}] * 2
    assert row["metrics"]["train"]["samples"] == 2 * 2400


@pytest.mark.slow
def test_nproc_is_recorded_and_shown(data_dir: Path, two_process_run: dict) -> None:
    res = _muse(data_dir, "rank", "show", str(two_process_run["run"]))
    assert res.returncode == 0, res.stderr
    assert "nproc = 2" in res.stdout  # the options, a --config file again
    assert "processes: 2 (1 node(s) x 2, gloo, started by muse --nproc); global batch 64" in res.stdout


@pytest.mark.slow
def test_evaluation_is_the_same_for_one_and_two_processes(data_dir: Path, two_process_run: dict) -> None:
    run = str(two_process_run["run"])
    one = _muse(data_dir, "rank", "eval", run, "--json", "--threads", "1")
    two = _muse(data_dir, "rank", "eval", run, "--json", "--nproc", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = json.loads(one.stdout), json.loads(two.stdout)
    trained = two_process_run["metrics"]  # evaluated by the two training processes
    for s in SPLITS:
        assert m1[s] == m2[s] == trained[s], s  # exact: AUC, GAUC, logloss, n
    assert m1["overall"]["n"] == 960


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_with_one_sentence(data_dir: Path) -> None:
    env = {**os.environ, "MUSE_DATA_DIR": str(data_dir), "MUSE_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "muse_cli", "rank", "train", "--model", "din", "--esu", "ta",
                             "--dataset", "synth", "--nproc", "2", "--batch-size", "64", "--epochs", "400"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id, pid = _running_rank(data_dir, rank=1, deadline=time.monotonic() + 300)
        time.sleep(1.0)  # mid-epoch: the run trains for minutes
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert lines == [f"error: rank 1 (pid {pid}) failed: killed by SIGKILL (out of memory, or killed from outside); "
                     f"1 other rank(s) stopped; run {run_id} is marked failed and has no checkpoint"], err[-3000:]
    assert proc.returncode == 1
    row = _run_row(data_dir, run_id)
    assert row["status"] == "failed" and row["checkpoint"] is None and "rank 1" in row["metrics"]["error"]
    assert not list((data_dir / "ranker").glob(f"run-{run_id}.pt*"))  # nothing that looks finished
    for r in row["config"]["distributed"]["ranks"]:  # the launcher left no rank behind
        assert not Path(f"/proc/{r['pid']}").exists() or _zombie(r["pid"])


def _running_rank(data_dir: Path, rank: int, deadline: float) -> tuple[int, int]:
    """(run id, pid of ``rank``) of the run being trained, once rank 0 has recorded it."""
    while time.monotonic() < deadline:
        with sqlite3.connect(data_dir / "muse.sqlite") as con:
            row = con.execute("select id, config from ranker_runs where status = 'running' order by id desc").fetchone()
        if row is not None:
            return row[0], json.loads(row[1])["distributed"]["ranks"][rank]["pid"]
        time.sleep(0.2)
    raise AssertionError("no running run appeared")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_compare_passes_nproc_through(data_dir: Path) -> None:
    res = _muse(data_dir, "compare", "--dataset", "synth", "--models", "din", "--esu", "ta", "--nproc", "2",
                "--batch-size", "64", "--max-train", "600", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout)
    assert result["spec"]["processes"] == {"world_size": 2, "backend": "gloo", "launcher": "muse --nproc"}
    (cell,) = result["cells"]
    row = _run_row(data_dir, cell["runs"][0])
    assert row["config"]["distributed"]["world_size"] == 2 and row["status"] == "done"
