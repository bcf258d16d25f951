"""The inbox folder as a set of files to watch: what is new or changed, and which days it touches.

A sensor (or any scheduler) keeps the `stamps` it saw last; `changed_files` compares, and
`pending_partitions` says which daily partitions need a run — the days of the files' records (read by
ingestion's own readers and day rule, `ingest.record_days`, so detection and ingestion never disagree,
without storing the records) plus the days a changed file's old rows lived in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ContextManager

import duckdb

from sdpo_platform.config import IngestConfig


def inbox_files(inbox: str | Path) -> list[Path]:
    """Every non-hidden file under `inbox` (recursively), in path order."""
    inbox = Path(inbox)
    if not inbox.exists():
        return []
    return sorted(
        p.resolve() for p in inbox.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(inbox).parts)
    )


def stamps(inbox: str | Path) -> dict[str, str]:
    """path → 'mtime_ns:size', a cheap change marker (content hashes are checked by ingestion itself)."""
    out = {}
    for path in inbox_files(inbox):
        stat = path.stat()
        out[str(path)] = f"{stat.st_mtime_ns}:{stat.st_size}"
    return out


def changed_files(current: dict[str, str], seen: dict[str, str]) -> list[str]:
    return sorted(path for path, stamp in current.items() if seen.get(path) != stamp)


def within_bytes(paths: list[str], current: dict[str, str], max_bytes: int) -> list[str]:
    """The leading `paths` whose sizes (from their stamps) add up to at most `max_bytes`, and at least one:
    one tick's share of a large drop, so that each tick stays short."""
    taken, total = [], 0
    for path in paths:
        size = int(current[path].rsplit(":", 1)[1])
        if taken and total + size > max_bytes:
            break
        taken.append(path)
        total += size
    return taken


def remembered(seen: dict[str, str], current: dict[str, str], changed: list[str], taken: list[str]) -> dict[str, str]:
    """The stamps to keep after a tick: what is there now, except that changed files left for a later tick
    keep the stamp seen before (none if they are new), so the next tick still finds them changed."""
    left = set(changed) - set(taken)
    stamps_now = {path: stamp for path, stamp in current.items() if path not in left}
    return {**stamps_now, **{path: seen[path] for path in left if path in seen}}


def pending_partitions(paths: list[str], connect: Callable[[], ContextManager[duckdb.DuckDBPyConnection]] | None = None,
                       cfg: IngestConfig | None = None) -> list[str]:
    """ISO days that ingesting `paths` needs runs for: their records' days and their old rows' days.

    A file whose bytes the warehouse already holds (touched, or rewritten identically) adds only the days
    of its rows that no data run has processed since it was ingested: an `ingest_partition` run ingests
    every new inbox file, so a file that arrived while runs were queued (or that an earlier tick left for
    later) may be stored before the sensor asks about it, and its days still need their run.

    `connect()` opens the warehouse (None: there is none yet) and is called twice, for short queries only:
    the files are hashed and read (up to a sensor tick's share of a drop) with no connection open, so a run
    starting meanwhile is not locked out."""
    from sdpo_platform.ingest import file_hash, record_days

    known = {}
    if connect is not None and paths:
        with connect() as con:
            known = dict(con.execute(
                "SELECT source_file, file_hash FROM source_files WHERE list_contains($paths, source_file)", {"paths": list(paths)}
            ).fetchall())
    held = [p for p in paths if p in known and known[p] == _hash_or_none(Path(p), file_hash)]
    fresh = [p for p in paths if p not in held]
    days = set(record_days(fresh, cfg)) if fresh else set()
    if connect is not None and paths:
        with connect() as con:
            days |= _unprocessed_days(con, held)
            if fresh:  # the days the changed files' old rows live in, which their re-ingestion empties
                days |= {row[0] for row in con.execute(
                    "SELECT DISTINCT strftime(partition_date, '%Y-%m-%d') FROM raw_records WHERE list_contains($paths, source_file)",
                    {"paths": fresh},
                ).fetchall()}
    return sorted(days)


def _unprocessed_days(warehouse: duckdb.DuckDBPyConnection, held: list[str]) -> set[str]:
    """Days of the held files' rows whose conversations check (the first thing a data run records after
    ingesting) is missing or older than the file's ingestion."""
    from sdpo_platform.gating import SCHEMA as CHECKS_SCHEMA

    if not held:
        return set()
    warehouse.execute(CHECKS_SCHEMA).fetchall()
    rows = warehouse.execute(
        """
        SELECT DISTINCT strftime(r.partition_date, '%Y-%m-%d')
        FROM (SELECT DISTINCT source_file, partition_date FROM raw_records WHERE list_contains($paths, source_file)) r
        JOIN source_files f USING (source_file)
        LEFT JOIN partition_checks c ON c.stage = 'conversations' AND c.partition_date = r.partition_date
        WHERE c.checked_at IS NULL OR c.checked_at < f.ingested_at
        """,
        {"paths": held},
    ).fetchall()
    return {row[0] for row in rows}


def _hash_or_none(path: Path, file_hash) -> str | None:
    """The file's content hash, or None when it vanished or cannot be read since it was listed."""
    try:
        return file_hash(path)
    except OSError:
        return None
