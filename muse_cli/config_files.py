"""Runs described as data: ``--config FILE`` (TOML) for ``muse rank train``, ``muse embed train`` and
``muse compare``.

Keys are the command's long options with ``-`` written ``_``: ``--batch-size 64`` is
``batch_size = 64``, ``--no-reuse`` is ``no_reuse = true``, ``--augment``/``--no-augment`` is
``augment = true``/``false``. Values have the option's type (integers, floats, strings, booleans;
comma-separated options such as ``--models`` take a list or a comma-separated string; options with
fixed choices are checked against them). ``--set KEY=VALUE`` is a table::

    [set]
    simtier_init = 0.5
    tower = [128, 64]

Options given on the command line override the file (``--set`` items are added after the file's, so a
key given on both takes the command line's value). An unknown key or a value of the wrong type is
refused with one :class:`~muse.errors.ConfigurationError` naming the key (and the valid keys).

The effective options (file merged with flags, options left at their default omitted) are what the
commands store with their run (:func:`effective_options`, :func:`dumps_toml`); a stored file can be
given to ``--config`` again.

The parser keeps every option of these commands at a neutral default (None, False or an empty list)
so that "given on the command line" is "differs from the parser's default"; the real defaults are
applied by the code after the merge.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from muse.configs import read_toml
from muse.errors import ConfigurationError

#: The option that names the file (never a key of it).
CONFIG_OPTION = "config"

_BOOL_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


def option_key(action: argparse.Action) -> str | None:
    """The file key of an option: its first long option without ``--``, ``-`` written ``_``
    (None for positionals and ``--help``)."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    if not longs or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        return None
    return longs[0][2:].replace("-", "_")


def file_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Key -> option of every option ``parser`` accepts in a config file (all but ``--config`` and
    ``--help``), in the order of ``--help``."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        key = option_key(action)
        if key is not None and key != CONFIG_OPTION:
            out[key] = action
    return out


def load_config(path: str | Path) -> dict[str, Any]:
    """The TOML file ``path`` as a dict.

    Raises:
        ConfigurationError: the file is missing, unreadable or not valid TOML.
    """
    return read_toml(path, f"config file {str(Path(path))!r}")


def _kind(action: argparse.Action) -> str:
    """Words for the type a key takes, for error messages."""
    if isinstance(action, _BOOL_ACTIONS):
        return "true or false"
    if isinstance(action, argparse._AppendAction):
        return 'a table of KEY = VALUE (or a list of "KEY=VALUE" strings)'
    if action.nargs in ("+", "*"):
        return "a list of strings"
    if action.type is int:
        return "an integer"
    if action.type is float:
        return "a number"
    if action.type in (None, str):
        return "a string"
    return "a string or a list of strings"


def _bad(where: str, key: str, action: argparse.Action, value: Any) -> ConfigurationError:
    return ConfigurationError(f"{where}: key {key!r} must be {_kind(action)}, got {value!r} "
                              f"({type(value).__name__})")


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def coerce(where: str, key: str, action: argparse.Action, value: Any) -> Any:
    """A file value as the parsed option would hold it; ConfigurationError naming the key when its type
    or choice is wrong."""
    if isinstance(action, _BOOL_ACTIONS):
        if not isinstance(value, bool):
            raise _bad(where, key, action, value)
        return value
    if isinstance(action, argparse._AppendAction):  # --set: a table or a list of "KEY=VALUE"
        if isinstance(value, dict):
            return [f"{k}={json.dumps(v)}" for k, v in value.items()]
        if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
            return list(value)
        raise _bad(where, key, action, value)
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else None
        if items is None or not all(isinstance(v, str) for v in items):
            raise _bad(where, key, action, value)
        out: Any = list(items)
    elif action.type is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(where, key, action, value)
        out = value
    elif action.type is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _bad(where, key, action, value)
        out = float(value)
    elif action.type in (None, str):
        if not isinstance(value, str):
            raise _bad(where, key, action, value)
        out = value
    else:  # a parsing function such as the comma-separated lists: it gets the string the flag would
        if isinstance(value, list) and all(_scalar(v) for v in value):
            value = ",".join(str(v) for v in value)
        if not _scalar(value):
            raise _bad(where, key, action, value)
        try:
            out = action.type(str(value))
        except (TypeError, ValueError) as e:
            raise ConfigurationError(f"{where}: key {key!r}: {e}") from None
    if action.choices is not None:
        for v in out if isinstance(out, list) else [out]:
            if v not in action.choices:
                raise ConfigurationError(f"{where}: key {key!r} = {v!r} is not one of "
                                         f"{', '.join(map(str, action.choices))}")
    return out


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, values: dict[str, Any],
                 where: str = "config file", command: str = "this command") -> argparse.Namespace:
    """Fill ``args`` from ``values`` (a loaded config file) wherever the command line left an option
    at the parser's default; ``--set`` items of the file go before the command line's.

    Raises:
        ConfigurationError: a key the command does not have, or a value of the wrong type.
    """
    keys = file_keys(parser)
    for key, value in values.items():
        action = keys.get(key)
        if action is None:
            raise ConfigurationError(f"{where}: unknown key {key!r} for `{command}`; valid keys: "
                                     f"{', '.join(keys)}")
        v = coerce(where, key, action, value)
        current = getattr(args, action.dest, action.default)
        if isinstance(action, argparse._AppendAction):
            setattr(args, action.dest, v + list(current or []))
        elif current == action.default:
            setattr(args, action.dest, v)
    return args


