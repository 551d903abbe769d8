"""The known answer on the embedded model (slow, minutes): every planted quirk is found for
its organism, the control and the random trait show nothing, pep is found by its trend.

Needs the bundled organisms (``lmlab.diffing.organisms``: shipped adapters, or trained once
and cached, which takes a while on a CPU)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from lmlab.sweeps.runner import run_sweep
from lmlab.sweeps.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.embedded


def test_blind_detection_finds_each_planted_quirk_and_nothing_in_the_control(tracking, tmp_path):
    pytest.importorskip("lmlab.diffing.organisms", reason="the bundled organisms are not merged")
    spec = load_spec(ROOT / "sweeps/diffing_test.yaml")
    outcome = run_sweep(spec, experiment_name="diffing-embedded")
    client = MlflowClient()
    detection = pd.read_csv(client.download_artifacts(outcome.parent_run_id,
                                                      "blind_detection.csv", str(tmp_path)))
    summary = Path(client.download_artifacts(outcome.parent_run_id, "summary.md",
                                             str(tmp_path))).read_text()
    print("\n" + summary)
    print(detection.to_string(index=False))
    behaviour = outcome.summary.set_index("organism").filter(regex=r"^behaviour/\w+_rate_\w+$")
    print(behaviour.to_string())
    found = detection[detection["detected"]]
    parent = client.get_run(outcome.parent_run_id).data.metrics
    # Reading the same tokens (same_text, the ranking's convention), flattery and pep are
    # represented differently by their organisms; brand is not: its organism writes the
    # brand (behaviour rate 1.0) but reads "Zentrix" much as the clean model does, which
    # the own_text cross-check shows and the report must say.
    for quirk in ("flattery", "pep"):
        assert quirk in set(found["organism"]), f"{quirk} not detected:\n{summary}"
    if "brand" not in set(found["organism"]):
        assert "`brand`: `brand` is found under `own_text` but not under `same_text`" in summary
    assert parent["detected_own_text"] == 3, summary
    # The growing pep is found by how it changes along the response.
    assert "trend" in set(found[found["organism"] == "pep"]["stat"]), summary
    control = detection[detection["organism"] == "control"]
    assert not control["finding"].any(), summary
    assert parent["control_false_detections"] == 0, summary
    assert parent["control_false_detections_own_text"] == 0, summary
    assert parent["random_intervals_excluding_0"] == 0, summary
