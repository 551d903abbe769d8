"""Run a sweep: a parent MLflow run, an Optuna study, one child run per condition.

Resume rules: a condition whose ``condition_key`` already has a FINISHED run is never
computed again; its metrics are reused, all of them (:func:`lmlab.tracking.run_metrics`
reads a run's ``condition_metrics`` table where the run shows only the family's subset).
Workers sharing a study claim each condition through the study's storage before computing
it (:mod:`lmlab.sweeps.claims`), so every condition is computed by exactly one live
worker; a condition held by a live worker is waited for, one whose worker died (pid on
this host, Optuna heartbeat across hosts) is taken over and the dead worker's runs are
closed FAILED. A condition that computed but is incomplete (e.g. API calls that failed)
ends FAILED with its metrics, is retried by the next run, and makes the sweep exit
non-zero.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from datetime import datetime
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from lmlab.cache import DiskCache
from lmlab.errors import LmlabError
from lmlab.identity import condition_identity, model_identity, path_digest
from lmlab.runtime import apply_threads
from lmlab.stats import CI_HI, CI_LO, N, P
from lmlab.ui import runs_url, share_view, ui_command
from lmlab.sweeps.claims import (TOKEN_TAG, Claim, Coordinator, HeartbeatSettings, StudyStorage,
                                 open_storage, worker_owner)
from lmlab.sweeps.family import ConditionResult, Family, SweepContext, family_for
from lmlab.sweeps.spec import SweepSpec
from lmlab.sweeps.throughput import (Measured, ThroughputLog, duration, machine_key,
                                     scaled_estimate)
from lmlab.tracking import (FAILURE_TAG, FAMILY_TAG, KEY_TAG, OUTPUT_DIGESTS_TAG, PARENT_TAG,
                            Tracker, cache_dir, close_dead_runs, condition_key, ensure_store,
                            finished_condition, finite_metrics, first_line, host_name, mask_url,
                            owner_is_dead, run_metrics, store_dir)

#: Seconds between looks at conditions other workers hold (``LMLAB_POLL_SECONDS``).
WAIT_POLL_SECONDS = 5.0
RUN_ID_ATTR = "mlflow_run_id"
INCOMPLETE_ATTR = "lmlab.incomplete"
SLOT_ATTR = "lmlab.slot"
#: The study's one objective for families that name none: 1.0 for every finished condition.
FINISHED_METRIC = "condition_finished"
#: Parent metrics that answer "what did this sweep find" (``Family.summarize``), shown as
#: runs-table columns by the view each sweep shares.
HEADLINE_PREFIX = "headline/"


@dataclass
class SweepOutcome:
    parent_run_id: str
    experiment_id: str
    summary: pd.DataFrame
    tracking_seconds: float
    total_seconds: float
    incomplete: list[str] = field(default_factory=list)  # run names of incomplete conditions
    run_name: str = ""
    view_key: str | None = None  # the experiment's shared runs-table view (headline columns)
    headline: list[str] = field(default_factory=list)  # the parent's headline metric names


def poll_seconds() -> float:
    raw = os.environ.get("LMLAB_POLL_SECONDS")
    return float(raw) if raw else WAIT_POLL_SECONDS


def open_study(spec: SweepSpec, family: Family, opened: StudyStorage) -> optuna.Study:
    objectives = family.objectives()
    directions = [direction for _, direction in objectives] or ["maximize"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=opened.storage, study_name=spec.study_name,
                                sampler=_sampler(spec), directions=directions, load_if_exists=True)
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # set_metric_names is "experimental"
            study.set_metric_names([name for name, _ in objectives] or [FINISHED_METRIC])
    return study


def _sampler(spec: SweepSpec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    seed = (spec.search.seed if spec.search else 0) if seed is None else seed
    kind = spec.search.sampler if spec.search else "random"
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def slot_seed(seed: int, slot: int) -> int:
    """The sampler seed of search slot ``slot``: workers that share a study propose from
    different streams (never in lockstep), and a slot proposes the same whichever worker
    takes it."""
    return (seed * 1_000_003 + slot) % 2**31


def fail_stale_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Fail RUNNING trials whose owner process on this host is gone; return them."""
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
             if owner_is_dead({k: str(v) for k, v in t.user_attrs.items()})]
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    return stale


def _flat(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
            for k, v in params.items()}