def parse_set_items(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as a dict (later items win). Values are read as JSON (``0.5``,
    ``[128, 64]``, ``true``), anything else as a string; ``-`` in a key is written ``_``.

    Raises:
        ConfigurationError: an item without ``=`` or without a key.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigurationError(f"--set {item!r}: expected KEY=VALUE, e.g. --set simtier_init=0.5")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def effective_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Key -> value of every option of ``args`` that is not at the parser's default (the file merged
    with the flags), ``--set`` items as a table: what a command stores with its run."""
    out: dict[str, Any] = {}
    for key, action in file_keys(parser).items():
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        if isinstance(action, argparse._AppendAction):
            value = parse_set_items(value)
        out[key] = _plain(value)
    return out


def add_config_option(parser: argparse.ArgumentParser, command: str, func: Callable[[argparse.Namespace], int],
                      required: Sequence[str] = ()) -> None:
    """Give ``parser`` a ``--config FILE`` option and make ``func`` its handler, called after the file
    is merged into the arguments. ``required``: keys that must be set by a flag or the file.

    The handler finds ``args.effective_config`` (:func:`effective_options`) and ``args.config`` (the
    file, or None).
    """
    parser.add_argument(f"--{CONFIG_OPTION}", metavar="FILE", default=None,
                        help="TOML file of this command's options: keys are the long options with - written _ "
                             "(e.g. batch_size = 64; --set as a [set] table); options given here override it")
    parser.set_defaults(func=functools.partial(run_with_config, parser, command, func, tuple(required)))


def run_with_config(parser: argparse.ArgumentParser, command: str, func: Callable[[argparse.Namespace], int],
                    required: Sequence[str], args: argparse.Namespace) -> int:
    """Merge ``args.config`` (when given) into ``args``, check ``required``, then run ``func``."""
    path = getattr(args, CONFIG_OPTION, None)
    if path:
        apply_config(parser, args, load_config(path), where=f"config file {str(path)!r}", command=command)
    keys = file_keys(parser)
    for key in required:
        if getattr(args, keys[key].dest, None) in (None, [], ""):
            raise ConfigurationError(f"`{command}` needs {keys[key].option_strings[0]} "
                                     f"(or `{key} = ...` in the --config file)")
    args.effective_config = effective_options(parser, args)
    return func(args)


# writing ------------------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()
                               if v is not None) + "}"
    return json.dumps(str(value))


def dumps_toml(values: dict[str, Any], comment: str | None = None) -> str:
    """``values`` (scalars, lists and one level of tables; None omitted: TOML has no null) as TOML text."""
    lines = [f"# {line}" for line in (comment or "").splitlines()]
    tables = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, dict):
            tables.append((key, value))
            continue
        lines.append(f"{_toml_key(str(key))} = {_toml_value(value)}")
    for key, table in tables:
        lines += ["", f"[{_toml_key(str(key))}]"]
        lines += [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"
