"""The command line's lists of sources, models and ESU variants are the registries' (read, not copied)."""

from __future__ import annotations

import argparse

import pytest

from indexer.source_registry import IMPORTED_SOURCES, SOURCES
from indexer.training import TRAINABLE_SOURCES, train_source
from muse_cli import registries
from muse_cli.main import build_parser
from ranker.models import ESU_VARIANTS, list_models


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _choices(path: tuple[str, ...], option: str) -> list[str]:
    parser = build_parser()
    for name in path:
        parser = _sub(parser, name)
    action = next(a for a in parser._actions if option in a.option_strings)
    assert action.choices is not None, (path, option)
    return list(action.choices)


@pytest.mark.parametrize(("path", "option", "registry"), [
    (("embed", "train"), "--source", TRAINABLE_SOURCES),
    (("embed", "list"), "--source", SOURCES),
    (("embed", "eval"), "--sources", SOURCES),
    (("embed", "import"), "--source", IMPORTED_SOURCES),
    (("rank", "train"), "--model", tuple(list_models())),
    (("rank", "train"), "--esu", ESU_VARIANTS),
], ids=["embed-train-source", "embed-list-source", "embed-eval-sources", "embed-import-source", "rank-train-model",
        "rank-train-esu"])
def test_cli_choices_are_the_registries(path: tuple[str, ...], option: str, registry: tuple[str, ...]) -> None:
    assert _choices(path, option) == list(registry)


def test_registry_readers_and_the_trainer_agree() -> None:
    assert registries.trainable_sources() == tuple(TRAINABLE_SOURCES)
    assert registries.all_sources() == tuple(SOURCES)
    assert registries.imported_sources() == tuple(IMPORTED_SOURCES)
    assert registries.model_names() == tuple(list_models())
    assert registries.esu_variants() == tuple(ESU_VARIANTS)
    assert set(TRAINABLE_SOURCES) <= set(SOURCES) and set(IMPORTED_SOURCES) <= set(SOURCES)
    assert train_source.__module__ == "indexer.training"


def test_no_copied_lists_left_in_the_cli() -> None:
    """The modules that once copied the lists now hold no literal list of model or ESU names."""
    from pathlib import Path

    import muse_cli

    root = Path(muse_cli.__file__).parent
    for name in ("embed.py", "rank.py", "quickstart.py"):
        text = (root / name).read_text()
        assert '"sim-hard", "sim-soft"' not in text and '"ta+simtier", "sa-ta"' not in text, name
        assert '("scl", "i2i", "openclip"' not in text, name


def test_quickstart_defaults_to_every_registered_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from muse_cli import quickstart

    args = build_parser().parse_args(["quickstart", "--size", "tiny"])
    assert args.models is None  # resolved from the registry by the handler
    seen: dict[str, list[str]] = {}

    def stop(*_a, **_k):
        seen["models"] = list(args.models)
        raise KeyboardInterrupt

    monkeypatch.setattr("muse.settings.load_settings", stop)
    with pytest.raises(KeyboardInterrupt):
        quickstart._quickstart(args)
    assert seen["models"] == list_models()


def test_lazy_choices_import_nothing_until_used() -> None:
    calls: list[int] = []

    def load() -> tuple[str, ...]:
        calls.append(1)
        return ("a", "b")

    c = registries.LazyChoices(load)
    p = argparse.ArgumentParser()
    p.add_argument("--x", choices=c, metavar="X")
    assert calls == []
    assert p.parse_args(["--x", "b"]).x == "b" and calls == [1]
    assert list(c) == ["a", "b"] and len(c) == 2 and "a" in c and "z" not in c and calls == [1]
