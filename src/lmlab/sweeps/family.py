"""The contract between the sweep runner and an experiment family.

A family turns a validated spec into conditions (plain param dicts), runs one condition
into a :class:`ConditionResult`, and summarises all rows on the parent run. The runner
owns everything else: the study, child runs, resume, claims, failures.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Collection, Literal, Mapping

import pandas as pd

from lmlab.cache import DiskCache
from lmlab.data.report import DataReport
from lmlab.identity import strip_operational
from lmlab.models import LoadedModel, load_model
from lmlab.sweeps.spec import SweepSpec
from lmlab.tracking import Tracker

Direction = Literal["maximize", "minimize"]


@dataclass
class ConditionResult:
    """What one condition produced; the runner logs it on the condition's child run."""

    metrics: dict[str, float]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # artifact dir -> local file
    tags: dict[str, str] = field(default_factory=dict)
    #: Why the condition computed but is not complete (e.g. "3 of 8 rows failed"), or None.
    #: An incomplete condition's run ends FAILED with everything above logged, its trial
    #: FAIL, the sweep exits non-zero, and the next run computes it again (a family that
    #: keeps finished parts, like the context row store, then redoes only the rest).
    incomplete: str | None = None


@dataclass
class SweepContext:
    """Shared, lazily built resources for one sweep process."""

    spec: SweepSpec
    tracker: Tracker
    cache: DiskCache
    store_dir: Path
    run_id: str | None = None  # the child run of the condition being computed

    @cached_property
    def model(self) -> LoadedModel:
        return load_model(self.spec.model)


class Family(ABC):
    """Base class for an experiment family; subclasses register themselves by ``name``."""

    name: ClassVar[str]
    #: Settings (dotted paths into the family's block) that cannot change a result, such
    #: as batch sizes, thread counts and where files live: left out of every condition key.
    operational_settings: ClassVar[tuple[str, ...]] = ()
    #: Params that only add outputs (steering's ``splits``): they are not part of the key,
    #: and a finished run is reused when its value covers the requested one.
    output_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec

    @abstractmethod
    def conditions(self) -> list[dict[str, Any]]:
        """Grid conditions to run, controls and baselines first."""

    def objectives(self) -> list[tuple[str, Direction]]:
        """Metric names and directions that Optuna records for each condition."""
        return []

    def logged_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The part of a condition's metrics its child run shows as MLflow metrics (the
        runs table's columns): what a reader compares conditions by. The runner adds the
        objectives; when anything is left out, every metric goes to the run's
        ``condition_metrics`` table, and reuse reads them all back from there
        (:func:`lmlab.tracking.run_metrics`). Default: all."""
        return dict(metrics)

    def search_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Turn one Optuna proposal into a full condition (adaptive sweeps)."""
        return dict(params)

    def final_conditions(self, chosen: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Conditions to run after a search, on the chosen configs (e.g. held-out test)."""
        return []

    def validate_condition(self, params: Mapping[str, Any]) -> None:
        """Raise LmlabError for a condition that cannot run (checked before any work)."""

    def settings_identity(self) -> Any:
        """Settings that change results; part of every condition key."""
        return strip_operational(dict(self.spec.settings), self.operational_settings)

    def data_inputs(self) -> dict[str, Path]:
        """Every file or folder the conditions read, by role; their content digests are
        part of every condition key (a path alone would let an edited file look unchanged)."""
        return {}

    def key_inputs(self) -> Collection[str] | None:
        """Names of the inputs whose digests enter every condition key (None: all).

        An input named like an output value (steering's split ``benign``) may be left out:
        a run's output for it is reused only while that input's digest is unchanged."""
        return None

    def data_reports(self) -> list[DataReport]:
        """What the loaders did with each input; valid after :meth:`prepare`."""
        return []

    work_unit_name: ClassVar[str] = "work units"

    def work_units(self, params: Mapping[str, Any]) -> int:
        """Size of one condition in the family's own unit (completions, tokens...)."""
        return 0

    def run_name(self, params: Mapping[str, Any]) -> str:
        return ",".join(f"{k}={v}" for k, v in params.items())

    def estimate_seconds(self, params: Mapping[str, Any]) -> float:
        return 0.0

    def describe(self, params: Mapping[str, Any]) -> str:
        return self.run_name(params)

    def prepare(self, ctx: SweepContext) -> None:
        """Model-dependent checks and shared work before the first condition."""

    @abstractmethod
    def run_condition(self, ctx: SweepContext, params: Mapping[str, Any]) -> ConditionResult:
        """Compute one condition."""

    def summarize(self, ctx: SweepContext, summary: pd.DataFrame) -> ConditionResult:
        """Parent-run artifacts built from every condition's metrics."""
        return ConditionResult(metrics={})


FAMILIES: dict[str, type[Family]] = {}


def register(family: type[Family]) -> type[Family]:
    FAMILIES[family.name] = family
    return family


def family_for(spec: SweepSpec) -> Family:
    _import_families()
    if spec.family not in FAMILIES:
        from lmlab.errors import LmlabError

        raise LmlabError(f"unknown family {spec.family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[spec.family](spec)


def _import_families() -> None:
    import importlib

    for module in ("lmlab.steering.family", "lmlab.probes.family", "lmlab.context.family",
                   "lmlab.diffing.family"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            # A family package that is not installed is skipped; a missing dependency
            # inside an existing family is a real error.
            if error.name is None or not module.startswith(error.name):
                raise
