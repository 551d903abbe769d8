"""Run a sweep: a parent MLflow run, an Optuna study, one child run per condition.

Resume rules: a condition whose ``condition_key`` already has a FINISHED run is never
computed again (its metrics are reused); RUNNING runs and trials left by dead processes
are closed as FAILED; a condition claimed by a live worker is waited for, not repeated.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from tqdm.auto import tqdm

from lmlab.cache import DiskCache
from lmlab.errors import LmlabError
from lmlab.identity import condition_identity, model_identity, path_digest
from lmlab.runtime import apply_threads
from lmlab.sweeps.family import ConditionResult, Family, SweepContext, family_for
from lmlab.sweeps.locks import ConditionLock
from lmlab.sweeps.spec import SweepSpec
from lmlab.tracking import (FAILURE_TAG, FAMILY_TAG, KEY_TAG, OUTPUT_DIGESTS_TAG, PARENT_TAG,
                            Tracker, close_dead_runs,
                            condition_key, ensure_store, finished_condition, owner_is_dead,
                            owner_tags, store_dir)

WAIT_POLL_SECONDS = 5.0


@dataclass
class SweepOutcome:
    parent_run_id: str
    experiment_id: str
    summary: pd.DataFrame
    tracking_seconds: float
    total_seconds: float


def open_study(spec: SweepSpec, family: Family, store: Path) -> optuna.Study:
    storage: Any = spec.storage
    if storage is None:
        store.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(str(store / "optuna.journal")))
    directions = [direction for _, direction in family.objectives()] or ["maximize"]
    sampler = _sampler(spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=storage, study_name=spec.study_name, sampler=sampler,
                               directions=directions, load_if_exists=True)


def _sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    seed = spec.search.seed if spec.search else 0
    kind = spec.search.sampler if spec.search else "random"
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def fail_stale_trials(study: optuna.Study) -> int:
    stale = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
             if owner_is_dead({k: str(v) for k, v in t.user_attrs.items()})]
    for trial in stale:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    return len(stale)


class SweepRunner:
    def __init__(self, spec: SweepSpec, family: Family, client: MlflowClient,
                 experiment_id: str, parent_run_id: str, store: Path) -> None:
        self.spec = spec
        self.family = family
        self.client = client
        self.tracker = Tracker(client, experiment_id, parent_run_id)
        self.store = store
        self.ctx = SweepContext(spec=spec, tracker=self.tracker, cache=DiskCache(store / "cache"),
                                store_dir=store)
        self.rows: list[dict[str, Any]] = []
        self.study: optuna.Study | None = None
        self._inputs: tuple[dict[str, Any], dict[str, str]] | None = None

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
    def run(self) -> SweepOutcome:
        start = time.perf_counter()
        closed = close_dead_runs(self.client, self.tracker.experiment_id)
        if closed:
            print(f"closed {len(closed)} run(s) left RUNNING by dead processes as FAILED")
        self.study = open_study(self.spec, self.family, self.store)
        stale = fail_stale_trials(self.study)
        if stale:
            print(f"marked {stale} trial(s) of dead workers as FAILED")
        grid = self.family.conditions() if self.spec.search is None else []
        for params in grid:
            self.family.validate_condition(params)
        self._print_plan(grid)
        self.family.prepare(self.ctx)
        self._report_data()
        if self.spec.search is None:
            self._run_grid(grid)
        else:
            self._run_search()
        summary = pd.DataFrame(self.rows)
        self._log_parent(summary)
        total = time.perf_counter() - start
        self.tracker.log_metrics(self.tracker.parent_run_id, {
            "sweep_seconds": total, "tracking_seconds": self.tracker.seconds,
            "tracking_share": self.tracker.seconds / total if total else math.nan})
        return SweepOutcome(self.tracker.parent_run_id, self.tracker.experiment_id, summary,
                            self.tracker.seconds, total)

    def _print_plan(self, grid: list[dict[str, Any]]) -> None:
        if self.spec.search is not None:
            print(f"sweep {self.spec.name!r} ({self.spec.family}): adaptive search, "
                  f"{self.spec.search.n_trials} trials ({self.spec.search.sampler}), "
                  f"study {self.spec.study_name}")
            return
        todo = [p for p in grid if self.finished(self.key_for(p), p) is None]
        seconds = sum(self.family.estimate_seconds(p) for p in todo)
        units = sum(self.family.work_units(p) for p in todo)
        print(f"sweep {self.spec.name!r} ({self.spec.family}): {len(grid)} conditions, "
              f"{len(grid) - len(todo)} already finished, {len(todo)} to run; "
              f"about {units} {self.family.work_unit_name}, estimated {seconds / 60:.1f} min")

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

    def _run_grid(self, grid: list[dict[str, Any]]) -> None:
        waiting = []
        for params in tqdm(grid, desc="conditions", unit="cond"):
            if not self._run_or_reuse(params):
                waiting.append(params)
        for params in waiting:
            self._wait_for(params)

    def _run_search(self) -> None:
        assert self.spec.search is not None and self.study is not None
        distributions = self.spec.search.distributions()
        complete = optuna.trial.TrialState.COMPLETE
        done = len(self.study.get_trials(deepcopy=False, states=(complete,)))
        for trial in self.study.get_trials(deepcopy=False, states=(complete,)):
            self._reuse_trial_row(trial)
        bar = tqdm(total=self.spec.search.n_trials, initial=done, desc="trials")
        while done < self.spec.search.n_trials:
            trial = self.study.ask(distributions)
            for name, value in owner_tags().items():
                trial.set_user_attr(name, value)
            params = self.family.search_params(trial.params)
            self.family.validate_condition(params)
            trial.set_user_attr(KEY_TAG, self.key_for(params))
            metrics = self._compute(params, trial_number=trial.number)
            values = self._objective_values(metrics)
            if values is None:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(trial, values)
                done += 1
                bar.update(1)
        bar.close()
        chosen = [self.family.search_params(t.params) for t in self.study.best_trials]
        for params in self.family.final_conditions(chosen):
            self.family.validate_condition(params)
            self._run_or_reuse(params)

    def _reuse_trial_row(self, trial: optuna.trial.FrozenTrial) -> None:
        key = trial.user_attrs.get(KEY_TAG)
        params = self.family.search_params(trial.params)
        run = self.finished(key, params) if key else None
        if run is not None:
            self._add_row(params, key, run.info.run_id, run.data.metrics, reused=True)

    # ------------------------------------------------------------------ one condition
    def _run_or_reuse(self, params: Mapping[str, Any]) -> bool:
        """Compute or reuse one grid condition; False when another worker holds it."""
        key = self.key_for(params)
        existing = self.finished(key, params)
        if existing is not None:
            self._adopt_if_orphaned(existing)
            self._add_row(params, key, existing.info.run_id, existing.data.metrics, reused=True)
            self._record_grid_trial(params, key, existing.data.metrics, existing.info.run_id)
            return True
        lock = ConditionLock(self.store / "locks", key)
        if not lock.acquire():
            return False
        try:
            metrics, run_id = self._compute_locked(params, key, trial_number=None)
        finally:
            lock.release()
        self._record_grid_trial(params, key, metrics, run_id)
        return True

    def _adopt_if_orphaned(self, run) -> None:  # type: ignore[no-untyped-def]
        """Move a finished child of an interrupted sweep under the sweep that resumes it,
        so the UI shows the whole sweep under one parent. Children of a parent that
        finished stay where they are."""
        old_parent = run.data.tags.get(PARENT_TAG)
        if not old_parent or old_parent == self.tracker.parent_run_id:
            return
        if self.client.get_run(old_parent).info.status == "FINISHED":
            return
        self.tracker.set_tags(run.info.run_id, {PARENT_TAG: self.tracker.parent_run_id,
                                                "lmlab.adopted_from": old_parent})

    def _wait_for(self, params: Mapping[str, Any]) -> None:
        key = self.key_for(params)
        lock = ConditionLock(self.store / "locks", key)
        print(f"waiting for another worker to finish {self.family.run_name(params)}")
        while lock.held_by_other():
            time.sleep(WAIT_POLL_SECONDS)
        if not self._run_or_reuse(params):
            self._wait_for(params)

    def _compute(self, params: Mapping[str, Any], trial_number: int | None) -> dict[str, float]:
        """Metrics of a search proposal: reused when that condition already finished."""
        key = self.key_for(params)
        existing = self.finished(key, params)
        if existing is not None:
            self._add_row(params, key, existing.info.run_id, existing.data.metrics, reused=True)
            return dict(existing.data.metrics)
        metrics, _ = self._compute_locked(params, key, trial_number)
        return metrics

    def _compute_locked(self, params: Mapping[str, Any], key: str,
                        trial_number: int | None) -> tuple[dict[str, float], str]:
        name = self.family.run_name(params)
        tags = {FAMILY_TAG: self.spec.family, KEY_TAG: key, "optuna.study": self.spec.study_name,
                "lmlab.sweep": self.spec.name}
        if self.family.output_params:
            tags[OUTPUT_DIGESTS_TAG] = json.dumps(self.output_digests(params), sort_keys=True)
        if trial_number is not None:
            tags["optuna.trial"] = str(trial_number)
        run_id = self.tracker.start_child(name, params, tags)
        identity = {**self.identity_for(params), "output_data": self.output_digests(params)}
        self.tracker.log_text(run_id, json.dumps(identity, indent=1, default=str), "identity.json")
        self.tracker.log_datasets(run_id, self.family.data_reports())
        self.ctx.run_id = run_id
        try:
            with closed_on_failure(self.tracker, run_id, f"condition {name}"):
                result = self.family.run_condition(self.ctx, params)
                self._log_result(run_id, result)
        finally:
            self.ctx.run_id = None
        self.tracker.finish(run_id)
        self._add_row(params, key, run_id, result.metrics, reused=False)
        return result.metrics, run_id

    def _log_result(self, run_id: str, result: ConditionResult) -> None:
        self.tracker.log_metrics(run_id, result.metrics)
        self.tracker.set_tags(run_id, result.tags)
        for name, frame in result.tables.items():
            self.tracker.log_table(run_id, frame, name)
        for name, figure in result.figures.items():
            self.tracker.log_figure(run_id, figure, name)
        for artifact_dir, path in result.files.items():
            self.tracker.log_file(run_id, path, artifact_dir or None)

    def _objective_values(self, metrics: Mapping[str, float]) -> list[float] | None:
        names = [name for name, _ in self.family.objectives()]
        values = [float(metrics.get(name, math.nan)) for name in names]
        if not names or any(not math.isfinite(v) for v in values):
            return None
        return values

    def _record_grid_trial(self, params: Mapping[str, Any], key: str,
                           metrics: Mapping[str, float], run_id: str) -> None:
        assert self.study is not None
        if any(t.user_attrs.get(KEY_TAG) == key for t in self.study.get_trials(deepcopy=False)):
            return
        from optuna.distributions import CategoricalDistribution

        flat = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                for k, v in params.items()}
        distributions = {k: CategoricalDistribution((v,)) for k, v in flat.items()}
        values = self._objective_values(metrics)
        state = optuna.trial.TrialState.COMPLETE if values else optuna.trial.TrialState.FAIL
        trial = optuna.trial.create_trial(
            state=state, values=values if values else None, params=flat,
            distributions=distributions,
            user_attrs={KEY_TAG: key, "mlflow_run_id": run_id})
        self.study.add_trial(trial)

    def _add_row(self, params: Mapping[str, Any], key: str, run_id: str,
                 metrics: Mapping[str, float], reused: bool) -> None:
        if any(row[KEY_TAG] == key for row in self.rows):
            return
        self.rows.append({**params, **metrics, KEY_TAG: key, "run_id": run_id, "reused": reused})

    # ------------------------------------------------------------------ parent
    def _log_parent(self, summary: pd.DataFrame) -> None:
        parent = self.tracker.parent_run_id
        result = self.family.summarize(self.ctx, summary)
        if "summary" not in result.tables:
            self.tracker.log_table(parent, summary, "summary")
        self._log_result(parent, result)


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


def start_parent(client: MlflowClient, spec: SweepSpec, experiment_name: str | None) -> tuple[str, str]:
    """Resume the run ``mlflow run`` created (MLFLOW_RUN_ID) or create one; (run id, experiment id)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        run = client.get_run(run_id)
        return run_id, run.info.experiment_id
    name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or spec.family
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=f"sweep-{spec.name}")
    return run.info.run_id, experiment_id


