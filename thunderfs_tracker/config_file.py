"""Settings from a TOML file under an argparse parser: every option a key, every key a flag.

A key is the long option's name without its dashes, with underscores (``cache_size`` for
``--cache-size``); a flag given on the command line wins over the file.  Unknown keys and values
of the wrong kind are refused with a message that names them, before anything starts.  Used by
``thunderfs mount`` and ``thunderfs-tracker`` alike.
"""

from __future__ import annotations

import argparse
import logging
import tomllib
from pathlib import Path

log = logging.getLogger(__name__)


class ConfigFileError(Exception):
    """The file is missing, does not parse, or holds keys or values the command does not take."""


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The settable actions by key (help, version, the config option itself and hidden ones left out)."""
    out = {}
    for action in parser._actions:  # argparse has no public list of its actions
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        if action.dest in ("config", "func") or action.help == argparse.SUPPRESS:
            continue
        out[action.dest] = action
    return out


def _value(key: str, action: argparse.Action, value: object) -> object:
    """The TOML value as argparse would have produced it from the flag, or ConfigFileError."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigFileError(f"{key} must be true or false, not {value!r}")
        return value  # the key is the destination: its value, whichever way the flag sets it
    if isinstance(value, (dict, list)) or isinstance(value, bool):
        raise ConfigFileError(f"{key} must be a {'number' if action.type in (int, float) else 'string'}, "
                              f"not {value!r}")
    if action.type is int and not isinstance(value, int):
        raise ConfigFileError(f"{key} must be a whole number, not {value!r}")
    if action.type is float and not isinstance(value, (int, float)):
        raise ConfigFileError(f"{key} must be a number, not {value!r}")
    if action.type is not None and action.type not in (int, float):
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ConfigFileError(f"{key}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigFileError(f"{key} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return str(value) if action.type is None and not isinstance(value, str) else value


def load(path: Path, parser: argparse.ArgumentParser) -> dict[str, object]:
    """The file's settings as argparse destinations and values."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"config file {path} does not parse: {exc}") from None
    options = _options(parser)
    unknown = sorted(k for k in doc if k not in options)
    if unknown:
        raise ConfigFileError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(options))})")
    out = {}
    for key, value in doc.items():
        try:
            out[key] = _value(key, options[key], value)
        except ConfigFileError as exc:
            raise ConfigFileError(f"{path}: {exc}") from None
    return out


def path_in(argv: list[str], default: Path) -> Path | None:
    """The ``--config PATH`` of ``argv``, else ``default`` if that file exists, else None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return default if default.exists() else None


def use(parser: argparse.ArgumentParser, path: Path) -> None:
    """Make the file's settings ``parser``'s defaults: flags given still win, and options the
    file sets are no longer required on the command line."""
    settings = load(path, parser)
    options = _options(parser)
    for dest in settings:
        options[dest].required = False
    parser.set_defaults(**settings)