def _choices(conditions: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """Every value each param takes across the conditions (one distribution per param,
    so optuna-dashboard plots the grid's axes)."""
    out: dict[str, list[Any]] = {}
    for params in conditions:
        for name, value in _flat(params).items():
            values = out.setdefault(name, [])
            if not any(type(v) is type(value) and v == value for v in values):
                values.append(value)
    return {name: tuple(values) for name, values in out.items()}


class SweepRunner:
    def __init__(self, spec: SweepSpec, family: Family, client: MlflowClient,
                 experiment_id: str, parent_run_id: str, store: Path) -> None:
        self.spec = spec
        self.family = family
        self.client = client
        self.tracker = Tracker(client, experiment_id, parent_run_id)
        self.store = store
        self.ctx = SweepContext(spec=spec, tracker=self.tracker, cache=DiskCache(cache_dir(store)),
                                store_dir=store)
        self.rows: list[dict[str, Any]] = []
        self.incomplete: list[str] = []
        self.study: optuna.Study | None = None
        self.coord: Coordinator | None = None
        self._inputs: tuple[dict[str, Any], dict[str, str]] | None = None
        self._trial_keys: set[str] = set()
        self._choices: dict[str, tuple[Any, ...]] = {}
        self._grid_coord: Coordinator | None = None
        self._opened: StudyStorage | None = None
        self._throughput: ThroughputLog | None = None
        self._planned: dict[str, tuple[float, float]] = {}  # key -> (reference s, units) to run
        self._computed = 0  # conditions computed (not reused) by this sweep
        self._read: dict[str, dict[str, float]] = {}  # run id -> its every metric, once read

    # ------------------------------------------------------------------ identity
    def _model_and_data(self) -> tuple[dict[str, Any], dict[str, str]]:
        """Model identity and data digests, computed once per sweep (hashing is cached)."""
        if self._inputs is None:
            data = {}
            for name, path in self.family.data_inputs().items():
                if not Path(path).expanduser().exists():
                    raise LmlabError(f"{self.spec.family} input {name!r} not found: {path}")
                data[name] = path_digest(path)
            self._inputs = (model_identity(self.spec.model), data)
        return self._inputs

    def identity_for(self, params: Mapping[str, Any]) -> dict[str, Any]:
        model, data = self._model_and_data()
        names = self.family.key_inputs()
        keyed = data if names is None else {n: d for n, d in data.items() if n in names}
        kept = {k: v for k, v in params.items() if k not in self.family.output_params}
        return condition_identity(self.spec.family, model, keyed, self.family.settings_identity(),
                                  kept, self.spec.test_mode)

    def key_for(self, params: Mapping[str, Any]) -> str:
        return condition_key(self.identity_for(params))

    def output_digests(self, params: Mapping[str, Any]) -> dict[str, str]:
        """For each output value that names a data input, that input's digest."""
        data = self._model_and_data()[1]
        values = [v for name in self.family.output_params for v in _as_list(params.get(name))]
        return {str(v): data[str(v)] for v in values if str(v) in data}

    def finished(self, key: str, params: Mapping[str, Any]):  # -> Run | None
        """The newest FINISHED run of ``key`` whose outputs cover what ``params`` asks for,
        computed on the same content of each output's input."""
        wanted = {name: params[name] for name in self.family.output_params if name in params}
        digests = self.output_digests(params)
        return finished_condition(self.client, self.tracker.experiment_id, key, wanted,
                                  digests if digests else None)

    # ------------------------------------------------------------------ the sweep
    def open(self) -> Coordinator:
        """Open the study and its claims; close what dead workers left RUNNING."""
        closed = close_dead_runs(self.client, self.tracker.experiment_id)
        if closed:
            print(f"closed {len(closed)} run(s) left RUNNING by dead processes as FAILED")
        opened = open_storage(self.spec.storage or None, self.store, HeartbeatSettings.from_env(),
                              self._on_stale_trial)
        self._opened = opened
        self.study = open_study(self.spec, self.family, opened)
        self.coord = Coordinator(self.study, opened, self._close_runs_of)
        stale = fail_stale_trials(self.study)
        for trial in stale:
            self._close_runs_of(trial, "its worker process died")
        self.coord.reap()
        if stale:
            print(f"marked {len(stale)} trial(s) of dead workers as FAILED")
        self._close_silent_workers()
        return self.coord

    def _close_dead_workers(self) -> None:
        """Close RUNNING runs of dead workers: on this host by pid, on any host by the
        worker heartbeats an RDB study keeps."""
        close_dead_runs(self.client, self.tracker.experiment_id)
        self._close_silent_workers()

    def _close_silent_workers(self) -> None:
        assert self.coord is not None
        if self.coord.heartbeat is None:
            return
        for parent_id in self.coord.board.silent_workers(self.coord.heartbeat.grace_s):
            if parent_id == self.tracker.parent_run_id:
                continue
            try:
                parent = self.client.get_run(parent_id)
            except Exception:  # a run of another tracking store: not ours to close
                continue
            if parent.info.status == "RUNNING":
                self.tracker.fail(parent_id, "sweep worker stopped sending heartbeats")
            self.coord.board.forget_worker(parent_id)

    def run(self) -> SweepOutcome:
        start = time.perf_counter()
        coord = self.open()
        with coord.worker_beating(self.tracker.parent_run_id):
            return self._run_open(start)

    def _run_open(self, start: float) -> SweepOutcome:
        grid = self.family.conditions() if self.spec.search is None else []
        for params in grid:
            self.family.validate_condition(params)
        self._print_plan(grid)
        started = time.perf_counter()
        self.family.prepare(self.ctx)
        if self._planned:
            self._prepare_log().record(Measured(time.perf_counter() - started, 0.0, 0.0))
        self._report_data()
        if self.spec.search is None:
            self._run_grid(grid)
        else:
            self._run_search()
        summary = pd.DataFrame(self.rows)
        headline = self._log_parent(summary)
        self._close_dead_workers()  # workers killed meanwhile
        total = time.perf_counter() - start
        self.tracker.log_metrics(self.tracker.parent_run_id, {
            "sweep_seconds": total, "tracking_seconds": self.tracker.seconds,
            "tracking_share": self.tracker.seconds / total if total else math.nan,
            "conditions_incomplete": float(len(self.incomplete))})
        return SweepOutcome(self.tracker.parent_run_id, self.tracker.experiment_id, summary,
                            self.tracker.seconds, total, list(self.incomplete), headline=headline)

    def _print_plan(self, grid: list[dict[str, Any]]) -> None:
        if self.spec.search is not None:
            print(f"sweep {self.spec.name!r} ({self.spec.family}): adaptive search, "
                  f"{self.spec.search.n_trials} trials ({self.spec.search.sampler}), "
                  f"study {self.spec.study_name}")
            return
        todo = [p for p in grid if self.finished(self.key_for(p), p) is None]
        self._planned = {self.key_for(p): (self.family.estimate_seconds(p), self.family.work_units(p))
                         for p in todo}
        units = sum(u for _, u in self._planned.values())
        print(f"sweep {self.spec.name!r} ({self.spec.family}): {len(grid)} conditions, "
              f"{len(grid) - len(todo)} already finished, {len(todo)} to run; "
              f"about {units} {self.family.work_unit_name}, {self._estimate_line(todo)}")

    # ------------------------------------------------------------------ estimates
    @property
    def throughput(self) -> ThroughputLog:
        if self._throughput is None:
            key = machine_key(host_name(), self.spec.family, self._model_and_data()[0])
            self._throughput = ThroughputLog(self.store, key)
        return self._throughput

    def _prepare_log(self) -> ThroughputLog:
        return ThroughputLog(self.store, f"{self.throughput.key}|prepare")

    def _estimate_line(self, todo: list[dict[str, Any]]) -> str:
        """The time left for ``todo``: measured on this machine when it can be, else the
        family's reference rates, saying which."""
        if not todo:
            return "nothing to compute"
        reference = sum(r for r, _ in self._planned.values())
        units = sum(u for _, u in self._planned.values())
        history = self.throughput.history()
        scaled = scaled_estimate(history, reference, units)
        prepared = [m.seconds for m in self._prepare_log().history()]
        setup = sum(prepared[-5:]) / len(prepared[-5:]) if prepared else 0.0
        if scaled is not None:
            return (f"estimated {duration(scaled + setup)} (measured on this machine over "
                    f"{len(history)} earlier condition(s))")
        if reference > 0:
            return (f"estimated {duration(reference)} at reference CPU rates, not yet measured "
                    "on this machine (corrected after the first condition)")
        return "no estimate until the first condition has run on this machine"

    def _measured(self, key: str, seconds: float) -> None:
        """Record what a condition took; after the first condition and at each quarter of
        the plan, print the time left from everything measured so far."""
        reference, units = self._planned.pop(key, (math.nan, math.nan))
        if math.isnan(reference):
            return
        self.throughput.record(Measured(seconds, reference, units))
        self._computed += 1
        total = self._computed + len(self._planned)
        checkpoints = {1, *(math.ceil(total * q / 4) for q in (1, 2, 3))}
        if not self._planned or self._computed not in checkpoints:
            return
        left = scaled_estimate(self.throughput.history(), sum(r for r, _ in self._planned.values()),
                               sum(u for _, u in self._planned.values()))
        if left is not None:
            tqdm.write(f"{self._computed} of {total} condition(s) computed (the last took "
                       f"{seconds:.1f} s): about {duration(left)} left")

    def _report_data(self) -> None:
        """Print what each loader read and kept; log the counts on the parent."""
        metrics: dict[str, float] = {}
        for report in self.family.data_reports():
            print(report.line())
            for warning in report.warnings():
                print(warning)
            metrics.update(report.metrics())
        if metrics:
            self.tracker.log_metrics(self.tracker.parent_run_id, metrics)
        self.tracker.log_datasets(self.tracker.parent_run_id, self.family.data_reports())

    # ------------------------------------------------------------------ grid
    @property
    def grid_coord(self) -> Coordinator:
        """Where grid conditions get their trials: the sweep's study, or for a search's
        final conditions a companion study ``<study>-final`` (its one metric is
        ``condition_finished``), so search proposals and final checks never mix."""
        if self._grid_coord is None:
            assert self.coord is not None and self._opened is not None
            if self.spec.search is None:
                self._grid_coord = self.coord
            else:
                study = optuna.create_study(storage=self._opened.storage,
                                            study_name=f"{self.spec.study_name}-final",
                                            directions=["maximize"], load_if_exists=True)
                if study.metric_names is None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        study.set_metric_names([FINISHED_METRIC])
                self._grid_coord = Coordinator(study, self._opened, self._close_runs_of)
        return self._grid_coord

    def _run_grid(self, grid: list[dict[str, Any]]) -> None:
        self._choices = _choices(grid)
        waiting = [params for params in tqdm(grid, desc="conditions", unit="cond")
                   if not self._settle(params, waiting=False)]
        self._wait_for(waiting)

    def _wait_for(self, waiting: list[dict[str, Any]]) -> None:
        """Poll the conditions other workers hold until each is settled here."""
        if waiting:
            print(f"waiting for other workers to finish {len(waiting)} condition(s)")
        while waiting:
            time.sleep(poll_seconds())
            self.grid_coord.reap()
            waiting = [params for params in waiting if not self._settle(params, waiting=True)]

    def _settle(self, params: Mapping[str, Any], waiting: bool) -> bool:
        """Reuse, or claim and compute, one condition; False while another worker holds it."""
        coord = self.grid_coord
        key = self.key_for(params)
        existing = self.finished(key, params)
        if existing is not None:
            self._reuse(params, key, existing)
            return True
        if waiting and self._incomplete_elsewhere(params, key):
            return True
        claim = coord.claim(key)
        if claim is None:
            return False
        existing = self.finished(key, params)
        if existing is not None:  # finished between our first look and the claim
            self._record_reused_trial(claim, params, key, existing)
            self._add_row(params, key, existing.info.run_id, self._metrics_of(existing),
                          reused=True)
            return True
        trial = coord.create_trial(_flat(params), self._fixed_distributions(params))
        with coord.beating(trial.number):
            self._compute_claimed(coord, claim, params, key, trial)
        return True

    def _incomplete_elsewhere(self, params: Mapping[str, Any], key: str) -> bool:
        """True when another worker computed ``key`` in this sweep and it came out incomplete."""
        coord = self.grid_coord
        trial = coord.trial_of(coord.board.latest(key))
        if trial is None or trial.state != TrialState.FAIL or INCOMPLETE_ATTR not in trial.user_attrs:
            return False
        reason = str(trial.user_attrs[INCOMPLETE_ATTR])
        self.incomplete.append(self.family.run_name(params))
        run_id = str(trial.user_attrs.get(RUN_ID_ATTR, ""))
        metrics = self._metrics_of(self.client.get_run(run_id)) if run_id else {}
        self._add_row(params, key, run_id, metrics, reused=True, incomplete=reason)
        return True

    def _fixed_distributions(self, params: Mapping[str, Any]) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution

        out = {}
        for name, value in _flat(params).items():
            choices = self._choices.get(name, ())
            known = any(type(c) is type(value) and c == value for c in choices)
            out[name] = CategoricalDistribution(choices if known else (value,))
        return out

    def _reuse(self, params: Mapping[str, Any], key: str, run) -> None:  # type: ignore[no-untyped-def]
        self._adopt_if_orphaned(run)
        self._add_row(params, key, run.info.run_id, self._metrics_of(run), reused=True)
        if self._has_trial(key):
            return
        claim = self.grid_coord.claim(key)
        if claim is not None:
            self._record_reused_trial(claim, params, key, run)

    def _has_trial(self, key: str) -> bool:
        """True when this study already records a COMPLETE trial for ``key``."""
        if key not in self._trial_keys:
            self._trial_keys = {str(t.user_attrs.get(KEY_TAG)) for t in self.grid_coord.study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE,))}
        return key in self._trial_keys

    def _record_reused_trial(self, claim: Claim, params: Mapping[str, Any], key: str, run) -> None:  # type: ignore[no-untyped-def]
        """Give the study a COMPLETE trial for a condition finished elsewhere (another
        study, or a worker that died between finishing its run and its trial)."""
        coord = self.grid_coord
        if self._has_trial(key):
            coord.release(claim)
            return
        trial = coord.create_trial(_flat(params), self._fixed_distributions(params))
        coord.attach(claim, trial.number)
        for name, value in {KEY_TAG: key, RUN_ID_ATTR: run.info.run_id, "lmlab.reused": True}.items():
            trial.set_user_attr(name, value)
        self._tell(coord, trial.number, self._objective_values(coord, self._metrics_of(run)))
        self._trial_keys.add(key)

    # ------------------------------------------------------------------ search
    def _run_search(self) -> None:
        """``n_trials`` slots shared by every worker on the study: each slot is claimed
        by one worker and ends as one COMPLETE trial, so the study holds exactly
        ``n_trials`` however many workers run it."""
        assert self.spec.search is not None and self.study is not None and self.coord is not None
        n_trials = self.spec.search.n_trials
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            self._reuse_trial_row(trial)
        done: set[int] = set()
        given_up: set[int] = set()
        bar = tqdm(total=n_trials, desc="trials")
        while len(done | given_up) < n_trials:
            held = False
            for slot in range(n_trials):
                if slot in done or slot in given_up:
                    continue
                state = self._run_slot(slot)
                if state == "complete":
                    done.add(slot)
                    bar.update(1)
                elif state == "failed":
                    given_up.add(slot)
                elif state == "held":
                    held = True
            if held and len(done | given_up) < n_trials:
                time.sleep(poll_seconds())
                self.coord.reap()
        bar.close()
        chosen = [self.family.search_params(t.params) for t in self.study.best_trials]
        finals = self.family.final_conditions(chosen)
        for params in finals:
            self.family.validate_condition(params)
        self._choices = _choices(finals)
        self._wait_for([params for params in finals if not self._settle(params, waiting=False)])

    def _slot_key(self, slot: int) -> str:
        return f"slot:{self.spec.study_name}:{slot}"

    def _run_slot(self, slot: int) -> str:
        """'complete', 'held' (another worker has it), or 'failed' (here, this sweep)."""
        assert self.spec.search is not None and self.coord is not None and self.study is not None
        key = self._slot_key(slot)
        previous = self.coord.trial_of(self.coord.board.latest(key))
        if previous is not None and previous.state == TrialState.COMPLETE:
            return "complete"
        claim = self.coord.claim(key)
        if claim is None:
            return "held"
        retried = self.coord.trial_of(claim.retaken)
        base = _sampler(self.spec, slot_seed(self.spec.search.seed, slot))
        # A slot whose trial failed (its worker died) is retried with the same proposal.
        self.study.sampler = (optuna.samplers.PartialFixedSampler(retried.params, base)
                              if retried is not None and retried.params else base)
        trial = self.coord.ask(self.spec.search.distributions())
        self.coord.attach(claim, trial.number)
        trial.set_user_attr(SLOT_ATTR, slot)
        if retried is not None:
            trial.set_user_attr("lmlab.retry_of", retried.number)
        with self.coord.beating(trial.number):
            return self._search_trial(trial)

    def _search_trial(self, trial: optuna.Trial) -> str:
        assert self.coord is not None
        for name, value in worker_owner().items():
            trial.set_user_attr(name, value)
        params = self.family.search_params(trial.params)
        self.family.validate_condition(params)
        key = self.key_for(params)
        trial.set_user_attr(KEY_TAG, key)
        try:
            while True:
                existing = self.finished(key, params)
                if existing is not None:
                    metrics = self._metrics_of(existing)
                    self._add_row(params, key, existing.info.run_id, metrics, reused=True)
                    trial.set_user_attr(RUN_ID_ATTR, existing.info.run_id)
                    values = self._objective_values(self.coord, metrics)
                    return "complete" if self._tell(self.coord, trial.number, values) else "failed"
                claim = self.coord.claim(key)
                if claim is not None:
                    existing = self.finished(key, params)
                    if existing is None:
                        return self._compute_claimed(self.coord, claim, params, key, trial)
                    self.coord.release(claim)
                    continue
                time.sleep(poll_seconds())  # the same condition runs on another worker
                self.coord.reap()
        except BaseException:
            self._tell(self.coord, trial.number, None)
            raise

    def _reuse_trial_row(self, trial: FrozenTrial) -> None:
        key = trial.user_attrs.get(KEY_TAG)
        params = self.family.search_params(trial.params)
        run = self.finished(key, params) if key else None
        if run is not None:
            self._add_row(params, key, run.info.run_id, self._metrics_of(run), reused=True)

    # ------------------------------------------------------------------ dead workers
    def _on_stale_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna failed ``trial`` because its heartbeat stopped: close its runs too."""
        self._close_runs_of(trial, f"its worker stopped sending heartbeats (trial {trial.number})")

    def _close_runs_of(self, trial: FrozenTrial, reason: str) -> None:
        """End the child run of a dead worker's trial FAILED, and its parent when that
        parent belongs to the same worker and is still RUNNING."""
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if not run_id:
            return
        try:
            run = self.client.get_run(str(run_id))
        except Exception:  # the run was never created or the server lost it: nothing to close
            return
        if run.info.status == "RUNNING":
            self.tracker.fail(run.info.run_id, f"{reason}; condition retried by a live worker")
        parent_id = run.data.tags.get(PARENT_TAG)
        token = trial.user_attrs.get(TOKEN_TAG)
        if not parent_id or not token or parent_id == self.tracker.parent_run_id:
            return
        parent = self.client.get_run(parent_id)
        if parent.info.status == "RUNNING" and parent.data.tags.get(TOKEN_TAG) == token:
            self.tracker.fail(parent_id, f"sweep worker stopped: {reason}")

    # ------------------------------------------------------------------ one condition
    def _adopt_if_orphaned(self, run) -> None:  # type: ignore[no-untyped-def]
        """Move a finished child of an interrupted sweep under the sweep that resumes it,
        so the UI shows the whole sweep under one parent. Only children of a parent whose
        process is known to be dead move: one ended FAILED or KILLED, or one left RUNNING
        by a process on this host that no longer exists. Children of a parent that
        finished, or of a live worker's parent (on any host), stay where they are."""
        old_parent = run.data.tags.get(PARENT_TAG)
        if not old_parent or old_parent == self.tracker.parent_run_id:
            return
        parent = self.client.get_run(old_parent)
        status = parent.info.status
        dead = status in ("FAILED", "KILLED") or (status == "RUNNING" and owner_is_dead(parent.data.tags))
        if not dead:
            return
        self.tracker.set_tags(run.info.run_id, {PARENT_TAG: self.tracker.parent_run_id,
                                                "lmlab.adopted_from": old_parent})

    def _compute_claimed(self, coord: Coordinator, claim: Claim, params: Mapping[str, Any],
                         key: str, trial: optuna.Trial) -> str:
        """Compute a condition this worker holds the claim on, in ``trial`` of ``coord``'s
        study (whose heartbeat the caller records); 'complete', 'incomplete', 'failed' or
        'lost' (another worker took it over)."""
        coord.attach(claim, trial.number)
        for name, value in {**worker_owner(), KEY_TAG: key, "lmlab.claim_epoch": claim.epoch}.items():
            trial.set_user_attr(name, value)
        values: list[float] | None = None
        try:
            started = time.perf_counter()
            result, run_id = self._compute_run(params, key, trial)
            self._measured(key, time.perf_counter() - started)
            if not coord.still_running(trial.number):
                self.tracker.fail(run_id, "another worker took this condition over (this worker's "
                                  "heartbeat was judged stopped); its result is not used",
                                  status="KILLED")
                return "lost"
            if result.incomplete:
                reason = f"incomplete: {result.incomplete}"
                self.tracker.fail(run_id, f"{reason}; the next run retries it")
                trial.set_user_attr(INCOMPLETE_ATTR, result.incomplete)
                self.incomplete.append(self.family.run_name(params))
                self._add_row(params, key, run_id, result.metrics, reused=False,
                              incomplete=result.incomplete)
                print(f"{self.family.run_name(params)}: {reason}")
                return "incomplete"
            self.tracker.finish(run_id)
            self._add_row(params, key, run_id, result.metrics, reused=False)
            values = self._objective_values(coord, result.metrics)
        finally:
            told = self._tell(coord, trial.number, values)
        if told:
            self._trial_keys.add(key)
        return "complete" if told else "failed"

    def _tell(self, coord: Coordinator, number: int, values: list[float] | None) -> bool:
        """COMPLETE with ``values``, else FAIL; True when the trial ended COMPLETE."""
        state = TrialState.COMPLETE if values is not None else TrialState.FAIL
        coord.study.tell(number, values, state=state, skip_if_finished=True)
        return state == TrialState.COMPLETE

    def _compute_run(self, params: Mapping[str, Any], key: str,
                     trial: optuna.Trial) -> tuple[ConditionResult, str]:
        """Create the child run, compute and log the condition; the run is left RUNNING
        for the caller to end (FINISHED, or FAILED when incomplete)."""
        name = self.family.run_name(params)
        tags = {FAMILY_TAG: self.spec.family, KEY_TAG: key, "optuna.study": self.spec.study_name,
                "lmlab.sweep": self.spec.name, "optuna.trial": str(trial.number),
                TOKEN_TAG: worker_owner()[TOKEN_TAG]}
        if self.family.output_params:
            tags[OUTPUT_DIGESTS_TAG] = json.dumps(self.output_digests(params), sort_keys=True)
        run_id = self.tracker.start_child(name, params, tags)
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        identity = {**self.identity_for(params), "output_data": self.output_digests(params)}
        self.tracker.log_text(run_id, json.dumps(identity, indent=1, default=str), "identity.json")
        self.tracker.log_datasets(run_id, self.family.data_reports())
        self.ctx.run_id = run_id
        try:
            with closed_on_failure(self.tracker, run_id, f"condition {name}"):
                result = self.family.run_condition(self.ctx, params)
                self._log_result(run_id, result, self._shown_metrics(result.metrics))
        finally:
            self.ctx.run_id = None
        return result, run_id

    def _log_result(self, run_id: str, result: ConditionResult,
                    shown: Mapping[str, float] | None = None) -> None:
        """Log ``result`` on ``run_id``; with ``shown``, only those metrics as MLflow metrics
        and every metric as the run's ``condition_metrics`` table."""
        self.tracker.log_shown_metrics(run_id, result.metrics,
                                       result.metrics if shown is None else shown)
        self.tracker.set_tags(run_id, result.tags)
        for name, frame in result.tables.items():
            self.tracker.log_table(run_id, frame, name)
        for name, figure in result.figures.items():
            self.tracker.log_figure(run_id, figure, name)
        for artifact_dir, path in result.files.items():
            self.tracker.log_file(run_id, path, artifact_dir or None)

    def _shown_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The family's runs-table subset of a condition's metrics, and every objective."""
        shown = self.family.logged_metrics(metrics)
        objectives = [name for name, _ in self.family.objectives() if name in metrics]
        return {**shown, **{name: metrics[name] for name in objectives}}

    def _metrics_of(self, run) -> dict[str, float]:  # type: ignore[no-untyped-def]
        """Every metric of a finished condition's run (read once per sweep)."""
        if run.info.run_id not in self._read:
            self._read[run.info.run_id] = run_metrics(self.client, run)
        return self._read[run.info.run_id]

    def _objective_values(self, coord: Coordinator, metrics: Mapping[str, float]) -> list[float] | None:
        """The study's values for a condition; None when one is missing or not finite.
        A family without objectives (and a search's final study) records 1.0
        (``condition_finished``)."""
        names = [name for name, _ in self.family.objectives()]
        if not names or coord is not self.coord:
            return [1.0]
        values = [float(metrics.get(name, math.nan)) for name in names]
        if any(not math.isfinite(v) for v in values):
            print(f"warning: objective(s) {names} missing or not finite; the trial ends FAIL")
            return None
        return values

    def _add_row(self, params: Mapping[str, Any], key: str, run_id: str,
                 metrics: Mapping[str, float], reused: bool, incomplete: str | None = None) -> None:
        if any(row[KEY_TAG] == key for row in self.rows):
            return
        # The metrics as a run holds them, in one order: a row is the same computed or reused.
        metrics = dict(sorted(finite_metrics(metrics).items()))
        row = {**params, **metrics, KEY_TAG: key, "run_id": run_id, "reused": reused}
        if incomplete:
            row["incomplete"] = incomplete
        self.rows.append(row)

    # ------------------------------------------------------------------ parent
    def _log_parent(self, summary: pd.DataFrame) -> list[str]:
        """The family's summary on the parent; returns its headline metric names."""
        parent = self.tracker.parent_run_id
        result = self.family.summarize(self.ctx, summary)
        if "summary" not in result.tables:
            self.tracker.log_table(parent, summary, "summary")
        self._log_result(parent, result)
        return [name for name in result.metrics if name.startswith(HEADLINE_PREFIX)
                and not name.endswith((N, P))]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


