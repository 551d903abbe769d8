"""Token shading shared by the probe viewer and the diffing report."""

from __future__ import annotations

import numpy as np

from lmlab.probes.view import ScoredText, render_html
from lmlab.shading import probability_colour, shaded_spans, signed_colour


def test_the_probe_viewer_page_is_unchanged_by_the_move():
    scored = ScoredText(["Wait", ",", " <b>x</b>"], np.array([0.1, 0.5, 1.4], dtype=np.float32),
                        {"lag": 2, "label": "backtracking", "layer": 3, "threshold": 0.5})
    page = render_html(scored, "T")
    assert ('<span title="p=0.100" style="background:rgba(220, 40, 40, 0.100);">Wait</span>'
            '<span title="p=0.500" style="background:rgba(220, 40, 40, 0.500);border-bottom:'
            '2px solid black;">,</span><span title="p=1.400" style="background:rgba(220, 40, 40, '
            '1.000);border-bottom:2px solid black;"> &lt;b&gt;x&lt;/b&gt;</span>') in page


def test_signed_scores_shade_red_up_and_blue_down_saturating_at_the_scale():
    assert signed_colour(0.5, 2.0) == "rgba(220, 40, 40, 0.250)"
    assert signed_colour(-4.0, 2.0) == "rgba(40, 90, 220, 1.000)"
    assert signed_colour(1.0, 0.0).endswith("0.000)")


def test_spans_escape_text_and_titles():
    out = shaded_spans(['a"<'], [0.2], probability_colour, title=lambda s: f'"{s}"')
    assert out == ('<span title="&quot;0.2&quot;" style="background:rgba(220, 40, 40, 0.200);">'
                   'a&quot;&lt;</span>')
