"""Per-triple informativeness and safety verdicts, stored beside the triples they judge.

`interactions.py` extracts triples with SQL; this module runs the follow-up taxonomy, the model signal,
the safety guardrail and the caps (`informativeness.assess_interactions`) on one partition's triples
and keeps the verdicts in `interaction_assessments`, which the targets stage reads to decide what to
score. Kept apart from `interactions` so the two stages can be rebuilt independently.
"""

from __future__ import annotations

from typing import Iterator

import duckdb
import pandas as pd

from sdpo_platform.config import PlatformConfig
from sdpo_platform.gating import unblocked
from sdpo_platform.informativeness import judge_rows, with_caps
from sdpo_platform.safety import exclusion_summary, principled_template

SCHEMA = """
CREATE TABLE IF NOT EXISTS interaction_assessments (
    interaction_id    VARCHAR NOT NULL,
    partition_date    DATE,
    followup_kind     VARCHAR NOT NULL,   -- correction | refinement | negative_reaction | ... (followups.py)
    followup_features VARCHAR[],          -- the rules that fired
    topic_overlap     DOUBLE,
    safety_flag       BOOLEAN NOT NULL,
    safety_reasons    VARCHAR[],
    model_signal      DOUBLE,             -- NULL when the model signal is off
    informativeness   DOUBLE NOT NULL,    -- [0, 1]
    keep              BOOLEAN NOT NULL,
    exclusion_reason  VARCHAR             -- too_short | unsafe | below_threshold | user_cap | conversation_cap
);
"""

COLUMNS = ["interaction_id", "followup_kind", "followup_features", "topic_overlap", "safety_flag", "safety_reasons",
           "model_signal", "informativeness", "keep", "exclusion_reason"]


def hindsight_template(cfg: PlatformConfig) -> str:
    """The template every scoring stage uses: the configured one, with the principles preamble if asked."""
    template = cfg.targets.template
    return principled_template(template) if cfg.informativeness.principles_preamble else template


JUDGE_SLICE_ROWS = 20_000  # triples whose text is in memory at once while a day is judged (~0.5 GB of real contexts)


_DAY_TRIPLES = "FROM interactions i JOIN conversations c USING (conversation_id) WHERE i.partition_date = $day::DATE"


def partition_ids(con: duckdb.DuckDBPyConnection, partition: str) -> list[str]:
    """The ids of a day's triples, sorted: `partition_triples` slices the day by them."""
    return [row[0] for row in con.execute(f"SELECT i.interaction_id {_DAY_TRIPLES} ORDER BY 1", {"day": partition}).fetchall()]


def partition_triples(con: duckdb.DuckDBPyConnection, partition: str, ids: list[str], slice_rows: int) -> Iterator[pd.DataFrame]:
    """A day's triples with the (hashed) user id of their conversation (for the per-user cap), `slice_rows` at
    a time, by interaction id (`ids`: `partition_ids`): only the ids are sorted (a sort of the text would hold
    the whole day's text in DuckDB's memory), then each slice's text is read by its id range. The same day
    always gives the same slices, and the model signal batches a slice's rows together, so re-judging a day
    gives the same bits; a conversation's turns are neighbours in id order and mostly share a slice (and its
    scored prefixes)."""
    query = (f"SELECT i.interaction_id, i.conversation_id, i.context, i.response, i.followup, c.user_hash AS user_id {_DAY_TRIPLES} "
             "AND i.interaction_id BETWEEN $first AND $last ORDER BY i.interaction_id")
    for start in range(0, max(len(ids), 1), slice_rows):
        part = ids[start : start + slice_rows] or [""]  # an empty day is one empty slice
        yield con.execute(query, {"day": partition, "first": part[0], "last": part[-1] if ids else ""}).df()


