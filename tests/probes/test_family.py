"""The probes family end to end through the sweep runner, the registry and the viewer."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from lmlab.errors import LmlabError
from lmlab.probes.registry import load_registered, registered_name
from lmlab.probes.view import render_html, score_text
from lmlab.sweeps import runner as sweep_runner
from lmlab.sweeps.family import family_for
from lmlab.sweeps.spec import parse_spec
from lmlab.tracking import run_metrics

LAYERS, LAGS = [0, 2], [-2, 0, 3]
# predict is type-hinted and every probe carries an input example: MLflow's warnings asking
# for either would be a regression.
pytestmark = [pytest.mark.filterwarnings("error:.*Add type hints:UserWarning"),
              pytest.mark.filterwarnings("error:.*input example was not provided:UserWarning")]


def spec_for(chain_file, **settings):
    raw = {"family": "probes", "name": "unit", "model": "tiny-llama",
           "grid": {"label": ["backtracking"], "layer": LAYERS, "lag": LAGS},
           "probes": {"data": str(chain_file), "bootstrap": 30, "batch_size": 8, **settings}}
    return parse_spec(raw)


def run(spec, lm):
    family = family_for(spec)
    client = sweep_runner.ensure_store()
    parent, experiment = sweep_runner.start_parent(client, spec, "probes-unit")
    runner = sweep_runner.SweepRunner(spec, family, client, experiment, parent,
                                      sweep_runner.store_dir())
    runner.ctx.__dict__["model"] = lm  # the tiny model instead of loading spec.model
    return runner.run(), family, client


def with_defects(sample_records):
    """Three malformed chains and one too long for the tiny model (512 positions)."""
    nested, stray, keyless, long = (dict(r) for r in sample_records[100:104])
    nested["annotated_chain"] = nested["annotated_chain"].replace('["end-section"]', " ", 1)
    stray["annotated_chain"] = stray["annotated_chain"].replace('["deduction"]', '["conclusion"]', 1)
    del keyless["problem"]
    long["reasoning_chain"] = "\n\n".join([long["reasoning_chain"]] * 3)
    long["annotated_chain"] = " ".join([long["annotated_chain"]] * 3)
    return [nested, stray, keyless, long]


DEFECTS = {"nested_open_tag": 0, "unknown_label": 1, "missing_key": 2, "too_long": 3}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, sample_records, tiny_lm):
    """One sweep (2 layers x 3 lags on 30 sample chains) shared by the tests that read it."""
    root = tmp_path_factory.mktemp("swept")
    chain_file = root / "chains.json"
    chain_file.write_text(json.dumps(sample_records[:30] + with_defects(sample_records)))
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        patch.setenv("LMLAB_STORE_DIR", str(root / ".lmlab"))
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        outcome, family, client = run(spec_for(chain_file), tiny_lm)
        yield outcome, family, client, chain_file
    mlflow.set_tracking_uri(previous)


def test_every_layer_and_lag_is_a_child_run_with_metrics_and_a_probe(swept):
    outcome, family, client, _ = swept
    children = client.search_runs([outcome.experiment_id],
                                  f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    assert len(children) == len(LAYERS) * len(LAGS)
    for child in children:
        lag = int(child.data.params["lag"])
        assert f"lag{lag}" in child.info.run_name
        assert {"test_auroc", "test_auroc_ci_lo", "test_pr_auc", "val_pr_auc", "token_test_pr_auc",
                "shuffled_test_pr_auc"} <= set(child.data.metrics)
        # The rest is in the run's condition_metrics table.
        assert {"token_test_auroc", "shuffled_test_auroc", "threshold", "base_rate"} <= \
            set(run_metrics(client, child)) - set(child.data.metrics)
        artifacts = [a.path for a in client.list_artifacts(child.info.run_id)]
        assert f"probe_layer{child.data.params['layer']}_lag{lag}" in artifacts


def test_the_parent_holds_the_results_table_and_figures(swept, tmp_path):
    outcome, family, client, _ = swept
    parent = outcome.parent_run_id
    local = client.download_artifacts(parent, "probe_results.csv", str(tmp_path))
    import pandas as pd

    table = pd.read_csv(local)
    assert len(table) == len(LAYERS) * len(LAGS)
    for column in ("layer", "lag", "train_accuracy", "test_f1", "test_auroc", "test_pr_auc",
                   "n_test", "pos_ratio_test", "token_test_auroc", "shuffled_test_auroc"):
        assert column in table
    plots = {a.path for a in client.list_artifacts(parent, "plots")}
    assert "plots/backtracking_heatmap_test_auroc.png" in plots
    assert "plots/backtracking_lines_test_pr_auc.png" in plots
    assert "plots/backtracking_class_balance.png" in plots
    manifest = json.loads(mlflow.artifacts.load_text(f"runs:/{parent}/activations/manifest.json"))
    assert len(manifest["items"]) == 30 and manifest["layers"] == LAYERS


def test_malformed_chains_are_skipped_counted_and_logged_on_the_parent(swept, sample_records,
                                                                      tiny_lm, tmp_path):
    outcome, family, client, _ = swept
    parent = client.get_run(outcome.parent_run_id)
    metrics = parent.data.metrics
    defects = with_defects(sample_records)
    for reason, index in DEFECTS.items():
        text = defects[index]["reasoning_chain"]
        assert metrics[f"data/chains/dropped_{reason}"] == 1
        assert metrics[f"chains_skipped_chars_{reason}"] == len(text)
        tokens = len(tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert metrics[f"chains_skipped_tokens_{reason}"] == tokens
    assert metrics["data/chains/rows_read"] == 34 and metrics["data/chains/rows_kept"] == 30
    assert metrics["chains_malformed"] == 3
    assert metrics["chains_malformed_share"] == pytest.approx(3 / 34)
    import pandas as pd

    table = pd.read_csv(client.download_artifacts(parent.info.run_id,
                                                  "chains_skipped_by_reason.csv", str(tmp_path)))
    assert sorted(table["reason"]) == sorted(DEFECTS)
    listed = pd.read_csv(client.download_artifacts(parent.info.run_id, "chains_skipped.csv",
                                                   str(tmp_path)))
    assert len(listed) == 4
    assert list(listed["index"]) == [30, 31, 32, 33]  # file positions, in order
    report = family.data_reports()[0]
    assert report.dropped == {reason: 1 for reason in DEFECTS}
    assert any("'conclusion' x1" in note for note in report.notes)


def test_chains_of_one_problem_never_straddle_train_and_test(swept):
    _, family, _, _ = swept
    prepared = family._data()
    problems = [c.problem for c in prepared.chains.chains]
    assert len(set(problems)) < len(problems)  # the fixture repeats problems
    for problem in set(problems):
        splits = {int(prepared.split[i]) for i, p in enumerate(problems) if p == problem}
        assert len(splits) == 1, problem


def test_every_probe_has_its_baselines_gains_and_convergence_beside_it(swept, tmp_path):
    outcome, family, client, _ = swept
    children = client.search_runs([outcome.experiment_id],
                                  f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    for child in children:
        lag = int(child.data.params["lag"])
        metrics = run_metrics(client, child)
        assert {"converged", "fits_unconverged", "fit_iterations", "probe_minus_token_test_pr_auc",
                "problems_test"} <= set(metrics)
        assert ("persistence_test_auroc" in metrics) == (lag != 0)
        assert ("probe_minus_persistence_test_pr_auc_ci_lo" in metrics) == (lag != 0)
        assert child.data.tags["fit_converged"] in ("true", "false")
    import pandas as pd

    table = pd.read_csv(client.download_artifacts(outcome.parent_run_id, "probe_results.csv",
                                                  str(tmp_path)))
    for column in ("persistence_test_auroc", "probe_minus_persistence_test_pr_auc",
                   "beats_baselines", "converged"):
        assert column in table
    assert table.loc[table["lag"] != 0, "persistence_test_auroc"].notna().all()
    assert "fit_converged" in client.get_run(outcome.parent_run_id).data.tags


def test_the_plan_counts_fits_and_estimates_time_from_the_file(chain_file, sample_records,
                                                                tmp_path, capsys):
    family = family_for(spec_for(chain_file))
    params = family.conditions()[0]
    assert family.work_units(params) == 2 * 4  # probe and shuffled control at 4 strengths
    seconds = family.estimate_seconds(params)
    assert seconds > 0
    assert "probes plan: 30 chains" in capsys.readouterr().out
    bigger = tmp_path / "more.json"
    bigger.write_text(json.dumps(sample_records[:90]))
    assert family_for(spec_for(bigger)).estimate_seconds(params) > 2 * seconds
    capped = family_for(spec_for(bigger, max_chains=30)).estimate_seconds(params)
    assert capped == pytest.approx(seconds, rel=0.3)


def test_the_champion_reloaded_by_alias_gives_the_trained_probabilities(swept, tiny_lm):
    outcome, family, client, _ = swept
    name = registered_name("backtracking", "tiny-llama")
    champion = client.get_model_version_by_alias(name, "champion")
    table = family.results_table(None, family.conditions())
    best = table.loc[table["val_pr_auc"].idxmax()]
    assert (champion.tags["layer"], champion.tags["lag"]) == (str(best["layer"]), str(best["lag"]))
    loaded = load_registered(name)
    layer, lag = int(best["layer"]), int(best["lag"])
    probe = family._layers[("backtracking", layer)].probes[lag]
    prepared = family._data()
    acts = prepared.cache.layer(layer, prepared.tokens[:3])
    x = np.concatenate(acts)
    np.testing.assert_allclose(loaded.predict(x), probe.predict_proba(x), rtol=1e-5, atol=1e-6)
    assert loaded.metadata.metadata["lag"] == lag
    assert loaded.metadata.metadata["dataset_digest"] == prepared.chains.digest
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == [champion.version]  # only the champion by default
    assert [s.name for s in loaded.metadata.signature.inputs.inputs] == ["activations"]
    assert [s.name for s in loaded.metadata.signature.outputs.inputs] == ["probability"]


def test_a_rerun_reuses_finished_runs_and_the_activation_cache(swept, tiny_lm, capsys):
    outcome, _, client, chain_file = swept
    again, _, _ = run(spec_for(chain_file), tiny_lm)
    assert again.summary["reused"].all()
    assert "30 of 30 chains already cached" in capsys.readouterr().out
    name = registered_name("backtracking", "tiny-llama")
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_a_fit_cached_with_the_old_interval_names_loads_under_the_new_ones(swept):
    from types import SimpleNamespace

    from lmlab.cache import DiskCache
    from lmlab.tracking import cache_dir, store_dir

    _, family, _, _ = swept
    cache, layer = DiskCache(cache_dir(store_dir())), LAYERS[0]
    key = family._probe_key("backtracking", layer)
    stored = cache.get_json("probes", key)
    def before(name: str) -> str:  # the name as lmlab wrote it before _ci_lo / _ci_hi
        return name.replace("_ci_lo", "_lo").replace("_ci_hi", "_hi")

    old = {lag: {before(name): v for name, v in metrics.items()}
           for lag, metrics in stored["metrics"].items()}
    assert "test_auroc_lo" in old[str(LAGS[0])]
    cache.put_json("probes", key, {**stored, "metrics": old})
    try:
        loaded = family._load_layer(SimpleNamespace(cache=cache), key, "backtracking", layer)
    finally:
        cache.put_json("probes", key, stored)
    fitted = family._layers[("backtracking", layer)]
    assert {lag: set(m) for lag, m in loaded.metrics.items()} == \
        {lag: set(m) for lag, m in fitted.metrics.items()}


def test_the_parent_shows_the_champion_against_the_stronger_baseline(swept):
    outcome, family, client, _ = swept
    metrics = client.get_run(outcome.parent_run_id).data.metrics
    table = family.results_table(None, family.conditions())
    best = table.loc[table["val_pr_auc"].idxmax()]
    prefix = "headline/backtracking"
    assert metrics[f"{prefix}_test_pr_auc"] == pytest.approx(best["test_pr_auc"])
    stronger = max(best["token_test_pr_auc"], best["persistence_test_pr_auc"])
    assert metrics[f"{prefix}_baseline_test_pr_auc"] == pytest.approx(stronger)
    name = f"{prefix}_gain_over_baseline"
    gain = metrics[name]
    assert gain == pytest.approx(best["test_pr_auc"] - stronger)
    assert metrics[f"{name}_ci_lo"] <= gain <= metrics[f"{name}_ci_hi"]


def test_register_all_registers_every_probe(tracking, sample_records, tiny_lm):
    chain_file = tracking / "chains.json"
    chain_file.write_text(json.dumps(sample_records[:30]))
    _, _, client = run(spec_for(chain_file, register_all=True), tiny_lm)
    name = registered_name("backtracking", "tiny-llama")
    assert len(client.search_model_versions(f"name = '{name}'")) == len(LAYERS) * len(LAGS)


def test_the_viewer_shades_every_chain_token(swept, tiny_lm):
    loaded = load_registered(registered_name("backtracking", "tiny-llama"))
    text = "Two plus two is five.\nWait, that is wrong: it is four."
    scored = score_text(tiny_lm, loaded, text, "What is 2 + 2?")
    assert "".join(scored.pieces) == text
    page = render_html(scored, "probe")
    assert page.count("<span") == len(scored.pieces)
    assert f"layer {loaded.metadata.metadata['layer']}" in page


def _probe_view():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "entrypoints/probe_view.py"
    spec = importlib.util.spec_from_file_location("probe_view", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_viewer_names_a_missing_probe_and_exits_non_zero(tracking, capsys):
    with pytest.raises(SystemExit) as stopped:
        _probe_view().main(["--name", "probe-nothing-here", "--no-log"])
    assert stopped.value.code == 2
    assert "no registered model named 'probe-nothing-here'" in capsys.readouterr().err


def test_a_missing_registered_name_is_a_clear_error(tracking):
    with pytest.raises(LmlabError, match="no registered model named 'probe-nothing'"):
        load_registered("probe-nothing")


@pytest.mark.parametrize("grid, settings, message", [
    ({"label": ["backtracking"], "layer": [0]}, {}, "exactly the keys"),
    ({"label": ["daydreaming"], "layer": [0], "lag": [0]}, {}, "not a chain label"),
    ({"label": ["backtracking"], "layer": [0], "lag": [0]}, {"colour": "red"}, "unknown probes setting"),
    ({"label": ["backtracking"], "layer": [0], "lag": [0.5]}, {}, "must be an integer"),
    ({"label": ["backtracking"], "layer": [0], "lag": [0]}, {"split": [0.9, 0.9, 0.1]}, "split"),
])
def test_bad_specs_are_refused_before_any_work(grid, settings, message):
    raw = {"family": "probes", "name": "bad", "grid": grid, "probes": settings}
    with pytest.raises(LmlabError, match=message):
        family_for(parse_spec(raw))


def test_a_lag_longer_than_every_chain_stops_the_sweep_with_nothing_registered(
        tracking, chain_file, tiny_lm):
    spec = parse_spec({"family": "probes", "name": "long", "model": "tiny-llama",
                       "grid": {"label": ["backtracking"], "layer": [0], "lag": [0, 5000]},
                       "probes": {"data": str(chain_file)}})
    with pytest.raises(LmlabError, match="lag 5000 is longer than every chain"):
        run(spec, tiny_lm)
    assert not mlflow.MlflowClient().search_registered_models()


def test_a_label_that_never_occurs_stops_the_sweep(tracking, tmp_path, sample_records, tiny_lm):
    records = [r for r in sample_records if '["uncertainty-estimation"]' not in r["annotated_chain"]]
    path = tmp_path / "no_uncertainty.json"
    path.write_text(json.dumps(records[:20]))
    spec = parse_spec({"family": "probes", "name": "never", "model": "tiny-llama",
                       "grid": {"label": ["uncertainty-estimation"], "layer": [0], "lag": [0]},
                       "probes": {"data": str(path)}})
    with pytest.raises(LmlabError, match="never occurs"):
        run(spec, tiny_lm)
