"""What "good" means for each stage, as one SQL query (or frame) plus one GX suite each.

Cross-table rules (raw = kept + quarantined, triples = assistant turns followed by a user turn) are
computed as columns so that GX can assert them, and the failure report carries the counts that
explain it.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import numpy as np
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


def _reconciled_and_valid(totals: pd.DataFrame, rows: pd.DataFrame, row_expectations: list, suite: str,
                          zero_columns: tuple[str, ...] = ("unaccounted",)) -> QualityReport:
    """Per partition, every `zero_columns` count of `totals` must be 0 (`unaccounted`: nothing lost
    between stages), and every row must pass."""
    E = expect()
    reconciled = validate(
        totals, [E.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=0) for c in zero_columns], f"{suite}_reconcile"
    )
    return merge(reconciled, validate(rows, row_expectations, suite))


def check_raw_records(con: duckdb.DuckDBPyConnection) -> QualityReport:
    """Every record has an id, a source file and a line; ids are unique; the table is not empty. Counted in SQL
    into one row, so every partition run pays one scan, not a copy of the whole table in pandas (5 s and
    ~0.9 GB at a million records)."""
    frame = con.sql(
        """
        SELECT count(*) AS records,
               count(*) - count(record_id) AS records_without_id,
               count(record_id) - count(DISTINCT record_id) AS repeated_ids,
               count(*) - count(source_file) AS records_without_source_file,
               count(*) FILTER (WHERE line_no IS NULL OR line_no < 0) AS records_without_line
        FROM raw_records
        """
    ).df()
    E = expect()
    none = ("records_without_id", "repeated_ids", "records_without_source_file", "records_without_line")
    return validate(
        frame,
        [E.ExpectColumnValuesToBeBetween(column="records", min_value=1)]
        + [E.ExpectColumnValuesToBeBetween(column=column, min_value=0, max_value=0) for column in none],
        "raw_records",
    )


_SCOPE = "($all OR list_contains($parts::DATE[], partition_date))"


def _scope(partitions: list[str] | None) -> dict:
    return {"all": partitions is None, "parts": [str(p) for p in partitions or []]}


# Records that could not be read at all. They carry no timestamp, so they sit on their file's arrival day,
# which for logs of other days holds nothing else: such a day is not a day of conversations that all failed.
UNREADABLE_REASONS = ("invalid_json", "invalid_utf8", "record_too_large")
# Nor is a day of re-sent conversations kept on other days: neither says a format or a rule broke.
NEUTRAL_REASONS = UNREADABLE_REASONS + ("duplicate", "duplicate_id")


def check_conversations(con: duckdb.DuckDBPyConnection, cfg: CleaningConfig, partitions: list[str] | None = None) -> QualityReport:
    """Per partition, raw = records in kept conversations + quarantined records (nothing lost), a partition
    with readable records keeps at least one conversation (a day that all fails is a broken format or
    rule, not data; unreadable lines and duplicates of conversations kept elsewhere do not count), and every kept conversation satisfies the cleaning filters. `partitions` (ISO days)
    limits the check; None = all."""
    totals = con.execute(
        f"""
        WITH raw AS (SELECT partition_date, count(*) AS n FROM raw_records WHERE {_SCOPE} GROUP BY 1),
        kept AS (SELECT partition_date, sum(coalesce(len(record_ids), 1)) AS n FROM conversations WHERE {_SCOPE} GROUP BY 1),
        rejected AS (SELECT partition_date, count(DISTINCT record_id) AS n,
                            count(DISTINCT record_id) FILTER (WHERE list_contains($neutral, reason)) AS neutral
                     FROM quarantine
                     WHERE stage = 'conversations' AND coalesce(level, 'record') = 'record' AND {_SCOPE} GROUP BY 1)
        SELECT partition_date, coalesce(raw.n, 0) AS raw_records, coalesce(kept.n, 0) AS records_kept,
               coalesce(rejected.n, 0) AS quarantined, coalesce(rejected.neutral, 0) AS neutral,
               coalesce(raw.n, 0) - coalesce(kept.n, 0) - coalesce(rejected.n, 0) AS unaccounted,
               (coalesce(kept.n, 0) = 0 AND coalesce(raw.n, 0) > coalesce(rejected.neutral, 0))::INTEGER
                   AS readable_but_none_kept
        FROM raw FULL JOIN kept USING (partition_date) FULL JOIN rejected USING (partition_date)
        """,
        {**_scope(partitions), "neutral": list(NEUTRAL_REASONS)},
    ).df()
    rows = con.execute(
        f"""
        SELECT conversation_id, n_messages, n_chars,
               len(list_filter(messages, lambda m: m.role <> 'system')) AS n_turns,
               list_max(list_transform(messages, lambda m: length(m.content))) AS longest_message,
               list_filter(messages, lambda m: m.role <> 'system')[1].role AS first_role,
               list_bool_and(list_transform(messages, lambda m: length(trim(m.content)) > 0)) AS no_empty_message
        FROM conversations WHERE {_SCOPE}
        """,
        _scope(partitions),
    ).df()
    E = expect()
    return _reconciled_and_valid(
        totals,
        rows,
        [
            E.ExpectColumnValuesToBeUnique(column="conversation_id"),
            E.ExpectColumnValuesToBeBetween(column="n_turns", min_value=cfg.min_messages),
            E.ExpectColumnValuesToBeBetween(column="longest_message", max_value=cfg.max_message_chars),
            E.ExpectColumnValuesToBeBetween(column="n_chars", max_value=cfg.max_conversation_chars),
            E.ExpectColumnValuesToBeInSet(column="first_role", value_set=["user"]),
            E.ExpectColumnValuesToBeInSet(column="no_empty_message", value_set=[True]),
        ],
        "conversations",
        zero_columns=("unaccounted", "readable_but_none_kept"),
    )


def check_interactions(con: duckdb.DuckDBPyConnection, partitions: list[str] | None = None) -> QualityReport:
    """Every triple is well-formed, and per partition their number equals the assistant turns followed by
    a user turn. `partitions` (ISO days) limits the check; None = all."""
    totals = con.execute(
        f"""
        WITH expected AS (
            SELECT partition_date, sum(len(list_filter(range(1, n_messages),
                   lambda k: messages[k].role = 'assistant' AND messages[k + 1].role = 'user'))) AS n
            FROM conversations WHERE {_SCOPE} GROUP BY 1
        ),
        extracted AS (SELECT partition_date, count(*) AS n FROM interactions WHERE {_SCOPE} GROUP BY 1)
        SELECT partition_date, coalesce(e.n, 0) AS expected, coalesce(i.n, 0) AS extracted,
               coalesce(e.n, 0) - coalesce(i.n, 0) AS unaccounted
        FROM expected e FULL JOIN extracted i USING (partition_date)
        """,
        _scope(partitions),
    ).df()
    rows = con.execute(
        f"""
        SELECT interaction_id, split, length(trim(response)) AS response_chars,
               length(trim(followup)) AS followup_chars,
               context[1].role AS first_role, context[-1].role AS last_role
        FROM interactions WHERE {_SCOPE}
        """,
        _scope(partitions),
    ).df()
    E = expect()
    return _reconciled_and_valid(
        totals,
        rows,
        [  # no row-count rule: every kept conversation has a triple, so an empty day fails the reconciliation
            E.ExpectColumnValuesToBeUnique(column="interaction_id"),
            E.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "validation"]),
            E.ExpectColumnValuesToBeBetween(column="response_chars", min_value=1),
            E.ExpectColumnValuesToBeBetween(column="followup_chars", min_value=1),
            E.ExpectColumnValuesToBeInSet(column="first_role", value_set=["user"]),
            E.ExpectColumnValuesToBeInSet(column="last_role", value_set=["user"]),
        ],
        "interactions",
    )


def check_pii(con: duckdb.DuckDBPyConnection, partitions: list[str] | None = None) -> QualityReport:
    """No PII pattern (pii.py) survives in cleaned text: conversation messages and source ids (the source's own
    id, e.g. an e-mail used as a conversation id), triples and quarantine details. One row per partition with the
    number of texts where a pattern still matches (must be 0). Triples' contexts are earlier messages of their
    conversation, scanned there."""
    from sdpo_platform.pii import install_macros

    install_macros(con)
    frame = con.execute(
        f"""
        WITH texts AS (
            SELECT partition_date, conversation_id AS id, unnest(messages).content AS text FROM conversations WHERE {_SCOPE}
            UNION ALL
            SELECT partition_date, conversation_id, source_id FROM conversations WHERE source_id IS NOT NULL AND {_SCOPE}
            UNION ALL
            SELECT partition_date, interaction_id, response || chr(10) || followup FROM interactions WHERE {_SCOPE}
            UNION ALL
            SELECT partition_date, record_id, detail FROM quarantine
            WHERE stage <> 'raw_interaction_logs' AND detail IS NOT NULL AND {_SCOPE}
        ),
        found AS (SELECT partition_date, id, sdpo_pii_found(text) AS kinds FROM texts)
        SELECT partition_date::VARCHAR AS partition_date, count(*) AS texts,
               count(*) FILTER (WHERE len(kinds) > 0) AS texts_with_pii,
               list_distinct(flatten(list(kinds))) AS kinds_found,
               list(id) FILTER (WHERE len(kinds) > 0)[:5] AS example_ids
        FROM found GROUP BY 1 ORDER BY 1
        """,
        _scope(partitions),
    ).df()
    E = expect()
    report = validate(
        frame[["partition_date", "texts", "texts_with_pii"]],
        [E.ExpectColumnValuesToBeBetween(column="texts_with_pii", min_value=0, max_value=0)],
        "pii_redacted",
    )
    found = [f"PII left on {row.partition_date}: {sorted(row.kinds_found)} in {row.texts_with_pii} text(s), e.g. {list(row.example_ids)}"
             for row in frame[frame["texts_with_pii"] > 0].itertuples()]
    if found and report.failures:  # where and what, for the person who must fix it
        report.failures[0]["expectation"] += " — " + "; ".join(found)
    return report


def _all_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def check_targets(targets: pd.DataFrame, eos_token_id: int) -> QualityReport:
    """Finite log-probs, one log-prob per response token under both prompts, EOS last unless the response
    was cut at the limit (`truncated`: no EOS was learned there), a well-formed top-k where one was stored,
    both splits."""
    from sdpo_platform.loss import topk_consistent  # here: the data checks import no torch

    def stored(value) -> bool:
        return isinstance(value, (list, tuple, np.ndarray))

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
            "eos_last_unless_truncated": [
                len(r) > 0 and (bool(cut) or int(r[-1]) == eos_token_id)
                for r, cut in zip(targets["response_ids"], targets["truncated"])
            ],
            "logprobs_nonpositive": [
                max((v for v in [*t, *s] if v == v), default=0.0) <= 1e-6  # NaN is `finite`'s failure, not this one
                for t, s in zip(targets["teacher_logprobs"], targets["student_logprobs"])
            ],
            "topk_consistent": [  # where a top-k was stored: what the top-k loss reads
                topk_consistent(i, lp, m, len(r)) if stored(i) else True
                for i, lp, m, r in zip(*(targets.get(c, pd.Series([None] * len(targets))) for c in (
                    "teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_mass")), targets["response_ids"])
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
            E.ExpectColumnValuesToBeInSet(column="eos_last_unless_truncated", value_set=[True]),
            E.ExpectColumnValuesToBeInSet(column="logprobs_nonpositive", value_set=[True]),
            E.ExpectColumnValuesToBeInSet(column="topk_consistent", value_set=[True]),
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
    report = validate(
        frame,
        [
            E.ExpectColumnValuesToBeBetween(column="version", min_value=1),
            E.ExpectColumnValuesToBeInSet(column="has_challenger", value_set=[True]),
            E.ExpectColumnValuesToBeBetween(column="missing_tags", min_value=0, max_value=0),
        ],
        "registered_model",
    )
    missing = sorted(set(required_tags) - set(tags))
    for failure in report.failures:  # which tags, not how many
        if "missing_tags" in failure["expectation"]:
            failure["expectation"] += f" — missing: {missing}"
    return report
