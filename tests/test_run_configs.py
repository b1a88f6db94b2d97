"""Runs as data: ``--config FILE`` (TOML) of ``muse rank train``, ``muse embed train`` and ``muse compare``
(parsing, merging, refusals; no training here: see test_ranker_models / test_embed_sources for the
runs that store their options), and the per-source training defaults read from
``indexer/train_defaults/*.toml``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from muse.configs import tomllib  # tomli on Python 3.10
from muse.errors import ConfigurationError
from muse_cli import config_files
from muse_cli.main import build_parser, main

COMMANDS = (("rank", "train"), ("embed", "train"), ("compare",))


def _subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _merged(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` and merge its --config file the way the handler sees it (without running it)."""
    args = build_parser().parse_args(argv)
    seen: list[argparse.Namespace] = []
    partial = args.func
    parser, command, _, required = partial.args
    config_files.run_with_config(parser, command, lambda a: seen.append(a) or 0, required, args)
    return seen[0]


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_flag_has_a_key(command: tuple[str, ...]) -> None:
    parser = _subparser(*command)
    longs = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and not s.startswith("--no-")}
    longs -= {"--help", "--config"}
    keys = config_files.file_keys(parser)
    assert set(keys) == {s[2:].replace("-", "_") for s in longs} | ({"no_reuse"} if command == ("compare",) else set())
    assert "config" not in keys and "help" not in keys


def test_file_values_fill_what_the_command_line_leaves_unset(tmp_path: Path) -> None:
    path = _write(tmp_path, 'model = "muse"\nsource = "scl"\ndataset = "d"\nepochs = 3\nbatch_size = 64\n'
                            'lr = 1\n[set]\nsimtier_init = 0.5\ntower = [32, 16]\n')
    args = _merged(["rank", "train", "--config", path, "--epochs", "5", "--set", "simtier_init=0.25"])
    assert (args.model, args.source, args.dataset, args.epochs, args.batch_size) == ("muse", "scl", "d", 5, 64)
    assert args.lr == 1.0 and isinstance(args.lr, float)
    assert args.settings == ["simtier_init=0.5", "tower=[32, 16]", "simtier_init=0.25"]  # the flag comes last
    from muse_cli.rank import parse_settings

    assert parse_settings(args.settings)[1] == {"simtier_init": 0.25, "tower": [32, 16]}
    assert args.effective_config == {"model": "muse", "source": "scl", "dataset": "d", "epochs": 5,
                                     "batch_size": 64, "lr": 1.0,
                                     "set": {"simtier_init": 0.25, "tower": [32, 16]}}


def test_compare_matrix_from_a_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'dataset = "d"\nmodels = ["din", "muse"]\nsources = "scl,id"\nesu = ["ta"]\n'
                            "seeds = 3\nthreads = 1\nmax_train = 300\nmax_eval = 200\nno_reuse = true\n")
    args = _merged(["compare", "--config", path, "--seeds", "2"])
    assert (args.models, args.sources, args.esu, args.seeds, args.threads) == (["din", "muse"], ["scl", "id"],
                                                                               ["ta"], 2, 1)
    assert (args.max_train, args.max_eval, args.no_reuse) == (300, 200, True)
    assert args.effective_config["seeds"] == 2 and args.effective_config["sources"] == ["scl", "id"]


def test_embed_train_from_a_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'source = "i2i"\ndataset = "d"\naugment = false\nmomentum = 0.99\nmax_steps = 3\n')
    args = _merged(["embed", "train", "--config", path, "--augment"])
    assert (args.source, args.augment, args.momentum, args.max_steps) == ("i2i", True, 0.99, 3)
    assert _merged(["embed", "train", "--config", path]).augment is False


