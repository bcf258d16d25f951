"""Library results → Dagster metadata a person reads in the UI."""

from __future__ import annotations

from typing import Any

import dagster as dg


def examples_table(rows: list[dict], max_chars: int = 160) -> dg.MetadataValue:
    """A markdown table of a few example rows, long cells shortened."""
    if not rows:
        return dg.MetadataValue.md("_no rows_")
    columns = list(rows[0])

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            value = f"{value:.4g}"
        # one line whatever the text holds (\r and U+2028 split a markdown row too), and no raw HTML from user logs
        text = " ".join(str(value).split()).replace("|", "\\|").replace("<", "&lt;")
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


def check_result(report) -> dg.AssetCheckResult:
    """A `QualityReport` as a blocking check result with the failing expectations as metadata."""
    return dg.AssetCheckResult(
        passed=report.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=report.description,
        metadata={
            "expectations_evaluated": report.evaluated,
            "expectations_failed": len(report.failures),
            "failures": dg.MetadataValue.json(report.failures),
        },
    )


def histogram_chart(buckets: list[dict], title: str, width: int = 30) -> dg.MetadataValue:
    """A histogram as a markdown table of unicode bars (renders in the Dagster UI without images)."""
    peak = max((b["count"] for b in buckets), default=0) or 1
    lines = [f"**{title}**", "", "| bucket | count | |", "|---|---:|---|"]
    lines += [f"| {b['bucket']} | {b['count']} | {'█' * round(width * b['count'] / peak)} |" for b in buckets]
    return dg.MetadataValue.md("\n".join(lines))


def heatmap_preview(rows) -> dg.MetadataValue:
    """The extremes heatmap in words, for the UI (which shows no HTML): per interaction its mean |A|,
    follow-up, and the tokens the follow-up reinforced and penalized most."""
    from sdpo_platform.heatmap import strongest_tokens

    def tokens(pairs) -> str:
        shown = [(t.strip()[:24].replace("`", "'"), a) for t, a in pairs]
        return ", ".join(f"`{t}` {a:+.2f}" for t, a in shown) or "–"

    table = []
    for row in rows:
        reinforced, penalized = strongest_tokens(row)
        mean_abs = sum(abs(a) for a in row.advantages) / len(row.advantages) if row.advantages else 0.0
        table.append({"interaction": row.title, "mean |A|": f"{mean_abs:.4f}", "follow-up": row.followup,
                      "reinforced": tokens(reinforced), "penalized": tokens(penalized)})
    return examples_table(table, max_chars=200)
