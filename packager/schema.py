"""Typed tables from TOML data: a dataclass's fields and type hints are its schema.

`parse_table` builds a (nested) dataclass from parsed TOML and refuses, in one line naming the file, table and key,
unknown keys (with the closest known one), wrong types, and values a section's __post_init__ rejects (ValueError).
A type with a `from_toml(where, value)` class method parses its own values (e.g. a min/opt/max range).
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from typing import Literal

from packager.errors import UsageError


def parse_table(kind, data: dict, where: str):
    """`data` as the dataclass `kind`; UsageError naming `where` (the file) and the key of anything wrong."""
    return _parse(kind, data, where, "")


def _parse(kind, value, where: str, key: str, base=dataclasses.MISSING):
    """`value` as type `kind`; `base` is the default a partial table is merged into."""
    path = f"{where}: {_describe_key(key)}" if key else where
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if hasattr(kind, "from_toml"):
        return kind.from_toml(path, value)
    if dataclasses.is_dataclass(kind):
        return _parse_table(kind, value, where, key, base)
    if origin in (types.UnionType, typing.Union):  # X | None: TOML has no null, so a value is always an X
        return _parse(next(a for a in arguments if a is not type(None)), value, where, key, base)
    if origin is Literal:
        if value not in arguments:
            raise UsageError(f"{path} must be one of {', '.join(map(repr, arguments))}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise UsageError(f"{path} must be a list; got {value!r}")
        return tuple(_parse(arguments[0], item, where, f"{key}[{index}]") for index, item in enumerate(value))
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{path} must be a number; got {value!r}")
        return float(value)
    if kind in (int, str, bool):
        if type(value) is not kind:
            raise UsageError(f"{path} must be {_KIND_NAMES[kind]}; got {value!r}")
        return value
    raise TypeError(f"the recipe schema has no parser for {kind}")


_KIND_NAMES = {int: "an integer", str: "a string", bool: "true or false"}


def _parse_table(kind, value, where: str, key: str, base):
    path = f"{where}: [{key}]" if key else where
    if not isinstance(value, dict):
        raise UsageError(f"{path} must be a table; got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    for name in value:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise UsageError(f"{path}: unknown key '{name}'{hint}")
    hints = typing.get_type_hints(kind)
    values = {}
    for name, spec in fields.items():
        default = getattr(base, name) if base is not dataclasses.MISSING else _field_default(spec)
        child = f"{key}.{name}" if key else name
        if name in value:
            values[name] = _parse(hints[name], value[name], where, child, default)
        elif default is dataclasses.MISSING:
            raise UsageError(f"{where}: {_describe_key(child)} is missing ({_expected(hints[name])})")
        else:
            values[name] = default
    try:
        return kind(**values)
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _field_default(spec: dataclasses.Field):
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return dataclasses.MISSING


def _describe_key(key: str) -> str:
    """'tensorrt.workspace_mib' as a reader finds it in the file: [tensorrt] workspace_mib."""
    section, _, rest = key.rpartition(".")
    return f"[{section}] {rest}" if section else f"'{rest}'"


def _expected(kind) -> str:
    if dataclasses.is_dataclass(kind):
        return "a table"
    return _KIND_NAMES.get(kind, str(kind))


def to_data(value):
    """A parsed table back as TOML-shaped data (what parse_table reads)."""
    if hasattr(type(value), "from_toml"):  # a type that parses its own values writes them too
        return value.to_data()
    if dataclasses.is_dataclass(value):
        return {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, tuple):
        return [to_data(item) for item in value]
    return value


def merge(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in, tables key by key."""
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def read_toml(data: bytes, where: str) -> dict:
    """Parsed TOML; a file that is not UTF-8 or not TOML is one UsageError naming `where`."""
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where}: not valid TOML: {exc}") from None


