"""What "good" means for each stage, as one SQL query (or frame) plus one GX suite each.

Cross-table rules (raw = kept + quarantined, triples = assistant turns followed by a user turn) are
computed as columns so that GX can assert them, and the failure report carries the counts that
explain it.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pandas as pd

from sdpo_platform.config import CleaningConfig
from sdpo_platform.quality import QualityReport, expect, validate


def merge(*reports: QualityReport) -> QualityReport:
    return QualityReport(
        suite="+".join(r.suite for r in reports),
        passed=all(r.passed for r in reports),
        evaluated=sum(r.evaluated for r in reports),
        failures=[f for r in reports for f in r.failures],
    )


def _reconciled_and_valid(totals: pd.DataFrame, rows: pd.DataFrame, row_expectations: list, suite: str) -> QualityReport:
    """`totals.unaccounted` must be 0 (nothing lost between stages), and every row must pass."""
    reconciled = validate(
        totals, [expect().ExpectColumnValuesToBeBetween(column="unaccounted", min_value=0, max_value=0)], f"{suite}_reconcile"
    )
    return merge(reconciled, validate(rows, row_expectations, suite))


def check_raw_records(con: duckdb.DuckDBPyConnection) -> QualityReport:
    frame = con.sql("SELECT record_id, source_file, line_no FROM raw_records").df()
    E = expect()
    return validate(
        frame,
        [
            E.ExpectTableRowCountToBeBetween(min_value=1),
            E.ExpectColumnValuesToNotBeNull(column="record_id"),
            E.ExpectColumnValuesToBeUnique(column="record_id"),
            E.ExpectColumnValuesToNotBeNull(column="source_file"),
            E.ExpectColumnValuesToBeBetween(column="line_no", min_value=0),
        ],
        "raw_records",
    )


def check_conversations(con: duckdb.DuckDBPyConnection, cfg: CleaningConfig) -> QualityReport:
    """raw = kept + quarantined, and every kept conversation satisfies the paper's filters."""
    totals = con.sql(
        """
        SELECT r.n AS raw_records, c.n AS kept, q.n AS quarantined, r.n - c.n - q.n AS unaccounted
        FROM (SELECT count(*) AS n FROM raw_records) r,
             (SELECT count(*) AS n FROM conversations) c,
             (SELECT count(DISTINCT record_id) AS n FROM quarantine WHERE stage = 'conversations') q
        """
    ).df()
    rows = con.sql(
        """
        SELECT conversation_id, n_messages, n_chars,
               list_max(list_transform(messages, lambda m: length(m.content))) AS longest_message,
               list_filter(messages, lambda m: m.role <> 'system')[1].role AS first_role,
               list_bool_and(list_transform(messages, lambda m: length(trim(m.content)) > 0)) AS no_empty_message
        FROM conversations
        """
    ).df()
    E = expect()
    return _reconciled_and_valid(
        totals,
        rows,
        [
            E.ExpectTableRowCountToBeBetween(min_value=1),
            E.ExpectColumnValuesToBeUnique(column="conversation_id"),
            E.ExpectColumnValuesToBeBetween(column="n_messages", min_value=cfg.min_messages),
            E.ExpectColumnValuesToBeBetween(column="longest_message", max_value=cfg.max_message_chars),
            E.ExpectColumnValuesToBeBetween(column="n_chars", max_value=cfg.max_conversation_chars),
            E.ExpectColumnValuesToBeInSet(column="first_role", value_set=["user"]),
            E.ExpectColumnValuesToBeInSet(column="no_empty_message", value_set=[True]),
        ],
        "conversations",
    )


def check_interactions(con: duckdb.DuckDBPyConnection) -> QualityReport:
    """Every triple is well-formed, and their number equals the assistant turns followed by a user turn."""
    totals = con.sql(
        """
        SELECT e.n AS expected, i.n AS extracted, e.n - i.n AS unaccounted
        FROM (SELECT coalesce(sum(len(list_filter(range(1, n_messages),
                     lambda k: messages[k].role = 'assistant' AND messages[k + 1].role = 'user'))), 0) AS n
              FROM conversations) e,
             (SELECT count(*) AS n FROM interactions) i
        """
    ).df()
    rows = con.sql(
        """
        SELECT interaction_id, split, length(trim(response)) AS response_chars,
               length(trim(followup)) AS followup_chars,
               context[1].role AS first_role, context[-1].role AS last_role
        FROM interactions
        """
    ).df()
    E = expect()
    return _reconciled_and_valid(
        totals,
        rows,
        [
            E.ExpectTableRowCountToBeBetween(min_value=1),
            E.ExpectColumnValuesToBeUnique(column="interaction_id"),
            E.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "validation"]),
            E.ExpectColumnValuesToBeBetween(column="response_chars", min_value=1),
            E.ExpectColumnValuesToBeBetween(column="followup_chars", min_value=1),
            E.ExpectColumnValuesToBeInSet(column="first_role", value_set=["user"]),
            E.ExpectColumnValuesToBeInSet(column="last_role", value_set=["user"]),
        ],
        "interactions",
    )


