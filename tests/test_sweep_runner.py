"""The sweep runner: parent/children layout, resume, reuse, failures, shared studies.

All tests run the steering family on a tiny random model with a few prompts, so they
check bookkeeping, not steering quality. Bad specs and their messages are the table in
tests/test_errors.py (docs/errors.md).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from lmlab.errors import LmlabError
from lmlab.steering.family import SteeringFamily
from lmlab.sweeps.runner import run_sweep
from lmlab.sweeps.spec import parse_spec
from lmlab.tracking import FAILURE_TAG, KEY_TAG, PARENT_TAG, condition_key

TINY_SPEC = {
    "family": "steering",
    "name": "tiny",
    "model": {"name": "tiny:llama"},
    "grid": {"method": ["suffix_contrast"], "layer": [1], "alpha": [0.5, 1.0], "intervention": ["add"]},
    "steering": {"n_prompts": 3, "n_train": 4, "eval_splits": ["harm_test", "benign"],
                 "generation": {"max_new_tokens": 4, "batch_size": 4}, "kl_tokens": 2},
}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)  # artifacts go to ./mlruns: keep them out of the checkout
    mlflow.set_tracking_uri(uri)
    return tmp_path


def spec_with(**changes):  # type: ignore[no-untyped-def]
    raw = {**TINY_SPEC, **changes}
    return parse_spec(raw)


def children(outcome) -> list:  # type: ignore[no-untyped-def]
    client = MlflowClient()
    return client.search_runs([outcome.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")


def count_condition_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    original = SteeringFamily.run_condition

    def counting(self, ctx, params):  # type: ignore[no-untyped-def]
        calls.append(dict(params))
        return original(self, ctx, params)

    monkeypatch.setattr(SteeringFamily, "run_condition", counting)
    return calls


def test_sweep_has_one_parent_with_a_child_per_condition_and_a_summary(store: Path) -> None:
    outcome = run_sweep(spec_with())
    runs = children(outcome)
    # baseline + 2 alphas x (suffix_contrast + matched random control)
    assert len(runs) == 5
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.info.experiment_id == outcome.experiment_id for r in runs)
    assert len({r.data.tags[KEY_TAG] for r in runs}) == 5
    artifacts = {a.path for a in MlflowClient().list_artifacts(outcome.parent_run_id)}
    assert "summary.csv" in artifacts
    plots = {a.path for a in MlflowClient().list_artifacts(outcome.parent_run_id, "plots")}
    assert {"plots/refusal_vs_strength.png", "plots/outcome_shares.png", "plots/tradeoff.png",
            "plots/layer_strength_heatmap.png"} <= plots
    summary = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=outcome.parent_run_id,
                                                              artifact_path="summary.csv"))
    assert (summary["intervention"] == "none").sum() == 1, "baseline row must be in summary.csv"
    assert {"harm_test/refusal", "harm_test/refusal_ci_lo", "harm_test/refusal_ci_hi",
            "harm_test/empty", "harm_test/refusal_diff", "harm_test/refusal_diff_p", "benign/cost",
            "benign/kl"} <= set(summary.columns)


def test_child_runs_log_params_completions_and_direction(store: Path) -> None:
    outcome = run_sweep(spec_with())
    steered = [r for r in children(outcome) if r.data.params["intervention"] == "add"][0]
    assert steered.data.params["layer"] == "1"
    files = {a.path for a in MlflowClient().list_artifacts(steered.info.run_id)}
    assert "completions.csv" in files and "direction" in files
    assert "direction/relative_norm" in steered.data.metrics


def test_the_strength_param_is_named_for_its_unit_and_controls_name_their_method(store: Path) -> None:
    spec = spec_with(grid={**TINY_SPEC["grid"], "alpha": [0.5], "intervention": ["add", "ablate"]})
    params = [r.data.params for r in children(run_sweep(spec))]
    assert not any("alpha" in p for p in params)
    adds = [p for p in params if p["intervention"] == "add"]
    ablations = [p for p in params if p["intervention"] == "ablate"]
    assert len(adds) == len(ablations) == 2
    assert all(p["add_norm_multiple"] == "0.5" and "ablate_fraction" not in p for p in adds)
    assert all(p["ablate_fraction"] == "0.5" and "add_norm_multiple" not in p for p in ablations)
    controls = [p for p in params if p["method"] == "random"]
    assert [p["control_for"] for p in controls] == ["suffix_contrast"] * 2


def test_rerunning_a_spec_reuses_every_finished_condition(store: Path, monkeypatch) -> None:
    run_sweep(spec_with())
    calls = count_condition_calls(monkeypatch)
    second = run_sweep(spec_with())
    assert calls == []
    assert children(second) == []
    assert second.summary["reused"].all() and len(second.summary) == 5


def test_an_interrupted_sweep_resumes_without_redoing_finished_conditions(store: Path, monkeypatch) -> None:
    original = SteeringFamily.run_condition
    seen: list = []

    def dies_on_third(self, ctx, params):  # type: ignore[no-untyped-def]
        seen.append(params)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return original(self, ctx, params)

    monkeypatch.setattr(SteeringFamily, "run_condition", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec_with())
    client = MlflowClient()
    statuses = sorted(r.info.status for r in client.search_runs(
        [client.get_experiment_by_name("steering").experiment_id]))
    assert statuses.count("KILLED") == 2  # the interrupted child and its parent
    assert "RUNNING" not in statuses

    calls = count_condition_calls(monkeypatch)
    resumed = run_sweep(spec_with())
    assert len(calls) == 3  # the interrupted condition and the two never started
    assert len(resumed.summary) == 5
    finished = [r for r in children(resumed) if r.info.status == "FINISHED"]
    assert len(finished) == 5, "the resumed parent adopts the interrupted sweep's finished children"


def test_runs_left_running_by_a_dead_process_are_closed_as_failed(store: Path) -> None:
    client = MlflowClient()
    experiment_id = client.create_experiment("steering")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    orphan = client.create_run(experiment_id, tags={"lmlab.pid": dead, "lmlab.host": socket.gethostname()})
    run_sweep(spec_with())
    closed = client.get_run(orphan.info.run_id)
    assert closed.info.status == "FAILED"
    assert "died" in closed.data.tags[FAILURE_TAG]


def test_a_layer_outside_the_model_fails_the_parent_with_a_reason(store: Path) -> None:
    spec = spec_with(grid={**TINY_SPEC["grid"], "layer": [7]})
    with pytest.raises(LmlabError, match="layer 7 is outside the model"):
        run_sweep(spec)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("steering").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "outside the model" in runs[0].data.tags[FAILURE_TAG]


def test_condition_key_does_not_depend_on_number_spelling() -> None:
    assert condition_key({"layer": 4, "alpha": 1}) == condition_key({"layer": 4.0, "alpha": 1.0})
    assert condition_key({"layer": 4}) != condition_key({"layer": 5})


def test_adaptive_search_runs_its_trial_budget_then_tests_the_pareto_configs(store: Path, monkeypatch) -> None:
    spec = spec_with(grid=None, search={"params": {"layer": {"int": [0, 2]}, "alpha": {"float": [0.1, 1.0]}},
                                        "n_trials": 3, "sampler": "nsga2", "seed": 1})
    outcome = run_sweep(spec)
    trials = outcome.summary[outcome.summary["splits"].map(lambda s: "harm_val" in s)]
    finals = outcome.summary[outcome.summary["splits"].map(lambda s: "harm_test" in s)]
    assert len(trials) >= 3
    assert len(finals) >= 2  # a baseline on harm_test and at least one chosen config
    calls = count_condition_calls(monkeypatch)
    run_sweep(spec)
    assert calls == [], "a finished study must not run new trials"


def _forked_worker(raw: dict) -> None:
    """One sweep worker in a forked process: its own pid, lock claims and MLflow connections,
    without the 20-60 s a fresh interpreter spends importing torch and MLflow again."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    for store_class in (TrackingStore, RegistryStore):
        for engine in store_class._engine_map.values():
            engine.dispose(close=False)  # SQLAlchemy's rule after fork: new connections, own pool
    run_sweep(parse_spec(raw))


