"""Rates, differences and bootstrap intervals against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmlab.stats import (
    Estimate,
    agreement,
    cluster_bootstrap,
    current_names,
    mcnemar_exact_p,
    mean_with_interval,
    paired_difference,
    paired_rate_difference,
    rate,
    tango_interval,
)

Z = 1.959963984540054


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


def test_estimate_to_dict_names_the_interval_ci_lo_and_ci_hi_beside_the_value() -> None:
    flat = Estimate(0.5, 0.25, 0.75, 12).to_dict("harm_test/refusal")
    assert flat == {"harm_test/refusal": 0.5, "harm_test/refusal_ci_lo": 0.25,
                    "harm_test/refusal_ci_hi": 0.75, "harm_test/refusal_n": 12.0}


def test_estimate_from_dict_reads_back_what_to_dict_wrote() -> None:
    estimate = Estimate(0.5, 0.25, 0.75, 12)
    assert Estimate.from_dict(estimate.to_dict("x"), "x") == estimate
    missing = Estimate.from_dict({"x": 0.5}, "x")
    assert missing.value == 0.5 and math.isnan(missing.lower) and missing.n == 0


def test_old_interval_names_read_as_current_ones() -> None:
    old = {"harm_test/refusal": 0.5, "harm_test/refusal_lo": 0.25, "harm_test/refusal_hi": 0.75,
           "harm_test/refusal_n": 12.0, "test_auroc": 0.9, "test_auroc_lo": 0.8}
    assert current_names(old) == {"harm_test/refusal": 0.5, "harm_test/refusal_ci_lo": 0.25,
                                  "harm_test/refusal_ci_hi": 0.75, "harm_test/refusal_n": 12.0,
                                  "test_auroc": 0.9, "test_auroc_ci_lo": 0.8}


def test_a_name_ending_in_lo_is_kept_when_it_is_no_interval_or_the_current_name_exists() -> None:
    assert current_names({"planted_lo": 1.0}) == {"planted_lo": 1.0}  # no value "planted"
    both = {"x": 0.5, "x_lo": 0.1, "x_ci_lo": 0.2}
    assert current_names(both) == both


def test_estimates_overlap_only_when_their_intervals_meet() -> None:
    assert Estimate(0.3, 0.2, 0.4, 10).overlaps(Estimate(0.45, 0.4, 0.5, 10))
    assert not Estimate(0.3, 0.2, 0.4, 10).overlaps(Estimate(0.6, 0.5, 0.7, 10))


# ------------------------------------------------------------------ paired rates

def _pairs(both: int, treated_only: int, control_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    treated = [True] * both + [True] * treated_only + [False] * control_only + [False] * neither
    control = [True] * both + [False] * treated_only + [True] * control_only + [False] * neither
    return treated, control


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20, 40])
def test_a_paired_rate_difference_with_every_pair_agreeing_is_never_zero_width(n: int) -> None:
    # No discordant pair: the score interval is +-z^2 / (n + z^2), whatever the concordant split.
    for both in range(n + 1):
        est = paired_rate_difference(*_pairs(both, 0, 0, n - both))
        assert est.value == 0.0 and est.p_value == 1.0
        assert est.lower == pytest.approx(-Z**2 / (n + Z**2), abs=1e-9)
        assert est.upper == pytest.approx(Z**2 / (n + Z**2), abs=1e-9)


def test_a_paired_rate_difference_where_every_pair_moved_up_reaches_one() -> None:
    # b = n: the score equation reduces to sqrt(n (1 - d) / (1 + d)) = z.
    est = paired_rate_difference(*_pairs(0, 10, 0, 0))
    assert est.value == 1.0 and est.upper == 1.0
    assert est.lower == pytest.approx((10 - Z**2) / (10 + Z**2), abs=1e-9)
    assert est.p_value == pytest.approx(2 * 0.5**10)


def test_tango_bounds_solve_the_score_equation_with_a_numerically_maximised_nuisance() -> None:
    """Checks the closed-form constrained MLE against a direct maximisation of the likelihood."""
    from scipy.optimize import minimize_scalar

    a, b, c, d = 3, 7, 2, 8
    n = a + b + c + d

    def score(diff: float) -> float:
        def neg_loglik(q: float) -> float:  # q = P(control only), P(treated only) = q + diff
            return -(b * np.log(q + diff) + c * np.log(q) + (a + d) * np.log(1 - 2 * q - diff))
        low = max(0.0, -diff) + 1e-12
        q = minimize_scalar(neg_loglik, bounds=(low, (1 - diff) / 2 - 1e-12), method="bounded",
                            options={"xatol": 1e-12}).x
        return (b - c - n * diff) / np.sqrt(n * (2 * q + diff * (1 - diff)))

    lower, upper = tango_interval(b, c, n)
    assert lower < (b - c) / n < upper
    assert score(lower) == pytest.approx(Z, abs=1e-4)
    assert score(upper) == pytest.approx(-Z, abs=1e-4)


def test_paired_rate_difference_is_antisymmetric_in_the_arms() -> None:
    treated, control = _pairs(2, 6, 1, 11)
    forward, backward = paired_rate_difference(treated, control), paired_rate_difference(control, treated)
    assert forward.value == pytest.approx(-backward.value)
    assert forward.lower == pytest.approx(-backward.upper, abs=1e-9)
    assert forward.upper == pytest.approx(-backward.lower, abs=1e-9)
    assert forward.p_value == backward.p_value


@pytest.mark.parametrize("b, c, p", [(0, 6, 2 * 0.5**6), (1, 9, 2 * 11 / 1024), (4, 4, 1.0),
                                     (0, 0, 1.0)])
def test_exact_mcnemar_p_values(b: int, c: int, p: float) -> None:
    assert mcnemar_exact_p(b, c) == pytest.approx(p)


def test_paired_rate_difference_flattens_with_its_p_value() -> None:
    flat = paired_rate_difference(*_pairs(0, 6, 0, 4)).to_dict("refusal_diff")
    assert set(flat) == {"refusal_diff", "refusal_diff_ci_lo", "refusal_diff_ci_hi",
                         "refusal_diff_n", "refusal_diff_p"}
    assert flat["refusal_diff_p"] == pytest.approx(2 * 0.5**6)


def test_paired_rate_difference_of_nothing_is_nan_and_mismatched_shapes_raise() -> None:
    assert paired_rate_difference([], []).n == 0
    with pytest.raises(ValueError, match="shape"):
        paired_rate_difference([True], [True, False])


COVERAGE_N = (10, 20, 40)
COVERAGE_RATES = (0.0, 0.05, 0.2, 0.5, 0.8, 0.95)
COVERAGE_CORRELATIONS = (0.0, 0.3, 0.6)


def _cell_probabilities(p_treated: float, p_control: float, rho: float) -> np.ndarray | None:
    """P(both), P(treated only), P(control only), P(neither) with that correlation, or None."""
    spread = np.sqrt(p_treated * (1 - p_treated) * p_control * (1 - p_control))
    if spread == 0 and rho != 0:
        return None
    both = p_treated * p_control + rho * spread
    cells = np.array([both, p_treated - both, p_control - both, 1 - p_treated - p_control + both])
    return None if cells.min() < -1e-12 else np.clip(cells, 0, 1) / np.clip(cells, 0, 1).sum()


def _simulated_coverage(n: int, cells: np.ndarray, truth: float, rng: np.random.Generator,
                        bounds: tuple[np.ndarray, np.ndarray], reps: int) -> float:
    tables = rng.multinomial(n, cells, size=reps)
    low, high = bounds[0][tables[:, 1], tables[:, 2]], bounds[1][tables[:, 1], tables[:, 2]]
    return float(((low - 1e-9 <= truth) & (truth <= high + 1e-9)).mean())


def _all_intervals(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Tango bounds for every (treated only, control only) count at this n."""
    low, high = np.full((n + 1, n + 1), np.nan), np.full((n + 1, n + 1), np.nan)
    for b in range(n + 1):
        for c in range(n + 1 - b):
            low[b, c], high[b, c] = tango_interval(b, c, n)
    return low, high


