"""Heatmaps: sign picks the colour, |A| the intensity, values on hover, log text escaped."""

from __future__ import annotations

import re

from sdpo_platform.heatmap import BLUE, RED, HeatmapRow, intensity_scale, render_html, token_span


def test_sign_picks_colour_and_magnitude_picks_intensity():
    strong_plus, weak_minus = token_span("yes", 2.0, scale=1.0), token_span("no", -0.25, scale=1.0)
    assert f"rgba({BLUE[0]},{BLUE[1]},{BLUE[2]},1.000)" in strong_plus  # clipped at full colour
    assert f"rgba({RED[0]},{RED[1]},{RED[2]},0.250)" in weak_minus
    assert 'title="A = +2.0000"' in strong_plus and 'title="A = -0.2500"' in weak_minus


def test_page_escapes_everything_from_the_logs():
    row = HeatmapRow(
        title="<b>id</b>",
        prompt="<script>alert(1)</script>",
        followup='"quoted" & <i>',
        tokens=["<img src=x onerror=alert(1)>", "\n", "ok"],
        advantages=[0.5, -0.1, 0.0],
    )
    page = render_html([row])
    assert "<script>alert" not in page and "<img src" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&quot;quoted&quot; &amp; &lt;i&gt;" in page
    assert len(re.findall(r'class="tok"', page)) == 3 and "↵<br>" in page  # newlines stay visible


def test_scale_ignores_a_single_outlier():
    rows = [HeatmapRow("r", "p", "f", ["t"] * 101, [0.1] * 100 + [50.0])]
    assert intensity_scale(rows) < 1.0
    assert intensity_scale([HeatmapRow("z", "p", "f", ["t"], [0.0])]) == 1.0  # all-zero rows do not divide by 0
