"""The sweep spec: the YAML file that is the only place conditions are listed.

Common keys (validated here): ``family``, ``name``, ``description``, ``model``, ``grid``
(each key a list; the conditions are their product), ``search`` (an Optuna search
instead of a grid), ``storage`` (Optuna storage URL; default a journal file beside the
tracking store), ``test_mode`` and ``runtime`` (``threads``). Family settings live under
the family's own key, e.g. ``steering: {...}``, and the family validates them.

Every mistake is one :class:`LmlabError` that says where: YAML errors keep their line and
column, a key given twice is refused, a misspelt family or key gets a "did you mean",
and types are strict (``test_mode: 'false'`` is a string, not a boolean). Any setting can
be overridden from the command line with a dotted key (``-P context.max_tokens=64``
through ``mlflow run``); overrides are part of the spec's identity like the file's keys.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import lmlab
from lmlab.config import check_value, from_mapping, suggest
from lmlab.errors import LmlabError
from lmlab.models import ModelSpec
from lmlab.runtime import RuntimeSpec
from lmlab.sweeps.specfile import read_spec_file
from lmlab.tracking import canonical_value, condition_key

COMMON_KEYS = {"family", "name", "description", "model", "grid", "search", "storage", "test_mode",
               "runtime"}
# Keys of a spec that cannot change what it computes (left out of the spec's digest).
_OPERATIONAL_KEYS = ("description", "storage", "runtime")


_DISTRIBUTION_KINDS = ("int", "float", "choices")


@dataclass(frozen=True)
class SearchSpec:
    """An Optuna search: ``params`` maps a name to ``{int: [lo, hi]}``, ``{float: [lo, hi]}``
    (optionally ``log: true``) or ``{choices: [...]}``."""

    params: Mapping[str, Mapping[str, Any]]
    n_trials: int
    sampler: str = "nsga2"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.params:
            raise LmlabError("search.params must be a non-empty mapping")
        if self.n_trials < 1:
            raise LmlabError("search.n_trials must be a positive integer")
        if self.sampler not in ("nsga2", "tpe", "random"):
            raise LmlabError(f"search.sampler must be nsga2, tpe or random, not {self.sampler!r}")
        for name, dist in self.params.items():
            _check_distribution(f"search.params.{name}", dist)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SearchSpec":
        return from_mapping(cls, raw, "search")

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


def _check_distribution(where: str, dist: Mapping[str, Any]) -> None:
    kinds = [k for k in _DISTRIBUTION_KINDS if k in dist]
    if len(kinds) != 1:
        raise LmlabError(f"{where} needs exactly one of int, float, choices")
    kind = kinds[0]
    extra = set(dist) - {kind, "log"}
    if extra or ("log" in dist and kind != "float"):
        raise LmlabError(f"{where}: unknown key(s) {sorted(map(str, extra or {'log'}))} "
                         f"for a {kind} range")
    if kind == "choices":
        check_value(f"{where}.choices", list[str | int | float | bool | None], dist[kind])
        if not dist[kind]:
            raise LmlabError(f"{where}.choices must be a non-empty list")
        return
    bound = int if kind == "int" else float
    check_value(f"{where}.{kind}", tuple[bound, bound], dist[kind])
    low, high = dist[kind]
    if not low <= high:
        raise LmlabError(f"{where}.{kind} must be [low, high] with low <= high, got {[low, high]}")
    if "log" in dist:
        check_value(f"{where}.log", bool, dist["log"])
        if dist["log"] and low <= 0:
            raise LmlabError(f"{where}: a log range needs low > 0, got {low}")


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


def known_families() -> list[str]:
    """Family names, without importing any family: each family is a package
    ``lmlab/<name>/`` whose ``family.py`` registers it (``lmlab/sweeps`` holds the contract)."""
    root = Path(lmlab.__file__).parent
    bundled = {p.parent.name for p in root.glob("*/family.py") if p.parent.name != "sweeps"}
    # Families registered in this process (a plugin's, a benchmark's) count too; only a
    # process that imported the contract can have registered one.
    contract = sys.modules.get("lmlab.sweeps.family")
    registered = set(getattr(contract, "FAMILIES", {}))
    return sorted(bundled | registered)


def _check_family(raw: Mapping[str, Any], origin: str) -> str:
    families = known_families()
    family = raw.get("family")
    if family is None:
        raise LmlabError(f"{origin}: 'family' is required: one of {', '.join(families)}")
    if not isinstance(family, str) or family not in families:
        raise LmlabError(f"{origin}: unknown family {family!r}; {suggest(family, families)}")
    return family


def _check_keys(raw: Mapping[str, Any], family: str, origin: str) -> None:
    allowed = COMMON_KEYS | {family}
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if len(unknown) == 1:
        raise LmlabError(f"{origin}: unknown key {unknown[0]!r}; {suggest(unknown[0], sorted(allowed))}")
    if unknown:
        raise LmlabError(f"{origin}: unknown keys {unknown}; known: {', '.join(sorted(allowed))}")


def _check_grid(grid: Any, origin: str) -> None:
    if not isinstance(grid, Mapping) or not grid:
        raise LmlabError(f"{origin}: 'grid' must be a mapping of name -> list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise LmlabError(f"{origin}: grid.{key} must be a non-empty list, got {values!r}")
        for value in values:
            _check_finite(value, f"{origin}: grid.{key}")


def parse_spec(raw: Any, origin: str = "spec") -> SweepSpec:
    if not isinstance(raw, Mapping):
        raise LmlabError(f"{origin}: a sweep spec must be a YAML mapping, got "
                         f"{'an empty file' if raw is None else type(raw).__name__}")
    family = _check_family(raw, origin)
    _check_keys(raw, family, origin)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise LmlabError(f"{origin}: 'name' must be a non-empty string")
    for key, hint in (("description", str), ("storage", str | None), ("test_mode", bool)):
        if key in raw:
            check_value(f"{origin}: {key}", hint, raw[key])
    grid = raw.get("grid")
    if grid is not None:
        _check_grid(grid, origin)
    search = SearchSpec.from_dict(raw["search"]) if raw.get("search") is not None else None
    if grid is not None and search is not None:
        raise LmlabError(f"{origin}: give either 'grid' or 'search', not both")
    settings = raw.get(family)
    if settings is not None and not isinstance(settings, Mapping):
        raise LmlabError(f"{origin}: '{family}' settings must be a mapping, got {settings!r}")
    return SweepSpec(
        family=family, name=name.strip(), model=ModelSpec.from_dict(raw.get("model")),
        grid=dict(grid) if grid else None, search=search, settings=dict(settings or {}),
        description=raw.get("description") or "", storage=raw.get("storage"),
        test_mode=raw.get("test_mode", False), runtime=RuntimeSpec.from_dict(raw.get("runtime")),
        source=canonical_value(dict(raw)),
    )


def load_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read, override (dotted keys; None values are skipped) and validate a spec file."""
    return parse_spec(read_spec_file(path, overrides), origin=str(path))
