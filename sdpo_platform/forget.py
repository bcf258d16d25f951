"""Erasing a source file: its raw records, its file-level quarantine rows and its `source_files` entry.

Removing a file from the inbox keeps its data (processed files are often archived that way). An erasure
request needs this instead; `pipeline.forget_and_rebuild` then rebuilds the file's days, so its
conversations, triples, verdicts and record quarantine rows go too, and days whose duplicates pointed at
its conversations are rebuilt as stale (`stale.py`).

Outside the warehouse, earlier rounds wrote copies of its interactions: target sets hold their text
(`inputs.parquet`) and token ids (shards, replaced shards kept for snapshots included), and their
heatmaps may show them. `derived_copies` finds every such set, and the checkpoints trained on it, so an
erasure says what still holds the data; `purge_target_sets` deletes those sets whole (the next round
plans and scores again without the forgotten rows). Checkpoints cannot be un-trained: they are listed,
for the operator to retire, and so are copies this module cannot see (heatmaps logged to MLflow runs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb

from sdpo_platform.file_quarantine import clear_file
from sdpo_platform.ingest import remove_file_rows
from sdpo_platform.paths import models_dir, targets_dir


def forget_files(con: duckdb.DuckDBPyConnection, paths: list[str | Path], inbox: Path | None = None) -> tuple[list[str], list[str]]:
    """(the files forgotten, as stored, ISO days their records were in). A path never ingested is an error,
    and so is one still in `inbox`: the next run would ingest it again."""
    files = stored_paths(paths)
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


def stored_paths(paths: list[str | Path]) -> list[str]:
    """Paths as ingestion stores them (`source_file`)."""
    return [str(Path(path).expanduser().resolve()) for path in paths]


def interaction_ids_of(con: duckdb.DuckDBPyConnection, files: list[str]) -> list[str]:
    """Ids of the interactions built from `files` (stored paths): what target sets may still hold after an erasure."""
    return [row[0] for row in con.execute(
        """SELECT DISTINCT i.interaction_id FROM interactions i JOIN conversations c USING (conversation_id)
           WHERE list_contains($files, c.source_file) ORDER BY 1""", {"files": files}).fetchall()]


def derived_copies(interaction_ids: list[str], root: Path | None = None) -> list[dict]:
    """Per target set holding any of `interaction_ids` (in its inputs or in any shard on disk): its folder,
    how many of them it holds, and the checkpoints trained on it (`train_state.json`'s `target_set`)."""
    if not interaction_ids:
        return []
    sets = [d for d in sorted(targets_dir(root).iterdir()) if d.is_dir()]
    files = [str(f) for d in sets for f in sorted(d.glob("*.parquet"))]  # inputs.parquet and every shard
    if not files:
        return []
    with duckdb.connect() as con:
        held = dict(con.execute(
            """SELECT parse_dirpath(filename) AS folder, count(DISTINCT interaction_id)
               FROM read_parquet($files, filename = true, union_by_name = true)
               WHERE list_contains($ids, interaction_id) GROUP BY folder""",
            {"files": files, "ids": list(interaction_ids)}).fetchall())
    trained: dict[str, list[str]] = {}
    for state in sorted((models_dir(root) / "checkpoints").glob("*/train_state.json")):
        target_set = json.loads(state.read_text()).get("target_set")
        trained.setdefault(target_set, []).append(str(state.parent))
    return [
        {"target_set": d.name, "path": str(d), "interactions": int(held[str(d)]), "checkpoints": trained.get(d.name, [])}
        for d in sets if str(d) in held
    ]


def purge_target_sets(copies: list[dict]) -> list[str]:
    """Delete the target sets `derived_copies` found, whole: their inputs, shards, snapshots and heatmaps."""
    for copy in copies:
        shutil.rmtree(copy["path"])
    return [copy["path"] for copy in copies]