def run_sweep(spec: SweepSpec, experiment_name: str | None = None) -> SweepOutcome:
    family = family_for(spec)
    threads, threads_source = apply_threads(spec.runtime)
    client = ensure_store()
    store = store_dir()
    parent_id, experiment_id = start_parent(client, spec, experiment_name)
    tracker_tags = {FAMILY_TAG: spec.family, "lmlab.sweep": spec.name, "lmlab.spec_digest": spec.digest,
                    "optuna.study": spec.study_name, "lmlab.role": "sweep", **owner_tags()}
    runner = SweepRunner(spec, family, client, experiment_id, parent_id, store)
    runner.tracker.set_tags(parent_id, {**tracker_tags, "lmlab.threads_source": threads_source})
    runner.tracker.log_params(parent_id, {"runtime.threads": threads})
    runner.tracker.log_text(parent_id, _spec_yaml(spec), "spec.yaml")
    with closed_on_failure(runner.tracker, parent_id, f"sweep {spec.name}"):
        outcome = runner.run()
    client.set_terminated(parent_id, "FINISHED")
    return outcome


def mark_run_failed(reason: str) -> None:
    """Close the run ``mlflow run`` created when the sweep could not even start."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    client = MlflowClient()
    client.set_tag(run_id, FAILURE_TAG, reason[:4000])
    client.set_terminated(run_id, "FAILED")


def _spec_yaml(spec: SweepSpec) -> str:
    import yaml

    return yaml.safe_dump(spec.source, sort_keys=False)


def ui_hint(outcome: SweepOutcome) -> str:
    uri = mlflow.get_tracking_uri()
    return (f"parent run: {outcome.parent_run_id}\n"
            f"open the UI:  mlflow ui --backend-store-uri {uri} --port 5000\n"
            f"then browse:  http://127.0.0.1:5000/#/experiments/{outcome.experiment_id}/runs/"
            f"{outcome.parent_run_id}")
