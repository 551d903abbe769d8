"""Parent-run figures: layer x lag heatmaps, metric-vs-lag lines, class balance."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lmlab.stats import CI_HI, CI_LO  # noqa: E402

PANELS = (("", "probe"), ("token_", "token-identity baseline"),
          ("persistence_", "label-persistence baseline"), ("shuffled_", "shuffled-label control"))
METRIC_TITLES = {"test_auroc": "test ROC-AUC", "test_pr_auc": "test PR-AUC", "test_f1": "test F1",
                 "test_accuracy": "test accuracy"}


def heatmap(results: pd.DataFrame, metric: str, label: str) -> plt.Figure:
    """Layer x lag grid of ``metric`` for the probe beside its baseline and control."""
    layers = sorted(results["layer"].unique())
    lags = sorted(results["lag"].unique())
    fig, axes = plt.subplots(1, len(PANELS), figsize=(2 + len(PANELS) * (1.2 + 0.55 * len(lags)),
                                            1.8 + 0.5 * len(layers)), squeeze=False)
    columns = [prefix + metric for prefix, _ in PANELS]
    # The persistence baseline has no lag-0 value (there the label at t is the target).
    results = results.assign(**{c: np.nan for c in columns if c not in results})
    values = results[columns].to_numpy(dtype=float)
    vmin, vmax = np.nanmin(values), np.nanmax(values)
    for ax, (prefix, title) in zip(axes[0], PANELS):
        grid = results.pivot_table(index="layer", columns="lag", values=prefix + metric)
        grid = grid.reindex(index=layers, columns=lags)
        image = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", vmin=vmin, vmax=vmax,
                          aspect="auto")
        for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
            if np.isnan(value):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="grey")
                continue
            bright = (value - vmin) / max(vmax - vmin, 1e-12) > 0.6
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if bright else "white")
        ax.set_xticks(range(len(lags)), [str(k) for k in lags])
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("lag (label at t + lag)")
        ax.set_ylabel("layer")
        ax.set_title(title)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"{label}: {METRIC_TITLES.get(metric, metric)}")
    return fig


def lines(results: pd.DataFrame, metric: str, label: str) -> plt.Figure:
    """``metric`` versus lag, one line per layer; token baseline dashed, persistence
    baseline dash-dotted, control dotted."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.cm.viridis(np.linspace(0, 0.9, results["layer"].nunique()))
    for colour, (layer, rows) in zip(colours, results.sort_values("lag").groupby("layer")):
        ax.plot(rows["lag"], rows[metric], marker="o", color=colour, label=f"layer {layer}")
        if metric + CI_LO in rows:
            ax.fill_between(rows["lag"], rows[metric + CI_LO], rows[metric + CI_HI], color=colour,
                            alpha=0.12)
    first = results[results["layer"] == results["layer"].min()].sort_values("lag")
    ax.plot(first["lag"], first[f"token_{metric}"], "k--", label="token-identity baseline")
    if f"persistence_{metric}" in first:
        ax.plot(first["lag"], first[f"persistence_{metric}"], "k-.", marker=".",
                label="label-persistence baseline")
    ax.plot(first["lag"], first[f"shuffled_{metric}"], "k:", label="shuffled-label control")
    if metric.endswith("pr_auc"):
        ax.plot(first["lag"], first["pos_ratio_test"], color="grey", lw=0.8, label="base rate")
    ax.set_xlabel("lag (activation at t predicts the label at t + lag)")
    ax.set_ylabel(METRIC_TITLES.get(metric, metric))
    ax.set_title(f"{label}: {METRIC_TITLES.get(metric, metric)} by lag (95% problem-bootstrap bands)")
    ax.legend(fontsize=7)
    return fig


def class_balance(results: pd.DataFrame, label: str) -> plt.Figure:
    """Positive share of tokens per split and lag (identical across layers)."""
    first = results[results["layer"] == results["layer"].min()].sort_values("lag")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    x = np.arange(len(first))
    for offset, split in zip((-width, 0, width), ("train", "val", "test")):
        ax.bar(x + offset, first[f"pos_ratio_{split}"], width,
               label=f"{split} (n={int(first[f'n_{split}'].iloc[0])} tokens)")
    ax.set_xticks(x, [str(k) for k in first["lag"]])
    ax.set_xlabel("lag")
    ax.set_ylabel(f"share of tokens labelled {label}")
    ax.set_title(f"class balance: {label}")
    ax.legend(fontsize=7)
    return fig