def test_paired_rate_difference_covers_the_true_difference_at_small_n() -> None:
    """Monte Carlo coverage of the 95% interval over true (treated, control, correlation).

    The interval inherits the Wilson interval's known dip where one rate is 0 and the
    other near 1 (exactly Wilson's when nobody is positive under control): about 0.91 at
    n = 10, so that size gets a lower floor. Elsewhere every cell is at least 0.92.
    40,000 draws per cell keep the Monte Carlo error (about 0.0013) far below those margins.
    """
    rng = np.random.default_rng(20240607)
    coverages: dict[tuple, float] = {}
    for n in COVERAGE_N:
        intervals = _all_intervals(n)
        for p_t in COVERAGE_RATES:
            for p_c in COVERAGE_RATES:
                for rho in COVERAGE_CORRELATIONS:
                    cells = _cell_probabilities(p_t, p_c, rho)
                    if cells is not None and (p_t, p_c) != (0.0, 0.0):
                        coverages[(n, p_t, p_c, rho)] = _simulated_coverage(
                            n, cells, p_t - p_c, rng, intervals, reps=40_000)
    worst = {n: min((v, k) for k, v in coverages.items() if k[0] == n) for n in COVERAGE_N}
    assert worst[10][0] >= 0.90, worst[10]
    assert worst[20][0] >= 0.92 and worst[40][0] >= 0.92, (worst[20], worst[40])
    assert 0.94 <= float(np.mean(list(coverages.values()))) <= 0.985
