"""The parent's summary and plots name each strength by its unit and show controls and
empty answers beside the effects."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from lmlab.steering.family import summarize_sweep


def summary_rows() -> pd.DataFrame:
    def condition(method: str, intervention: str, value: float | None, refusal: float,
                  control_for: str | None = None, empty: float = 0.0) -> dict:
        row = {"method": method, "layer": None if intervention == "none" else 15,
               "intervention": intervention, "scope": "layer", "splits": ["harm_test", "benign"]}
        if intervention != "none":
            row[{"add": "add_norm_multiple", "ablate": "ablate_fraction"}[intervention]] = value
        if control_for:
            row["control_for"] = control_for
        for split in ("harm_test", "benign"):
            row.update({f"{split}/refusal": refusal, f"{split}/refusal_ci_lo": refusal / 2,
                        f"{split}/refusal_ci_hi": (1 + refusal) / 2, f"{split}/empty": empty,
                        f"{split}/degenerate": 0.0, f"{split}/compliance": 1 - refusal - empty})
        row["benign/cost"] = refusal + empty
        return row

    return pd.DataFrame([
        condition("none", "none", None, 0.05),
        condition("suffix_contrast", "add", 0.25, 0.9),
        condition("suffix_contrast", "add", 0.5, 0.6, empty=0.3),
        condition("random", "add", 0.25, 0.05, control_for="suffix_contrast"),
        condition("suffix_contrast", "ablate", 0.5, 0.0),
        condition("random", "ablate", 0.5, 0.05, control_for="suffix_contrast"),
    ])


def axis_labels(figure: plt.Figure) -> list[str]:
    return [ax.get_xlabel() for ax in figure.axes if ax.get_visible() and ax.get_xlabel()]


def test_dose_response_plots_label_each_axis_with_its_strength_name() -> None:
    result = summarize_sweep(summary_rows())
    for name in ("refusal_vs_strength", "outcome_shares", "layer_strength_heatmap"):
        labels = axis_labels(result.figures[name])
        assert any(label.startswith("add_norm_multiple") for label in labels), (name, labels)
        assert any(label.startswith("ablate_fraction") for label in labels), (name, labels)
        assert not any("alpha" in label for label in labels), (name, labels)


def test_a_control_is_drawn_in_the_panel_of_the_method_it_controls() -> None:
    figure = summarize_sweep(summary_rows()).figures["refusal_vs_strength"]
    panels = [ax for ax in figure.axes if ax.get_visible() and ax.get_title()]
    assert sorted(ax.get_title() for ax in panels) == ["suffix_contrast ablate L15",
                                                       "suffix_contrast add L15"]
    add_panel = [ax for ax in panels if "add" in ax.get_title()][0]
    assert any("random control" in line.get_label() for line in add_panel.get_lines())


def test_the_summary_keeps_strength_and_control_columns_in_front() -> None:
    table = summarize_sweep(summary_rows()).tables["summary"]
    assert list(table.columns[:8]) == ["method", "control_for", "layer", "intervention",
                                       "add_norm_multiple", "ablate_fraction", "scope", "splits"]
    assert table.iloc[0]["method"] == "none", "the baseline row comes first"
    assert "harm_test/empty" in table