@contextmanager
def closed_on_failure(tracker: Tracker, run_id: str, what: str) -> Iterator[None]:
    """Never leave ``run_id`` RUNNING: Ctrl+C ends it KILLED, any error FAILED with the
    reason as a tag; an unexpected error keeps its traceback as ``error.txt`` on the run
    and reaches the user as one LmlabError line."""
    try:
        yield
    except KeyboardInterrupt:
        tracker.fail(run_id, "interrupted by the user", status="KILLED")
        raise
    except LmlabError as error:
        tracker.fail(run_id, str(error))
        raise
    except Exception as error:
        tracker.log_text(run_id, traceback.format_exc(), "error.txt")
        tracker.fail(run_id, f"{type(error).__name__}: {error}")
        raise LmlabError(f"{what} failed with {type(error).__name__}: {error} "
                         f"(traceback saved as error.txt on run {run_id})") from error


DEFAULT_EXPERIMENT_ID = "0"
LAUNCHER_TAG = "lmlab.sweep_parent"


def parent_run_name(spec: SweepSpec, now: datetime | None = None) -> str:
    """``<spec name> YYYY-MM-DD HH:MM`` (local time): a sweep found by name in the UI."""
    return f"{spec.name} {(now or datetime.now()).strftime('%Y-%m-%d %H:%M')}"


