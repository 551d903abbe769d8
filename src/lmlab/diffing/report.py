"""What a reader opens: the top-activating page of a condition and the sweep's summary.md."""

from __future__ import annotations

import html
import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from lmlab.diffing.analysis import Finding
from lmlab.diffing.capture import CONVENTIONS
from lmlab.shading import shaded_spans, signed_colour

UNIT_WORDS = {"raw": "raw h.v/|v| (residual units)",
              "scaled": "h.v/|v| divided by the layer's mean residual norm (clean model, this "
                        "prompt set, first token left out)"}


def top_activating_html(organism: str, prompt_set: str, layer: int, method: str, unit: str,
                        responses: Sequence[tuple[str, str, list[str], np.ndarray, float]],
                        clauses: pd.DataFrame) -> str:
    """``responses``: (trait, prompt id, response pieces, per-token shift, response mean),
    already the top ones per trait. Tokens are shaded by their same_text shift: red up,
    blue down, saturated at the largest |shift| on the page."""
    finite = [np.abs(s).max() for *_, s, _ in responses if len(s)]
    scale = float(max(finite)) if finite else 1.0
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(organism)}: top-activating responses</title></head>",
        "<body style='font-family:sans-serif;max-width:64em;margin:2em auto'>",
        f"<h2>{html.escape(organism)} on {html.escape(prompt_set)}: top-activating responses</h2>",
        f"<p>Convention <b>same_text</b>: {html.escape(CONVENTIONS['same_text'])}. Layer {layer}, "
        f"trait method {html.escape(method)}, unit: {html.escape(UNIT_WORDS[unit])}. Each token "
        f"is shaded by its shift (red: the organism projects higher than the clean model, "
        f"blue: lower; full colour at |shift| = {scale:.3g}). Hover for values.</p>"]
    for trait in dict.fromkeys(t for t, *_ in responses):
        parts.append(f"<h3>{html.escape(trait)}</h3>")
        top = clauses[clauses["trait"] == trait] if not clauses.empty else clauses
        if not top.empty:
            parts.append("<p>Top clauses:</p><ol>" + "".join(
                f"<li>{html.escape(row.clause)} <small>({row.shift:+.3g}, {html.escape(row.prompt_id)})"
                "</small></li>" for row in top.itertuples()) + "</ol>")
        for name, prompt_id, pieces, shift, mean in responses:
            if name != trait:
                continue
            spans = shaded_spans(pieces, shift, lambda s: signed_colour(s, scale),
                                 title=lambda s: f"shift={s:+.3g}")
            parts.append(f"<p><small>{html.escape(prompt_id)}, response mean {mean:+.3g}</small></p>"
                         "<div style='white-space:pre-wrap;line-height:1.7;font-family:monospace;"
                         f"border-left:3px solid #ccc;padding-left:0.6em'>{spans}</div>")
    parts.append("</body></html>")
    return "".join(parts)


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.3g}"


def summary_markdown(found: Sequence[Finding], planted: Mapping[str, str | None],
                     controls: Sequence[str], stats: Sequence[str], convention: str, layer: int,
                     method: str, unit: str, random: pd.DataFrame, n_traits: int,
                     behaviour: pd.DataFrame | None = None,
                     cross_check: tuple[str, Sequence[Finding]] | None = None) -> str:
    """What was and was not found, and why, in words. ``cross_check`` is the other diff
    convention's findings, reported beside the ranking's (never instead of it)."""
    known = [o for o, t in planted.items() if t]
    detected = sorted({f.organism for f in found if f.detected})
    lines = ["# Model diffing: blind detection", "",
             f"Ranking: convention `{convention}` ({CONVENTIONS[convention]}), layer {layer}, "
             f"trait method `{method}`, unit: {UNIT_WORDS[unit]}. Shifts are shared-shift "
             "removed (the mean over organisms of the same response subtracted) before ranking; "
             f"{n_traits} traits compete, the random controls among them. Intervals: 95% "
             "bootstrap over responses.", "",
             "A **finding** for an organism under a statistic is its top-ranked trait when that "
             "trait's whole interval lies above 0 and above every random direction's upper "
             "bound. A planted trait is **detected** when it is the finding under at least one "
             f"statistic of: {', '.join(f'`{s}`' for s in stats)}.", "",
             f"**Detected {len(detected)} of {len(known)}** organisms with a planted trait"
             + (f" ({', '.join(detected)})." if detected else "."), ""]
    for organism in known:
        mine = [f for f in found if f.organism == organism]
        hits = [f.stat for f in mine if f.detected]
        trait = planted[organism]
        if hits:
            lines.append(f"- `{organism}`: planted `{trait}` **found** by {', '.join(hits)}.")
        else:
            why = "; ".join(_why(f) for f in mine) or "no statistic could be computed"
            lines.append(f"- `{organism}`: planted `{trait}` **not found**: {why}.")
        for f in mine:
            if f.detected and f.stat != "mean" and not any(g.detected and g.stat == "mean"
                                                          for g in mine):
                lines.append(f"  - the response mean misses it; `{f.stat}` finds it "
                             f"({_fmt(f.top.value)} [{_fmt(f.top.lower)}, {_fmt(f.top.upper)}]).")
                break
    if cross_check is not None:
        lines += _cross_check_lines(convention, known, planted, found, controls, *cross_check)
    lines.append("")
    for control in controls:
        false = [f for f in found if f.organism == control and f.found]
        if false:
            lines.append(f"- control `{control}`: **{len(false)} false detection(s)**: " + "; ".join(
                f"`{f.top_trait}` by {f.stat} ({_fmt(f.top.value)} [{_fmt(f.top.lower)}, "
                f"{_fmt(f.top.upper)}])" for f in false) + ".")
        else:
            lines.append(f"- control `{control}`: no false detection under any statistic.")
    others = [o for o, t in planted.items() if not t and o not in controls]
    for organism in others:
        hits = [f for f in found if f.organism == organism and f.found]
        lines.append(f"- `{organism}` (no planted trait given): " + (
            "; ".join(f"`{f.top_trait}` by {f.stat} ({_fmt(f.top.value)})" for f in hits)
            if hits else "nothing beyond the intervals") + ".")
    lines.append(_random_line(random))
    if behaviour is not None and not behaviour.empty:
        lines += ["", "Behaviour check (share of responses showing each quirk, organism vs clean "
                  "model, 95% Wilson intervals):", "", markdown_table(behaviour)]
    return "\n".join(lines) + "\n"


