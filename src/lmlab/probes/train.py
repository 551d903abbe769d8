"""Fit and evaluate linear probes for every lag of one layer at once.

Lag convention: see :mod:`lmlab.probes` (activation at token t predicts the label at
t + lag; both tokens must be chain tokens).

One layer's features are shared by all lags, so all lags and all regularisation strengths
are fitted in one batch of independent L2 logistic regressions (one per (C, lag), plus the
shuffled-label controls), each with its own L-BFGS and its own convergence test (see
:mod:`lmlab.probes.lbfgs`): a lag's probe does not depend on the other lags in the grid.
Strengths mean what sklearn's ``C`` means.

Chains are split train/val/test by problem (chains of one problem never straddle
splits); C and the decision threshold (max F1) are chosen on val; test metrics carry 95%
intervals from a bootstrap that resamples problems. Beside every probe: a token-identity
baseline, a label-persistence baseline (lag != 0) and a shuffled-label control.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from lmlab.errors import LmlabError
from lmlab.probes.lbfgs import JointFit, fit_joint
from lmlab.stats import CI_HI, CI_LO, CONFIDENCE, Estimate

__all__ = ["JointFit", "fit_joint"]  # re-exported: the fitter lives in lmlab.probes.lbfgs

SPLITS = ("train", "val", "test")
# The probe, its baselines (token identity; label at t plus token, for lag != 0) and the
# shuffled-label control. A baseline's metrics carry its name as a prefix.
SCORERS = ("probe", "token", "persistence", "shuffled")
BASELINES = ("token", "persistence")
THRESHOLD_METRICS = ("accuracy", "f1")
RANKING_METRICS = ("auroc", "pr_auc")
METRICS = RANKING_METRICS + THRESHOLD_METRICS


@dataclass(frozen=True)
class TrainConfig:
    """How probes are fitted and evaluated.

    lags: label offsets to fit (activation at t predicts label at t + lag).
    strengths: candidate inverse L2 strengths C (sklearn's meaning); best on val PR-AUC.
    split: train/val/test shares of chains (whole problems, never tokens or single chains).
    bootstrap: problem resamples for the 95% test intervals (0 disables intervals).
    max_iter / tolerance: per-output L-BFGS limits; an output converged when its largest
        absolute gradient entry is at most ``tolerance`` (sklearn's lbfgs test).
    fit_threads: torch threads while fitting (None keeps torch's setting); 1 is much faster
        on a busy small machine, where threads spin-wait on L-BFGS's many small operations.
    """

    lags: tuple[int, ...]
    strengths: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0
    bootstrap: int = 500
    max_iter: int = 300
    fit_threads: int | None = None
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if not self.lags or any(not isinstance(k, int) or isinstance(k, bool) for k in self.lags):
            raise LmlabError(f"lags must be a non-empty list of integers, got {list(self.lags)}")
        if len(set(self.lags)) != len(self.lags):
            raise LmlabError(f"lags must not repeat, got {list(self.lags)}")
        if not self.strengths or any(not isinstance(c, (int, float)) or not c > 0
                                     for c in self.strengths):
            raise LmlabError(f"probes.strengths must be positive numbers, got {list(self.strengths)}")
        if len(self.split) != 3 or any(not isinstance(s, (int, float)) or s <= 0 for s in self.split) \
                or not math.isclose(sum(self.split), 1.0, abs_tol=1e-6):
            raise LmlabError(f"probes.split must be three positive shares summing to 1, "
                             f"got {list(self.split)}")
        if not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise LmlabError(f"probes.bootstrap must be a non-negative integer, got {self.bootstrap!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise LmlabError(f"probes.max_iter must be a positive integer, got {self.max_iter!r}")
        if not isinstance(self.tolerance, (int, float)) or not self.tolerance > 0:
            raise LmlabError(f"probes.tolerance must be a positive number, got {self.tolerance!r}")
        if self.fit_threads is not None and (not isinstance(self.fit_threads, int)
                                             or self.fit_threads < 1):
            raise LmlabError(f"probes.fit_threads must be a positive integer or null, "
                             f"got {self.fit_threads!r}")


@dataclass(frozen=True)
class LayerData:
    """One layer's chain tokens as rows, with the labels every lag needs.

    features: (rows, width) float32, one row per chain token.
    chain: (rows,) index of the chain; group: (rows,) its problem group (bootstrap cluster).
    token_ids: (rows,) the token at t (for the baselines).
    current: (rows,) the label at t (for the label-persistence baseline).
    targets: (rows, lags) label at t + lag; valid: (rows, lags) whether t + lag is a chain token.
    split: (chains,) 0 train, 1 val, 2 test.
    """

    features: np.ndarray
    chain: np.ndarray
    token_ids: np.ndarray
    targets: np.ndarray
    valid: np.ndarray
    split: np.ndarray
    lags: tuple[int, ...]
    current: np.ndarray
    group: np.ndarray


@dataclass
class Probe:
    """A fitted probe: p = sigmoid(((x - mean) / scale) . weight + bias)."""

    layer: int
    lag: int
    label: str
    weight: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    threshold: float
    strength: float

    def predict_proba(self, activations: np.ndarray) -> np.ndarray:
        z = ((np.asarray(activations, np.float32) - self.mean) / self.scale) @ self.weight + self.bias
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


@dataclass
class LayerResult:
    layer: int
    label: str
    metrics: dict[int, dict[str, float]]  # lag -> flat metrics
    probes: dict[int, Probe] = field(default_factory=dict)

    def convergence_warnings(self) -> list[str]:
        """One line per lag whose fits did not all converge (read from the metrics, so a
        result reloaded from the cache warns again)."""
        out = []
        for lag, metrics in sorted(self.metrics.items()):
            failed = int(metrics.get("fits_unconverged", 0))
            if failed:
                chosen = "the chosen probe did not" if not metrics.get("converged", 1) \
                    else "the chosen probe did"
                out.append(f"warning: {self.label} layer {self.layer} lag {lag}: {failed} of "
                           f"{int(metrics['fits'])} fits did not converge ({chosen}; largest "
                           f"|gradient| {metrics['fit_grad_max_worst']:.2g}); raise "
                           "probes.max_iter or lower the strengths")
        return out


def split_groups(groups: Sequence[Any], shares: Sequence[float], seed: int) -> np.ndarray:
    """Assign chains to train (0), val (1), test (2) so that a group never straddles splits.

    Groups are shuffled (seeded) and dealt out whole: to val until it holds its share of
    chains, then to test, the rest to train. With one chain per group this is a seeded
    permutation of the chains.
    """
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_chains = inverse.size
    if names.size < 3:
        raise LmlabError(f"need chains of at least 3 different problems to split train/val/test, "
                         f"have {names.size} ({n_chains} chains)")
    sizes = np.bincount(inverse)
    wanted = (max(1, round(shares[1] * n_chains)), max(1, round(shares[2] * n_chains)))
    filled = [0, 0]
    of_group = np.zeros(names.size, dtype=np.int8)
    for group in np.random.default_rng(seed).permutation(names.size):
        for target in (0, 1):
            if filled[target] < wanted[target]:
                of_group[group] = target + 1
                filled[target] += sizes[group]
                break
    split = of_group[inverse]
    if not (split == 0).any():
        raise LmlabError(f"{names.size} problems cannot fill train, val and test with shares "
                         f"{list(shares)}; use more problems or other probes.split shares")
    return split


def split_chains(n_chains: int, shares: Sequence[float], seed: int) -> np.ndarray:
    """Split chains that are all of different problems (see :func:`split_groups`)."""
    if n_chains < 3:
        raise LmlabError(f"need at least 3 chains to split train/val/test, have {n_chains}")
    return split_groups(np.arange(n_chains), shares, seed)


def build_layer_data(activations: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                     token_ids: Sequence[np.ndarray], chain_starts: Sequence[int],
                     lags: Sequence[int], split: np.ndarray,
                     groups: Sequence[int] | None = None) -> LayerData:
    """Rows for every chain token; targets and validity for every lag.

    groups: a bootstrap cluster per chain (its problem); each chain its own by default.
    """
    feats, chains, ids, targets, valid, current = [], [], [], [], [], []
    lags_arr = np.asarray(lags)
    for index, (acts, lab, tok, start) in enumerate(zip(activations, labels, token_ids, chain_starts)):
        if not acts.shape[0] == lab.shape[0] == tok.shape[0]:
            raise LmlabError(f"chain #{index}: {acts.shape[0]} activations, {lab.shape[0]} labels, "
                             f"{tok.shape[0]} tokens (lengths must match exactly)")
        positions = np.arange(start, acts.shape[0])
        shifted = positions[:, None] + lags_arr[None, :]
        ok = (shifted >= start) & (shifted < acts.shape[0])
        feats.append(acts[start:])
        chains.append(np.full(positions.size, index))
        ids.append(tok[start:])
        current.append(lab[start:])
        targets.append(np.where(ok, lab[np.clip(shifted, 0, acts.shape[0] - 1)], 0))
        valid.append(ok)
    chain = np.concatenate(chains)
    group_of = np.arange(len(feats)) if groups is None else np.asarray(groups)
    return LayerData(np.concatenate(feats).astype(np.float32, copy=False), chain,
                     np.concatenate(ids), np.concatenate(targets).astype(np.int8),
                     np.concatenate(valid), split, tuple(lags),
                     np.concatenate(current).astype(np.int8), group_of[chain])


def standardizer(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = features.mean(axis=0, dtype=np.float64).astype(np.float32)
    scale = features.std(axis=0, dtype=np.float64).astype(np.float32)
    # A constant feature carries nothing; dividing by 1 keeps it at 0 instead of inf.
    scale[scale < 1e-6] = 1.0
    return mean, scale


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- metrics

def ranking_metrics(y: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """(ROC-AUC, average precision) from one sort, equal to sklearn's (ties included).

    The chain bootstrap evaluates these thousands of times; sklearn's two calls cost
    several times more.
    """
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return math.nan, math.nan
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], y[order].astype(np.float64)
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
    tp = np.cumsum(t)[last]
    fp = (last + 1) - tp
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / (y.size - n_pos)]
    auroc = float(np.trapezoid(tpr, fpr))
    precision = tp / (last + 1)
    ap = float(np.sum(np.diff(tpr) * precision))
    return auroc, ap


def threshold_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float]:
    pred = score >= threshold
    tp = float(np.sum(pred & (y == 1)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))
    accuracy = float(np.mean(pred == (y == 1))) if y.size else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 0.0
    return accuracy, f1


def best_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The score threshold with the highest F1 on these (validation) rows."""
    precision, recall, thresholds = precision_recall_curve(y, score)
    f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-12, None)
    return float(thresholds[int(np.argmax(f1))])


def point_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    both = 0 < int(y.sum()) < y.size
    accuracy, f1 = threshold_metrics(y, score, threshold)
    return {"auroc": float(roc_auc_score(y, score)) if both else math.nan,
            "pr_auc": float(average_precision_score(y, score)) if both else math.nan,
            "accuracy": accuracy, "f1": f1}


def bootstrap_draws(y: np.ndarray, score: np.ndarray, threshold: float, cluster: np.ndarray,
                    n_resamples: int, seed: int) -> dict[str, np.ndarray]:
    """Every metric on ``n_resamples`` cluster resamples (clusters drawn with replacement).

    The scheme of :func:`lmlab.stats.cluster_bootstrap`, vectorised: a resample is a weight
    per row (how often its cluster was drawn), so one sort of the scores serves every
    resample and every metric, instead of a sort per resample and metric. The draws depend
    only on ``cluster`` and ``seed``, so two scorers evaluated on the same rows with the
    same seed see the same resamples: their differences are paired.
    """
    groups, inverse = np.unique(cluster, return_inverse=True)
    picks = np.random.default_rng(seed).integers(0, groups.size, (n_resamples, groups.size))
    counts = np.zeros((n_resamples, groups.size))
    np.add.at(counts, (np.repeat(np.arange(n_resamples), groups.size), picks.ravel()), 1.0)
    weights = counts[:, inverse]  # (resamples, rows)
    return {**_weighted_ranking(y, score, weights),
            **_weighted_threshold(y, score >= threshold, weights)}


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """The central 95% of the finite draws (NaN when there are none)."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return math.nan, math.nan
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(finite, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_metrics(y: np.ndarray, score: np.ndarray, threshold: float, chain: np.ndarray,
                      n_resamples: int, seed: int) -> dict[str, Estimate]:
    """95% percentile intervals for every metric from a bootstrap over clusters (``chain``
    holds each row's cluster: its chain, or its problem)."""
    draws = bootstrap_draws(y, score, threshold, chain, n_resamples, seed)
    point = point_metrics(y, score, threshold)
    n_clusters = int(np.unique(chain).size)
    return {name: Estimate(point[name], *percentile_interval(values), n_clusters)
            for name, values in draws.items()}


def _weighted_ranking(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    order = np.argsort(-score, kind="mergesort")
    s = score[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last row of each distinct score
    w = weights[:, order]
    tp = np.cumsum(w * y[order], axis=1)[:, last]
    fp = np.cumsum(w * (1 - y[order]), axis=1)[:, last]
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = np.hstack([np.zeros((w.shape[0], 1)), tp / tp[:, -1:]])
        fpr = np.hstack([np.zeros((w.shape[0], 1)), fp / fp[:, -1:]])
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        auroc = np.trapezoid(tpr, fpr, axis=1)
        ap = np.sum(np.diff(tpr, axis=1) * precision, axis=1)
    degenerate = (tp[:, -1] == 0) | (fp[:, -1] == 0)
    return {"auroc": np.where(degenerate, np.nan, auroc), "pr_auc": np.where(degenerate, np.nan, ap)}


def _weighted_threshold(y: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    positive = y == 1
    tp = weights @ (pred & positive).astype(float)
    fp = weights @ (pred & ~positive).astype(float)
    fn = weights @ (~pred & positive).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = (weights @ (pred == positive).astype(float)) / weights.sum(axis=1)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    return {"accuracy": accuracy, "f1": f1}


# --------------------------------------------------------------------------- scorers

def token_identity_scores(train_ids: np.ndarray, train_y: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """P(label at t + lag | token at t) from train counts, smoothed towards the base rate."""
    base = float(train_y.mean())
    size = int(max(train_ids.max(initial=0), ids.max(initial=0))) + 1
    positives = np.bincount(train_ids, weights=train_y, minlength=size)
    totals = np.bincount(train_ids, minlength=size)
    return ((positives + base) / (totals + 1.0))[ids]


def persistence_scores(train_now: np.ndarray, train_ids: np.ndarray, train_y: np.ndarray,
                       now: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """P(label at t + lag | label at t, token at t) from train counts.

    Spans are contiguous, so "t is already inside a span" predicts "t + lag is too" at
    small lags without any model state. Within each value of the label at t this is the
    token-identity baseline, smoothed towards that value's own rate.
    """
    base = float(train_y.mean())
    size = int(max(train_ids.max(initial=0), ids.max(initial=0))) + 1
    out = np.empty(ids.size, dtype=np.float64)
    for state in (0, 1):
        fit, rows = train_now == state, now == state
        state_y = train_y[fit]
        rate = (float(state_y.sum()) + base) / (state_y.size + 1.0)
        positives = np.bincount(train_ids[fit], weights=state_y, minlength=size)
        totals = np.bincount(train_ids[fit], minlength=size)
        out[rows] = ((positives + rate) / (totals + 1.0))[ids[rows]]
    return out


@dataclass
class _Scored:
    scores: dict[int, np.ndarray]  # split -> scores
    threshold: float
    strength: float = math.nan


def _evaluate(name: str, scored: _Scored, ys: dict[int, np.ndarray], clusters: dict[int, np.ndarray],
              config: TrainConfig) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
    """Flat metrics of one scorer (its name as prefix, none for the probe) and its test
    bootstrap draws (None without a bootstrap)."""
    prefix = "" if name == "probe" else f"{name}_"
    out: dict[str, float] = {}
    for split, split_name in enumerate(SPLITS):
        for metric, value in point_metrics(ys[split], scored.scores[split], scored.threshold).items():
            out[f"{prefix}{split_name}_{metric}"] = value
    draws = None
    if config.bootstrap:
        draws = bootstrap_draws(ys[2], scored.scores[2], scored.threshold, clusters[2],
                                config.bootstrap, config.seed)
        for metric, values in draws.items():
            name = f"{prefix}test_{metric}"
            out[name + CI_LO], out[name + CI_HI] = percentile_interval(values)
    out[f"{prefix}threshold"] = scored.threshold
    if not math.isnan(scored.strength):
        out[f"{prefix}C"] = scored.strength
    return out, draws


def _paired_gains(metrics: dict[str, float], draws: dict[str, dict[str, np.ndarray] | None],
                  baselines: Sequence[str]) -> dict[str, float]:
    """Probe minus each baseline on the test ranking metrics, with paired 95% intervals
    (both scorers see the same problem resamples), and whether the probe beats every
    baseline on PR-AUC (interval above 0)."""
    out: dict[str, float] = {}
    for baseline in baselines:
        for metric in RANKING_METRICS:
            name = f"probe_minus_{baseline}_test_{metric}"
            out[name] = metrics[f"test_{metric}"] - metrics[f"{baseline}_test_{metric}"]
            if draws["probe"] is not None and draws[baseline] is not None:
                out[name + CI_LO], out[name + CI_HI] = percentile_interval(
                    draws["probe"][metric] - draws[baseline][metric])
    lows = [out.get(f"probe_minus_{b}_test_pr_auc{CI_LO}", math.nan) for b in baselines]
    if lows and not any(math.isnan(low) for low in lows):
        out["beats_baselines"] = float(all(low > 0 for low in lows))
    return out


def _choose(logits: dict[int, np.ndarray], y_val: np.ndarray, strengths: Sequence[float]
            ) -> tuple[int, _Scored]:
    """Pick the strength with the best val PR-AUC, then the val-F1 threshold."""
    best = int(np.nanargmax([average_precision_score(y_val, logits[1][:, j])
                             for j in range(len(strengths))]))
    scores = {split: 1.0 / (1.0 + np.exp(-values[:, best])) for split, values in logits.items()}
    return best, _Scored(scores, best_threshold(y_val, scores[1]), float(strengths[best]))


def _check_rows(data: LayerData, label: str) -> None:
    row_split = data.split[data.chain]
    for k, lag in enumerate(data.lags):
        for split, split_name in enumerate(SPLITS):
            rows = data.valid[:, k] & (row_split == split)
            if not rows.any():
                raise LmlabError(f"lag {lag} is longer than every {split_name} chain: no token "
                                 f"t has a chain token at t + {lag}")
            if not data.targets[rows, k].any():
                raise LmlabError(f"label {label!r} never occurs in the {split_name} chains at lag "
                                 f"{lag}; use more chains or another label")


def _columns(real: int, k: int, n_lags: int, n_c: int) -> np.ndarray:
    """Output columns of lag index ``k``: the probe (real 0) or its shuffled control (1)."""
    return (real * n_lags + k) * n_c + np.arange(n_c)


def train_layer(data: LayerData, layer: int, label: str, config: TrainConfig) -> LayerResult:
    """Probe, baselines and shuffled control for every lag of one layer."""
    if not data.targets.any():
        raise LmlabError(f"label {label!r} never occurs in the kept chains")
    _check_rows(data, label)
    row_split = data.split[data.chain]
    train_rows = row_split == 0
    mean, scale = standardizer(data.features[train_rows])
    x = torch.from_numpy((data.features - mean) / scale)
    n_lags, n_c = len(data.lags), len(config.strengths)
    targets = np.zeros((x.shape[0], 2 * n_lags * n_c), dtype=np.float32)
    weights = np.zeros_like(targets)
    for k in range(n_lags):
        fit_rows = np.nonzero(train_rows & data.valid[:, k])[0]
        # Seeded per lag so a lag's control does not depend on which other lags are fitted.
        rng = np.random.default_rng([config.seed, data.lags[k] + 2 ** 16])
        shuffled = rng.permutation(data.targets[fit_rows, k])
        for real, column_y in ((0, data.targets[fit_rows, k]), (1, shuffled)):
            cols = _columns(real, k, n_lags, n_c)
            targets[np.ix_(fit_rows, cols)] = column_y[:, None]
            weights[np.ix_(fit_rows, cols)] = 1.0
    strengths = torch.tensor(list(config.strengths) * (2 * n_lags), dtype=x.dtype)
    fit_idx = np.nonzero(train_rows)[0]
    with torch_threads(config.fit_threads):
        fit = fit_joint(x[fit_idx], torch.from_numpy(targets[fit_idx]),
                        torch.from_numpy(weights[fit_idx]), strengths, config.max_iter,
                        config.tolerance)
    all_logits = (x @ fit.coef + fit.bias).numpy()
    result = LayerResult(layer, label, {})
    for k, lag in enumerate(data.lags):
        result.metrics[lag], result.probes[lag] = _lag_result(
            data, k, all_logits, fit, mean, scale, layer, label, config)
    return result


def _lag_result(data: LayerData, k: int, all_logits: np.ndarray, fit: JointFit,
                mean: np.ndarray, scale: np.ndarray, layer: int, label: str,
                config: TrainConfig) -> tuple[dict[str, float], Probe]:
    n_lags, n_c = len(data.lags), len(config.strengths)
    lag = data.lags[k]
    row_split = data.split[data.chain]
    rows = {s: np.nonzero(data.valid[:, k] & (row_split == s))[0] for s in range(3)}
    ys = {s: data.targets[r, k].astype(np.int64) for s, r in rows.items()}
    clusters = {s: data.group[r] for s, r in rows.items()}
    metrics: dict[str, float] = {}
    draws: dict[str, dict[str, np.ndarray] | None] = {}
    for real, name in ((0, "probe"), (1, "shuffled")):
        cols = _columns(real, k, n_lags, n_c)
        best, scored = _choose({s: all_logits[r][:, cols] for s, r in rows.items()}, ys[1],
                               config.strengths)
        found, draws[name] = _evaluate(name, scored, ys, clusters, config)
        metrics.update(found)
        if name == "probe":
            column = int(cols[best])
            probe = Probe(layer, lag, label, fit.coef[:, column].numpy().copy(),
                          float(fit.bias[column]), mean, scale, scored.threshold, scored.strength)
            metrics.update({"converged": float(fit.converged[column]),
                            "fit_iterations": float(fit.iterations[column]),
                            "fit_grad_max": float(fit.grad_max[column])})
    ids, now = data.token_ids, data.current
    baselines = {"token": {s: token_identity_scores(ids[rows[0]], ys[0], ids[r])
                           for s, r in rows.items()}}
    if lag != 0:  # at lag 0 the label at t is the target itself
        baselines["persistence"] = {s: persistence_scores(now[rows[0]], ids[rows[0]], ys[0],
                                                          now[r], ids[r]) for s, r in rows.items()}
    for name, scores in baselines.items():
        found, draws[name] = _evaluate(name, _Scored(scores, best_threshold(ys[1], scores[1])),
                                       ys, clusters, config)
        metrics.update(found)
    metrics.update(_paired_gains(metrics, draws, list(baselines)))
    lag_cols = np.r_[_columns(0, k, n_lags, n_c), _columns(1, k, n_lags, n_c)]
    metrics["fits"] = float(lag_cols.size)
    metrics["fits_unconverged"] = float((~fit.converged[lag_cols]).sum())
    metrics["fit_grad_max_worst"] = float(fit.grad_max[lag_cols].max())
    for s, split_name in enumerate(SPLITS):
        metrics[f"n_{split_name}"] = float(ys[s].size)
        metrics[f"positives_{split_name}"] = float(ys[s].sum())
        metrics[f"pos_ratio_{split_name}"] = float(ys[s].mean())
        metrics[f"chains_{split_name}"] = float(np.unique(data.chain[rows[s]]).size)
        metrics[f"problems_{split_name}"] = float(np.unique(clusters[s]).size)
    metrics["base_rate"] = metrics["pos_ratio_test"]
    return metrics, probe
