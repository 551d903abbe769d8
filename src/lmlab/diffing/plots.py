"""Figures: organism x trait heatmaps of the shift, per-token trajectories."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lmlab.stats import CI_HI, CI_LO  # noqa: E402


def shift_heatmap(table: pd.DataFrame, kind: str, title: str) -> plt.Figure:
    """Organism x trait grid of ``estimate_<kind>`` (kind: raw or adjusted), a diverging
    scale centred on 0; cells whose interval excludes 0 are marked with a star."""
    grid = table.pivot_table(index="organism", columns="trait", values=f"estimate_{kind}")
    low = table.pivot_table(index="organism", columns="trait", values=f"estimate_{kind}{CI_LO}")
    high = table.pivot_table(index="organism", columns="trait", values=f"estimate_{kind}{CI_HI}")
    values = grid.to_numpy(dtype=float)
    bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * grid.shape[1], 1.6 + 0.5 * grid.shape[0]))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        if np.isnan(value):
            continue
        outside = low.to_numpy()[i, j] > 0 or high.to_numpy()[i, j] < 0
        ax.text(j, i, f"{value:.2f}{'*' if outside else ''}", ha="center", va="center",
                fontsize=7)
    ax.set_xticks(range(grid.shape[1]), list(grid.columns), rotation=40, ha="right")
    ax.set_yticks(range(grid.shape[0]), list(grid.index))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def trajectories(rows: pd.DataFrame, organism: str, planted: str | None, unit: str) -> plt.Figure:
    """Mean same_text shift by relative response position, one line per trait (95% band)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for trait, frame in rows.groupby("trait"):
        frame = frame.sort_values("position")
        bold = trait == planted
        line, = ax.plot(frame["position"], frame["mean"], marker="o", markersize=3,
                        linewidth=2.4 if bold else 1.0, label=str(trait) + (" (planted)" if bold else ""))
        ax.fill_between(frame["position"], frame["mean" + CI_LO], frame["mean" + CI_HI], alpha=0.12,
                        color=line.get_color())
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("relative position in the response (0 = first token, 1 = last)")
    ax.set_ylabel(f"shift ({unit})")
    ax.set_title(f"{organism}: same_text shift along the response", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
