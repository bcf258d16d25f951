"""Cross-run gating: a partition whose blocking check failed stays out of training until it passes.

Dagster's blocking checks stop downstream assets *in the same run*; a scheduled training run later
reads the whole warehouse, so the failed partition must be excluded explicitly. Checks record each
(stage, partition) verdict here, and the targets stage reads `blocked_partitions`.
"""

from __future__ import annotations

import duckdb

SCHEMA = """
CREATE TABLE IF NOT EXISTS partition_checks (
    stage          VARCHAR NOT NULL,   -- the asset whose check ran: conversations, interactions, ...
    partition_date DATE    NOT NULL,
    passed         BOOLEAN NOT NULL,
    description    VARCHAR,
    checked_at     TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (stage, partition_date)
);
"""


def record_check(con: duckdb.DuckDBPyConnection, stage: str, partition: str, passed: bool, description: str = "") -> None:
    """Remember the latest verdict of `stage`'s check on `partition` (a later pass unblocks it)."""
    con.execute(SCHEMA).fetchall()
    con.execute(
        # checked_at named: INSERT OR REPLACE updates only the listed columns of an existing row, so a default would
        # keep the first verdict's time (the inbox sensor compares it with files' ingestion times)
        "INSERT OR REPLACE INTO partition_checks (stage, partition_date, passed, description, checked_at) "
        "VALUES (?, ?, ?, ?, current_timestamp)",
        [stage, partition, passed, description],
    ).fetchall()


def unblocked(day_column: str) -> str:
    """SQL: the row's day is not among `$blocked` (`blocked_partitions`). A row without a day is never blocked
    (`list_contains` gives NULL for it, which a bare NOT would turn into "blocked" whenever any day is)."""
    return f"NOT coalesce(list_contains($blocked::DATE[], {day_column}), false)"


def blocked_partitions(con: duckdb.DuckDBPyConnection) -> list[str]:
    """ISO days with at least one stage whose latest check failed."""
    con.execute(SCHEMA).fetchall()
    rows = con.execute(
        "SELECT DISTINCT strftime(partition_date, '%Y-%m-%d') FROM partition_checks WHERE NOT passed ORDER BY 1"
    ).fetchall()
    return [row[0] for row in rows]
