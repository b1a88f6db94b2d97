"""Models by name: ``din``, ``sim-hard``, ``sim-soft``, ``twin``, ``muse``; one factory."""

from __future__ import annotations

from typing import Any

from muse.errors import ConfigurationError
from ranker.models.base import CTRModel
from ranker.models.config import (
    DINConfig,
    FeatureSpec,
    ModelConfig,
    MUSEConfig,
    SIMHardConfig,
    SIMSoftConfig,
    TWINConfig,
    build_config,
)
from ranker.models.din import DIN
from ranker.models.muse import MUSE
from ranker.models.sim import SIMHard, SIMSoft
from ranker.models.twin import TWIN

#: name -> (model class, config class)
MODELS: dict[str, tuple[type[CTRModel], type[ModelConfig]]] = {
    "din": (DIN, DINConfig),
    "sim-hard": (SIMHard, SIMHardConfig),
    "sim-soft": (SIMSoft, SIMSoftConfig),
    "twin": (TWIN, TWINConfig),
    "muse": (MUSE, MUSEConfig),
}


def list_models() -> list[str]:
    """Names of the available models."""
    return list(MODELS)


def _lookup(name: str) -> tuple[type[CTRModel], type[ModelConfig]]:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigurationError(f"model {name!r} is unknown; valid: {', '.join(MODELS)}") from None


def model_class(name: str) -> type[CTRModel]:
    """The model class registered as ``name``."""
    return _lookup(name)[0]


def make_config(name: str, **overrides: Any) -> ModelConfig:
    """The frozen config of model ``name`` with ``overrides`` (unknown keys rejected)."""
    return build_config(_lookup(name)[1], overrides)


def build_model(name: str, spec: FeatureSpec, config: ModelConfig | None = None, **overrides: Any) -> CTRModel:
    """A fresh model ``name`` on feature spec ``spec`` (config from ``config`` or ``overrides``)."""
    cls, cfg_cls = _lookup(name)
    if config is None:
        config = make_config(name, **overrides)
    elif overrides:
        raise ConfigurationError("give either config or overrides, not both")
    if not isinstance(config, cfg_cls):
        raise ConfigurationError(f"model {name!r} needs a {cfg_cls.__name__}, got {type(config).__name__}")
    return cls(config, spec)
