"""The DuckDB warehouse: one file under the data root, tables created idempotently.

Lineage columns (`source_file`, `line_no`, `record_id`, `conversation_id`, `turn_index`) travel with
every row so that any interaction can be traced back to the line of the file it came from.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from sdpo_platform.paths import warehouse_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS raw_records (
    record_id    VARCHAR PRIMARY KEY,   -- sha256 of (source_file, line_no, raw_text)
    source_file  VARCHAR NOT NULL,
    line_no      BIGINT  NOT NULL,      -- 1-based line (JSONL) or record index (JSON array)
    raw_text     VARCHAR,               -- the record exactly as read; may be invalid JSON
    ingested_at  TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS quarantine (
    record_id    VARCHAR,
    stage        VARCHAR NOT NULL,      -- raw_interaction_logs | conversations | interactions | ...
    reason       VARCHAR NOT NULL,      -- short machine-readable reason, e.g. invalid_json
    detail       VARCHAR,
    source_file  VARCHAR,
    line_no      BIGINT,
    quarantined_at TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS conversations (
    conversation_id VARCHAR PRIMARY KEY,  -- = record_id: unique and stable whatever the sources' ids do
    record_id    VARCHAR NOT NULL,
    source_file  VARCHAR NOT NULL,
    line_no      BIGINT  NOT NULL,
    source_id    VARCHAR,               -- the source's own id (ShareGPT id, WildChat conversation_hash), if any
    source_format VARCHAR NOT NULL,     -- sharegpt | openai | wildchat
    language     VARCHAR NOT NULL,      -- heuristic ISO 639-1 code, 'und' when undetermined
    messages     STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,  -- roles: system|user|assistant, merged
    n_messages   INTEGER NOT NULL,
    n_chars      BIGINT  NOT NULL,
    content_hash VARCHAR NOT NULL       -- sha256 of roles + whitespace/case-normalized contents (dedup key)
);
CREATE TABLE IF NOT EXISTS interactions (
    interaction_id  VARCHAR PRIMARY KEY,  -- conversation_id || ':' || turn_index
    conversation_id VARCHAR NOT NULL,
    turn_index   INTEGER NOT NULL,        -- index of the response y in conversations.messages
    context      STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,  -- x: starts with user, ends with user
    response     VARCHAR NOT NULL,        -- y
    followup     VARCHAR NOT NULL,        -- o
    informative  BOOLEAN NOT NULL,
    informative_reason VARCHAR NOT NULL,
    split        VARCHAR NOT NULL         -- train | validation
);
CREATE TABLE IF NOT EXISTS evaluations (
    evaluated_at  TIMESTAMP DEFAULT current_timestamp,
    target_set    VARCHAR NOT NULL,       -- which hindsight targets the checkpoint was trained and judged on
    adapter_dir   VARCHAR NOT NULL,
    mlflow_run_id VARCHAR,
    gap_before    DOUBLE NOT NULL,        -- mean |A| on validation, base model as student
    gap_after     DOUBLE NOT NULL,        -- the same with the checkpoint as student
    signed_before DOUBLE,
    signed_after  DOUBLE,
    n_validation  INTEGER NOT NULL,
    improved      BOOLEAN NOT NULL
);
"""


def fetch_scalar(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None):
    """First column of the first row. Fetches everything: duckdb 2 keeps a half-read result open and
    refuses further work on the connection until it is drained."""
    rows = con.execute(sql, params or {}).fetchall()
    return rows[0][0] if rows else None


def run_steps(con: duckdb.DuckDBPyConnection, steps: list[str], params: dict, temp_tables: list[str], summarize):
    """Run a stage's SQL steps in one transaction and return `summarize(con)`, read before the
    stage's temp tables are dropped. Each step gets only the `$name` parameters it uses; on any
    error the stage's tables stay as they were."""
    con.begin()
    try:
        for sql in steps:
            used = {name: value for name, value in params.items() if f"${name}" in sql}
            con.execute(sql, used).fetchall()
        result = summarize(con)
        for table in temp_tables:
            con.execute(f"DROP TABLE IF EXISTS {table}").fetchall()  # fixed allow-list, not user input
        con.commit()
    except BaseException:
        con.rollback()
        raise
    return result


def connect(path: str | Path | None = None, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the warehouse (creating tables on first use)."""
    path = Path(path) if path else warehouse_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path), read_only=read_only)
    con.execute("SET enable_progress_bar = false").fetchall()  # keep logs (Dagster, pytest) free of bars
    if not read_only:
        con.execute(SCHEMA).fetchall()
    return con