def test_two_workers_share_a_study_without_repeating_a_condition(store: Path) -> None:
    import multiprocessing

    MlflowClient().search_experiments()  # create the schema before fanning out
    fork = multiprocessing.get_context("fork")
    workers = [fork.Process(target=_forked_worker, args=(TINY_SPEC,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=600)
        assert worker.exitcode == 0, "a worker failed (its traceback is in the captured stderr)"
    client = MlflowClient()
    experiment = client.get_experiment_by_name("steering")
    finished = client.search_runs([experiment.experiment_id],
                                  filter_string="attributes.status = 'FINISHED'")
    keys = [r.data.tags[KEY_TAG] for r in finished if KEY_TAG in r.data.tags]
    assert len(keys) == 5 and len(set(keys)) == 5
    parents = {r.data.tags.get("lmlab.pid") for r in client.search_runs(
        [experiment.experiment_id], filter_string="tags.`lmlab.role` = 'sweep'")}
    assert len(parents) == 2 and os.getpid() not in {int(p) for p in parents}


def test_a_fresh_store_made_from_the_migrated_template_is_a_whole_store(store: Path) -> None:
    client = MlflowClient()
    default = client.get_experiment("0")
    assert default.name == "Default"
    assert default.artifact_location.startswith(str(store)), "this store's, not the template's"
    run = client.create_run(client.create_experiment("check"))
    client.log_metric(run.info.run_id, "m", 1.0)
    client.create_registered_model("probe-check")
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
