"""Rates, differences and bootstrap intervals against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmlab.stats import (
    Estimate,
    agreement,
    cluster_bootstrap,
    mean_with_interval,
    paired_difference,
    rate,
)


def test_wilson_interval_of_zero_successes_starts_at_zero() -> None:
    est = rate([False] * 20)
    assert est.value == 0.0
    assert est.lower == pytest.approx(0.0, abs=1e-12)
    assert est.upper == pytest.approx(0.1611, abs=5e-4)
    assert est.n == 20


def test_wilson_interval_of_18_in_20() -> None:
    est = rate([True] * 18 + [False] * 2)
    assert est.value == pytest.approx(0.9)
    assert est.lower == pytest.approx(0.699, abs=1e-3)
    assert est.upper == pytest.approx(0.972, abs=1e-3)


def test_wilson_interval_of_all_successes_ends_at_one() -> None:
    est = rate([True] * 20)
    assert est.upper == pytest.approx(1.0)
    assert est.lower == pytest.approx(1 - 0.1611, abs=5e-4)


def test_rate_of_nothing_is_nan_with_n_zero() -> None:
    est = rate([])
    assert math.isnan(est.value) and math.isnan(est.lower) and math.isnan(est.upper)
    assert est.n == 0


def test_paired_difference_of_identical_samples_is_zero_with_zero_width() -> None:
    values = [0.1, 0.5, 0.9, 0.3]
    est = paired_difference(values, values)
    assert (est.value, est.lower, est.upper, est.n) == (0.0, 0.0, 0.0, 4)


def test_paired_difference_is_the_mean_of_differences_inside_its_interval() -> None:
    treated = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    control = [0.0, 1.5, 2.0, 3.5, 3.0, 5.0]
    est = paired_difference(treated, control, seed=0)
    assert est.value == pytest.approx(np.mean(np.subtract(treated, control)))
    assert est.lower <= est.value <= est.upper
    assert est.lower < est.upper


def test_paired_difference_of_mismatched_shapes_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])


def test_mean_with_interval_ignores_nans() -> None:
    est = mean_with_interval([1.0, math.nan, 3.0])
    assert est.value == pytest.approx(2.0)
    assert est.n == 2


def test_mean_with_interval_is_reproducible_with_a_seed() -> None:
    values = np.random.default_rng(0).normal(size=30)
    assert mean_with_interval(values, seed=3) == mean_with_interval(values, seed=3)


def test_agreement_of_identical_detectors_is_one_with_kappa_one() -> None:
    a = [True, False, True, True]
    assert agreement(a, a) == {"agreement": 1.0, "kappa": 1.0}


def test_agreement_and_kappa_known_values() -> None:
    # observed 0.75; chance = 0.5 * 0.25 + 0.5 * 0.75 = 0.5; kappa = (0.75 - 0.5) / 0.5
    result = agreement([True, True, False, False], [True, False, False, False])
    assert result["agreement"] == pytest.approx(0.75)
    assert result["kappa"] == pytest.approx(0.5)


def test_kappa_of_opposite_detectors_is_minus_one() -> None:
    result = agreement([True, False, True, False], [False, True, False, True])
    assert result == {"agreement": 0.0, "kappa": pytest.approx(-1.0)}


def test_agreement_of_nothing_is_nan() -> None:
    result = agreement([], [])
    assert math.isnan(result["agreement"]) and math.isnan(result["kappa"])


def _clusters() -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    values = rng.normal(loc=2.0, size=40)
    clusters = [np.arange(start, start + 5) for start in range(0, 40, 5)]
    return values, clusters


def test_cluster_bootstrap_interval_contains_the_point_estimate() -> None:
    values, clusters = _clusters()
    est = cluster_bootstrap(lambda rows: float(values[rows].mean()), clusters, n_resamples=300)
    assert est.value == pytest.approx(values.mean())
    assert est.lower < est.value < est.upper
    assert est.n == len(clusters)


def test_cluster_bootstrap_is_reproducible_with_a_seed() -> None:
    values, clusters = _clusters()
    stat = lambda rows: float(values[rows].mean())  # noqa: E731
    first = cluster_bootstrap(stat, clusters, n_resamples=200, seed=5)
    assert first == cluster_bootstrap(stat, clusters, n_resamples=200, seed=5)
    assert first != cluster_bootstrap(stat, clusters, n_resamples=200, seed=6)


def test_estimate_to_dict_flattens_with_the_prefix() -> None:
    flat = Estimate(0.5, 0.25, 0.75, 12).to_dict("refusal_rate")
    assert flat == {"refusal_rate": 0.5, "refusal_rate_lo": 0.25, "refusal_rate_hi": 0.75,
                    "refusal_rate_n": 12.0}


def test_estimates_overlap_only_when_their_intervals_meet() -> None:
    assert Estimate(0.3, 0.2, 0.4, 10).overlaps(Estimate(0.45, 0.4, 0.5, 10))
    assert not Estimate(0.3, 0.2, 0.4, 10).overlaps(Estimate(0.6, 0.5, 0.7, 10))
