"""The probes pipeline on the embedded model (slow): sweep, registry, viewer entry point."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lmlab.sweeps.spec import load_spec

from .test_family import run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.embedded,
              pytest.mark.filterwarnings("ignore:.*Add type hints:UserWarning")]


def _probe_view():
    spec = importlib.util.spec_from_file_location("probe_view", ROOT / "entrypoints/probe_view.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quick_sweep_finds_backtracking_beyond_the_token_baseline(tracking, tmp_path):
    from lmlab.models import load_model

    spec = load_spec(ROOT / "sweeps/probes_test.yaml")
    outcome, family, client = run(spec, load_model(spec.model))
    rows = outcome.summary.set_index("lag")
    assert len(rows) == 6
    lag0 = rows[rows["layer"] == 14].loc[0]
    assert lag0["test_auroc"] > 0.8
    assert lag0["test_auroc"] > lag0["shuffled_test_auroc"] + 0.2
    assert lag0["test_pr_auc"] > lag0["token_test_pr_auc"]
    assert (rows["fits_unconverged"] == 0).all()  # every L-BFGS fit converged at max_iter 300
    lagged = rows.loc[[-2, 2]]
    assert lagged["persistence_test_auroc"].notna().all()
    print("\nembedded probes:\n" + rows.reset_index()[
        ["layer", "lag", "test_auroc", "test_pr_auc", "token_test_pr_auc",
         "persistence_test_pr_auc", "shuffled_test_auroc", "probe_minus_token_test_pr_auc_ci_lo",
         "beats_baselines", "fit_iterations"]].to_string(index=False))
    champion = client.get_model_version_by_alias("probe-backtracking-smollm2-135m", "champion")
    print(f"champion: v{champion.version} layer {champion.tags['layer']} lag "
          f"{champion.tags['lag']} val PR-AUC {champion.tags['val_pr_auc']}")

    out = tmp_path / "view.html"
    _probe_view().main(["--out", str(out), "--no-log"])
    page = out.read_text()
    assert "Wait" in page and "<span" in page
