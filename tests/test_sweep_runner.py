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

from lmlab import stats
from lmlab.errors import LmlabError
from lmlab.steering.family import SteeringFamily, shown_metrics
from lmlab.sweeps.family import ConditionResult
from lmlab.sweeps.runner import run_sweep
from lmlab.sweeps.spec import parse_spec
from lmlab.tracking import (FAILURE_TAG, KEY_TAG, METRICS_TAG, PARENT_TAG, condition_key,
                            metrics_from_table, metrics_table, run_metrics)

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


def assert_same_rows(first: pd.DataFrame, again: pd.DataFrame) -> None:
    """Two sweeps' summaries hold the same rows, whether computed or reused."""
    pd.testing.assert_frame_equal(first.drop(columns="reused"), again.drop(columns="reused"))


def headline_of(outcome) -> dict[str, float]:  # type: ignore[no-untyped-def]
    metrics = MlflowClient().get_run(outcome.parent_run_id).data.metrics
    return {name: value for name, value in metrics.items() if name.startswith("headline/")}


def test_a_child_run_shows_the_familys_subset_and_its_table_holds_every_metric(store: Path) -> None:
    outcome = run_sweep(spec_with())
    client = MlflowClient()
    steered = [r for r in children(outcome) if r.data.params["method"] == "suffix_contrast"][0]
    every = run_metrics(client, steered)
    row = outcome.summary.set_index("run_id").loc[steered.info.run_id]
    assert every == {name: row[name] for name in every}, "the table holds what the sweep computed"
    assert steered.data.metrics == shown_metrics(every)
    assert {"harm_test/refusal", "benign/cost"} <= set(steered.data.metrics)  # the objectives
    assert {"harm_test/refusal_phrase_ci_lo", "harm_test/refusal_likelihood_diff_p",
            "harm_test/refusal_n"} <= set(every) - set(steered.data.metrics)
    assert steered.data.tags[METRICS_TAG] == "condition_metrics.csv"
    table = client.load_table(outcome.experiment_id, "tables/condition_metrics.json",
                              run_ids=[steered.info.run_id])
    refusal = table.set_index("metric").loc["harm_test/refusal"]
    assert (refusal["value"], refusal["ci_lo"], refusal["n"]) == pytest.approx(
        (every["harm_test/refusal"], every["harm_test/refusal_ci_lo"],
         every["harm_test/refusal_n"]))


def test_a_steering_child_shows_at_most_40_metrics_with_three_splits(store: Path) -> None:
    spec = spec_with(grid={**TINY_SPEC["grid"], "alpha": [1.0]},
                     steering={**TINY_SPEC["steering"],
                               "eval_splits": ["harm_train", "harm_test", "benign"]})
    runs = children(run_sweep(spec))
    counts = {r.data.params["method"]: len(r.data.metrics) for r in runs}
    assert counts == {"none": 39, "suffix_contrast": 40, "random": 40}
    steered = next(r for r in runs if r.data.params["method"] == "suffix_contrast")
    for split in ("harm_train", "harm_test", "benign"):
        assert {f"{split}/refusal_ci_lo", f"{split}/refusal_diff_p", f"{split}/kl",
                f"{split}/perplexity_median", f"{split}/empty"} <= set(steered.data.metrics)
    assert len(run_metrics(MlflowClient(), steered)) > 120


def test_a_rerun_reads_every_metric_back_so_its_summary_and_headline_match(store: Path) -> None:
    first = run_sweep(spec_with())
    again = run_sweep(spec_with())
    assert again.summary["reused"].all()
    assert_same_rows(first.summary, again.summary)
    assert headline_of(again) == headline_of(first)
    assert "headline/refusal_gain_vs_random_ci_lo" in headline_of(again)


