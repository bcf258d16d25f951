"""The inbox folder as a set of files to watch: what is new or changed, and which days it touches.

A sensor (or any scheduler) keeps the `stamps` it saw last; `changed_files` compares, and
`pending_partitions` says which daily partitions need a run — the days of the files' records (read by
ingestion's own readers and day rule, `ingest.record_days`, so detection and ingestion never disagree,
without storing the records) plus the days a changed file's old rows lived in.
"""

from __future__ import annotations

from pathlib import Path

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


def pending_partitions(paths: list[str], warehouse: duckdb.DuckDBPyConnection | None = None, cfg: IngestConfig | None = None) -> list[str]:
    """ISO days that ingesting `paths` would touch: their records' days, and their old rows' days.

    A file whose bytes the warehouse already holds (touched, or rewritten identically) touches nothing:
    its stored rows keep their days, whatever its new mtime says."""
    from sdpo_platform.ingest import file_hash, record_days

    if warehouse is not None and paths:
        known = dict(warehouse.execute(
            "SELECT source_file, file_hash FROM source_files WHERE list_contains($paths, source_file)", {"paths": list(paths)}
        ).fetchall())
        paths = [p for p in paths if known.get(p) != file_hash(Path(p))]
    if not paths:
        return []
    days = set(record_days(paths, cfg))
    if warehouse is not None and paths:
        days |= {str(row[0]) for row in warehouse.execute(
            "SELECT DISTINCT partition_date FROM raw_records WHERE list_contains($paths, source_file)", {"paths": list(paths)}
        ).fetchall()}
    return sorted(days)
