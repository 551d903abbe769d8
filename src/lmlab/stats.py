"""Rates with intervals, paired differences and bootstrap intervals.

Every rate lmlab reports is an :class:`Estimate`: a point value with a 95% interval and
the number of independent units (unique prompts, chains) behind it. Flattened for MLflow
(:meth:`Estimate.to_dict`) it is named ``<name>``, ``<name>_ci_lo``, ``<name>_ci_hi`` and
``<name>_n`` (``<name>_p`` for a paired difference's p-value), as metrics and as table
columns alike.

* one rate: Wilson score interval;
* the difference of two rates on the same units (steered vs baseline answer to the same
  prompt): Tango's score interval with the exact McNemar p-value
  (:func:`paired_rate_difference`);
* the mean (or paired mean difference) of continuous values: percentile bootstrap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import optimize
from scipy import stats as sps

CONFIDENCE = 0.95
#: What follows a metric's name in the names of its interval bounds, unit count and p-value.
CI_LO, CI_HI, N, P = "_ci_lo", "_ci_hi", "_n", "_p"


def with_interval(name: str) -> tuple[str, str, str]:
    """``name`` and the names of its interval bounds."""
    return name, name + CI_LO, name + CI_HI


#: The interval suffixes of runs and caches written before the bounds were named CI_LO / CI_HI.
OLD_BOUNDS = (("_lo", CI_LO), ("_hi", CI_HI))


def current_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` with interval bounds under their current names, in the same order:
    ``x_lo`` / ``x_hi`` become ``x_ci_lo`` / ``x_ci_hi`` where ``x`` (or ``x_n``) is among
    the metrics and the current name is not, so an old run or cached result reads as a
    new one; any other name is kept."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        for old, new in OLD_BOUNDS:
            base = name[:-len(old)]
            if (name.endswith(old) and not name.endswith(new) and base + new not in metrics
                    and (base in metrics or base + N in metrics)):
                name = base + new
                break
        out[name] = value
    return out


@dataclass(frozen=True)
class Estimate:
    value: float
    lower: float
    upper: float
    n: int

    def to_dict(self, prefix: str) -> dict[str, float]:
        """Flatten for ``mlflow.log_metrics``: prefix, prefix_ci_lo, prefix_ci_hi, prefix_n."""
        return {prefix: self.value, prefix + CI_LO: self.lower, prefix + CI_HI: self.upper,
                prefix + N: float(self.n)}

    @staticmethod
    def from_dict(flat: Mapping[str, Any], prefix: str) -> "Estimate":
        """The estimate :meth:`to_dict` flattened under ``prefix`` (NaN for a missing value
        or bound, n 0 when missing)."""
        def value(key: str) -> float:
            found = flat.get(key)
            return math.nan if found is None else float(found)

        n = value(prefix + N)
        return Estimate(value(prefix), value(prefix + CI_LO), value(prefix + CI_HI),
                        0 if math.isnan(n) else int(n))

    def overlaps(self, other: "Estimate") -> bool:
        return self.lower <= other.upper and other.lower <= self.upper


def rate(successes: Sequence[bool] | np.ndarray) -> Estimate:
    """Proportion with a Wilson score interval (sane at 0 and at n)."""
    outcomes = np.asarray(successes, dtype=bool)
    n = int(outcomes.size)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    k = int(outcomes.sum())
    interval = sps.binomtest(k, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return Estimate(k / n, float(interval.low), float(interval.high), n)


def rate_difference(a: Estimate, b: Estimate) -> Estimate:
    """``a - b`` for two rates measured on different units (a condition against its
    control), with Newcombe's hybrid score interval built from each rate's Wilson bounds
    (Newcombe 1998, method 10). On the same units it is conservative when the two
    outcomes are positively correlated, as steered answers to the same prompts are."""
    d = a.value - b.value
    lower = d - math.sqrt((a.value - a.lower) ** 2 + (b.upper - b.value) ** 2)
    upper = d + math.sqrt((a.upper - a.value) ** 2 + (b.value - b.lower) ** 2)
    return Estimate(d, max(lower, -1.0), min(upper, 1.0), min(a.n, b.n))


@dataclass(frozen=True)
class PairedRateDifference(Estimate):
    """treated rate - control rate over the same units, with a two-sided p-value for
    "no difference" (exact McNemar)."""

    p_value: float

    def to_dict(self, prefix: str) -> dict[str, float]:
        return {**super().to_dict(prefix), prefix + P: self.p_value}


def paired_rate_difference(treated: Sequence[bool] | np.ndarray,
                           control: Sequence[bool] | np.ndarray) -> PairedRateDifference:
    """Difference of two binary outcomes measured on the same units.

    Only discordant units carry information about the difference: ``b`` units are
    positive under treatment only, ``c`` under control only, and the estimate is
    ``(b - c) / n``. The interval is Tango's score interval (Tango 1998, recommended for
    small paired samples by Fagerland, Lydersen and Laake 2014); it is never zero-width
    (with no discordant unit it is ``±z²/(n + z²)``). The p-value is the exact McNemar
    test, a two-sided binomial test of ``b`` in ``b + c`` at one half.
    """
    x = np.asarray(treated, dtype=bool)
    y = np.asarray(control, dtype=bool)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in shape: {x.shape} vs {y.shape}")
    n = int(x.size)
    if n == 0:
        return PairedRateDifference(math.nan, math.nan, math.nan, 0, math.nan)
    b, c = int((x & ~y).sum()), int((~x & y).sum())
    low, high = tango_interval(b, c, n)
    return PairedRateDifference((b - c) / n, low, high, n, mcnemar_exact_p(b, c))


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the two discordant counts (1 when there are none)."""
    if b + c == 0:
        return 1.0
    return float(sps.binomtest(b, b + c, 0.5).pvalue)


