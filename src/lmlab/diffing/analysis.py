"""From per-token projections to ranked traits and blind detection.

Per response (response tokens only), for each trait at each layer:

* ``mean``: response mean; ``max_token``: the largest token score; ``top3_mean``: mean of
  the three largest; ``trend``: least-squares slope of the score over relative position
  (0 = first response token, 1 = last), i.e. the change across a whole response;
  ``top_clause``: the largest clause mean (clauses end at . , ; : ! ? or a newline).

``same_text`` takes these statistics of the per-token shift (organism minus clean on the
organism's tokens); ``own_text`` takes each model's statistic on its own generation and
subtracts the clean model's from the organism's, prompt by prompt. Every estimate is a mean
over responses with a percentile bootstrap interval over responses (:mod:`lmlab.stats`).

Across organisms (the parent run), the shared shift is the mean over organisms for the same
response unit (prompt set, prompt id); it is subtracted before ranking so that a persona
every fine-tune shares does not dominate. The raw ranking is kept beside it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from lmlab.stats import CI_HI, CI_LO, Estimate, mean_with_interval

CLAUSE_END = re.compile(r"[.,;:!?\n]")
UNIT_KEYS = ["prompt_set", "prompt_id"]
CELL_KEYS = ["convention", "layer", "trait", "method", "stat"]
#: The columns of an estimate in a table: the mean over responses and its interval.
ESTIMATE, ESTIMATE_LO, ESTIMATE_HI = "estimate", "estimate" + CI_LO, "estimate" + CI_HI


def trend(scores: np.ndarray) -> float:
    """Slope of score over relative position in [0, 1] (NaN below two tokens)."""
    n = scores.size
    if n < 2:
        return math.nan
    position = np.linspace(0.0, 1.0, n)
    centred = position - position.mean()
    return float(centred @ (scores - scores.mean()) / (centred @ centred))


def clause_spans(pieces: Sequence[str]) -> list[tuple[int, int]]:
    """[start, end) token ranges of clauses: a clause ends with a token holding . , ; : ! ?
    or a newline."""
    spans, start = [], 0
    for index, piece in enumerate(pieces):
        if CLAUSE_END.search(piece):
            spans.append((start, index + 1))
            start = index + 1
    if start < len(pieces):
        spans.append((start, len(pieces)))
    return spans


def response_stats(scores: np.ndarray, spans: Sequence[tuple[int, int]]) -> dict[str, float]:
    if scores.size == 0:
        return {"mean": math.nan, "top3_mean": math.nan, "max_token": math.nan,
                "trend": math.nan, "top_clause": math.nan}
    top = np.sort(scores)[::-1][:3]
    clauses = [float(scores[a:b].mean()) for a, b in spans if b > a]
    return {"mean": float(scores.mean()), "top3_mean": float(top.mean()),
            "max_token": float(scores.max()), "trend": trend(scores),
            "top_clause": max(clauses) if clauses else float(scores.mean())}


def estimates(values: pd.DataFrame, keys: Sequence[str], n_resamples: int, seed: int,
              column: str = "value") -> pd.DataFrame:
    """Mean and 95% bootstrap interval over responses for every group of ``keys``."""
    rows = []
    for group, frame in values.groupby(list(keys), sort=True):
        estimate = mean_with_interval(frame[column].to_numpy(), n_resamples=n_resamples, seed=seed)
        rows.append({**dict(zip(keys, group if isinstance(group, tuple) else (group,))),
                     ESTIMATE: estimate.value, ESTIMATE_LO: estimate.lower,
                     ESTIMATE_HI: estimate.upper, "n": estimate.n})
    return pd.DataFrame(rows, columns=[*keys, ESTIMATE, ESTIMATE_LO, ESTIMATE_HI, "n"])


def binned_trajectory(scores: np.ndarray, bins: int) -> np.ndarray:
    """Mean score in each relative-position bin of one response (NaN for empty bins)."""
    out = np.full(bins, np.nan)
    if scores.size == 0:
        return out
    index = np.minimum((np.linspace(0, 1, scores.size, endpoint=False) * bins).astype(int)
                       if scores.size > 1 else np.zeros(1, dtype=int), bins - 1)
    for b in range(bins):
        chosen = scores[index == b]
        if chosen.size:
            out[b] = chosen.mean()
    return out


# ---------------------------------------------------------------- across organisms


def remove_shared_shift(values: pd.DataFrame) -> pd.DataFrame:
    """Add ``adjusted`` = value minus the mean over organisms of the same unit and cell.

    Units every organism lacks are left out of nothing: the mean is over the organisms
    that have that unit."""
    keys = UNIT_KEYS + CELL_KEYS
    shared = values.groupby(keys)["value"].transform("mean")
    return values.assign(shared=shared, adjusted=values["value"] - shared)


def ranked(values: pd.DataFrame, n_resamples: int, seed: int) -> pd.DataFrame:
    """Per (organism, convention, layer, method, stat, trait): raw and shared-shift-removed
    estimates with intervals, and each trait's rank among the organism's traits (1 = the
    largest positive shift)."""
    adjusted = remove_shared_shift(values)
    keys = ["organism", *CELL_KEYS]
    raw = _kind(estimates(adjusted, keys, n_resamples, seed, "value"), "raw")
    adj = _kind(estimates(adjusted, keys, n_resamples, seed, "adjusted"), "adjusted")
    table = raw.merge(adj.drop(columns=["n"]), on=keys)
    group = ["organism", "convention", "layer", "method", "stat"]
    for kind in ("raw", "adjusted"):
        table[f"rank_{kind}"] = table.groupby(group)[f"estimate_{kind}"].rank(
            ascending=False, method="min")
    return table


def _kind(table: pd.DataFrame, kind: str) -> pd.DataFrame:
    """``estimate`` and its interval columns renamed ``estimate_<kind>...``."""
    return table.rename(columns={ESTIMATE + end: f"{ESTIMATE}_{kind}{end}"
                                 for end in ("", CI_LO, CI_HI)})


def _adjusted(row: pd.Series) -> Estimate:
    return Estimate(float(row["estimate_adjusted"]), float(row["estimate_adjusted" + CI_LO]),
                    float(row["estimate_adjusted" + CI_HI]), int(row["n"]))


@dataclass(frozen=True)
class Finding:
    organism: str
    planted: str | None
    stat: str
    top_trait: str
    top: Estimate
    planted_rank: float
    planted_estimate: Estimate | None
    random_upper: float
    found: bool  # the top trait is a finding: its whole interval above 0 and above the band

    @property
    def detected(self) -> bool:
        return self.found and self.planted is not None and self.top_trait == self.planted


def findings(table: pd.DataFrame, planted: Mapping[str, str | None], convention: str, layer: int,
             method: str, stats: Iterable[str], random_names: Sequence[str]) -> list[Finding]:
    """For each organism and statistic: the top-ranked trait after shared-shift removal,
    whether it is a finding, and where the planted trait ranks."""
    out = []
    cell = table[(table["convention"] == convention) & (table["layer"] == layer)
                 & (table["method"] == method)]
    for organism, trait in planted.items():
        for stat in stats:
            rows = cell[(cell["organism"] == organism) & (cell["stat"] == stat)]
            rows = rows.dropna(subset=["estimate_adjusted"])
            if rows.empty:
                continue
            top = rows.sort_values("estimate_adjusted", ascending=False).iloc[0]
            randoms = rows[rows["trait"].isin(random_names)]
            random_upper = float(randoms["estimate_adjusted" + CI_HI].max()) \
                if not randoms.empty else -math.inf
            top_estimate = _adjusted(top)
            # The whole interval must clear the random band, not only the point estimate:
            # with 20+ traits and 5 statistics, a point just above the band is expected by
            # chance (the control organism showed one at layer 15 on the embedded model).
            found = (top["trait"] not in random_names and top_estimate.lower > 0
                     and top_estimate.lower > random_upper)
            mine = rows[rows["trait"] == trait] if trait else rows.iloc[0:0]
            planted_estimate = None if mine.empty else _adjusted(mine.iloc[0])
            out.append(Finding(organism, trait, stat, str(top["trait"]), top_estimate,
                               float(mine["rank_adjusted"].iloc[0]) if not mine.empty else math.nan,
                               planted_estimate, random_upper, bool(found)))
    return out


def detection_table(found: Sequence[Finding]) -> pd.DataFrame:
    return pd.DataFrame([{
        "organism": f.organism, "planted_trait": f.planted or "", "stat": f.stat,
        "planted_rank": f.planted_rank,
        "planted_shift": f.planted_estimate.value if f.planted_estimate else math.nan,
        "planted_shift" + CI_LO: f.planted_estimate.lower if f.planted_estimate else math.nan,
        "planted_shift" + CI_HI: f.planted_estimate.upper if f.planted_estimate else math.nan,
        "top_trait": f.top_trait, "top_shift": f.top.value, "top_shift" + CI_LO: f.top.lower,
        "top_shift" + CI_HI: f.top.upper, "random_hi": f.random_upper, "finding": f.found,
        "detected": f.detected} for f in found])


def random_pooled(table: pd.DataFrame, random_names: Sequence[str], n_resamples: int,
                  seed: int) -> pd.DataFrame:
    """The random control as one trait: a direction drawn at random.

    A fine-tune moves the residual stream by a consistent vector, so its projection on any
    one fixed direction is consistently non-zero and that direction's interval over
    responses may well exclude 0. What a random direction shows is therefore estimated
    over directions: per (organism, convention, layer, method, statistic), the mean of the
    directions' shared-shift-removed estimates with a bootstrap interval over directions,
    beside the largest single-direction upper bound (the band a finding must clear)."""
    rows = []
    keys = ["organism", "convention", "layer", "method", "stat"]
    chosen = table[table["trait"].isin(random_names)]
    for group, frame in chosen.groupby(keys, sort=True):
        estimate = mean_with_interval(frame["estimate_adjusted"].to_numpy(),
                                      n_resamples=n_resamples, seed=seed)
        rows.append({**dict(zip(keys, group)), ESTIMATE: estimate.value,
                     ESTIMATE_LO: estimate.lower, ESTIMATE_HI: estimate.upper,
                     "directions": estimate.n,
                     "largest_hi": float(frame["estimate_adjusted" + CI_HI].max()),
                     "largest_abs": float(frame["estimate_adjusted"].abs().max())})
    return pd.DataFrame(rows, columns=[*keys, ESTIMATE, ESTIMATE_LO, ESTIMATE_HI, "directions",
                                       "largest_hi", "largest_abs"])


# Statistics linear in the per-token shift: their mean over random directions is 0 in
# expectation. Extreme ones (max_token, top3_mean, top_clause) are not: after shared-shift
# removal an organism whose shifts vary more has larger maxima along any direction, so their
# pooled random values are biased (positive for a strong organism, negative for a weak one)
# and are read only as the band a finding must clear.
LINEAR_STATS = ("mean", "trend")


def outside_zero(pooled: pd.DataFrame) -> pd.DataFrame:
    """Rows of :func:`random_pooled` for a linear statistic whose interval excludes 0."""
    linear = pooled[pooled["stat"].isin(LINEAR_STATS)]
    return linear[(linear[ESTIMATE_LO] > 0) | (linear[ESTIMATE_HI] < 0)]


def is_random(trait: str) -> bool:
    """The random controls are named ``random`` and ``random_<k>``."""
    return re.fullmatch(r"random(_\d+)?", str(trait)) is not None