def _all_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def check_targets(targets: pd.DataFrame, eos_token_id: int) -> QualityReport:
    """Finite log-probs, one log-prob per response token under both prompts, EOS last, both splits."""
    frame = pd.DataFrame(
        {
            "interaction_id": targets["interaction_id"],
            "split": targets["split"],
            "n_tokens": targets["n_tokens"],
            "lengths_match": [
                len(r) == n == len(t) == len(s) == len(a)
                for r, n, t, s, a in zip(
                    targets["response_ids"], targets["n_tokens"], targets["teacher_logprobs"],
                    targets["student_logprobs"], targets["advantages"],
                )
            ],
            "finite": [
                _all_finite(t) and _all_finite(s) and _all_finite(a)
                for t, s, a in zip(targets["teacher_logprobs"], targets["student_logprobs"], targets["advantages"])
            ],
            "eos_last": [int(r[-1]) == eos_token_id if len(r) else False for r in targets["response_ids"]],
            "logprobs_nonpositive": [
                max(list(t) + list(s)) <= 1e-6 for t, s in zip(targets["teacher_logprobs"], targets["student_logprobs"])
            ],
        }
    )
    E = expect()
    return validate(
        frame,
        [
            E.ExpectTableRowCountToBeBetween(min_value=2),
            E.ExpectColumnValuesToBeUnique(column="interaction_id"),
            E.ExpectColumnDistinctValuesToEqualSet(column="split", value_set=["train", "validation"]),
            E.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1),
            E.ExpectColumnValuesToBeInSet(column="lengths_match", value_set=[True]),
            E.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
            E.ExpectColumnValuesToBeInSet(column="eos_last", value_set=[True]),
            E.ExpectColumnValuesToBeInSet(column="logprobs_nonpositive", value_set=[True]),
        ],
        "hindsight_targets",
    )


def check_checkpoint(losses: list[float], expected_steps: int, adapter_dir: str | Path) -> QualityReport:
    adapter = Path(adapter_dir)
    frame = pd.DataFrame(
        {
            "step": list(range(1, len(losses) + 1)),
            "loss_finite": [math.isfinite(x) for x in losses],
            "adapter_present": [(adapter / "adapter_config.json").exists()] * len(losses),
        }
    )
    E = expect()
    return validate(
        frame,
        [
            E.ExpectTableRowCountToBeBetween(min_value=expected_steps, max_value=expected_steps),
            E.ExpectColumnValuesToBeInSet(column="loss_finite", value_set=[True]),
            E.ExpectColumnValuesToBeInSet(column="adapter_present", value_set=[True]),
        ],
        "distilled_checkpoint",
    )


def check_evaluation(values: dict[str, float], n_validation: int) -> QualityReport:
    frame = pd.DataFrame([{**values, "n_validation": n_validation, "finite": _all_finite(values.values())}])
    E = expect()
    return validate(
        frame,
        [
            E.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
            E.ExpectColumnValuesToBeBetween(column="n_validation", min_value=1),
            E.ExpectColumnValuesToBeBetween(column="gap_before", min_value=0),
            E.ExpectColumnValuesToBeBetween(column="gap_after", min_value=0),
        ],
        "evaluation",
    )


def check_registration(version: int, aliases: list[str], tags: dict[str, str], required_tags: list[str]) -> QualityReport:
    frame = pd.DataFrame(
        [{"version": version, "has_challenger": "challenger" in aliases, "missing_tags": len(set(required_tags) - set(tags))}]
    )
    E = expect()
    return validate(
        frame,
        [
            E.ExpectColumnValuesToBeBetween(column="version", min_value=1),
            E.ExpectColumnValuesToBeInSet(column="has_challenger", value_set=[True]),
            E.ExpectColumnValuesToBeBetween(column="missing_tags", min_value=0, max_value=0),
        ],
        "registered_model",
    )
