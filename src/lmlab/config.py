"""Build frozen config dataclasses from spec mappings, validated at the edge."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, Mapping, TypeVar

from lmlab.errors import LmlabError

T = TypeVar("T")

_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_scalar(where: str, name: str, annotation: str, value: Any) -> None:
    expected = _SCALARS.get(annotation.replace(" | None", ""))
    if expected is None or (value is None and "None" in annotation):
        return
    if isinstance(value, bool) and bool not in expected:
        raise LmlabError(f"{where}.{name} must be {annotation}, got {value!r}")
    if not isinstance(value, expected):
        raise LmlabError(f"{where}.{name} must be {annotation}, got {value!r}")


def from_mapping(cls: type[T], raw: Any, where: str, **converted: Any) -> T:
    """``cls(**raw)`` with unknown keys, wrong scalar types and lists handled as user errors.

    ``converted`` holds fields the caller already turned into their proper objects.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise LmlabError(f"{where} must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(raw) - set(known)
    if unknown:
        raise LmlabError(f"unknown {where} setting(s) {sorted(unknown)}; known: {sorted(known)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name in converted:
            continue
        _check_scalar(where, name, str(known[name].type), value)
        values[name] = tuple(value) if isinstance(value, list) else value
    values.update(converted)
    missing = [n for n, f in known.items() if n not in values and f.default is MISSING
               and f.default_factory is MISSING]  # type: ignore[misc]
    if missing:
        raise LmlabError(f"{where} is missing required setting(s) {missing}")
    return cls(**values)