def test_runs_logged_with_the_old_interval_names_are_reused_under_the_new_ones(
        store: Path, monkeypatch) -> None:
    def old_names(self, prefix):  # type: ignore[no-untyped-def]
        return {prefix: self.value, f"{prefix}_lo": self.lower, f"{prefix}_hi": self.upper,
                f"{prefix}_n": float(self.n)}

    with monkeypatch.context() as before:  # runs as lmlab logged them before _ci_lo / _ci_hi
        before.setattr(stats.Estimate, "to_dict", old_names)
        before.setattr(SteeringFamily, "logged_metrics", lambda self, metrics: dict(metrics))
        before.setattr(SteeringFamily, "summarize", lambda self, ctx, summary: ConditionResult({}))
        old = run_sweep(spec_with())
    assert "harm_test/refusal_lo" in children(old)[0].data.metrics
    calls = count_condition_calls(monkeypatch)
    again = run_sweep(spec_with())
    assert calls == []
    columns = set(again.summary.columns)
    assert {"harm_test/refusal_ci_lo", "harm_test/refusal_diff_ci_hi",
            "benign/cost_ci_lo"} <= columns
    assert not any(name.endswith(("_lo", "_hi")) and not name.endswith(("_ci_lo", "_ci_hi"))
                   for name in columns)
    assert set(headline_of(again)) == {
        f"headline/{name}{end}" for end in ("", "_ci_lo", "_ci_hi", "_n")
        for name in ("refusal_gain_vs_random", "refusal", "benign_cost")}


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


def test_the_metrics_table_has_a_row_per_metric_with_its_interval_n_and_p_beside_it() -> None:
    metrics = {**stats.paired_rate_difference([True, True, False], [False, True, False])
               .to_dict("harm_test/refusal_diff"), "judge/calls": 6.0, "accuracy_n": 3.0}
    rows = metrics_table(metrics)
    assert rows[0] == {"metric": "harm_test/refusal_diff", "value": pytest.approx(1 / 3),
                       "ci_lo": metrics["harm_test/refusal_diff_ci_lo"],
                       "ci_hi": metrics["harm_test/refusal_diff_ci_hi"], "n": 3.0, "p": 1.0}
    assert rows[1:] == [{"metric": "judge/calls", "value": 6.0},
                        {"metric": "accuracy_n", "value": 3.0}]  # no "accuracy": its own row
    assert metrics_from_table(rows) == metrics


def test_a_run_without_a_metrics_table_reads_as_its_mlflow_metrics_under_current_names() -> None:
    from types import SimpleNamespace

    run = SimpleNamespace(info=SimpleNamespace(run_id="r"), data=SimpleNamespace(
        tags={}, metrics={"harm_test/refusal": 0.5, "harm_test/refusal_lo": 0.2}))
    assert run_metrics(None, run) == {"harm_test/refusal": 0.5, "harm_test/refusal_ci_lo": 0.2}


def test_a_metrics_table_that_cannot_be_read_stops_with_the_run_named() -> None:
    from types import SimpleNamespace

    class Gone:
        def download_artifacts(self, *args):  # type: ignore[no-untyped-def]
            raise OSError("no such file")

    run = SimpleNamespace(info=SimpleNamespace(run_id="r1"), data=SimpleNamespace(
        tags={METRICS_TAG: "condition_metrics.csv"}, metrics={"harm_test/refusal": 0.5}))
    with pytest.raises(LmlabError, match="run r1 keeps its metrics in condition_metrics.csv"):
        run_metrics(Gone(), run)


def test_adaptive_search_runs_its_trial_budget_then_tests_the_pareto_configs(store: Path, monkeypatch) -> None:
    spec = spec_with(grid=None, search={"params": {"layer": {"int": [0, 2]}, "alpha": {"float": [0.1, 1.0]}},
                                        "n_trials": 3, "sampler": "nsga2", "seed": 1})
    outcome = run_sweep(spec)
    trials = outcome.summary[outcome.summary["splits"].map(lambda s: "harm_val" in s)]
    finals = outcome.summary[outcome.summary["splits"].map(lambda s: "harm_test" in s)]
    assert len(trials) >= 3
    assert len(finals) >= 2  # a baseline on harm_test and at least one chosen config
    calls = count_condition_calls(monkeypatch)
    again = run_sweep(spec)
    assert calls == [], "a finished study must not run new trials"
    assert_same_rows(outcome.summary, again.summary)


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
