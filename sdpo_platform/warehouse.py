"""The DuckDB warehouse: one file under the data root, tables created idempotently.

Lineage columns (`source_file`, `line_no`, `record_id`, `conversation_id`, `turn_index`) travel with
every row so that any interaction can be traced back to the line of the file it came from.

The big tables have no PRIMARY KEY: DuckDB keeps such indexes in memory, which at millions of rows
costs more than the stages themselves; ids are unique by construction and the blocking checks assert it.
Warehouses created before keep their keys (`CREATE TABLE IF NOT EXISTS`), which still works.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb

from sdpo_platform.paths import warehouse_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS source_files (
    source_file  VARCHAR PRIMARY KEY,   -- absolute path
    file_hash    VARCHAR NOT NULL,      -- sha256 of the bytes: same path + same hash = nothing to do
    container    VARCHAR,               -- jsonl | json_array | json_document | parquet (+ '.gz')
    source_format VARCHAR,              -- wildchat | sharegpt | openai | hh_rlhf (detected or given)
    n_records    BIGINT,
    ingested_at  TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS forgotten_records (  -- the ids of files `sdpo forget` erased: no text, so a later --purge-targets still finds their copies
    source_file  VARCHAR NOT NULL,
    record_id    VARCHAR NOT NULL,
    forgotten_at TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS raw_records (
    record_id    VARCHAR NOT NULL,      -- sha256 of (source_file, line_no, raw_text); unique (checked)
    source_file  VARCHAR NOT NULL,
    line_no      BIGINT  NOT NULL,      -- 1-based line (JSONL), record index (JSON array), row (Parquet)
    raw_text     VARCHAR,               -- the record exactly as read; may be invalid JSON
    ingested_at  TIMESTAMP DEFAULT current_timestamp
);
ALTER TABLE raw_records ADD COLUMN IF NOT EXISTS partition_date DATE;  -- conversation day, else file arrival day
ALTER TABLE raw_records ADD COLUMN IF NOT EXISTS source_format VARCHAR;  -- the file's format
ALTER TABLE raw_records ADD COLUMN IF NOT EXISTS file_hash VARCHAR;
ALTER TABLE raw_records ADD COLUMN IF NOT EXISTS read_error VARCHAR;  -- invalid_utf8 | record_too_large; NULL = read fine
UPDATE raw_records SET partition_date = ingested_at::DATE WHERE partition_date IS NULL;
CREATE TABLE IF NOT EXISTS quarantine (
    record_id    VARCHAR,
    stage        VARCHAR NOT NULL,      -- raw_interaction_logs | conversations | interactions | ...
    reason       VARCHAR NOT NULL,      -- short machine-readable reason, e.g. invalid_json
    detail       VARCHAR,               -- PII-redacted like everything that leaves raw_records
    source_file  VARCHAR,
    line_no      BIGINT,
    quarantined_at TIMESTAMP DEFAULT current_timestamp
);
ALTER TABLE quarantine ADD COLUMN IF NOT EXISTS partition_date DATE;  -- NULL for whole-file rows
ALTER TABLE quarantine ADD COLUMN IF NOT EXISTS level VARCHAR DEFAULT 'record';  -- file | record | message
ALTER TABLE quarantine ADD COLUMN IF NOT EXISTS message_index INTEGER;  -- level 'message': position in the source record
ALTER TABLE quarantine ADD COLUMN IF NOT EXISTS duplicate_of VARCHAR;  -- duplicate / duplicate_id: the kept conversation it repeats
CREATE TABLE IF NOT EXISTS conversations (
    conversation_id VARCHAR NOT NULL,     -- = record_id of its first record: unique (checked) and stable
    record_id    VARCHAR NOT NULL,
    source_file  VARCHAR NOT NULL,
    line_no      BIGINT  NOT NULL,
    source_id    VARCHAR,               -- the source's own id (ShareGPT id without chunk suffix, WildChat hash), if any
    source_format VARCHAR NOT NULL,     -- sharegpt | openai | wildchat | hh_rlhf
    language     VARCHAR NOT NULL,      -- heuristic ISO 639-1 code, 'und' when undetermined
    messages     STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,  -- roles: system|user|assistant, merged, PII-redacted
    n_messages   INTEGER NOT NULL,
    n_chars      BIGINT  NOT NULL,
    content_hash VARCHAR NOT NULL       -- sha256 of roles + whitespace/case-normalized contents (dedup key)
);
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS partition_date DATE;
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS record_ids VARCHAR[];  -- every source record (ShareGPT chunks: several)
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS user_hash VARCHAR;  -- sha256(salt, user id) when the source has one
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS pii_counts MAP(VARCHAR, INTEGER);  -- placeholder type → replacements
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS near_key VARCHAR;  -- near-duplicate key (cleaning.py)
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS near_duplicate_of VARCHAR;  -- first conversation with the same near_key; flagged, not removed
CREATE TABLE IF NOT EXISTS interactions (
    interaction_id  VARCHAR NOT NULL,     -- conversation_id || ':' || turn_index; unique (checked)
    conversation_id VARCHAR NOT NULL,
    turn_index   INTEGER NOT NULL,        -- index of the response y in conversations.messages
    context      STRUCT(role VARCHAR, content VARCHAR)[] NOT NULL,  -- x: starts with user, ends with user
    response     VARCHAR NOT NULL,        -- y
    followup     VARCHAR NOT NULL,        -- o
    informative  BOOLEAN NOT NULL,
    informative_reason VARCHAR NOT NULL,
    split        VARCHAR NOT NULL         -- train | validation
);
ALTER TABLE interactions ADD COLUMN IF NOT EXISTS partition_date DATE;
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
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS gap_champion DOUBLE;  -- the champion on the same rows, when it was not the round's base
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


def stage_partitions(con: duckdb.DuckDBPyConnection, tables: list[tuple[str, str]]) -> list[str]:
    """Every partition day present in the given (table, filter) pairs, as ISO strings (fixed SQL only)."""
    days: set = set()
    for table, condition in tables:
        days |= {row[0] for row in con.execute(
            f"SELECT DISTINCT partition_date FROM {table} WHERE partition_date IS NOT NULL AND {condition}").fetchall()}
    return sorted(str(day) for day in days)


def partition_batches(con: duckdb.DuckDBPyConnection, table: str, partitions: list[str], batch_rows: int) -> list[tuple[list[str], int]]:
    """Whole partitions grouped so that each group holds about `batch_rows` rows of `table` (fixed name):
    (days, rows of `table` on them) per group, the rows for progress reports."""
    sizes = dict(con.execute(
        f"SELECT partition_date::VARCHAR, count(*) FROM {table} WHERE list_contains($parts::DATE[], partition_date) GROUP BY 1",
        {"parts": partitions},
    ).fetchall())
    batches, current, filled = [], [], 0
    for day in partitions:
        size = sizes.get(day, 0)
        if current and filled + size > batch_rows:
            batches.append((current, filled))
            current, filled = [], 0
        current.append(day)
        filled += size
    if current:
        batches.append((current, filled))
    return batches


def stats(con: duckdb.DuckDBPyConnection) -> dict:
    """Warehouse-wide counts for `sdpo stats --json` (all integers except the reason maps).

    `quarantined` counts rejected *source records* (one record-level 'conversations' row each), so
    `raw_records = records_kept + quarantined` always holds, and `raw_records = conversations_kept +
    quarantined` when every record holds one conversation; ShareGPT chunks joined into one conversation
    count once in `conversations_kept` and once each in `records_kept`. File-level rows and dropped blank
    messages are reported apart: they are not records. `files_rejected` counts files that could not be
    stored (unreadable, binary), as `sdpo ingest` does; `files_by_reason` also counts the notes on stored
    files (empty, unknown format, truncated).
    """
    def scalar(sql: str) -> int:
        return int(fetch_scalar(con, sql) or 0)

    def reasons(condition: str) -> dict[str, int]:
        return {reason: int(n) for reason, n in con.execute(
            f"SELECT reason, count(DISTINCT record_id) FROM quarantine WHERE {condition} GROUP BY 1 ORDER BY 2 DESC, 1"
        ).fetchall()}

    from sdpo_platform.file_quarantine import IS_REJECTION

    record_rows = "stage = 'conversations' AND level = 'record'"
    return {
        "raw_records": scalar("SELECT count(*) FROM raw_records"),
        "conversations_kept": scalar("SELECT count(*) FROM conversations"),
        "records_kept": scalar("SELECT coalesce(sum(coalesce(len(record_ids), 1)), 0) FROM conversations"),
        "interactions_total": scalar("SELECT count(*) FROM interactions"),
        "interactions_informative": scalar("SELECT count(*) FROM interactions WHERE informative"),
        "quarantined": scalar(f"SELECT count(DISTINCT record_id) FROM quarantine WHERE {record_rows}"),
        "quarantine_by_reason": reasons(record_rows),
        "files": scalar("SELECT count(*) FROM source_files"),
        "files_rejected": scalar(f"SELECT count(*) FROM quarantine WHERE level = 'file' AND {IS_REJECTION}"),  # not stored, as `sdpo ingest` counts
        "files_by_reason": reasons("level = 'file'"),
        "messages_dropped": scalar("SELECT count(*) FROM quarantine WHERE stage = 'conversations' AND level = 'message'"),
        "conversations_without_interactions": scalar("SELECT count(*) FROM quarantine WHERE stage = 'interactions'"),
        "near_duplicates_flagged": scalar("SELECT count(*) FROM conversations WHERE near_duplicate_of IS NOT NULL"),
        "pii_redactions": {kind: int(n) for kind, n in con.execute(
            "SELECT e.key, sum(e.value) FROM (SELECT unnest(map_entries(pii_counts)) AS e FROM conversations) GROUP BY 1 ORDER BY 1"
        ).fetchall()},
        "partitions": scalar("SELECT count(DISTINCT partition_date) FROM raw_records"),
    }


ROW_GROUP_ROWS = 16_384  # rows per row group of new data (DuckDB's default is 122,880); see connect()


def _literal(text: str) -> str:
    """A file path as a SQL string literal (ATTACH takes no bound parameters)."""
    return "'" + text.replace("'", "''") + "'"


def connect(path: str | Path | None = None, read_only: bool = False, memory_limit: str | None = None,
            threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """Open the warehouse (creating tables on first use). `memory_limit` (e.g. '1GB') caps DuckDB's
    buffer pool: larger intermediate results spill to disk under the warehouse's folder."""
    path = Path(path) if path else warehouse_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # streaming mode: cap the buffer pool (spilling beyond it) and let operators drop row order
    config = {"memory_limit": memory_limit, "preserve_insertion_order": False} if memory_limit else {}
    if threads:
        config["threads"] = threads
    if str(path) == ":memory:":
        con = duckdb.connect(":memory:", config=config)
    else:
        # Attached rather than opened, for ROW_GROUP_SIZE: a transaction that appends a whole row group writes
        # it straight into the database file (optimistic write). With DuckDB's default (122,880 rows) a 100k-line
        # file never fills one, so its raw text went through the WAL at commit and was copied again by the
        # checkpoint; smaller groups also give finer zone maps (a one-day read of day-clustered rows skips the rest).
        # One named in-memory instance per (file, mode): connections of a process share it, as they shared the
        # file's instance before (a second instance could not attach the same file).
        instance = f":memory:sdpo_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}_{'ro' if read_only else 'rw'}"
        con = duckdb.connect(instance, config={**config, "temp_directory": f"{path}.tmp"})  # where a file db spills
        options = "READ_ONLY" if read_only else f"ROW_GROUP_SIZE {ROW_GROUP_ROWS}"
        con.execute(f"ATTACH IF NOT EXISTS {_literal(str(path))} AS warehouse ({options})").fetchall()
        con.execute("USE warehouse").fetchall()
    con.execute("SET enable_progress_bar = false").fetchall()  # keep logs (Dagster, pytest) free of bars
    con.execute("SET TimeZone = 'UTC'").fetchall()  # partition days are UTC days whatever the host says
    if not read_only:
        con.execute(SCHEMA).fetchall()
    return con
