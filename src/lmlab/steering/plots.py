"""Parent-run plots for a steering sweep, built from summary.csv's rows."""

from __future__ import annotations

from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SPLIT_COLOURS = {"harm_train": "tab:red", "harm_val": "tab:orange", "harm_test": "tab:purple",
                 "benign": "tab:green"}


def _layer_label(layer: object) -> str:
    return f"L{int(layer)}" if isinstance(layer, (int, float)) and layer == layer else f"L{layer}"


def _steered(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary["intervention"] != "none"]


def _baseline_value(summary: pd.DataFrame, column: str) -> float | None:
    base = summary[summary["intervention"] == "none"]
    if column not in base or base[column].dropna().empty:
        return None
    return float(base[column].dropna().iloc[0])


def refusal_vs_alpha(summary: pd.DataFrame, splits: Iterable[str]) -> plt.Figure:
    """One panel per (method, intervention, layer): refusal rate with 95% bands."""
    steered = _steered(summary)
    groups = list(steered.groupby(["method", "intervention", "layer"], dropna=False))
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(4.2 * max(len(groups), 1), 3.6),
                             squeeze=False, sharey=True)
    baseline = summary[summary["intervention"] == "none"].assign(alpha=0.0)
    for ax, ((method, intervention, layer), rows) in zip(axes[0], groups):
        # The unsteered baseline is the curve's alpha = 0 point.
        rows = pd.concat([baseline, rows]).sort_values("alpha")
        for split in splits:
            col = f"{split}/refusal"
            if col not in rows:
                continue
            colour = SPLIT_COLOURS.get(split)
            ax.plot(rows["alpha"], rows[col], marker="o", color=colour, label=split)
            ax.fill_between(rows["alpha"], rows[f"{col}_lo"], rows[f"{col}_hi"], color=colour, alpha=0.15)
            base = _baseline_value(summary, col)
            if base is not None:
                ax.axhline(base, color=colour, linestyle=":", linewidth=1)
        ax.set_title(f"{method} {intervention} {_layer_label(layer)}")
        ax.set_xlabel("alpha")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("refusal rate (dotted: baseline)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def generalization_gap(summary: pd.DataFrame) -> plt.Figure:
    """harm_train minus harm_test refusal against alpha, per method and layer."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    steered = _steered(summary)
    if {"harm_train/refusal", "harm_test/refusal"} <= set(steered):
        for (method, layer), rows in steered.groupby(["method", "layer"], dropna=False):
            rows = rows.sort_values("alpha")
            ax.plot(rows["alpha"], rows["harm_train/refusal"] - rows["harm_test/refusal"],
                    marker="o", label=f"{method} {_layer_label(layer)}")
        ax.legend(fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("alpha")
    ax.set_ylabel("refusal: harm_train - harm_test")
    ax.set_title("generalization gap")
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
    rows = summary.dropna(subset=[c for c in (benefit_col, "benign/cost") if c in summary])
    if benefit_col in rows and "benign/cost" in rows and len(rows):
        benefit, cost = rows[benefit_col].to_numpy(), rows["benign/cost"].to_numpy()
        front = pareto_mask(benefit, cost)
        for method, group in rows.groupby("method"):
            ax.scatter(group["benign/cost"], group[benefit_col], label=method, alpha=0.8)
        order = np.argsort(cost[front])
        ax.plot(cost[front][order], benefit[front][order], color="black", linewidth=1,
                label="Pareto front")
        ax.scatter(cost[front], benefit[front], facecolors="none", edgecolors="black", s=120)
        ax.legend(fontsize=8)
    ax.set_xlabel("benign cost (refused or degenerate)")
    ax.set_ylabel(benefit_col.replace("/", " "))
    ax.set_title("trade-off")
    fig.tight_layout()
    return fig


def layer_alpha_heatmaps(summary: pd.DataFrame, column: str = "harm_test/refusal") -> plt.Figure:
    steered = _steered(summary).dropna(subset=[column]) if column in summary else summary.iloc[:0]
    groups = list(steered.groupby(["method", "intervention"]))
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(4.5 * max(len(groups), 1), 3.8), squeeze=False)
    for ax, ((method, intervention), rows) in zip(axes[0], groups):
        table = rows.pivot_table(index="layer", columns="alpha", values=column, aggfunc="mean")
        image = ax.imshow(table.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(table.columns)), [f"{a:g}" for a in table.columns])
        ax.set_yticks(range(len(table.index)), [_layer_label(l) for l in table.index])
        for (i, j), value in np.ndenumerate(table.to_numpy()):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white", fontsize=8)
        ax.set_xlabel("alpha")
        ax.set_ylabel("layer")
        ax.set_title(f"{column} | {method} {intervention}")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
