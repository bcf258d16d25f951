"""Days whose derived rows no longer match the raw rows or conversations they were built from, and so need a rebuild.

Two ways a day goes stale without any run of it:
- links that dangle. Exact dedup and near-duplicate flags link a day's records to a conversation kept in
  *another* day: a record is a `duplicate` (or `duplicate_id`) of it, `quarantine.duplicate_of`, or a kept
  conversation is flagged `near_duplicate_of` it. When that conversation vanishes (its source file changed,
  and the day holding it was rebuilt without it), the linking day keeps a verdict about something that is
  gone: its duplicates stay quarantined although nothing kept repeats them any more.
- rows whose raw record is gone. A changed file replaces its raw rows, and the days its old rows lived in
  must be rebuilt; the run that re-ingested it rebuilds only its own day, so when another day's run (a
  backfill, a queued run) ingests the file first, the old days keep conversations and record-level
  quarantine rows whose `(record_id, partition_date)` is no longer in `raw_records`, and a "passed" verdict.

Rebuilding a day only looks at its own records, so such days are found here and rebuilt as well: `sdpo
ingest` does it in the same call, the inbox sensor asks for a run of each.
"""

from __future__ import annotations

import hashlib

import duckdb

# Anti joins on (record_id, partition_date): a record whose file moved it to another day (a new arrival day,
# a forced partition) is gone from its old day too. It runs on every sensor tick: one hash join over raw_records.
_STALE = """
WITH links AS (
    SELECT partition_date, duplicate_of AS target FROM quarantine
    WHERE stage = 'conversations' AND duplicate_of IS NOT NULL
    UNION ALL
    SELECT partition_date, near_duplicate_of FROM conversations WHERE near_duplicate_of IS NOT NULL
),
gone AS (
    SELECT partition_date, target AS id FROM links WHERE target NOT IN (SELECT conversation_id FROM conversations)
    UNION ALL
    SELECT c.partition_date, c.record_id FROM conversations c
    ANTI JOIN raw_records r ON r.record_id = c.record_id AND r.partition_date = c.partition_date
    UNION ALL
    SELECT q.partition_date, q.record_id
    FROM (SELECT partition_date, record_id FROM quarantine
          WHERE stage = 'conversations' AND level = 'record' AND record_id IS NOT NULL AND partition_date IS NOT NULL) q
    ANTI JOIN raw_records r ON r.record_id = q.record_id AND r.partition_date = q.partition_date
)
SELECT strftime(partition_date, '%Y-%m-%d') AS day, list(DISTINCT id ORDER BY id) AS ids
FROM gone GROUP BY day ORDER BY day
"""


def stale_partitions(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """ISO day → a digest of what its rows point at and is gone (vanished conversations, replaced raw records);
    stable until the day is rebuilt, so a scheduler can use it as a run key. Empty when every day matches."""
    return {day: hashlib.sha256("|".join(ids).encode()).hexdigest()[:12] for day, ids in con.execute(_STALE).fetchall()}
