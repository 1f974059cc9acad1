"""One loader for dataclass configs: plain dicts (JSON / YAML) <-> dataclass instances.

``config_from_dict(cls, data)`` builds ``cls`` from a mapping, recursively: nested dataclasses, ``Optional`` /
unions with None, ``list[X]``, ``tuple[X, ...]`` and fixed tuples, ``dict[K, V]``, ``Path``; ints are accepted
where floats are expected (and numeric strings, which YAML produces for ``1e-3``), whole floats where ints are.
Unknown keys raise ``ConfigError`` naming the full key (``qformer.num_query_tokenz``) and the valid ones; a
dataclass may list options it no longer has in ``REMOVED_OPTIONS`` (a class attribute), which are accepted and
dropped so files written before stay loadable. ``config_to_dict(obj)`` is the inverse (tuples -> lists,
paths -> str), so ``config_from_dict(type(c), config_to_dict(c)) == c``.

``ConfigMixin`` gives a dataclass ``to_dict()`` and ``from_dict(data)`` methods built on these.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from pathlib import PurePath
from typing import Any, TypeVar

from slidechat.errors import ConfigError

T = TypeVar("T")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key_error(cls: type, where: str, unknown: list[str], names: list[str]) -> ConfigError:
    key = unknown[0]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    full = f"{where}.{key}" if where else key
    return ConfigError(f"{cls.__name__}: unknown option {full!r}{hint} (valid options: {', '.join(names)})")


def config_from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build the dataclass ``cls`` from the mapping ``data`` (None = all defaults). See the module docstring."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of options, got {type(data).__name__}")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    removed = set(getattr(cls, "REMOVED_OPTIONS", ()))
    unknown = [k for k in data if k not in names and k not in removed]
    if unknown:
        raise _unknown_key_error(cls, where, unknown, names)
    hints = _hints(cls)
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items() if k in names}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` as type ``tp`` (recursing into containers and dataclasses); ConfigError naming ``where``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where) if len(inner) == 1 else value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, where)
    if origin in (list, tuple, dict):
        return _convert_container(origin, args, value, where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    return _convert_scalar(tp, value, where)


def _convert_container(origin: type, args: tuple, value: Any, where: str) -> Any:
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if origin is list:
        return [_convert(args[0] if args else Any, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
    return tuple(_convert(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(args, value)))


def _convert_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if not isinstance(value, (str, PurePath)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return tp(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def config_to_dict(obj: Any) -> Any:
    """A dataclass (or container of them) as plain JSON-ready values: dicts, lists, str for paths."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: config_to_dict(v) for k, v in obj.items()}
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


class ConfigMixin:
    """``to_dict()`` / ``from_dict(data)`` for a dataclass config, via the one loader of this module."""

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
        return config_from_dict(cls, data)


__all__ = ["config_from_dict", "config_to_dict", "ConfigMixin"]
