"""The names the command line offers, read from the stages' registries (never copied here).

The registries live in modules that import torch, and building the parser must not (``muse --help``
stays fast), so the options take a :class:`LazyChoices`: argparse only iterates or tests it when an
option is given or its help is shown, and only then is the registry imported. Options that use one
must give a ``metavar``: without it argparse formats the choices while the option is added.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator


def trainable_sources() -> tuple[str, ...]:
    """Embedding sources ``muse embed train`` trains (``indexer.training.TRAINABLE_SOURCES``)."""
    from indexer.training import TRAINABLE_SOURCES

    return tuple(TRAINABLE_SOURCES)


def all_sources() -> tuple[str, ...]:
    """Every embedding source: trained, ID and imported (``indexer.source_registry.SOURCES``)."""
    from indexer.source_registry import SOURCES

    return tuple(SOURCES)


def imported_sources() -> tuple[str, ...]:
    """Sources whose vectors a dataset ships (``indexer.source_registry.IMPORTED_SOURCES``)."""
    from indexer.source_registry import IMPORTED_SOURCES

    return tuple(IMPORTED_SOURCES)


def model_names() -> tuple[str, ...]:
    """CTR models by name (``ranker.models.list_models``)."""
    from ranker.models import list_models

    return tuple(list_models())


def esu_variants() -> tuple[str, ...]:
    """ESU variants (``ranker.models.ESU_VARIANTS``)."""
    from ranker.models import ESU_VARIANTS

    return tuple(ESU_VARIANTS)


class LazyChoices:
    """A ``choices=`` container that reads its names from ``load`` on first use."""

    def __init__(self, load: Callable[[], tuple[str, ...]]) -> None:
        self._load = load
        self._names: tuple[str, ...] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        if self._names is None:
            self._names = tuple(self._load())
        return self._names

    def __contains__(self, value: object) -> bool:
        return value in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"LazyChoices({self._load.__name__})"
