"""Token shading for HTML pages: each token a ``<span>`` whose background carries its score.

Used by the probe viewer (a probability per token) and the diffing report (a signed shift
per token). ``probability_colour`` maps [0, 1] to white..red; ``signed_colour`` maps a
signed score to blue (negative) or red (positive), saturated at ``scale``.
"""

from __future__ import annotations

import html
from typing import Callable, Iterable


def probability_colour(score: float) -> str:
    # White at 0 to saturated red at 1: alpha carries the score.
    return f"rgba(220, 40, 40, {min(max(score, 0.0), 1.0):.3f})"


def signed_colour(score: float, scale: float) -> str:
    """Red for positive, blue for negative scores; alpha = |score| / scale, capped at 1."""
    strength = min(abs(score) / scale, 1.0) if scale > 0 else 0.0
    red, green, blue = (220, 40, 40) if score >= 0 else (40, 90, 220)
    return f"rgba({red}, {green}, {blue}, {strength:.3f})"


def shaded_spans(pieces: Iterable[str], scores: Iterable[float], colour: Callable[[float], str],
                 title: Callable[[float], str], underline: Callable[[float], bool] | None = None,
                 ) -> str:
    """One span per token: background ``colour(score)``, hover text ``title(score)``, and a
    black underline where ``underline(score)`` holds."""
    spans = []
    for piece, score in zip(pieces, scores):
        value = float(score)
        border = "border-bottom:2px solid black;" if underline and underline(value) else ""
        spans.append(f'<span title="{html.escape(title(value))}" style="background:'
                     f'{colour(value)};{border}">{html.escape(piece)}</span>')
    return "".join(spans)
