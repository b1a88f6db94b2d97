"""The torch thread count of ``muse compare``: ``--threads N`` is used as given, otherwise the faster
of the probed counts (never more than the CPUs), and it is what the comparison runs and records."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ranker.compare as rc
from muse.errors import ConfigurationError
from muse.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def restore_threads(one_torch_thread: None) -> None:
    """Each test may set the thread count; the shared fixture puts it back to one."""
    yield
    torch.set_num_threads(1)


def _no_probe(*args: object, **kwargs: object) -> dict[int, float]:
    raise AssertionError("the probe must not run")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_requested_count_is_used_without_a_probe(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(rc, "probe_thread_rates", _no_probe)
    assert rc.pick_threads(None, "any", ["twin"], ["scl"], None, requested=n) == n  # type: ignore[arg-type]
    assert torch.get_num_threads() == n


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_requested_count_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="--threads"):
        rc.pick_threads(None, "any", None, ["scl"], None, requested=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rates", "best"), [({1: 900.0, 2: 200.0}, 1), ({1: 300.0, 2: 1200.0}, 2),
                                             ({1: 500.0, 2: 500.0}, 1)])
def test_the_fastest_probed_count_is_picked(monkeypatch: pytest.MonkeyPatch, rates: dict, best: int) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    seen = {}

    def probe(*args: object) -> dict[int, float]:
        seen["counts"] = args[7]
        return rates

    monkeypatch.setattr(rc, "probe_thread_rates", probe)
    assert rc.pick_threads(None, "any", None, ["scl"], None) == best  # type: ignore[arg-type]
    assert seen["counts"] == [1, 2] and torch.get_num_threads() == best


def test_candidates_never_exceed_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    monkeypatch.setattr(rc, "probe_thread_rates", _no_probe)  # one candidate left: nothing to probe
    assert rc.pick_threads(None, "any", None, ["scl"], None, candidates=(1, 2, 4)) == 1  # type: ignore[arg-type]
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert rc.thread_candidates((4, 2, 2, 8, 0)) == [2, 4]
    assert rc.thread_candidates((8,)) == [1]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, str]:
    """A migrated deployment with the benchmark's synthetic dataset, tiny (histories of 80)."""
    from bench.ranker import make_dataset
    from muse import db

    settings = load_settings(env={}, data_dir=tmp_path_factory.mktemp("threads") / "muse-data", device="cpu")
    db.upgrade(settings)
    return settings, make_dataset(settings, n_users=30, n_items=400, history=80, n_impressions=600, dim=8)


def test_the_probe_times_every_count_on_the_heaviest_model(small, monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from bench.ranker import SOURCE
    from indexer.item_vectors import item_vectors

    settings, dataset = small
    vectors_for = functools.partial(item_vectors, settings)  # what the CLI hands the ranker
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    cfg = None  # the default train config: batches of 256
    overrides = {"k": 10, "tower": (16, 8), "recent_len": 10}
    rates = rc.probe_thread_rates(settings, dataset, ["din", "twin"], [SOURCE], None, cfg, overrides, [1, 2], 2,
                                  vectors_for)
    assert set(rates) == {1, 2} and all(r > 0 for r in rates.values())
    picked = rc.pick_threads(settings, dataset, ["din", "twin"], [SOURCE], None, cfg, overrides, steps=2,
                             vectors_for=vectors_for)
    assert picked in (1, 2) and torch.get_num_threads() == picked


def test_cli_compare_runs_and_records_the_picked_count(monkeypatch: pytest.MonkeyPatch, capsys,
                                                       tmp_path: Path) -> None:
    from muse_cli.main import main

    monkeypatch.setenv("MUSE_DATA_DIR", str(tmp_path / "muse-data"))
    monkeypatch.setenv("MUSE_DEVICE", "cpu")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr(rc, "probe_thread_rates", lambda *a: {1: 100.0, 2: 400.0})
    got = {}

    def fake_compare(settings: Settings, dataset: str, **kwargs: object) -> SimpleNamespace:
        got.update(threads=kwargs["threads"], torch=torch.get_num_threads())
        return SimpleNamespace(comparison_id=1, result={}, table="", table_path=None, plot_path=None,
                               stored_before=False)

    monkeypatch.setattr(rc, "compare", fake_compare)
    argv = ["compare", "--dataset", "d", "--models", "din", "--sources", "scl"]
    assert main(argv) == 0
    assert "torch threads: 2 (the faster of 1 and 2" in capsys.readouterr().out
    assert got == {"threads": 2, "torch": 2}
    monkeypatch.setattr(rc, "probe_thread_rates", _no_probe)
    assert main([*argv, "--threads", "1"]) == 0
    assert "torch threads: 1 (--threads)" in capsys.readouterr().out
    assert got == {"threads": 1, "torch": 1}
    assert main([*argv, "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
