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
        text = str(value).replace("\n", " ").replace("|", "\\|")
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
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
