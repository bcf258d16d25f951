"""Which interactions a round scores: informative rows, capped per split, chosen by a hash of their content.

Rows are chosen by an md5 of their content (context, response, follow-up; the id where a frame has none),
so the choice is deterministic, does not depend on input order or on where the log files lived (ids hash
the source path), and a grown table keeps most of an earlier selection. The chosen rows come back grouped by
conversation, turns ascending, so a conversation's turns land in the same shard, where the scoring engine
runs the tokens they share once; conversations come by the day they start (`partition_date`, where the
frame has one), then by conversation hash, so a new day's conversations follow the shards of the days
before instead of landing in all of them. The order only decides the shards' composition;
`bench/bench_scoring.py` takes its fixed set of interactions from it.

One choice, two front ends: `select_for_scoring` takes a frame (tests, benchmarks), `select_from_warehouse`
chooses inside the warehouse and reads only the chosen rows, so a round over a million triples loads a few
hundred of them instead of all of them (at 1M short triples: 27 s and 8 GB of peak memory before).
"""

from __future__ import annotations

import duckdb
import pandas as pd

from sdpo_platform.config import TargetsConfig
from sdpo_platform.gating import unblocked

CONTENT = ("context", "response", "followup")

# over `keys` (interaction_id, split, informative, conversation_id, turn_index, day, content_key): the chosen ids, in order
_CHOOSE = """
WITH keyed AS (
    SELECT *, min(day) OVER (PARTITION BY conversation_id) AS first_day FROM ({keys}) WHERE informative
)
SELECT interaction_id
FROM keyed
QUALIFY row_number() OVER (PARTITION BY split ORDER BY content_key, interaction_id)
        <= CASE split WHEN 'train' THEN $max_train WHEN 'validation' THEN $max_validation ELSE 0 END
ORDER BY split, first_day NULLS FIRST, md5(conversation_id), conversation_id, turn_index, interaction_id
"""


def _content_key(columns: list[str], prefix: str = "") -> str:
    if not columns:
        return "md5(interaction_id)"
    return "md5(concat_ws(chr(0), " + ", ".join(f"coalesce(to_json({prefix}{c})::VARCHAR, '')" for c in columns) + "))"


def _choose(con: duckdb.DuckDBPyConnection, keys: str, cfg: TargetsConfig, params: dict | None = None) -> pd.DataFrame:
    return con.execute(_CHOOSE.format(keys=keys), {"max_train": cfg.max_train, "max_validation": cfg.max_validation,
                                                   **(params or {})}).df()


def select_for_scoring(interactions_df: pd.DataFrame, cfg: TargetsConfig) -> pd.DataFrame:
    """Informative rows of a frame, at most `cfg.max_train` train and `cfg.max_validation` validation rows."""
    missing = [c for c in ("interaction_id", "split", "informative") if c not in interactions_df.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}")
    keys = interactions_df[["interaction_id", "split", "informative"]].copy()
    keys["conversation_id"] = interactions_df.get("conversation_id", interactions_df["interaction_id"])
    keys["turn_index"] = interactions_df.get("turn_index", 0)
    keys["day"] = interactions_df.get("partition_date")
    content = [c for c in CONTENT if c in interactions_df.columns]
    for column in content:
        keys[column] = interactions_df[column]
    con = duckdb.connect()
    try:
        con.register("interaction_keys", keys)
        chosen = _choose(con, f"SELECT *, {_content_key(content)} AS content_key FROM interaction_keys", cfg)
    finally:
        con.close()
    return chosen.merge(interactions_df, on="interaction_id", how="left")


def select_from_warehouse(con: duckdb.DuckDBPyConnection, cfg: TargetsConfig, blocked: list[str]) -> tuple[pd.DataFrame, int]:
    """(the chosen rows, as `select_for_scoring(kept_interactions(con, blocked), cfg)` returns them; how many
    triples the unblocked days hold), choosing in the warehouse: only the chosen rows are read."""
    from sdpo_platform.assessments import SCHEMA as ASSESSMENTS_SCHEMA, kept_interactions

    con.execute(ASSESSMENTS_SCHEMA).fetchall()
    keys = f"""
        SELECT i.interaction_id, i.split, coalesce(a.keep, false) AS informative, i.conversation_id, i.turn_index,
               i.partition_date AS day, {_content_key(list(CONTENT), "i.")} AS content_key
        FROM interactions i LEFT JOIN interaction_assessments a USING (interaction_id)
        WHERE {unblocked("i.partition_date")}
    """
    chosen = _choose(con, keys, cfg, {"blocked": blocked})
    total = con.execute(f"SELECT count(*) FROM interactions WHERE {unblocked('partition_date')}", {"blocked": blocked}).fetchone()[0]
    rows = kept_interactions(con, blocked, only=list(chosen["interaction_id"]))
    return chosen.merge(rows, on="interaction_id", how="left"), int(total)
