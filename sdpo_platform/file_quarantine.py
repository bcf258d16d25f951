"""Ingestion's file-level quarantine rows (`level = 'file'`): one per (file, reason), about the path's latest attempt.

Two kinds, told apart by their id, so that each can be replaced without touching the other:
- a *note* on a stored file, id `sha256('file', path, reason)`: 'empty_file' (no record at all: 0 bytes, blank
  lines, `[]`, a Parquet file without rows), 'unknown_format' (text records of no known format, kept for
  inspection), 'truncated_json_array' and 'truncated_file' (a gzip cut off early): these last two keep the records
  read before the break, so they are not rejections (`TRUNCATION_REASONS`);
- a *rejection* of a file that could not be stored, id `sha256('reject', path, reason)`: 'unreadable_file'
  (missing, bad gzip, broken Parquet) or 'unknown_format' (binary content).

A successful ingest replaces every row of its path (inside its transaction), a rejection replaces the path's earlier
rejections, and a path found unchanged drops rejections of a content it no longer holds: an old rejection never
outlives the fix, and `files_rejected` counts files that are still bad.
"""

from __future__ import annotations

from sdpo_platform.formats import FORMATS, Container

STAGE = "raw_interaction_logs"
TRUNCATION_REASONS = ("truncated_json_array", "truncated_file")
_NO_RECORDS = {"json_array": "an empty JSON array", "parquet": "a Parquet file without rows"}
IS_REJECTION = "record_id = sha256(concat_ws(chr(31), 'reject', source_file, reason))"


def note_file(con, source_file: str, container: Container, used_format: str | None, new: int, sample: list) -> None:
    """The notes on a file just stored with `new` records: how it was cut, or why it holds nothing usable."""
    if container.cut_off:
        _insert(con, source_file, "truncated_file",
                f"{source_file}: gzip data cut off before its end (incomplete copy or download); "
                f"the {new} records read up to the cut are kept (the last may be incomplete), the rest is lost")
    elif container.truncated_after is not None:
        _insert(con, source_file, "truncated_json_array",
                f"{source_file}: JSON array ends or breaks after record {container.truncated_after}; later content skipped")
    elif new == 0:
        _insert(con, source_file, "empty_file",
                f"{source_file}: no records ({_NO_RECORDS.get(container.kind, 'empty or whitespace only')})")
    if used_format is None and new:
        keys = sorted({key for record in sample if isinstance(record, dict) for key in record})[:12]
        _insert(con, source_file, "unknown_format",
                f"{source_file}: unknown log format — no record looks like {', '.join(FORMATS)} "
                f"(top-level keys seen: {', '.join(keys) or 'none'}); ingested as-is, pass format= to force one")


def reject_file(con, source_file: str, reason: str, detail: str) -> None:
    """Record that the file could not be stored, in place of the path's earlier rejections (and of any row at all when
    nothing is stored under the path: rows written before rejections had their own ids)."""
    con.execute(
        f"""DELETE FROM quarantine WHERE stage = $stage AND source_file = $source_file
            AND ({IS_REJECTION} OR NOT EXISTS (SELECT 1 FROM source_files WHERE source_file = $source_file))""",
        {"stage": STAGE, "source_file": source_file},
    )
    _insert(con, source_file, reason, detail, kind="reject")


def clear_file(con, source_file: str, rejections_only: bool = False) -> None:
    """Forget the path's rows before it is stored again; only its rejections when its stored content is current."""
    con.execute(f"DELETE FROM quarantine WHERE stage = ? AND source_file = ?{' AND ' + IS_REJECTION if rejections_only else ''}",
                [STAGE, source_file])


def _insert(con, source_file: str, reason: str, detail: str, kind: str = "file") -> None:
    """One quarantine row per (kind, file, reason): the id hashes them, so a retry does not add another."""
    con.execute(
        """
        INSERT INTO quarantine (record_id, stage, reason, detail, source_file, line_no, level)
        SELECT id, $stage, $reason, $detail, $source_file, NULL, 'file'
        FROM (SELECT sha256(concat_ws(chr(31), $kind, $source_file, $reason)) AS id)
        WHERE NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.record_id = id AND q.stage = $stage)
        """,
        {"stage": STAGE, "reason": reason, "detail": detail, "source_file": source_file, "kind": kind},
    ).fetchall()
