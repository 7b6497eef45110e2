"""YAML -> dataclass loading shared by every config in the project (model, training, server), and the one JSON
object reader (golden sets' case files, downloaded model configs).

One place decides what a config error says: a missing or malformed file, an unknown key (with the
keys that are known), a section that is not a mapping, a value of the wrong type. Each config module
keeps its own dataclasses and `validate()`; this module only reads and builds them.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from emo_stream.errors import ConfigError

_SCALARS = (bool, int, float, str)


def read_yaml(path: str | Path, what: str = "config", hint: str = "") -> dict[str, Any]:
    """A YAML file's top-level mapping ({} for an empty file).

    `what` names the file in the not-found message ("model config not found: x.yaml"); `hint` is
    appended there (e.g. which presets exist)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}{hint}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def read_json(path: str | Path, error: type[Exception] = ConfigError, missing: str | None = None) -> dict[str, Any]:
    """A JSON file's top-level object. Each failure is one line naming the file, raised as `error`: not found
    (`missing` when given: where the file should come from), not valid JSON, or not an object."""
    path = Path(path)
    if not path.is_file():
        raise error(missing or f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:   # JSONDecodeError is a ValueError
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_keys(data: dict[str, Any], known: typing.Iterable[str], source: str, section: str | None = None) -> None:
    """Unknown keys are a ConfigError that lists the known ones (typos are the usual cause)."""
    known = set(known)
    bad = sorted(set(data) - known, key=str)
    if bad:
        where = f"unknown keys in {section!r}:" if section else "unknown keys"
        raise ConfigError(f"{source}: {where} {bad} (known: {', '.join(sorted(known))})")


def build_dataclass(cls: type, data: Any, source: str, section: str | None = None) -> Any:
    """Dataclass `cls` from a mapping, recursing into fields whose type is a dataclass.

    None builds the defaults. Scalar fields (bool/int/float/str, optionally `| None`) are type-checked;
    ints are accepted for floats, and numeric strings too (PyYAML reads 1e-5 as a string). Containers
    are checked to be a list/dict; tuples accept lists. Everything else is left to the config's
    `validate()`. Errors name `source` and the dotted key."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        if section is None:
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        raise ConfigError(f"{source}: {section} must be a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    check_keys(data, hints, source, section)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{section}.{name}" if section else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value, source, key)
        else:
            kwargs[name] = coerce(hint, value, f"{source}: {key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # e.g. a required field is missing
        where = f"section {section!r}: " if section else ""
        raise ConfigError(f"{source}: {where}{exc}") from None


def coerce(hint: Any, value: Any, key: str) -> Any:
    """`value` as type `hint`, or a ConfigError "<key> must be <type>: got <value>" ("is not a number")."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} must not be empty")
    wanted = [t for t in options if t is not type(None)]
    for t in wanted:
        converted = _as_type(t, value)
        if converted is not _NO:
            return converted
    if wanted == [float]:
        raise ConfigError(f"{key} is not a number: {value!r}")
    raise ConfigError(f"{key} must be {' or '.join(_type_name(t) for t in wanted)}: got {value!r}")


_NO = object()  # "does not convert" (None is a valid converted value)


def _as_type(t: Any, value: Any) -> Any:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is Any:
        return value
    if t is bool:
        return value if isinstance(value, bool) else _NO
    if t is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if t is float:
        if is_number:
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1: 1e-5 (no dot) is a string
            except ValueError:
                return _NO
        return _NO
    if t is str:
        return str(value) if isinstance(value, str) or is_number else _NO
    container = typing.get_origin(t) or t
    if container is tuple:
        return tuple(value) if isinstance(value, (list, tuple)) else _NO
    if container in (list, dict):
        return value if isinstance(value, container) else _NO
    return value  # other types: validate() decides


def _type_name(t: Any) -> str:
    container = typing.get_origin(t)
    if container is not None:
        return container.__name__ if container in (list, dict, tuple) else str(t)
    return getattr(t, "__name__", str(t))


@lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (annotations are strings under `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
