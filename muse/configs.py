"""Configs are frozen dataclasses built at the boundary from plain mappings; this module holds the
one builder they share, so that every config rejects unknown keys the same way, and the one TOML
reader every config file goes through (settings, training defaults, ``--config`` files)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from muse.errors import ConfigurationError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

T = TypeVar("T")


def config_from_dict(
    cls: type[T], values: Mapping[str, Any], what: str | None = None, drop_none: bool = False
) -> T:
    """Build the dataclass ``cls`` from ``values``. With ``drop_none`` a key whose value is ``None``
    keeps the field's default (a command-line option left unset); it must still be a field.

    Raises:
        ConfigurationError: ``values`` has keys that are not fields of ``cls`` (the message names
            them and the valid ones).
    """
    valid = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigurationError(f"unknown {what or cls.__name__ + ' keys'} {unknown}; valid: {sorted(valid)}")
    if drop_none:
        values = {k: v for k, v in values.items() if v is not None}
    return cls(**values)


def read_toml(path: str | Path, what: str | None = None) -> dict[str, Any]:
    """The TOML file ``path`` as a dict; ``what`` names it in errors (default: ``file 'PATH'``).

    Raises:
        ConfigurationError: the file does not exist, cannot be read or is not valid TOML.
    """
    p = Path(path)
    what = what or f"file {str(p)!r}"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"{what} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"{what} cannot be read: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"{what} is not valid TOML: {e}") from None
