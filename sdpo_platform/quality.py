"""Data quality suites (Great Expectations 1.x, defined in code, run on an ephemeral context).

Each stage has one suite: a list of expectations over a pandas frame that the stage's check builds
with one SQL query (derived columns such as `unaccounted` or `lengths_match` turn cross-table rules
into column rules). `validate` returns a plain report, so the Dagster layer only maps it to an
`AssetCheckResult` and the library stays usable without Dagster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pandas as pd

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@dataclass
class QualityReport:
    suite: str
    passed: bool
    evaluated: int
    failures: list[dict] = field(default_factory=list)

    @property
    def description(self) -> str:
        if self.passed:
            return f"{self.suite}: all {self.evaluated} expectations passed"
        return f"{self.suite}: {len(self.failures)} of {self.evaluated} expectations failed: " + "; ".join(
            f["expectation"] for f in self.failures
        )


def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


ID_COLUMNS = ("interaction_id", "conversation_id", "record_id")  # what a failure names its rows by, when the frame has one


def validate(frame: pd.DataFrame, expectations: list, suite: str) -> QualityReport:
    """Run `expectations` (GX expectation objects) against `frame`; never raises on failing data. A failing
    row-level expectation names up to 20 of its rows (`unexpected_ids`) by the frame's first `ID_COLUMNS`."""
    import great_expectations as gx

    context = _context()
    batch = (
        context.data_sources.add_pandas(f"{suite}_source")
        .add_dataframe_asset(name=suite)
        .add_batch_definition_whole_dataframe("whole")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    gx_suite = gx.ExpectationSuite(name=suite)
    for expectation in expectations:
        gx_suite.add_expectation(expectation)
    id_column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": 20}
    if id_column is not None:
        result_format["unexpected_index_column_names"] = [id_column]
    result = batch.validate(gx_suite, result_format=result_format)
    failures = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
        # what was seen: the set expectations of GX 1.x say what is missing in `partial_missing_list`, with no observed value
        observed = {k: item.result[k] for k in ("observed_value", "unexpected_count", "partial_unexpected_list",
                                                "missing_count", "partial_missing_list") if item.result.get(k) is not None}
        rows = item.result.get("partial_unexpected_index_list") or []
        if id_column is not None and rows and isinstance(rows[0], dict):
            observed["unexpected_ids"] = [str(row.get(id_column)) for row in rows]
        failures.append({"expectation": f"{config.type}({kwargs})", **observed})
    return QualityReport(suite=suite, passed=bool(result.success), evaluated=len(result.results), failures=failures)


def expect():
    """The GX expectations module, imported lazily (GX import costs seconds)."""
    import great_expectations as gx

    return gx.expectations