def _cross_check_lines(convention: str, known: Sequence[str], planted: Mapping[str, str | None],
                       found: Sequence[Finding], controls: Sequence[str], other: str,
                       other_found: Sequence[Finding]) -> list[str]:
    """The same detection under the other convention, and what a difference between the
    two means: ``same_text`` sees how the organism represents the same tokens differently,
    ``own_text`` adds what it chose to write."""
    mine = {f.organism for f in found if f.detected}
    theirs = sorted({f.organism for f in other_found if f.detected})
    false = sorted({f.organism for f in other_found if f.organism in controls and f.found})
    lines = ["", f"Cross-check under `{other}` ({CONVENTIONS[other]}): detected {len(theirs)} of "
             f"{len(known)}" + (f" ({', '.join(theirs)})" if theirs else "")
             + (f"; control false detections: {', '.join(false)}." if false else
                "; no control false detection.")]
    for organism in known:
        if organism in theirs and organism not in mine:
            lines.append(f"- `{organism}`: `{planted[organism]}` is found under `{other}` but not "
                         f"under `{convention}`" + (
                             ": the organism writes differently (its own text carries the trait), "
                             "but reading the same tokens it represents them much as the clean "
                             "model does." if other == "own_text" else
                             ": reading the same tokens the organism represents the trait "
                             "differently, though its own text does not show it."))
    return lines


def _random_line(random: pd.DataFrame) -> str:
    from lmlab.diffing.analysis import LINEAR_STATS, outside_zero

    if random.empty:
        return "- random control: none in the ranking."
    outside = outside_zero(random)
    directions = int(random["directions"].max())
    band = (f"single directions move by up to {_fmt(float(random['largest_abs'].max()))} (a "
            "consistent shift projects on any fixed direction), which is the band a finding "
            "must clear")
    if outside.empty:
        return (f"- random control ({directions} directions): pooled over directions, every "
                f"interval of {' and '.join(LINEAR_STATS)} includes 0 (nothing beyond the "
                f"intervals; the extreme statistics are biased by design and serve only as the "
                f"band); {band}.")
    return (f"- random control ({directions} directions): {len(outside)} pooled interval(s) "
            "exclude 0: " + "; ".join(f"{r.organism} {r.stat} ({_fmt(r.estimate)} "
                                      f"[{_fmt(r.estimate_ci_lo)}, {_fmt(r.estimate_ci_hi)}])"
                                      for r in outside.head(8).itertuples()) + f"; {band}.")


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _why(f: Finding) -> str:
    if f.planted_estimate is None:
        return f"{f.stat}: the planted trait is not among the traits"
    est = f.planted_estimate
    where = f"{f.stat}: rank {int(f.planted_rank) if math.isfinite(f.planted_rank) else '?'}, " \
            f"{_fmt(est.value)} [{_fmt(est.lower)}, {_fmt(est.upper)}]"
    if f.planted_rank == 1 and not est.lower > 0:
        return where + " (interval includes 0)"
    if f.planted_rank == 1:
        return where + f" (its interval does not clear the random band {_fmt(f.random_upper)})"
    return where + f" (top: {f.top_trait} {_fmt(f.top.value)})"
