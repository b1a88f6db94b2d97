"""Configs are frozen dataclasses built at the boundary from plain mappings; this module holds the
one builder they share, so that every config rejects unknown keys the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from muse.errors import ConfigurationError

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
