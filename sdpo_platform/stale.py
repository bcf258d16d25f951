"""Days whose verdicts point at conversations that no longer exist, and so need a rebuild.

Exact dedup and near-duplicate flags link a day's records to a conversation kept in *another* day: a
record is a `duplicate` (or `duplicate_id`) of it, `quarantine.duplicate_of`, or a kept conversation
is flagged `near_duplicate_of` it. When that conversation vanishes (its source file changed, and the
day holding it was rebuilt without it), the linking day keeps a verdict about something that is gone:
its duplicates stay quarantined although nothing kept repeats them any more. Rebuilding a day only
looks at its own records, so the linking day is found here, by links that dangle, and rebuilt as well:
`sdpo ingest` does it in the same call, the inbox sensor asks for a run of it.
"""

from __future__ import annotations

import hashlib

import duckdb

_DANGLING = """
WITH links AS (
    SELECT partition_date, duplicate_of AS target FROM quarantine
    WHERE stage = 'conversations' AND duplicate_of IS NOT NULL
    UNION ALL
    SELECT partition_date, near_duplicate_of FROM conversations WHERE near_duplicate_of IS NOT NULL
)
SELECT strftime(partition_date, '%Y-%m-%d') AS day, list(DISTINCT target ORDER BY target) AS gone
FROM links WHERE target NOT IN (SELECT conversation_id FROM conversations)
GROUP BY day ORDER BY day
"""


def stale_partitions(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """ISO day → a digest of the vanished conversations its verdicts point at (stable until the day is
    rebuilt, so a scheduler can use it as a run key); empty when every link holds."""
    return {day: hashlib.sha256("|".join(gone).encode()).hexdigest()[:12] for day, gone in con.execute(_DANGLING).fetchall()}
