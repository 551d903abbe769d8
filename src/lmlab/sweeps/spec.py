"""The sweep spec: the YAML file that is the only place conditions are listed.

Common keys (validated here): ``family``, ``name``, ``description``, ``model``, ``grid``
(each key a list; the conditions are their product), ``search`` (an Optuna search
instead of a grid), ``storage`` (Optuna storage URL; default a journal file beside the
tracking store), ``test_mode`` and ``runtime`` (``threads``). Family settings live under the family's own key,
e.g. ``steering: {...}``, and the family validates them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from lmlab.errors import LmlabError
from lmlab.models import ModelSpec
from lmlab.runtime import RuntimeSpec
from lmlab.tracking import canonical_value, condition_key

COMMON_KEYS = {"family", "name", "description", "model", "grid", "search", "storage", "test_mode",
               "runtime"}
# Keys of a spec that cannot change what it computes (left out of the spec's digest).
_OPERATIONAL_KEYS = ("description", "storage", "runtime")


@dataclass(frozen=True)
class SearchSpec:
    """An Optuna search: ``params`` maps a name to ``{int: [lo, hi]}``, ``{float: [lo, hi]}``
    (optionally ``log: true``) or ``{choices: [...]}``."""

    params: Mapping[str, Mapping[str, Any]]
    n_trials: int
    sampler: str = "nsga2"
    seed: int = 0

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SearchSpec":
        unknown = set(raw) - {"params", "n_trials", "sampler", "seed"}
        if unknown:
            raise LmlabError(f"unknown search key(s): {sorted(unknown)}")
        if not isinstance(raw.get("params"), Mapping) or not raw["params"]:
            raise LmlabError("search.params must be a non-empty mapping")
        n_trials = raw.get("n_trials")
        if not isinstance(n_trials, int) or n_trials < 1:
            raise LmlabError("search.n_trials must be a positive integer")
        sampler = raw.get("sampler", "nsga2")
        if sampler not in ("nsga2", "tpe", "random"):
            raise LmlabError(f"search.sampler must be nsga2, tpe or random, not {sampler!r}")
        for name, dist in raw["params"].items():
            kinds = set(dist) & {"int", "float", "choices"} if isinstance(dist, Mapping) else set()
            if len(kinds) != 1:
                raise LmlabError(f"search.params.{name} needs exactly one of int, float, choices")
        return cls(params=dict(raw["params"]), n_trials=n_trials, sampler=sampler,
                   seed=int(raw.get("seed", 0)))

    def distributions(self) -> dict[str, Any]:
        from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                          IntDistribution)

        out: dict[str, Any] = {}
        for name, dist in self.params.items():
            if "int" in dist:
                low, high = dist["int"]
                out[name] = IntDistribution(int(low), int(high))
            elif "float" in dist:
                low, high = dist["float"]
                out[name] = FloatDistribution(float(low), float(high), log=bool(dist.get("log")))
            else:
                out[name] = CategoricalDistribution(tuple(dist["choices"]))
        return out


@dataclass(frozen=True)
class SweepSpec:
    family: str
    name: str
    model: ModelSpec
    grid: Mapping[str, list[Any]] | None
    search: SearchSpec | None
    settings: Mapping[str, Any]
    description: str = ""
    storage: str | None = None
    test_mode: bool = False
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Identity of what the spec computes (description, storage and runtime excluded)."""
        ident = {k: v for k, v in self.source.items() if k not in _OPERATIONAL_KEYS}
        return condition_key(ident)

    @property
    def study_name(self) -> str:
        return f"{self.family}-{self.name}-{self.digest[:8]}"

    def grid_points(self) -> list[dict[str, Any]]:
        if not self.grid:
            return []
        names = list(self.grid)
        return [dict(zip(names, values)) for values in itertools.product(*self.grid.values())]


def _check_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise LmlabError(f"{where} must be a finite number, got {value}")


def parse_spec(raw: Any, origin: str = "spec") -> SweepSpec:
    if not isinstance(raw, Mapping):
        raise LmlabError(f"{origin}: a sweep spec must be a YAML mapping")
    family = raw.get("family")
    if not isinstance(family, str):
        raise LmlabError(f"{origin}: 'family' is required (steering, probes, context)")
    unknown = set(raw) - COMMON_KEYS - {family}
    if unknown:
        raise LmlabError(f"{origin}: unknown key(s) {sorted(unknown)}; "
                         f"allowed: {sorted(COMMON_KEYS | {family})}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise LmlabError(f"{origin}: 'name' must be a non-empty string")
    grid = raw.get("grid")
    if grid is not None:
        if not isinstance(grid, Mapping) or not grid:
            raise LmlabError(f"{origin}: 'grid' must be a mapping of name -> list of values")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise LmlabError(f"{origin}: grid.{key} must be a non-empty list")
            for value in values:
                _check_finite(value, f"grid.{key}")
    search = SearchSpec.from_dict(raw["search"]) if raw.get("search") is not None else None
    if grid is not None and search is not None:
        raise LmlabError(f"{origin}: give either 'grid' or 'search', not both")
    settings = raw.get(family) or {}
    if not isinstance(settings, Mapping):
        raise LmlabError(f"{origin}: '{family}' settings must be a mapping")
    return SweepSpec(
        family=family, name=name.strip(), model=ModelSpec.from_dict(raw.get("model")),
        grid=dict(grid) if grid else None, search=search, settings=dict(settings),
        description=str(raw.get("description", "")), storage=raw.get("storage"),
        test_mode=bool(raw.get("test_mode", False)), runtime=RuntimeSpec.from_dict(raw.get("runtime")),
        source=canonical_value(dict(raw)),
    )


def load_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"sweep spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise LmlabError(f"{path}: malformed YAML: {str(error).splitlines()[0]}") from error
    if isinstance(raw, dict) and overrides:
        raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    return parse_spec(raw, origin=str(path))
