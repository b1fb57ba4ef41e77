"""Strict parsing of params.yaml sections into frozen dataclasses.

Every stage calls ``load_section(<dataclass>, "<dotted.section>")`` at start-up. An unknown key,
a missing required key, a value of the wrong type or a value outside a ``Literal`` stops the run
before any work, with a message naming the full key and the allowed values. A key left out
takes the schema's default: the dataclasses are the one home of defaults, and params.yaml lists
only the knobs an experiment usually turns (docs/params.md lists every key).

Supported field types: bool, int, float, str, None, ``Literal[...]``, ``X | None``, unions of
the above, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict[str, X]`` and nested frozen
dataclasses. YAML lists become tuples so configs stay hashable and immutable.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

log = logging.getLogger(__name__)

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-05`` as a float.

    YAML 1.1 (PyYAML) wants a dot in exponent floats, but `dvc exp run -S lr=0.00001` writes
    ``1e-05`` into params.yaml; plain safe_load would hand the stage a string.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


# Field metadata of a source's extras (a key whose default means "not used"), for the docs.
OPTIONAL = {"optional": True}


def optional(default=None):
    """A schema field whose default means "not used" (a source's optional extras)."""
    return dataclasses.field(default=default, metadata=OPTIONAL)


class ConfigError(ValueError):
    """A params section does not match its schema; the message names the key."""


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the repository root)")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:  # a tab, a bad indent, an unclosed bracket...
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def get_section(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"params: missing section '{dotted}' (no key '{part}')")
        node = node[part]
    return node


def load_section(cls: type[T], dotted: str, path: str | Path = PARAMS_FILE) -> T:
    """Read ``params.yaml`` and parse the section at ``dotted`` (e.g. ``split.detection``)."""
    return parse(cls, get_section(read_params(path), dotted), dotted)


def parse(cls: type[T], data: Any, where: str = "params") -> T:
    """Parse ``data`` into the dataclass ``cls``; raises ConfigError naming the offending key."""
    return _convert(cls, data, where)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list structure (tuples become lists), for JSON reports."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"mapping with keys {sorted(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(
            isinstance(a, bool) for a in allowed
        ):
            raise ConfigError(f"{where}: got {value!r}; allowed values: {_describe(tp)}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: got {value!r}; expected {_describe(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(
                _convert(a, v, f"{where}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = get_args(tp) or (str, Any)
        return types.MappingProxyType(
            {str(k): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config schema: unsupported type {tp!r} at {where}")


def _convert_dataclass(cls: Any, value: Any, where: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    hints = get_type_hints(cls, include_extras=False)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = f"{where}.{name}"
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing (expected {_describe(hints[name])})")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ range checks
        raise ConfigError(f"{where}: {exc}") from exc
    return obj


def check(condition: bool, message: str) -> None:
    """Range check for ``__post_init__``: raises ValueError (re-raised as ConfigError by parse)."""
    if not condition:
        raise ValueError(message)


__all__ = [
    "ConfigError",
    "OPTIONAL",
    "check",
    "optional",
    "get_section",
    "load_section",
    "parse",
    "read_params",
    "to_dict",
]
_ = typing  # keep typing importable for forward refs in schemas
