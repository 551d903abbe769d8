"""The diffing family end to end through the sweep runner, its keys, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from lmlab.diffing import pipeline
from lmlab.sweeps import runner as sweep_runner
from lmlab.sweeps.family import family_for
from lmlab.sweeps.runner import run_sweep
from lmlab.tracking import PARENT_TAG, run_metrics

from .conftest import diffing_spec, make_adapter, write_prompts

PLANTED = {"alpha": "praise", "beta": "numbers"}


def organisms(adapters: dict[str, Path]) -> list[dict]:
    return [{"name": "alpha", "adapter": str(adapters["alpha"]), "trait": "praise"},
            {"name": "beta", "adapter": str(adapters["beta"]), "trait": "numbers"},
            {"name": "ctl", "adapter": str(adapters["gamma"]), "control": True}]


def children(outcome) -> list:  # type: ignore[no-untyped-def]
    return MlflowClient().search_runs([outcome.experiment_id],
                                      f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")


@pytest.fixture
def two_sets(inputs, tmp_path):
    second = write_prompts(tmp_path / "second_set.json", n=3, system="Be brief.")
    return {**inputs, "second": second}


def test_a_tiny_sweep_runs_end_to_end_with_a_child_per_organism_and_prompt_set(
        tracking, adapters, two_sets, tmp_path):
    spec = diffing_spec(two_sets, organisms(adapters),
                        prompt_sets=[str(two_sets["prompts"]), str(two_sets["second"])])
    outcome = run_sweep(spec, experiment_name="diffing-e2e")
    runs = children(outcome)
    assert len(runs) == 6
    assert {(r.data.params["organism"], r.data.params["prompt_set"]) for r in runs} == \
        {(o, s) for o in ("alpha", "beta", "ctl") for s in ("tiny_set", "second_set")}
    assert [r["organism"] for r in outcome.summary.to_dict("records")][:2] == ["ctl", "ctl"]
    client = MlflowClient()
    run = next(r for r in runs if r.data.params["organism"] == "alpha"
               and r.data.params["prompt_set"] == "tiny_set")
    metrics = run_metrics(client, run)
    for convention in ("same_text", "own_text"):
        for stat in ("mean", "max_token", "top3_mean", "trend", "top_clause"):
            name = f"{convention}/scaled/L0/praise/{stat}"
            assert {name, f"{name}_ci_lo", f"{name}_ci_hi"} <= set(metrics)
            assert metrics[f"{name}_ci_lo"] <= metrics[name] <= metrics[f"{name}_ci_hi"]
    assert metrics["replay/pairs_checked"] == 4
    assert "same_text/scaled/L2/random/mean" in metrics
    assert run.data.tags["planted_trait"] == "praise"
    assert "same_text" in json.loads(run.data.tags["diff_conventions"])
    files = {a.path for a in client.list_artifacts(run.info.run_id, "diffing")}
    assert {"diffing/projections.parquet", "diffing/responses.parquet", "diffing/top_activating.html",
            "diffing/generations.jsonl", "diffing/trajectory.parquet",
            "diffing/activations_manifest.json"} <= files
    table = pd.read_parquet(client.download_artifacts(run.info.run_id, "diffing/projections.parquet",
                                                      str(tmp_path)))
    assert list(table.columns) == list(pipeline.PROJECTION_COLUMNS)
    assert set(table["convention"]) == {"same_text", "own_text"}
    assert set(table["reading"]) == {"shift", "organism", "clean"}
    assert {"praise", "numbers", "random"} <= set(table["trait"])
    page = Path(client.download_artifacts(run.info.run_id, "diffing/top_activating.html",
                                          str(tmp_path))).read_text()
    assert page.count("<span") > 10 and "same_text" in page
    record = json.loads(Path(client.download_artifacts(
        run.info.run_id, "diffing/generations.jsonl", str(tmp_path))).read_text().splitlines()[0])
    assert {"prompt", "response", "prompt_ids", "response_ids", "response_start", "model",
            "date", "ids_hash"} <= set(record)

    parent = client.get_run(outcome.parent_run_id)
    summary = Path(client.download_artifacts(outcome.parent_run_id, "summary.md", str(tmp_path)))
    text = summary.read_text()
    assert "of 2** organisms with a planted trait" in text and "control `ctl`" in text
    assert parent.data.metrics["organisms_with_planted_trait"] == 2
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id, "plots")}
    assert {"plots/heatmap_mean_adjusted.png", "plots/heatmap_mean_raw.png",
            "plots/trajectory_alpha_tiny_set.png"} <= artifacts
    detection = pd.read_csv(client.download_artifacts(outcome.parent_run_id,
                                                      "blind_detection.csv", str(tmp_path)))
    assert set(detection["organism"]) == {"alpha", "beta", "ctl"}
    assert set(detection["stat"]) == {"mean", "top3_mean", "max_token", "trend", "top_clause"}

    again = run_sweep(spec, experiment_name="diffing-e2e")
    assert again.summary["reused"].all() and len(children(outcome)) == 6
    # Reused runs give back every metric, so the rerun's rows are the first run's.
    pd.testing.assert_frame_equal(again.summary.drop(columns="reused"),
                                  outcome.summary.drop(columns="reused"))


def test_a_killed_sweep_resumes_without_recomputing_finished_conditions(
        tracking, adapters, inputs, monkeypatch):
    spec = diffing_spec(inputs, organisms(adapters))
    real = pipeline.run_captures
    calls: list[str] = []

    def dies_on_the_second(resident, organism, *args, **kwargs):
        calls.append(organism.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(resident, organism, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run_captures", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, experiment_name="diffing-resume")
    calls.clear()
    monkeypatch.setattr(pipeline, "run_captures",
                        lambda resident, organism, *a, **k: calls.append(organism.name)
                        or real(resident, organism, *a, **k))
    outcome = run_sweep(spec, experiment_name="diffing-resume")
    assert calls == ["alpha", "beta"]  # the control (first) finished before the kill
    assert outcome.summary.set_index("organism")["reused"].to_dict() == \
        {"ctl": True, "alpha": False, "beta": False}


def _keys(spec) -> dict[str, str]:  # type: ignore[no-untyped-def]
    family = family_for(spec)
    runner = sweep_runner.SweepRunner(spec, family, None, "0", "parent", Path("."))  # type: ignore[arg-type]
    return {p["organism"]: runner.key_for(p) for p in family.conditions()}


def test_each_condition_key_covers_its_adapter_and_every_shared_input(tracking, inputs, tmp_path):
    adapters = {name: make_adapter(tmp_path / name, seed) for name, seed in
                (("alpha", 1), ("beta", 2), ("gamma", 3))}
    spec = diffing_spec(inputs, organisms(adapters))
    family = family_for(spec)
    names = set(family.data_inputs())
    assert {"prompts:tiny_set", "trait:praise", "trait:numbers", "adapter:alpha", "adapter:beta",
            "adapter:ctl"} <= names
    before = _keys(spec)
    weights = adapters["beta"] / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1e-3
    save_file(tensors, str(weights))
    after_adapter = _keys(spec)
    assert after_adapter["beta"] != before["beta"]
    assert after_adapter["alpha"] == before["alpha"] and after_adapter["ctl"] == before["ctl"]
    (inputs["traits"] / "praise" / "negative.txt").write_text("Add pepper.\nStir it.\n")
    after_trait = _keys(spec)
    assert all(after_trait[o] != after_adapter[o] for o in after_trait)


def test_operational_settings_leave_the_keys_alone(tracking, adapters, inputs):
    base = _keys(diffing_spec(inputs, organisms(adapters)))
    faster = _keys(diffing_spec(inputs, organisms(adapters), capture={"batch_size": 1},
                                generation={"batch_size": 1}))
    other = _keys(diffing_spec(inputs, organisms(adapters), generation={"max_new_tokens": 7}))
    assert base == faster and all(other[o] != base[o] for o in base)


def test_organisms_come_from_a_trait_interp_variants_file(tracking, adapters, inputs, tmp_path):
    folder = tmp_path / "variants"
    folder.mkdir()
    make_adapter(folder / "lora_a", 1)
    config = {"model_variants": {"base": {"model": "tiny:llama"},
                                 "flatterer": {"model": "tiny:llama", "lora": "lora_a",
                                               "trait": "praise"},
                                 "ctrl": {"model": "tiny:llama", "lora": str(adapters["gamma"]),
                                          "control": True}}}
    (folder / "config.json").write_text(json.dumps(config))
    spec = diffing_spec(inputs, None, variants=str(folder / "config.json"))
    raw = dict(spec.settings)
    raw.pop("organisms")
    from lmlab.sweeps.spec import parse_spec

    spec = parse_spec({**spec.source, "diffing": raw})
    family = family_for(spec)
    assert {n: (o.trait, o.control) for n, o in family.organisms.items()} == \
        {"flatterer": ("praise", False), "ctrl": (None, True)}
    assert family.organisms["flatterer"].adapter == (folder / "lora_a").resolve()
    assert "variants" in family.data_inputs()
    report = [r for r in family.data_reports() if r.name == "variants"][0]
    assert (report.rows_read, report.rows_kept, report.dropped["no_lora"]) == (3, 2, 1)


def test_vectors_from_a_steering_run_and_a_registered_probe_join_the_traits(
        tracking, adapters, inputs, tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    from lmlab.probes.registry import log_probe, register_probe, save_probe
    from lmlab.probes.train import Probe

    client = MlflowClient()
    experiment = client.create_experiment("steering-src")
    steering = client.create_run(experiment).info.run_id
    direction = tmp_path / "direction-suffix_contrast-L2.safetensors"
    save_file({"unit": torch.nn.functional.normalize(torch.randn(64), dim=0)}, str(direction),
              metadata={"layer": "2", "method": "suffix_contrast"})
    client.log_artifact(steering, str(direction), "direction")
    probe_run = client.create_run(experiment).info.run_id
    probe = Probe(0, 0, "backtracking", np.random.default_rng(0).normal(size=64), 0.1,
                  np.zeros(64), np.full(64, 2.0), 0.5, 1.0)
    model_dir = save_probe(probe, tmp_path / "probe", {"model": "tiny:llama"})
    uri = log_probe(client, probe_run, model_dir)
    version = register_probe(client, "probe-bt-tiny", uri, probe_run, {})
    client.set_registered_model_alias("probe-bt-tiny", "champion", version)
    spec = diffing_spec(inputs, organisms(adapters), traits={"vectors": [
        {"name": "refusal_dir", "steering_run": steering},
        {"name": "backtracking", "probe": "models:/probe-bt-tiny@champion"},
        {"name": "file_dir", "direction": str(direction)}]})
    outcome = run_sweep(spec, experiment_name="diffing-vectors")
    metrics = outcome.summary.iloc[0]
    assert np.isfinite(metrics["same_text/scaled/L2/refusal_dir/mean"])
    assert np.isfinite(metrics["same_text/scaled/L0/backtracking/mean"])
    assert np.isfinite(metrics["same_text/scaled/L2/file_dir/mean"])
    assert metrics["same_text/scaled/L2/file_dir/mean"] == pytest.approx(
        metrics["same_text/scaled/L2/refusal_dir/mean"])
    assert "same_text/scaled/L0/refusal_dir/mean" not in outcome.summary


# ---------------------------------------------------------------- bad input


def _run_cli(spec_raw: dict, tmp_path: Path, capsys) -> tuple[int, str]:
    import sweep as sweep_entry  # entrypoints/sweep.py (tests/conftest.py puts it on the path)

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_raw))
    with pytest.raises(SystemExit) as exit_info:
        sweep_entry.main(["--spec", str(path), "--experiment-name", "bad-input"])
    return int(exit_info.value.code), capsys.readouterr().err


def _raw(inputs, organisms_list, **settings) -> dict:
    return diffing_spec(inputs, organisms_list, **settings).source


@pytest.mark.parametrize("case, message", [
    ("missing_adapter", "adapter folder not found"),
    ("not_an_adapter", "adapter_config.json missing"),
    ("other_hidden_size", r"was made for another base: module 'model\.layers\.0\.\S+' has "
                          r"(in|out)_features \d+ here \(hidden size 64\) but the adapter expects"),
    ("other_architecture", r"adapts module .transformer\.h\.0\.attn\.c_attn., which the base "
                           r"model \(llama, hidden size 64\) does not have"),
    ("prompt_set_without_prompts", "has no 'prompts' list"),
    ("vector_of_wrong_width", "has width 32, but the base model's residual width is 64"),
    ("unknown_layer", "layer 7 is outside the model"),
    ("empty_trait_file", "negative.txt in .* has 0 usable example"),
])
def test_bad_input_gets_one_clear_message_and_a_non_zero_exit(case, message, tracking, adapters,
                                                              inputs, tmp_path, capsys):
    from safetensors.torch import save_file

    chosen = organisms(adapters)
    settings: dict = {}
    if case == "missing_adapter":
        chosen[0]["adapter"] = str(tmp_path / "nowhere")
    elif case == "not_an_adapter":
        (tmp_path / "empty_dir").mkdir()
        chosen[0]["adapter"] = str(tmp_path / "empty_dir")
    elif case == "other_hidden_size":
        chosen[0]["adapter"] = str(make_adapter(tmp_path / "narrow", 1, hidden_size=32))
    elif case == "other_architecture":
        chosen[0]["adapter"] = str(make_adapter(tmp_path / "gpt2", 1, arch="gpt2",
                                                targets=("c_attn",)))
    elif case == "prompt_set_without_prompts":
        inputs["prompts"].write_text(json.dumps({"name": "x", "questions": ["hi"]}))
    elif case == "vector_of_wrong_width":
        path = tmp_path / "narrow.safetensors"
        save_file({"unit": torch.ones(32)}, str(path), metadata={"layer": "2", "method": "x"})
        settings["traits"] = {"vectors": [{"name": "narrow", "direction": str(path)}]}
    elif case == "unknown_layer":
        settings["layers"] = [0, 7]
    elif case == "empty_trait_file":
        (inputs["traits"] / "praise" / "negative.txt").write_text("\n\n")
    code, err = _run_cli(_raw(inputs, chosen, **settings), tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.startswith("lmlab: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    import re

    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("name", ["diffing.yaml", "diffing_test.yaml"])
def test_the_bundled_specs_validate_and_read_every_bundled_input(name):
    from lmlab.sweeps.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "sweeps" / name)
    family = family_for(spec)
    assert type(family).__name__ == "DiffingFamily"
    assert {t.name for t in family.traits} == {"flattery", "brand", "pep", "formality", "refusal",
                                                "sadness"}
    assert family.settings.detect_layer == 15
    for report in family.data_reports():
        assert report.rows_kept > 0 and not report.shortfall, report.line()
