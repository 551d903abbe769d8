"""Build frozen config dataclasses from spec mappings, validated at the edge.

Every value is checked against its field's annotation before the dataclass is built, so
``max_tokens: 'four'`` is one clear :class:`LmlabError` naming the setting, never a
``TypeError`` from a comparison in ``__post_init__``. Checks are strict: YAML already
gives numbers and booleans their types, so a quoted ``'false'`` or ``'4'`` is a mistake
worth naming (an int is accepted where a float is expected). Lists become tuples.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping as MappingABC
from dataclasses import MISSING, fields
from typing import Any, Mapping, Sequence, TypeVar, Union

from lmlab.errors import LmlabError

T = TypeVar("T")

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
          type(None): "null"}
_REPR_LIMIT = 60


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that cannot be resolved: check nothing
        return {}


def _arms(hint: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(hint)
    return typing.get_args(hint) if origin in (Union, types.UnionType) else (hint,)


def describe(hint: Any) -> str:
    """A reader's name for a type annotation ("an integer or null", "a list of numbers")."""
    if hint is Any:
        return "anything"
    arms = _arms(hint)
    if len(arms) > 1:
        return " or ".join(describe(arm) for arm in arms)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
        inner = args[0] if args else Any
        return f"a list of {_plural(inner)}"
    if origin in (dict, MappingABC) or hint in (dict, MappingABC):
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    plain = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
    return plain.get(hint, f"values that are {describe(hint)}")


def conforms(hint: Any, value: Any) -> bool:
    """Whether ``value`` (as YAML gives it) fits the annotation ``hint``."""
    if hint is Any or isinstance(hint, TypeVar):
        return True
    arms = _arms(hint)
    if len(arms) > 1:
        return any(conforms(arm, value) for arm in arms)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(conforms(a, v) for a, v in zip(args, value))
        return all(conforms(args[0] if args else Any, v) for v in value)
    if origin in (dict, MappingABC):
        key, val = args if args else (Any, Any)
        return isinstance(value, Mapping) and all(conforms(key, k) and conforms(val, v)
                                                  for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, Mapping))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[:_REPR_LIMIT - 3] + "..."


def check_value(where: str, hint: Any, value: Any) -> None:
    """Raise one clear LmlabError when ``value`` does not fit ``hint``."""
    if not conforms(hint, value):
        raise LmlabError(f"{where} must be {describe(hint)}, got {_shown(value)}")


def suggest(word: Any, choices: Sequence[str]) -> str:
    """``"did you mean 'steering'?"`` when one choice is close to ``word``, else the choices."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"known: {', '.join(choices)}"


def _nested_dataclass(hint: Any) -> type | None:
    for arm in _arms(hint):
        if dataclasses.is_dataclass(arm):
            return arm  # type: ignore[return-value]
    return None


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def from_mapping(cls: type[T], raw: Any, where: str, **converted: Any) -> T:
    """``cls(**raw)`` with unknown keys, wrong types and missing settings as user errors.

    ``converted`` holds fields the caller already turned into their proper objects. A
    field annotated with another config dataclass is built from its mapping the same way.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise LmlabError(f"{where} must be a mapping, got {_shown(raw)}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        if len(unknown) == 1:
            raise LmlabError(f"unknown {where} setting {unknown[0]!r}; "
                             f"{suggest(unknown[0], sorted(known))}")
        raise LmlabError(f"unknown {where} settings {unknown}; known: {', '.join(sorted(known))}")
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name in converted:
            continue
        hint = hints.get(name, Any)
        nested = _nested_dataclass(hint)
        if nested is not None and isinstance(value, Mapping):
            values[name] = from_mapping(nested, value, f"{where}.{name}")
            continue
        check_value(f"{where}.{name}", hint, value)
        values[name] = _frozen(value)
    values.update(converted)
    missing = [n for n, f in known.items() if n not in values and f.default is MISSING
               and f.default_factory is MISSING]  # type: ignore[misc]
    if missing:
        raise LmlabError(f"{where} is missing required setting(s) {missing}")
    return cls(**values)