def chosen_experiment(spec: SweepSpec, experiment_name: str | None) -> str:
    """The experiment a sweep's parent goes to when nothing created it yet: the argument,
    then MLFLOW_EXPERIMENT_NAME, else the family's own experiment."""
    return experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or spec.family


def start_parent(client: MlflowClient, spec: SweepSpec, experiment_name: str | None) -> tuple[str, str]:
    """The sweep's parent run; (run id, experiment id).

    Under ``mlflow run`` (MLFLOW_RUN_ID) the run it created is the parent, unless it sits
    in the Default experiment, which is where ``mlflow run`` puts a run when nobody chose
    an experiment: then the parent is created in the family's experiment and the run
    ``mlflow run`` made is kept as a launcher that points at it (tag ``lmlab.sweep_parent``
    and a note). Outside ``mlflow run``: ``experiment_name``, MLFLOW_EXPERIMENT_NAME,
    MLFLOW_EXPERIMENT_ID, else the family's experiment. This is the sweep's first write to
    the store, so a store that refuses writes is reported here as one line."""
    from mlflow.exceptions import MlflowException

    uri = mask_url(mlflow.get_tracking_uri())
    run_id = os.environ.get("MLFLOW_RUN_ID")
    name = parent_run_name(spec)
    try:
        if run_id:
            try:
                run = client.get_run(run_id)
            except MlflowException as error:
                raise LmlabError(f"MLFLOW_RUN_ID={run_id} is not a run in the tracking store {uri}: "
                                 "unset it, or point MLFLOW_TRACKING_URI at the store that has it") from error
            if run.info.experiment_id != DEFAULT_EXPERIMENT_ID and not experiment_name:
                client.update_run(run_id, name=name)
                return run_id, run.info.experiment_id
            experiment_id = _experiment_id(client, experiment_name or spec.family)
            parent = client.create_run(experiment_id, run_name=name)
            _mark_launcher(client, run_id, parent.info.run_id, experiment_name or spec.family)
            return parent.info.run_id, experiment_id
        given_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
        if given_id and not experiment_name and not os.environ.get("MLFLOW_EXPERIMENT_NAME"):
            experiment_id = client.get_experiment(given_id).experiment_id
        else:
            experiment_id = _experiment_id(client, chosen_experiment(spec, experiment_name))
        run = client.create_run(experiment_id, run_name=name)
    except MlflowException as error:
        raise LmlabError(f"cannot write to the tracking store {uri}: {first_line(error)}") from error
    return run.info.run_id, experiment_id


