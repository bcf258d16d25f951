"""Erasing a source file: its raw records, its file-level quarantine rows and its `source_files` entry.

Removing a file from the inbox keeps its data (processed files are often archived that way). An erasure
request needs this instead; `pipeline.forget_and_rebuild` then rebuilds the file's days, so its
conversations, triples, verdicts and record quarantine rows go too, and days whose duplicates pointed at
its conversations are rebuilt as stale (`stale.py`). Target sets and checkpoints already written from
it are files of earlier rounds: they are not rewritten (the next round plans without it).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from sdpo_platform.file_quarantine import clear_file
from sdpo_platform.ingest import remove_file_rows


def forget_files(con: duckdb.DuckDBPyConnection, paths: list[str | Path], inbox: Path | None = None) -> tuple[list[str], list[str]]:
    """(the files forgotten, as stored, ISO days their records were in). A path never ingested is an error,
    and so is one still in `inbox`: the next run would ingest it again."""
    files = [str(Path(path).expanduser().resolve()) for path in paths]
    known = {row[0] for row in con.execute(
        "SELECT source_file FROM source_files WHERE list_contains($files, source_file)", {"files": files}).fetchall()}
    unknown = [f for f in files if f not in known]
    if unknown:
        raise ValueError(f"not ingested, nothing to forget: {', '.join(unknown)}")
    if inbox is not None:
        root = Path(inbox).expanduser().resolve()
        inside = [f for f in files if Path(f).exists() and Path(f).is_relative_to(root)]
        if inside:
            raise ValueError(f"still in the inbox {root} (the next run would ingest it again); move it out first: {', '.join(inside)}")
    con.begin()
    try:
        removed: set = set()
        for source_file in files:  # what ingestion does to a changed file's rows, and its `source_files` entry too
            removed |= remove_file_rows(con, source_file)
            clear_file(con, source_file)
            con.execute("DELETE FROM source_files WHERE source_file = ?", [source_file]).fetchall()
        con.commit()
    except BaseException:
        con.rollback()
        raise
    return files, sorted(str(day) for day in removed)