@pytest.mark.parametrize(("text", "words"), [
    ('model = "din"\ndataset = "d"\nepoch = 3\n', ["unknown key 'epoch'", "valid keys: model, source, esu, dataset, epochs"]),
    ('model = "din"\ndataset = "d"\nepochs = "3"\n', ["key 'epochs' must be an integer", "'3'"]),
    ('model = "din"\ndataset = "d"\nepochs = true\n', ["key 'epochs' must be an integer"]),
    ('model = "din"\ndataset = "d"\nlr = "fast"\n', ["key 'lr' must be a number"]),
    ('model = "dinx"\ndataset = "d"\n', ["key 'model' = 'dinx' is not one of din, sim-hard"]),
    ('model = "din"\ndataset = "d"\njson = 1\n', ["key 'json' must be true or false"]),
    ('model = "din"\ndataset = "d"\nset = 3\n', ["key 'set' must be a table"]),
    ('model = "din"\ndataset = "d"\n[train]\nepochs = 3\n', ["unknown key 'train'"]),
    ('model = "din"\ndataset = \n', ["is not valid TOML"]),
    ('dataset = "d"\n', ["`muse rank train` needs --model (or `model = ...` in the --config file)"]),
])
def test_bad_files_are_refused_with_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 text: str, words: list[str]) -> None:
    path = _write(tmp_path, text)
    assert main(["rank", "train", "--config", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "unavailable" not in err
    for w in words:
        assert w in err, err
    with pytest.raises(ConfigurationError):
        _merged(["rank", "train", "--config", path])


def test_missing_file_and_compare_refusals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = _write(tmp_path, 'dataset = "d"\nseeds = 2.5\n')
    assert main(["compare", "--config", path]) == 2
    assert "key 'seeds' must be an integer" in capsys.readouterr().err
    path = _write(tmp_path, 'source = "scl"\ndataset = "d"\nsourcez = 1\n')
    assert main(["embed", "train", "--config", path]) == 2
    assert "unknown key 'sourcez' for `muse embed train`" in capsys.readouterr().err


def test_toml_written_reads_back_and_is_accepted_again(tmp_path: Path) -> None:
    values = {"model": "muse", "epochs": 3, "lr": 1e-3, "json": True, "sources": ["scl", "id"],
              "set": {"tower": [32, 16], "simtier_init": 0.5, "name": 'a "quoted" ü'}, "none": None}
    text = config_files.dumps_toml(values, comment="two\nlines")
    assert text.startswith("# two\n# lines\n")
    assert tomllib.loads(text) == {k: v for k, v in values.items() if v is not None}
    args = _merged(["rank", "train", "--config", path := _write(tmp_path, config_files.dumps_toml(
        {"model": "din", "dataset": "d", "k": 20, "set": {"tower": [32, 16]}}))])
    assert path and (args.model, args.k, args.settings) == ("din", 20, ["tower=[32, 16]"])
    again = _merged(["rank", "train", "--config", _write(tmp_path, config_files.dumps_toml(args.effective_config),
                                                         "again.toml")])
    assert again.effective_config == args.effective_config


# per-source training defaults as data ---------------------------------------------------------------

#: The values indexer/training.py held in Python before they moved to indexer/train_defaults/, with
#: the one change made since (i2i's view term 0.1 -> 0.5, openclip's views and view term: docs/ranker.md).
OLD_GENERIC = {"epochs": 2, "temperature": 0.07, "augment": False, "view_weight": 0.0}
OLD_SOURCES = {"i2i": {"temperature": 0.2, "augment": True, "view_weight": 0.5}, "scl": {"epochs": 8},
               "id": {"epochs": 10}, "openclip": {"augment": True, "view_weight": 0.5}}


def test_training_defaults_load_from_the_data_files_with_the_old_values() -> None:
    from indexer import training

    assert training.GENERIC_DEFAULTS == OLD_GENERIC
    assert training.SOURCE_DEFAULTS == OLD_SOURCES
    assert training.load_train_defaults() is training.load_train_defaults()  # read once
    for key, value in OLD_GENERIC.items():
        assert type(training.GENERIC_DEFAULTS[key]) is type(value)
    for source in ("scl", "i2i", "openclip", "id"):
        cfg = training.EmbedTrainConfig().for_source(source, 600)
        want = {**OLD_GENERIC, **OLD_SOURCES.get(source, {})}
        assert {k: getattr(cfg, k) for k in want} == want, source
    explicit = training.EmbedTrainConfig(epochs=1, temperature=0.5).for_source("i2i", 600)
    assert (explicit.epochs, explicit.temperature, explicit.augment) == (1, 0.5, True)


def test_training_defaults_files_are_checked_and_shipped(tmp_path: Path) -> None:
    from indexer import training

    (tmp_path / "generic.toml").write_text("epochs = 2\n")
    (tmp_path / "scl.toml").write_text("epoch = 8\n")
    with pytest.raises(ConfigurationError, match="unknown key.*epoch"):
        training.load_train_defaults(tmp_path)
    (tmp_path / "scl.toml").write_text("epochs = \n")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        training.load_train_defaults(tmp_path)
    with pytest.raises(ConfigurationError, match="generic.toml is missing"):
        training.load_train_defaults(tmp_path / "empty")
    fields = {f.name for f in dataclasses.fields(training.EmbedTrainConfig)}
    files = sorted(training.TRAIN_DEFAULTS_DIR.glob("*.toml"))
    assert [f.stem for f in files] == ["generic", "i2i", "id", "openclip", "scl"]
    for f in files:  # every value explained: each file starts with a comment
        assert f.read_text().startswith("# ") and set(tomllib.loads(f.read_text())) <= fields
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "train_defaults/*.toml" in project["tool"]["setuptools"]["package-data"]["indexer"]
    assert any(d.startswith("tomli") and "3.11" in d for d in project["project"]["dependencies"])
