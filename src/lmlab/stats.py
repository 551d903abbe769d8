"""Rates with intervals, paired differences and bootstrap intervals.

Every rate lmlab reports is an :class:`Estimate`: a point value with a 95% interval and
the number of independent units (unique prompts, chains) behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    value: float
    lower: float
    upper: float
    n: int

    def to_dict(self, prefix: str) -> dict[str, float]:
        """Flatten for ``mlflow.log_metrics``: prefix, prefix_lo, prefix_hi, prefix_n."""
        return {prefix: self.value, f"{prefix}_lo": self.lower, f"{prefix}_hi": self.upper,
                f"{prefix}_n": float(self.n)}

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


def paired_difference(treated: Sequence[float], control: Sequence[float],
                      n_resamples: int = 2000, seed: int = 0) -> Estimate:
    """Mean of treated - control over the same units, with a percentile bootstrap interval."""
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