def tango_interval(b: int, c: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Tango's score interval for a paired difference of proportions ``(b - c) / n``.

    The interval holds every difference d that the score test does not reject:
    ``|b - c - n d| / sqrt(n (2 q(d) + d (1 - d))) <= z``, where ``q(d)`` is the maximum-
    likelihood probability of a control-only unit when the difference is fixed at d.
    """
    if not (0 <= b and 0 <= c and b + c <= n and n > 0):
        raise ValueError(f"need 0 <= b, c and b + c <= n > 0, got b={b}, c={c}, n={n}")
    z = float(sps.norm.ppf(1 - (1 - confidence) / 2))
    estimate = (b - c) / n

    def score(d: float) -> float:
        w = -b - c + (2 * n - b + c) * d
        q = (math.sqrt(max(w * w + 8 * n * c * d * (1 - d), 0.0)) - w) / (4 * n)
        variance = n * (2 * q + d * (1 - d))
        numerator = b - c - n * d
        if variance <= 0:
            return math.copysign(math.inf, numerator) if numerator else 0.0
        return numerator / math.sqrt(variance)

    # The score falls from +inf at d = -1 to -inf at d = 1 (0 at the estimate); near an
    # end the variance vanishes, so the search stops just inside it.
    edge = 1e-12
    low = -1.0 if score(-1 + edge) <= z else optimize.brentq(
        lambda d: score(d) - z, -1 + edge, estimate, xtol=1e-12)
    high = 1.0 if score(1 - edge) >= -z else optimize.brentq(
        lambda d: score(d) + z, estimate, 1 - edge, xtol=1e-12)
    return float(low), float(high)


def paired_difference(treated: Sequence[float], control: Sequence[float],
                      n_resamples: int = 2000, seed: int = 0) -> Estimate:
    """Mean of treated - control over the same units, with a percentile bootstrap interval.

    For continuous values; two binary outcomes on the same units take
    :func:`paired_rate_difference` (this bootstrap is zero-width when every pair agrees
    and under-covers badly at small n)."""
    a = np.asarray(treated, dtype=float)
    b = np.asarray(control, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} vs {b.shape}")
    return mean_with_interval(a - b, n_resamples=n_resamples, seed=seed)


def mean_with_interval(values: Sequence[float], n_resamples: int = 2000, seed: int = 0) -> Estimate:
    """Mean with a percentile bootstrap interval over independent units."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    if np.all(x == x[0]):
        return Estimate(float(x[0]), float(x[0]), float(x[0]), int(x.size))
    result = sps.bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=CONFIDENCE,
                           method="percentile", rng=np.random.default_rng(seed))
    ci = result.confidence_interval
    return Estimate(float(x.mean()), float(ci.low), float(ci.high), int(x.size))


def cluster_bootstrap(statistic: Callable[[np.ndarray], float], clusters: Sequence[np.ndarray],
                      n_resamples: int = 1000, seed: int = 0) -> Estimate:
    """Interval for ``statistic`` over rows grouped in clusters (e.g. tokens by chain).

    Clusters are resampled with replacement; each resample concatenates the chosen
    clusters' row indices and evaluates ``statistic`` on them.
    """
    rng = np.random.default_rng(seed)
    everything = np.concatenate(clusters) if clusters else np.array([], dtype=int)
    point = statistic(everything)
    values = []
    for _ in range(n_resamples):
        picks = rng.integers(0, len(clusters), len(clusters))
        value = statistic(np.concatenate([clusters[i] for i in picks]))
        if not math.isnan(value):
            values.append(value)
    if not values:
        return Estimate(point, math.nan, math.nan, len(clusters))
    low, high = np.quantile(values, [(1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2])
    return Estimate(float(point), float(low), float(high), len(clusters))


def agreement(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """Share of units on which two detectors agree, and Cohen's kappa."""
    x = np.asarray(a, dtype=bool)
    y = np.asarray(b, dtype=bool)
    if x.size == 0:
        return {"agreement": math.nan, "kappa": math.nan}
    observed = float((x == y).mean())
    expected = float(x.mean() * y.mean() + (1 - x.mean()) * (1 - y.mean()))
    kappa = 1.0 if expected == 1.0 else (observed - expected) / (1 - expected)
    return {"agreement": observed, "kappa": kappa}
