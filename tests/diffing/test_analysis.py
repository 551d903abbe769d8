"""Per-response statistics, shared-shift removal, ranking and blind detection on known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lmlab.diffing import analysis


def test_the_position_trend_is_the_change_across_a_response():
    assert analysis.trend(np.linspace(0.0, 2.0, 11)) == pytest.approx(2.0)
    assert analysis.trend(np.full(7, 3.0)) == pytest.approx(0.0)
    assert np.isnan(analysis.trend(np.array([1.0])))


def test_response_statistics_on_a_known_response():
    scores = np.array([0.0, 1.0, 5.0, 2.0, 4.0, 0.0])
    spans = analysis.clause_spans(["Hi", ",", " you", " there", ".", " ok"])
    assert spans == [(0, 2), (2, 5), (5, 6)]
    stats = analysis.response_stats(scores, spans)
    assert stats["mean"] == pytest.approx(2.0)
    assert stats["max_token"] == 5.0
    assert stats["top3_mean"] == pytest.approx((5 + 4 + 2) / 3)
    assert stats["top_clause"] == pytest.approx((5 + 2 + 4) / 3)


def test_trajectory_bins_follow_relative_position():
    curve = analysis.binned_trajectory(np.arange(10.0), bins=5)
    np.testing.assert_allclose(curve, [0.5, 2.5, 4.5, 6.5, 8.5])
    assert np.isnan(analysis.binned_trajectory(np.array([]), 3)).all()


def _values(shifts: dict[tuple[str, str, str], np.ndarray]) -> pd.DataFrame:
    """(organism, trait, stat) -> one value per response unit."""
    rows = []
    for (organism, trait, stat), values in shifts.items():
        for unit, value in enumerate(values):
            rows.append({"organism": organism, "prompt_set": "s", "prompt_id": f"p{unit}",
                         "convention": "same_text", "layer": 1, "trait": trait,
                         "method": "mean_diff", "stat": stat, "value": float(value)})
    return pd.DataFrame(rows)


def test_shared_shift_removal_subtracts_the_mean_over_organisms_per_response():
    values = _values({("a", "t", "mean"): np.array([1.0, 2.0]),
                      ("b", "t", "mean"): np.array([3.0, 6.0])})
    adjusted = analysis.remove_shared_shift(values)
    assert adjusted["shared"].tolist() == [2.0, 4.0, 2.0, 4.0]
    assert adjusted["adjusted"].tolist() == [-1.0, -2.0, 1.0, 2.0]


def test_a_common_persona_dominates_the_raw_ranking_but_not_the_adjusted_one():
    rng = np.random.default_rng(0)
    noise = lambda: rng.normal(0, 0.05, 30)  # noqa: E731
    shifts = {}
    for organism in ("flat", "ctl"):
        shifts[(organism, "persona", "mean")] = 1.0 + noise()  # every fine-tune has it
        shifts[(organism, "random", "mean")] = noise()
    shifts[("flat", "flattery", "mean")] = 0.5 + noise()
    shifts[("ctl", "flattery", "mean")] = noise()
    table = analysis.ranked(_values(shifts), n_resamples=300, seed=0)
    flat = table[table["organism"] == "flat"].set_index("trait")
    assert flat.loc["persona", "rank_raw"] == 1 and flat.loc["flattery", "rank_raw"] == 2
    assert flat.loc["flattery", "rank_adjusted"] == 1
    assert flat.loc["flattery", "estimate_adjusted_ci_lo"] > 0


def test_blind_detection_finds_a_growing_trait_by_its_trend_when_the_mean_misses_it():
    rng = np.random.default_rng(1)
    noise = lambda scale=0.05: rng.normal(0, scale, 40)  # noqa: E731
    shifts = {}
    traits = ("pep", "flattery", "random")
    for organism in ("pep_org", "flat_org", "ctl"):
        for trait in traits:
            for stat in ("mean", "trend"):
                shifts[(organism, trait, stat)] = noise()
    # pep grows along the response: no mean shift, a strong positive trend.
    shifts[("pep_org", "pep", "trend")] = 1.0 + noise()
    shifts[("flat_org", "flattery", "mean")] = 0.8 + noise()
    table = analysis.ranked(_values(shifts), n_resamples=300, seed=0)
    planted = {"pep_org": "pep", "flat_org": "flattery", "ctl": None}
    found = analysis.findings(table, planted, "same_text", 1, "mean_diff", ["mean", "trend"],
                              ["random"])
    by = {(f.organism, f.stat): f for f in found}
    assert by[("pep_org", "trend")].detected and not by[("pep_org", "mean")].detected
    assert by[("flat_org", "mean")].detected
    assert not any(f.found for f in found if f.organism == "ctl")
    detection = analysis.detection_table(found)
    assert detection.query("organism == 'pep_org' and stat == 'trend'")["planted_rank"].item() == 1


def test_a_top_trait_inside_the_random_controls_band_is_no_finding():
    rng = np.random.default_rng(2)
    shifts = {("o", "t", "mean"): 0.3 + rng.normal(0, 0.05, 30),
              ("o", "random", "mean"): 0.25 + rng.normal(0, 0.3, 30),
              ("p", "t", "mean"): rng.normal(0, 0.05, 30) - 0.3,
              ("p", "random", "mean"): rng.normal(0, 0.05, 30) - 0.25}
    table = analysis.ranked(_values(shifts), n_resamples=300, seed=0)
    found = analysis.findings(table, {"o": "t"}, "same_text", 1, "mean_diff", ["mean"], ["random"])
    assert found[0].top_trait == "t" and found[0].top.lower > 0
    assert found[0].random_upper > found[0].top.value and not found[0].detected


def test_the_random_control_is_pooled_over_directions():
    # Each direction's interval excludes 0 (a consistent shift), but the directions scatter
    # around 0, so a direction drawn at random shows nothing beyond its interval.
    estimates = [0.02, -0.015, 0.01, -0.02, 0.005, -0.01]
    table = pd.DataFrame({"organism": "a", "convention": "same_text", "layer": 1,
                          "method": "mean_diff", "stat": "mean",
                          "trait": ["random"] + [f"random_{k}" for k in range(2, 7)],
                          "estimate_adjusted": estimates,
                          "estimate_adjusted_ci_lo": [e - 0.004 for e in estimates],
                          "estimate_adjusted_ci_hi": [e + 0.004 for e in estimates]})
    table = pd.concat([table, table.assign(trait="flattery", estimate_adjusted=0.5)])
    pooled = analysis.random_pooled(table, ["random"] + [f"random_{k}" for k in range(2, 7)],
                                    300, 0)
    row = pooled.iloc[0]
    assert row["directions"] == 6 and row["estimate_ci_lo"] < 0 < row["estimate_ci_hi"]
    assert row["largest_hi"] == pytest.approx(0.024) and row["largest_abs"] == pytest.approx(0.02)
    assert analysis.outside_zero(pooled).empty
    shifted = table.assign(estimate_adjusted=table["estimate_adjusted"] + 0.1)
    assert len(analysis.outside_zero(analysis.random_pooled(shifted, ["random"], 300, 0))) == 1
    assert analysis.is_random("random_12") and not analysis.is_random("random_walk")


def test_a_finding_needs_its_whole_interval_above_the_random_band():
    # The point estimate clears the band, its interval does not: no finding.
    rng = np.random.default_rng(3)
    shifts = {("o", "t", "mean"): 0.35 + np.tile([1.0, -1.0], 15),  # mean 0.35, sd 1
              ("o", "random", "mean"): 0.20 + rng.normal(0, 0.01, 30),
              ("p", "t", "mean"): -0.30 + rng.normal(0, 0.01, 30),
              ("p", "random", "mean"): -0.20 + rng.normal(0, 0.01, 30)}
    table = analysis.ranked(_values(shifts), n_resamples=300, seed=0)
    found = analysis.findings(table, {"o": "t"}, "same_text", 1, "mean_diff", ["mean"], ["random"])
    assert found[0].top_trait == "t" and found[0].top.value > found[0].random_upper
    assert found[0].top.lower < found[0].random_upper and not found[0].detected


def test_random_pooled_values_of_extreme_statistics_are_a_band_not_a_test():
    # An organism whose shifts vary more has larger maxima along any direction: a pooled
    # max_token that excludes 0 is expected and is not counted; a pooled mean is.
    estimates = [0.02, 0.021, 0.019, 0.022, 0.018, 0.02]
    names = ["random"] + [f"random_{k}" for k in range(2, 7)]
    base = pd.DataFrame({"organism": "a", "convention": "same_text", "layer": 1,
                         "method": "mean_diff", "trait": names, "estimate_adjusted": estimates,
                         "estimate_adjusted_ci_lo": [e - 0.004 for e in estimates],
                         "estimate_adjusted_ci_hi": [e + 0.004 for e in estimates]})
    extreme = analysis.random_pooled(base.assign(stat="max_token"), names, 300, 0)
    linear = analysis.random_pooled(base.assign(stat="mean"), names, 300, 0)
    assert extreme.iloc[0]["estimate_ci_lo"] > 0 and analysis.outside_zero(extreme).empty
    assert len(analysis.outside_zero(linear)) == 1
