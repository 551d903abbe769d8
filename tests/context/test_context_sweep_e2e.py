"""End to end through the sweep runner: MLflow runs, parent plots, and the API key kept out
of params, tags, artifacts, rows and logs."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from context_helpers import api_subject, niah_spec
from lmlab.sweeps.runner import run_sweep

SECRET = "sk-lmlab-test-0123456789abcdefSECRET"


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_niah_sweep_through_the_runner_never_records_the_key(served, proxy_factory, tmp_path,
                                                             monkeypatch, capfd, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"LMLAB_SECRET_KEY={SECRET}\n")  # key only in .env
    monkeypatch.delenv("LMLAB_SECRET_KEY", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    proxy = proxy_factory()
    subject = api_subject(served, proxy.api_base, api_key_env="LMLAB_SECRET_KEY")
    spec = niah_spec({"subject": subject, "row_store": str(tmp_path / "rows.sqlite")},
                     grid={"length": [300, 400], "depth": [0, 100]})
    try:
        outcome = run_sweep(spec, experiment_name="context-e2e")
        again = run_sweep(spec, experiment_name="context-e2e")
    finally:
        mlflow.set_tracking_uri(None)
    assert all(h == f"Bearer {SECRET}" for h in proxy.auth_headers)  # the key was used...
    out, err = capfd.readouterr()
    assert SECRET not in out + err + caplog.text  # ...but never printed or logged
    assert files_containing(tmp_path, SECRET.encode()) == [tmp_path / ".env"]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(outcome.parent_run_id)
    assert "effective_length" in parent.data.metrics
    assert parent.data.metrics["effective_length_n"] == 2  # two needles, the clusters
    # what the loaders read is on the console, in the parent's metrics and its datasets
    assert "data haystack: bundled" in out and "data needles: bundled" in out
    assert parent.data.metrics["data/haystack/rows_kept"] == 6
    assert parent.data.metrics["data/needles/rows_read"] == 8
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {"haystack", "needles"}
    children = client.search_runs([outcome.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.metrics["rows_done"] == 2 for c in children)
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id, "plots")}
    assert {"plots/niah_heatmap.png", "plots/niah_accuracy_vs_tokens.png"} <= artifacts
    assert len(outcome.summary) == 4 and len(again.summary) == 4
    assert len(proxy.forwarded_prompts) == 8  # the second sweep sent nothing