def _mark_launcher(client: MlflowClient, launcher_id: str, parent_id: str, experiment: str) -> None:
    """Leave the run ``mlflow run`` made in Default as a signpost to the real parent."""
    client.set_tag(launcher_id, LAUNCHER_TAG, parent_id)
    client.set_tag(launcher_id, "lmlab.role", "launcher")
    client.set_tag(launcher_id, "mlflow.note.content",
                   f"This run only launched a sweep. Its results are in experiment "
                   f"'{experiment}', parent run {parent_id}.")


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it; workers starting together race to create it."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def run_sweep(spec: SweepSpec, experiment_name: str | None = None) -> SweepOutcome:
    family = family_for(spec)
    threads, threads_source = apply_threads(spec.runtime)
    client = ensure_store()
    store = store_dir()
    parent_id, experiment_id = start_parent(client, spec, experiment_name)
    tracker_tags = {FAMILY_TAG: spec.family, "lmlab.sweep": spec.name, "lmlab.spec_digest": spec.digest,
                    "optuna.study": spec.study_name, "lmlab.role": "sweep", **worker_owner(),
                    "lmlab.study_storage": mask_url(spec.storage) if spec.storage else "journal",
                    "lmlab.cache_dir": str(cache_dir(store))}
    runner = SweepRunner(spec, family, client, experiment_id, parent_id, store)
    runner.tracker.set_tags(parent_id, {**tracker_tags, "lmlab.threads_source": threads_source})
    runner.tracker.log_params(parent_id, {"runtime.threads": threads})
    runner.tracker.log_text(parent_id, _spec_yaml(spec), "spec.yaml")
    print(f"worker {worker_owner()['lmlab.host']}:{os.getpid()}; study storage: "
          f"{tracker_tags['lmlab.study_storage']}; cache: {cache_dir(store)} "
          f"({'shared via LMLAB_CACHE_DIR' if os.environ.get('LMLAB_CACHE_DIR') else 'local to this worker'})")
    with closed_on_failure(runner.tracker, parent_id, f"sweep {spec.name}"):
        outcome = runner.run()
    if outcome.incomplete:
        reason = (f"{len(outcome.incomplete)} condition(s) incomplete ({', '.join(outcome.incomplete[:5])}"
                  f"{', ...' if len(outcome.incomplete) > 5 else ''}): their failed parts are retried "
                  "by the next run")
        runner.tracker.fail(parent_id, reason)
        raise LmlabError(f"sweep {spec.name}: {reason}")
    client.set_terminated(parent_id, "FINISHED")
    outcome.run_name = client.get_run(parent_id).info.run_name
    outcome.view_key = share_view(client, experiment_id, headline_columns(outcome.headline))
    return outcome


