"""What a sweep leaves for the MLflow UI: one experiment per family, a parent named after
the spec and its date, children named after their condition, headline metrics on the
parent, and a last line that opens the runs table in the classic view.

Steering on a tiny random model, so these check bookkeeping, not steering quality.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from lmlab import stats
from lmlab.steering.family import headline
from lmlab.sweeps.runner import LAUNCHER_TAG, run_sweep, ui_hint
from lmlab.sweeps.spec import parse_spec
from lmlab.tracking import PARENT_TAG
from lmlab.ui import SHARED_VIEW_TAG, keep_price_table_local, runs_url

TINY_SPEC = {
    "family": "steering",
    "name": "tiny",
    "model": {"name": "tiny:llama"},
    "grid": {"method": ["suffix_contrast"], "layer": [1], "alpha": [0.5], "intervention": ["add"]},
    "steering": {"n_prompts": 3, "n_train": 4, "eval_splits": ["harm_test", "benign"],
                 "generation": {"max_new_tokens": 4, "batch_size": 4}, "kl_tokens": 2},
}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    return tmp_path


def children_of(experiment_id: str, parent_id: str) -> list:
    return MlflowClient().search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'")


def test_a_sweep_lands_in_its_familys_experiment_under_a_dated_name(store: Path) -> None:
    outcome = run_sweep(parse_spec(TINY_SPEC))
    client = MlflowClient()
    assert client.get_experiment(outcome.experiment_id).name == "steering"
    parent = client.get_run(outcome.parent_run_id)
    assert re.fullmatch(r"tiny \d{4}-\d\d-\d\d \d\d:\d\d", parent.info.run_name)
    names = {r.info.run_name for r in children_of(outcome.experiment_id, outcome.parent_run_id)}
    assert "baseline [harm_test+benign]" in names
    assert "suffix_contrast add L1 add_norm_multiple=0.5 [harm_test+benign]" in names
    # The parent answers "what did this sweep find" with an interval.
    metrics = parent.data.metrics
    for name in ("headline/refusal_gain_vs_random", "headline/refusal", "headline/benign_cost"):
        assert metrics[f"{name}_ci_lo"] <= metrics[name] <= metrics[f"{name}_ci_hi"]
    assert parent.data.tags["lmlab.headline"].startswith("suffix_contrast add layer 1")


def readme_search_strings() -> list[str]:
    """The search strings the README shows (its comment lines start with #)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("Search strings for the runs table's search box", 1)[1]
    block = block.split("```text\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_readmes_search_strings_run_on_a_store_and_name_metrics_its_runs_show(
        store: Path) -> None:
    from lmlab.probes.chains import SAMPLE_PATH

    chains = store / "chains.json"
    chains.write_text(json.dumps(json.loads(SAMPLE_PATH.read_text())[:30]))
    probes = {"family": "probes", "name": "tiny-probes", "model": {"name": "tiny:llama"},
              "grid": {"label": ["backtracking"], "layer": [0, 2], "lag": [0, 2]},
              "probes": {"data": str(chains), "bootstrap": 20, "batch_size": 8}}
    experiments = [run_sweep(parse_spec(raw)).experiment_id for raw in (TINY_SPEC, probes)]
    client = MlflowClient()
    logged = {name for run in client.search_runs(experiments) for name in run.data.metrics}
    strings = readme_search_strings()
    assert len(strings) >= 8
    found = {}
    for search in strings:
        found[search] = len(client.search_runs(experiments, search))  # valid, or MLflow raises
        for name in re.findall(r"metrics\.`?([\w/.]+)`?", search):
            assert name in logged, f"{search!r}: no run shows the metric {name!r}"
    assert found["tags.`lmlab.role` = 'sweep'"] == 2
    assert found["params.control_for = 'suffix_contrast'"] == 1


def test_the_last_lines_open_the_classic_runs_view_with_the_headline_columns(store: Path) -> None:
    outcome = run_sweep(parse_spec(TINY_SPEC))
    hint = ui_hint(outcome)
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True mlflow ui --backend-store-uri sqlite:///" in hint
    assert hint.splitlines()[-1].endswith(
        f"/#/experiments/{outcome.experiment_id}/runs?viewStateShareKey={outcome.view_key}"
        "&workflowType=machine_learning")
    experiment = MlflowClient().get_experiment(outcome.experiment_id)
    view = json.loads(experiment.tags[f"{SHARED_VIEW_TAG}{outcome.view_key}"])
    assert "metrics.`headline/refusal_gain_vs_random`" in view["selectedColumns"]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_named_experiment_still_wins(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outcome = run_sweep(parse_spec(TINY_SPEC), experiment_name="mine")
    assert MlflowClient().get_experiment(outcome.experiment_id).name == "mine"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    outcome = run_sweep(parse_spec(TINY_SPEC))
    assert MlflowClient().get_experiment(outcome.experiment_id).name == "from-env"


def test_mlflow_run_in_default_points_at_a_parent_in_the_family_experiment(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mlflow run . -e sweep` with no experiment makes its run in Default (id 0)."""
    client = MlflowClient()
    launcher = client.create_run("0").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher)
    outcome = run_sweep(parse_spec(TINY_SPEC))
    assert client.get_experiment(outcome.experiment_id).name == "steering"
    assert outcome.parent_run_id != launcher
    assert client.get_run(launcher).data.tags[LAUNCHER_TAG] == outcome.parent_run_id
    assert len(children_of(outcome.experiment_id, outcome.parent_run_id)) == 3


def test_mlflow_run_with_an_experiment_keeps_its_run_as_the_parent(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient()
    chosen = client.create_experiment("chosen")
    run_id = client.create_run(chosen).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    outcome = run_sweep(parse_spec(TINY_SPEC))
    assert (outcome.parent_run_id, outcome.experiment_id) == (run_id, chosen)
    assert client.get_run(run_id).info.run_name.startswith("tiny 20")


def test_headline_picks_the_largest_gain_over_the_matched_control() -> None:
    def row(method, control_for, alpha, refusal, cost):  # type: ignore[no-untyped-def]
        est, benign = stats.rate([True] * refusal + [False] * (10 - refusal)), \
            stats.rate([True] * cost + [False] * (10 - cost))
        return {"method": method, "control_for": control_for, "layer": 1, "intervention": "add",
                "scope": "layer", "add_norm_multiple": alpha, "run_id": f"{method}{alpha}",
                **est.to_dict("harm_test/refusal"), **benign.to_dict("benign/cost")}

    frame = pd.DataFrame([
        row("suffix_contrast", None, 0.25, 6, 1), row("random", "suffix_contrast", 0.25, 1, 0),
        row("suffix_contrast", None, 0.5, 9, 8), row("random", "suffix_contrast", 0.5, 7, 2)])
    found, tags = headline(frame)
    # 0.25: 0.6 - 0.1 = 0.5 beats 0.5: 0.9 - 0.7 = 0.2, although 0.5 refuses more.
    assert found["headline/refusal_gain_vs_random"] == pytest.approx(0.5)
    assert found["headline/refusal"] == pytest.approx(0.6)
    assert found["headline/benign_cost"] == pytest.approx(0.1)
    gain = "headline/refusal_gain_vs_random"
    assert found[f"{gain}_ci_lo"] < 0.5 < found[f"{gain}_ci_hi"]
    assert tags["lmlab.headline_run"] == "suffix_contrast0.25"


def test_newcombe_interval_of_a_known_difference() -> None:
    # Newcombe (1998) table II, example (a): 56/70 - 48/80 = 0.2, method 10: 0.0524 to 0.3339.
    a = stats.rate([True] * 56 + [False] * 14)
    b = stats.rate([True] * 48 + [False] * 32)
    d = stats.rate_difference(a, b)
    assert d.value == pytest.approx(0.2)
    assert (d.lower, d.upper) == (pytest.approx(0.0524, abs=1e-4), pytest.approx(0.3339, abs=1e-4))


def test_lmlab_keeps_litellm_off_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LITELLM_LOCAL_MODEL_COST_MAP", raising=False)
    keep_price_table_local()
    import os

    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"


def test_runs_url_without_a_view_still_asks_for_the_classic_view() -> None:
    assert runs_url("http://h:1/", "7") == "http://h:1/#/experiments/7/runs?workflowType=machine_learning"


def test_scaled_estimate_uses_the_measured_ratio_then_seconds_per_unit() -> None:
    from lmlab.sweeps.throughput import Measured, scaled_estimate

    history = [Measured(10.0, 2.0, 5.0), Measured(30.0, 6.0, 5.0)]  # 5x the reference
    assert scaled_estimate(history, 3.0, 1.0) == pytest.approx(15.0)
    assert scaled_estimate(history, 0.0, 2.0) == pytest.approx(8.0)  # 4 s per unit
    assert scaled_estimate([], 3.0, 1.0) is None


def test_the_second_plan_is_measured_on_this_machine(store: Path, capsys: pytest.CaptureFixture) -> None:
    from lmlab.sweeps.throughput import FILE_NAME

    run_sweep(parse_spec(TINY_SPEC))
    first = capsys.readouterr().out
    assert "at reference CPU rates, not yet measured on this machine" in first
    rows = json.loads((store / ".lmlab" / FILE_NAME).read_text())
    measured = next(v for k, v in rows.items() if "|steering|" in k and not k.endswith("|prepare"))
    assert len(measured) == 3 and all(seconds > 0 for seconds, _, _ in measured)
    spec = {**TINY_SPEC, "grid": {**TINY_SPEC["grid"], "alpha": [0.75]}}
    run_sweep(parse_spec(spec))
    second = capsys.readouterr().out
    plan = next(line for line in second.splitlines() if line.startswith("sweep 'tiny'"))
    assert "1 already finished, 2 to run" in plan
    assert "measured on this machine over 3 earlier condition(s)" in plan


def test_longmemeval_headline_is_focused_against_full_accuracy() -> None:
    from lmlab.context.family import headline as context_headline

    focused, full = stats.rate([True, True, False]), stats.rate([True, False, False])
    found, _ = context_headline({**focused.to_dict("focused_accuracy"),
                                 **full.to_dict("full_accuracy")}, {})
    assert found["headline/accuracy_shortest"] == pytest.approx(2 / 3)
    assert found["headline/accuracy_longest_ci_hi"] == pytest.approx(full.upper)
    assert found["headline/accuracy_longest_n"] == 3


def test_every_entry_point_keeps_the_price_table_local(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    code = ("import sys; sys.path.insert(0, 'entrypoints'); import _bootstrap, os; "
            "print(os.environ['LITELLM_LOCAL_MODEL_COST_MAP'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def test_plain_mlflow_run_lands_the_sweep_in_the_familys_experiment(store: Path) -> None:
    """The real `mlflow run . -e sweep`, no experiment given: its own run stays in Default
    as a launcher, the parent and children are in `steering`."""
    import os
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    spec = store / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY_SPEC))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "LMLAB_STORE_DIR": str(store / ".lmlab"),
           "PYTHONPATH": str(root / "src"),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    MlflowClient().search_experiments()  # the schema, before mlflow run uses the store
    done = subprocess.run([sys.executable, "-m", "mlflow", "run", str(root), "-e", "sweep",
                           "--env-manager", "local", "-P", f"spec={spec}"],
                          cwd=store, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient()
    [launcher] = client.search_runs(["0"])
    steering = client.get_experiment_by_name("steering")
    [parent] = client.search_runs([steering.experiment_id], "tags.`lmlab.role` = 'sweep'")
    assert launcher.data.tags[LAUNCHER_TAG] == parent.info.run_id
    assert launcher.info.status == parent.info.status == "FINISHED"
    assert len(children_of(steering.experiment_id, parent.info.run_id)) == 3
    assert f"#/experiments/{steering.experiment_id}/runs?viewStateShareKey=" in done.stdout