def assess_partition(con: duckdb.DuckDBPyConnection, partition: str, cfg: PlatformConfig, model=None, tokenizer=None,
                     progress=None, slice_rows: int = JUDGE_SLICE_ROWS) -> tuple[pd.DataFrame, dict]:
    """Judge a day's triples, replace that day's verdicts, and return them (by interaction id) with an exclusion
    summary.

    The text is read `slice_rows` triples at a time (`partition_triples`) and judged row by row (`judge_rows`);
    only the verdicts (no text) of the whole day meet for the caps. A day has no size limit (a million records of
    a file without timestamps share its arrival day): judged whole, 300k triples of 5 KB contexts peaked at
    7.3 GB. `progress(done, total)` counts triples."""
    ids = partition_ids(con, partition)
    n = len(ids)
    signal = cfg.informativeness.use_model and model is not None  # it reports its own progress within a slice
    judged, done = [], 0
    for triples in partition_triples(con, partition, ids, slice_rows):

        def within(part: int, total: int, before=done, rows=len(triples)) -> None:  # the model signal's progress, in triples
            progress(before + rows * part // max(total, 1), n)

        judged.append(judge_rows(triples, cfg.informativeness, model, tokenizer, hindsight_template(cfg),
                                 progress=within if progress is not None else None,
                                 min_followup_chars=cfg.interactions.min_followup_chars))
        done += len(triples)
        if progress is not None and len(triples) and not signal:
            progress(done, n)
    day = pd.concat(judged, ignore_index=True) if len(judged) > 1 else judged[0]
    assessed = with_caps(day, cfg.informativeness)
    rows = assessed[COLUMNS].assign(partition_date=partition)
    con.execute(SCHEMA).fetchall()
    con.begin()
    try:
        con.execute("DELETE FROM interaction_assessments WHERE partition_date = ?::DATE", [partition]).fetchall()
        con.register("assessed_rows", rows)
        con.execute(
            f"INSERT INTO interaction_assessments ({', '.join(COLUMNS)}, partition_date) "
            f"SELECT {', '.join(COLUMNS)}, partition_date::DATE FROM assessed_rows"
        ).fetchall()  # column names from the fixed COLUMNS list
        con.unregister("assessed_rows")
        con.commit()
    except BaseException:
        con.rollback()
        raise
    return assessed, exclusion_summary(assessed)


def kept_interactions(con: duckdb.DuckDBPyConnection, blocked: list[str], only: list[str] | None = None) -> pd.DataFrame:
    """Triples of unblocked days (those of `only` when given), `informative` set by the stored keep verdict. A
    triple never judged is not kept: the verdict carries the safety guardrail, and the SQL's own flag knows
    nothing of it."""
    con.execute(SCHEMA).fetchall()
    return con.execute(
        f"""
        SELECT i.* REPLACE (coalesce(a.keep, false) AS informative), a.informativeness, a.followup_kind
        FROM interactions i LEFT JOIN interaction_assessments a USING (interaction_id)
        WHERE {unblocked("i.partition_date")}
          AND ($only IS NULL OR list_contains($only::VARCHAR[], i.interaction_id))
        ORDER BY i.interaction_id
        """,
        {"blocked": blocked, "only": only},
    ).df()


def judged_triples(con: duckdb.DuckDBPyConnection, partition: str) -> tuple[pd.DataFrame, int]:
    """(a day's stored verdicts with conversation, user and split, the day's number of triples) for the checks."""
    con.execute(SCHEMA).fetchall()
    judged = con.execute(
        """
        SELECT a.*, i.conversation_id, i.split, c.user_hash AS user_id
        FROM interaction_assessments a JOIN interactions i USING (interaction_id) JOIN conversations c USING (conversation_id)
        WHERE a.partition_date = ?::DATE
        """,
        [partition],
    ).df()
    judged["partition_date"] = partition
    n_triples = con.execute("SELECT count(*) FROM interactions WHERE partition_date = ?::DATE", [partition]).fetchall()[0][0]
    return judged, int(n_triples)


def check_judged(con: duckdb.DuckDBPyConnection, partition: str, cfg: PlatformConfig):
    """The `interactions_judged` verdict of a day (asset check and `sdpo ingest` alike): every triple judged,
    scores in [0, 1], kept fraction inside the bounds, no user or conversation above its cap."""
    from sdpo_platform.informativeness_checks import check_informativeness

    judged, n_triples = judged_triples(con, partition)
    return check_informativeness(judged, cfg.informativeness, n_triples, partition_column="partition_date")


def informativeness_weights(con: duckdb.DuckDBPyConnection, ids: list[str]) -> dict[str, float]:
    """interaction_id → informativeness for `ids` (a round's rows), the per-triple loss weights of
    `training.weighting='informativeness'`; only those travel to the trainer (all 1M of them made a 76 MB run file)."""
    con.execute(SCHEMA).fetchall()
    return dict(con.execute("SELECT interaction_id, informativeness FROM interaction_assessments "
                            "WHERE list_contains($ids::VARCHAR[], interaction_id)", {"ids": list(ids)}).fetchall())


def kept_count(con: duckdb.DuckDBPyConnection, blocked: list[str]) -> int:
    """How many triples of the unblocked days the verdicts keep (counted in the warehouse)."""
    con.execute(SCHEMA).fetchall()
    return int(con.execute("SELECT count(*) FROM interactions JOIN interaction_assessments USING (interaction_id) "
                           f"WHERE keep AND {unblocked('interactions.partition_date')}",
                           {"blocked": blocked}).fetchone()[0])
