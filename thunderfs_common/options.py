"""Each option declared once.

A program's settings are one frozen dataclass whose fields are declared with ``option(...)``: its
default, its help, how a text becomes its value (``parse``), and its check.  From that one
declaration come the command line (``add_arguments``), the TOML config file's keys (the field's
name: ``cache_size = "20G"``), the types, the defaults and the checks (``load``).  Values are
parsed and checked once, when the settings are made; the settings never change afterwards.
Checks that tie several options together go in the dataclass's ``__post_init__``.

Precedence: the defaults, then the config file, then the flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thunderfs_common.units import format_size, parse_size


class OptionError(ValueError):
    """An option's value, or a config file, that cannot be used; the text says which and why."""


REQUIRED = dataclasses.MISSING


def option(default: Any = REQUIRED, help: str = "", *, parse: Callable[[Any], Any] | None = None,
           check: Callable[[Any], str | None] | None = None, flag: str | None = None, positional: bool = False,
           group: str | None = None, metavar: str | None = None, file: bool = True, hidden: bool = False,
           default_factory: Callable[[], Any] | None = None) -> Any:
    """A settings field.  ``parse`` turns a flag's text (or a config file's value) into the value
    (default: by the field's type); ``check(value)`` returns what is wrong with it, or None.
    ``flag``: the long option (default ``--name-with-dashes``; for a bool that defaults to True,
    give the ``--no-...`` flag that turns it off).  ``file``: whether the config file may set it."""
    meta = {"help": help, "parse": parse, "check": check, "flag": flag, "positional": positional,
            "group": group, "metavar": metavar, "file": file, "hidden": hidden}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --- parsers and checks for option(parse=..., check=...) -------------------------------------


def size(value) -> int:
    """``"64K"``, ``"20GiB"``, ``4096`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    return value if isinstance(value, int) else parse_size(str(value))


def positive(value) -> str | None:
    return None if value > 0 else "must be positive"


def not_negative(value) -> str | None:
    return None if value >= 0 else "must not be negative"


def at_least(n: int) -> Callable[[Any], str | None]:
    return lambda value: None if value >= n else f"must be at least {n}"


def http_url(value: str) -> str | None:
    return None if value.startswith(("http://", "https://")) else f"must be an http(s) URL, not {value!r}"


# --- the schema --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Option:
    name: str
    kind: Any  # the field's type
    default: Any
    meta: dict

    @property
    def flag(self) -> str:
        return self.meta["flag"] or "--" + self.name.replace("_", "-")

    @property
    def shown(self) -> str:
        """How messages name it on the command line."""
        return self.name.upper() if self.meta["positional"] else self.flag

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def _options(schema: type) -> list[_Option]:
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        if f.metadata.get("help") is None and "parse" not in f.metadata:
            continue  # not an option (a value the program derives)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED)
        out.append(_Option(f.name, hints[f.name], default, dict(f.metadata)))
    return out


def _base(kind) -> Any:
    """``str | None`` -> str; ``Path`` -> Path."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1 else kind


def add_arguments(parser: argparse.ArgumentParser, schema: type) -> None:
    """One argument per option.  A flag not given leaves no value behind (``load`` fills in the
    config file's, else the default), so the parser never hides a file's setting."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for o in _options(schema):
        target = parser
        if o.meta["group"]:
            title, _, description = o.meta["group"].partition(": ")
            target = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title, description or None))
        shown = format_size(o.default) if o.meta["parse"] is size else o.default
        shown_default = "" if (o.required or o.default in (None, "", False) or _base(o.kind) is bool
                               or "default" in o.meta["help"]) else f" (default {shown})"
        help_text = argparse.SUPPRESS if o.meta["hidden"] else (o.meta["help"] + shown_default)
        if o.meta["positional"]:
            target.add_argument(o.name, nargs="?", default=argparse.SUPPRESS, help=help_text)
        elif _base(o.kind) is bool:
            target.add_argument(o.flag, dest=o.name, action="store_false" if o.default else "store_true",
                                default=argparse.SUPPRESS, help=help_text)
        else:
            target.add_argument(o.flag, dest=o.name, default=argparse.SUPPRESS, help=help_text,
                                metavar=o.meta["metavar"])


def _convert(o: _Option, value: Any, from_file: bool) -> Any:
    """The value of ``o`` from a flag's text or a config file's value; OptionError if it is not one."""
    name = o.name if from_file else o.shown
    base = _base(o.kind)
    if value is None:
        return None
    if base is bool:
        if not isinstance(value, bool):
            raise OptionError(f"{name} must be true or false, not {value!r}")
        return value
    if isinstance(value, (dict, list, bool)):
        raise OptionError(f"{name} must be a {'number' if base in (int, float) else 'string'}, not {value!r}")
    if o.meta["parse"] is not None:
        try:
            return o.meta["parse"](value)
        except ValueError as exc:
            raise OptionError(f"{name}: {exc}") from None
    if base in (int, float):
        number = (int,) if base is int else (int, float)
        if isinstance(value, number):
            return base(value)
        if not from_file:
            try:
                return base(value)
            except ValueError:
                pass
        raise OptionError(f"{name} must be {'a whole number' if base is int else 'a number'}, not {value!r}")
    if not isinstance(value, str):
        raise OptionError(f"{name} must be a string, not {value!r}")
    return base(value)


def read_file(path: Path, schema: type) -> dict[str, Any]:
    """A TOML config file's settings, parsed and checked as the options they set."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise OptionError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise OptionError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise OptionError(f"config file {path} does not parse: {exc}") from None
    options = {o.name: o for o in _options(schema) if o.meta["file"]}
    unknown = sorted(k for k in doc if k not in options)
    if unknown:
        raise OptionError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(options))})")
    out = {}
    for key, value in doc.items():
        try:
            out[key] = _checked(options[key], _convert(options[key], value, from_file=True), from_file=True)
        except OptionError as exc:
            raise OptionError(f"{path}: {exc}") from None
    return out


def _checked(o: _Option, value: Any, from_file: bool) -> Any:
    check = o.meta["check"]
    if check is not None and value is not None and (problem := check(value)):
        raise OptionError(f"{o.name if from_file else o.shown} {problem}")
    return value


def load(schema: type, args: argparse.Namespace, config_file: Path | None = None):
    """The settings: defaults, then ``config_file``'s, then the flags in ``args``.  Parsed and
    checked once; OptionError says what is wrong.  What a program derives from them (a secret read
    from its file, tokens) it adds with ``dataclasses.replace``."""
    values = read_file(config_file, schema) if config_file is not None else {}
    for o in _options(schema):
        if o.name in vars(args):
            values[o.name] = _checked(o, _convert(o, getattr(args, o.name), from_file=False), from_file=False)
    for o in _options(schema):
        if o.required and o.name not in values:
            raise OptionError(f"{o.shown} is needed (on the command line, or {o.name} in the config file)")
    try:
        return schema(**values)
    except ValueError as exc:  # a check across options (__post_init__)
        raise OptionError(str(exc)) from None


def config_file(given: str | None, default: Path) -> Path | None:
    """The config file to read: the one ``--config`` names, else ``default`` if it exists."""
    return Path(given) if given else (default if default.exists() else None)
