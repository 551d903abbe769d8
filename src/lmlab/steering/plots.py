"""Parent-run plots for a steering sweep, built from summary.csv's rows.

The x axis of every dose-response plot is the intervention's own strength param, named
for its unit: ``add_norm_multiple`` or ``ablate_fraction``. A random control is drawn in
the panel of the method it controls (dashed), beside the baseline (dotted).
"""

from __future__ import annotations

from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lmlab.stats import CI_HI, CI_LO  # noqa: E402
from lmlab.steering.directions import CONTROL_METHOD as CONTROL  # noqa: E402
from lmlab.steering.family import CONTROL_FOR, STRENGTH, direction_label  # noqa: E402

SPLIT_COLOURS = {"harm_train": "tab:red", "harm_val": "tab:orange", "harm_test": "tab:purple",
                 "benign": "tab:green"}
STRENGTH_LABELS = {"add_norm_multiple": "add_norm_multiple (added norm / mean residual norm)",
                   "ablate_fraction": "ablate_fraction (share of the component removed)"}


def _layer_label(layer: object) -> str:
    return f"L{int(layer)}" if isinstance(layer, (int, float)) and layer == layer else f"L{layer}"


def normalised(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with every condition column present (NaN where a row has none)."""
    missing = [c for c in (CONTROL_FOR, *STRENGTH.values()) if c not in summary]
    return summary.assign(**{c: np.nan for c in missing}) if missing else summary


def _steered(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary["intervention"] != "none"]


def _baseline_value(summary: pd.DataFrame, column: str) -> float | None:
    base = summary[summary["intervention"] == "none"]
    if column not in base or base[column].dropna().empty:
        return None
    return float(base[column].dropna().iloc[0])


def _controlled_method(rows: pd.DataFrame) -> pd.Series:
    """The real method each row belongs to (a control's is the one it controls)."""
    return rows[CONTROL_FOR].where(rows["method"] == CONTROL, rows["method"])


def _labels(rows: pd.DataFrame) -> pd.Series:
    return pd.Series([direction_label(m, c) for m, c in zip(rows["method"], rows[CONTROL_FOR])],
                     index=rows.index, dtype=object)


def _panels(summary: pd.DataFrame) -> list[tuple[tuple[str, str, object], pd.DataFrame]]:
    """Steered rows grouped by (controlled method, intervention, layer)."""
    steered = _steered(summary).assign(panel_method=lambda f: _controlled_method(f))
    return list(steered.groupby(["panel_method", "intervention", "layer"], dropna=False))


def _axes(n: int, height: float = 3.6, columns: int = 4) -> tuple[plt.Figure, list]:
    """``n`` panels (at least one) in rows of at most ``columns``; spare panels hidden."""
    n = max(n, 1)
    ncols, nrows = min(n, columns), -(-n // columns)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, height * nrows), squeeze=False,
                             sharey=True)
    flat = list(axes.flat)
    for spare in flat[n:]:
        spare.set_visible(False)
    return fig, flat[:n]


def refusal_vs_strength(summary: pd.DataFrame, splits: Iterable[str]) -> plt.Figure:
    """One panel per (method, intervention, layer): refusal rate with 95% bands; the
    method solid, its random control dashed, the baseline dotted (the strength-0 point)."""
    summary = normalised(summary)
    panels = _panels(summary)
    fig, axes = _axes(len(panels))
    baseline = summary[summary["intervention"] == "none"]
    for ax, ((method, intervention, layer), rows) in zip(axes, panels):
        x = STRENGTH[intervention]
        for is_control, style in ((False, "-"), (True, "--")):
            part = rows[(rows["method"] == CONTROL) == is_control]
            if part.empty:
                continue
            part = pd.concat([baseline.assign(**{x: 0.0}), part]).sort_values(x)
            for split in splits:
                col = f"{split}/refusal"
                if col not in part:
                    continue
                colour = SPLIT_COLOURS.get(split)
                label = f"{split} (random control)" if is_control else split
                ax.plot(part[x], part[col], style, marker="o", color=colour, label=label)
                if not is_control:
                    ax.fill_between(part[x], part[col + CI_LO], part[col + CI_HI], color=colour,
                                    alpha=0.15)
        for split in splits:
            base = _baseline_value(summary, f"{split}/refusal")
            if base is not None:
                ax.axhline(base, color=SPLIT_COLOURS.get(split), linestyle=":", linewidth=1)
        ax.set_title(f"{method} {intervention} {_layer_label(layer)}")
        ax.set_xlabel(STRENGTH_LABELS[x])
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("refusal rate (dotted: baseline)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def outcome_shares(summary: pd.DataFrame, splits: Iterable[str]) -> plt.Figure:
    """Shares of compliant (solid), degenerate (dashed) and empty (dotted) answers against
    strength, per (method, intervention, layer): what a refusal rate leaves out."""
    summary = normalised(summary)
    panels = _panels(summary)
    fig, axes = _axes(len(panels))
    baseline = summary[summary["intervention"] == "none"]
    for ax, ((method, intervention, layer), rows) in zip(axes, panels):
        x = STRENGTH[intervention]
        part = pd.concat([baseline.assign(**{x: 0.0}), rows[rows["method"] != CONTROL]]).sort_values(x)
        for split in splits:
            for outcome, style in (("compliance", "-"), ("degenerate", "--"), ("empty", ":")):
                col = f"{split}/{outcome}"
                if col in part:
                    ax.plot(part[x], part[col], style, marker=".", color=SPLIT_COLOURS.get(split),
                            label=f"{split} {outcome}")
        ax.set_title(f"{method} {intervention} {_layer_label(layer)}")
        ax.set_xlabel(STRENGTH_LABELS[x])
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("share of answers")
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def generalization_gap(summary: pd.DataFrame) -> plt.Figure:
    """harm_train minus harm_test refusal against strength, one panel per intervention."""
    steered = _steered(normalised(summary))
    interventions = sorted(steered["intervention"].unique()) or ["add"]
    fig, axes = _axes(len(interventions))
    for ax, intervention in zip(axes, interventions):
        x = STRENGTH[intervention]
        rows = steered[steered["intervention"] == intervention]
        if {"harm_train/refusal", "harm_test/refusal"} <= set(rows):
            for (label, layer), group in rows.groupby([_labels(rows), "layer"], dropna=False):
                group = group.sort_values(x)
                ax.plot(group[x], group["harm_train/refusal"] - group["harm_test/refusal"],
                        "--" if group["method"].iloc[0] == CONTROL else "-", marker="o",
                        label=f"{label} {_layer_label(layer)}")
            ax.legend(fontsize=7)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel(STRENGTH_LABELS[x])
        ax.set_title(f"generalization gap ({intervention})")
    axes[0].set_ylabel("refusal: harm_train - harm_test")
    fig.tight_layout()
    return fig


def pareto_mask(benefit: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """True where no other point has benefit >= and cost <= with one strictly better."""
    mask = np.ones(len(benefit), dtype=bool)
    for i in range(len(benefit)):
        better = (benefit >= benefit[i]) & (cost <= cost[i]) & ((benefit > benefit[i]) | (cost < cost[i]))
        mask[i] = not better.any()
    return mask


def tradeoff(summary: pd.DataFrame, benefit_col: str = "harm_test/refusal") -> plt.Figure:
    """Held-out refusal against benign cost; the Pareto front is outlined."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    rows = normalised(summary).dropna(subset=[c for c in (benefit_col, "benign/cost") if c in summary])
    if benefit_col in rows and "benign/cost" in rows and len(rows):
        benefit, cost = rows[benefit_col].to_numpy(), rows["benign/cost"].to_numpy()
        front = pareto_mask(benefit, cost)
        for label, group in rows.groupby(_labels(rows)):
            ax.scatter(group["benign/cost"], group[benefit_col], label=label, alpha=0.8)
        order = np.argsort(cost[front])
        ax.plot(cost[front][order], benefit[front][order], color="black", linewidth=1,
                label="Pareto front")
        ax.scatter(cost[front], benefit[front], facecolors="none", edgecolors="black", s=120)
        ax.legend(fontsize=7)
    ax.set_xlabel("benign cost (refused, degenerate or empty)")
    ax.set_ylabel(benefit_col.replace("/", " "))
    ax.set_title("trade-off")
    fig.tight_layout()
    return fig


def layer_strength_heatmaps(summary: pd.DataFrame, column: str = "harm_test/refusal") -> plt.Figure:
    """Layer by strength, one panel per (method or control, intervention)."""
    summary = normalised(summary)
    steered = _steered(summary).dropna(subset=[column]) if column in summary else summary.iloc[:0]
    steered = steered.assign(label=_labels(steered))
    groups = list(steered.groupby(["label", "intervention"]))
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(4.8 * max(len(groups), 1), 3.8),
                             squeeze=False)
    for ax, ((label, intervention), rows) in zip(axes[0], groups):
        x = STRENGTH[intervention]
        table = rows.pivot_table(index="layer", columns=x, values=column, aggfunc="mean")
        image = ax.imshow(table.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(table.columns)), [f"{a:g}" for a in table.columns])
        ax.set_yticks(range(len(table.index)), [_layer_label(l) for l in table.index])
        for (i, j), value in np.ndenumerate(table.to_numpy()):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white", fontsize=8)
        ax.set_xlabel(STRENGTH_LABELS[x])
        ax.set_ylabel("layer")
        ax.set_title(f"{column} | {label} {intervention}", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