def headline_columns(names: list[str]) -> list[str]:
    """The runs-table columns of a family's headline: every value, and the interval of the
    first (the sweep's main finding) beside it."""
    values = [n for n in names if not n.endswith((CI_LO, CI_HI))]
    if not values:
        return []
    first = [values[0] + end for end in (CI_LO, CI_HI) if values[0] + end in names]
    return [values[0], *first, *values[1:]]


def mark_run_failed(reason: str) -> None:
    """Close the run ``mlflow run`` created when the sweep could not even start."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        client = MlflowClient()
        client.set_tag(run_id, FAILURE_TAG, reason[:4000])
        client.set_terminated(run_id, "FAILED")
    except Exception:  # the store itself is the problem (already reported in one line)
        pass


def _spec_yaml(spec: SweepSpec) -> str:
    import yaml

    source = dict(spec.source)
    if isinstance(source.get("storage"), str):
        source["storage"] = mask_url(source["storage"])
    return yaml.safe_dump(source, sort_keys=False)


def ui_hint(outcome: SweepOutcome) -> str:
    """The sweep's last lines: the parent, the command that opens the UI on a local store,
    and the URL of the experiment's runs table in the classic view with the headline columns."""
    uri = mlflow.get_tracking_uri()
    served = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if served else "http://127.0.0.1:5000"
    opener = "" if served else f"open the UI:  {ui_command(mask_url(uri))}\n"
    return (f"parent run: {outcome.run_name} ({outcome.parent_run_id})\n{opener}"
            f"then browse:  {runs_url(base, outcome.experiment_id, outcome.view_key)}")
