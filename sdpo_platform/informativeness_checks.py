"""Blocking checks on the informativeness labels: what "labelled well" means, as GX suites.

Same shape as `sdpo_platform.checks`: one SQL query builds the frame (per row, per partition, per
user), one GX suite asserts it, and failures carry the values that explain them. The kept-fraction
rule is two expectations (one per bound) so the report says which bound a partition broke.
"""

from __future__ import annotations

import duckdb
import pandas as pd

from sdpo_platform.config import InformativenessConfig
from sdpo_platform.followups import FOLLOWUP_KINDS
from sdpo_platform.checks import merge
from sdpo_platform.quality import QualityReport, expect, validate
from sdpo_platform.safety import group_caps

CAP_REASONS = ("user_cap", "conversation_cap")


def check_labels(assessed: pd.DataFrame, n_interactions: int | None = None) -> QualityReport:
    """Every triple labelled (kind from the taxonomy, keep and safety flag set); scores in [0, 1].

    With `n_interactions` (rows of the input table) the labelled rows must reconcile with it.
    """
    E = expect()
    rows = assessed[["interaction_id", "followup_kind", "informativeness", "keep", "safety_flag"]].copy()
    rows["keep"] = rows["keep"].astype("object")
    expectations = [
        E.ExpectColumnValuesToNotBeNull(column="interaction_id"),
        E.ExpectColumnValuesToBeUnique(column="interaction_id"),
        E.ExpectColumnValuesToNotBeNull(column="followup_kind"),
        E.ExpectColumnValuesToBeInSet(column="followup_kind", value_set=list(FOLLOWUP_KINDS)),
        E.ExpectColumnValuesToNotBeNull(column="informativeness"),
        E.ExpectColumnValuesToBeBetween(column="informativeness", min_value=0.0, max_value=1.0),
        E.ExpectColumnValuesToNotBeNull(column="keep"),
        E.ExpectColumnValuesToNotBeNull(column="safety_flag"),
    ]
    report = validate(rows, expectations, "informativeness_labels")
    if n_interactions is None:
        return report
    totals = pd.DataFrame({"unaccounted": [n_interactions - len(assessed)]})
    reconciled = validate(totals, [E.ExpectColumnValuesToBeBetween(column="unaccounted", min_value=0, max_value=0)], "informativeness_reconcile")
    return merge(reconciled, report)


def check_kept_fraction(assessed: pd.DataFrame, cfg: InformativenessConfig, partition_column: str | None = "split") -> QualityReport:
    """Each partition of at least `kept_fraction_min_triples` triples keeps between `min_kept_fraction` and
    `max_kept_fraction` of them (a smaller one, an empty day included, has nothing to say about the filter).

    A partition where nothing (or everything) is kept fails on the min (or max) bound; the failure
    names the bound and lists the offending partitions with their kept fraction.
    """
    frame = assessed[["keep"]].copy()
    frame["partition"] = assessed[partition_column].astype(str).to_numpy() if partition_column and partition_column in assessed.columns else "all"
    con = duckdb.connect()
    try:
        con.register("assessed_keep", frame)
        partitions = con.execute(
            "SELECT partition, count(*) AS n, avg(keep::INTEGER) AS kept_fraction FROM assessed_keep GROUP BY partition "
            "HAVING count(*) >= $min_triples ORDER BY partition", {"min_triples": cfg.kept_fraction_min_triples}
        ).df()
    finally:
        con.close()
    E = expect()
    reports = []
    for bound, kwargs in (
        ("min_kept_fraction", {"min_value": cfg.min_kept_fraction}),
        ("max_kept_fraction", {"max_value": cfg.max_kept_fraction}),
    ):
        report = validate(partitions, [E.ExpectColumnValuesToBeBetween(column="kept_fraction", **kwargs)], f"informativeness_{bound}")
        value = kwargs.get("min_value", kwargs.get("max_value"))
        outside = partitions[(partitions["kept_fraction"] < value) if "min_value" in kwargs else (partitions["kept_fraction"] > value)]
        for failure in report.failures:
            if "kept_fraction" in failure["expectation"]:
                detail = ", ".join(f"{p}: {f:.3f} of {n}" for p, f, n in zip(outside["partition"], outside["kept_fraction"], outside["n"]))
                failure["expectation"] = f"kept fraction {'below' if 'min_value' in kwargs else 'above'} {bound}={value} in partition(s) {detail}"
        reports.append(report)
    return merge(*reports)


def check_caps(assessed: pd.DataFrame, cfg: InformativenessConfig) -> QualityReport:
    """No user and no conversation holds more kept triples than its cap (`safety.group_caps`)."""
    frame = pd.DataFrame(
        {
            "interaction_id": assessed["interaction_id"].astype(str).to_numpy(),
            "conversation_id": assessed["conversation_id"].astype("object").to_numpy() if "conversation_id" in assessed.columns else None,
            "user_id": assessed["user_id"].astype("object").to_numpy() if "user_id" in assessed.columns else None,
            "keep": assessed["keep"].astype(bool).to_numpy(),
            "candidate": (assessed["exclusion_reason"].isna() | assessed["exclusion_reason"].isin(CAP_REASONS)).to_numpy(),
        }
    )
    user_cap, conversation_cap = group_caps(int(frame["candidate"].sum()), cfg)
    con = duckdb.connect()
    try:
        con.register("assessed_groups", frame)
        groups = con.execute(
            """
            WITH keyed AS (
                SELECT keep,
                       coalesce(CAST(conversation_id AS VARCHAR), interaction_id) AS conversation_key,
                       coalesce(CAST(user_id AS VARCHAR), CAST(conversation_id AS VARCHAR), interaction_id) AS user_key
                FROM assessed_groups
            )
            SELECT 'user' AS level, user_key AS key, count(*) FILTER (WHERE keep) - $user_cap AS kept_over_cap
            FROM keyed GROUP BY user_key
            UNION ALL
            SELECT 'conversation', conversation_key, count(*) FILTER (WHERE keep) - $conversation_cap
            FROM keyed GROUP BY conversation_key
            """,
            {"user_cap": user_cap, "conversation_cap": conversation_cap},
        ).df()
    finally:
        con.close()
    return validate(groups, [expect().ExpectColumnValuesToBeBetween(column="kept_over_cap", max_value=0)], "informativeness_caps")


def check_informativeness(assessed: pd.DataFrame, cfg: InformativenessConfig, n_interactions: int | None = None, partition_column: str | None = "split") -> QualityReport:
    """All blocking checks of the informativeness labels, as one report."""
    return merge(check_labels(assessed, n_interactions), check_kept_fraction(assessed, cfg, partition_column), check_caps(assessed, cfg))
