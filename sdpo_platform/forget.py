"""Erasing a source file: its raw records, its file-level quarantine rows and its `source_files` entry.

Removing a file from the inbox keeps its data (processed files are often archived that way). An erasure
request needs this instead; `pipeline.forget_and_rebuild` then rebuilds the file's days, so its
conversations, triples, verdicts and record quarantine rows go too, and days whose duplicates pointed at
its conversations are rebuilt as stale (`stale.py`).

Outside the warehouse, earlier rounds wrote copies of its interactions: target sets hold their text
(`inputs.parquet`) and token ids (shards, replaced shards kept for snapshots included), and their
heatmaps may show them. `derived_copies` finds every such set, and the checkpoints trained on it, and
`registered_versions` the model versions registered from them (the champion among them), so an
erasure says what still holds the data; `purge_target_sets` deletes those sets whole (the next round
plans and scores again without the forgotten rows). The heatmap pages runs logged to MLflow are found by
`logged_heatmaps` and deleted by `erase_logged_heatmaps`. Checkpoints cannot be un-trained: they are
listed, versions and checkpoints alike, for the operator to retire. Dagster's event log keeps each run's metadata (a heatmap's strongest
tokens among it); nothing here edits it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import duckdb

from sdpo_platform.file_quarantine import clear_file
from sdpo_platform.ingest import remove_file_rows
from sdpo_platform.paths import models_dir, targets_dir


def forget_files(con: duckdb.DuckDBPyConnection, paths: list[str | Path], inbox: Path | None = None,
                 already_forgotten_ok: bool = False) -> tuple[list[str], list[str]]:
    """(the files forgotten, as stored, ISO days their records were in); `forgettable` checks the paths first.
    The records' ids (not their text) are kept in `forgotten_records`, so that copies outside the warehouse
    can still be found and purged after the erasure (`record_ids_of`)."""
    files = forgettable(con, paths, inbox, already_forgotten_ok)
    con.begin()
    try:
        removed: set = set()
        for source_file in files:  # what ingestion does to a changed file's rows, and its `source_files` entry too
            con.execute("""INSERT INTO forgotten_records (source_file, record_id)
                           SELECT DISTINCT source_file, record_id FROM raw_records WHERE source_file = ?""", [source_file]).fetchall()
            removed |= remove_file_rows(con, source_file)
            clear_file(con, source_file)
            con.execute("DELETE FROM source_files WHERE source_file = ?", [source_file]).fetchall()
        con.commit()
    except BaseException:
        con.rollback()
        raise
    return files, sorted(str(day) for day in removed)


def forgettable(con: duckdb.DuckDBPyConnection, paths: list[str | Path], inbox: Path | None = None,
                already_forgotten_ok: bool = False) -> list[str]:
    """The paths as stored (`source_file`, each once). A path never ingested is an error, and so is one still
    in `inbox`: the next run would ingest it again. A path forgotten before is one only without
    `already_forgotten_ok` (a later --purge-targets: its copies outside the warehouse are still to delete)."""
    files = list(dict.fromkeys(str(Path(path).expanduser().resolve()) for path in paths))
    query = "SELECT DISTINCT source_file FROM {} WHERE list_contains($files, source_file)"
    known = {row[0] for row in con.execute(query.format("source_files"), {"files": files}).fetchall()}
    forgotten = {row[0] for row in con.execute(query.format("forgotten_records"), {"files": files}).fetchall()} - known
    if not already_forgotten_ok and forgotten:
        raise ValueError(f"already forgotten: {', '.join(sorted(forgotten))}; add --purge-targets to delete the copies outside "
                         "the warehouse that its first erasure listed")
    unknown = [f for f in files if f not in known | forgotten]
    if unknown:
        raise ValueError(f"not ingested, nothing to forget: {', '.join(unknown)}")
    if inbox is not None:
        root = Path(inbox).expanduser().resolve()
        inside = [f for f in files if Path(f).exists() and Path(f).is_relative_to(root)]
        if inside:
            raise ValueError(f"still in the inbox {root} (the next run would ingest it again); move it out first: {', '.join(inside)}")
    return files


def record_ids_of(con: duckdb.DuckDBPyConnection, files: list[str]) -> list[str]:
    """Ids of the raw records `files` (stored paths) hold. A conversation's id is its first record's id and an
    interaction's is `conversation_id:turn`, so these find every interaction built from the files in a target
    set, also one the warehouse no longer keeps (its conversation since quarantined as a duplicate)."""
    return [row[0] for row in con.execute(
        """SELECT record_id FROM raw_records WHERE list_contains($files, source_file)
           UNION SELECT record_id FROM forgotten_records WHERE list_contains($files, source_file) ORDER BY 1""", {"files": files}).fetchall()]


def derived_copies(record_ids: list[str], root: Path | None = None) -> tuple[list[dict], list[dict]]:
    """(per target set holding an interaction of `record_ids` in its inputs or any shard on disk: its folder,
    how many it holds and the checkpoints trained on it (`train_state.json`'s `target_set`); the files and
    folders that could not be checked, each with why). A set with an unreadable file may hold them too: it is
    reported, not guessed. A folder linked in from elsewhere counts once, under all its names; a link to the
    data root or to a folder above it is not a set and is reported, never scanned or purged."""
    if not record_ids:
        return [], []
    unreadable: list[dict] = []
    trained: dict[str, list[str]] = {}
    for state in sorted((models_dir(root) / "checkpoints").glob("*/train_state.json")):
        try:
            trained.setdefault(json.loads(state.read_text())["target_set"], []).append(str(state.parent))
        except (OSError, ValueError, KeyError, TypeError) as error:  # a run still writing it, or a damaged one
            unreadable.append({"path": str(state), "error": f"{type(error).__name__}: {error}"})
    home = targets_dir(root).resolve()
    folders: dict[Path, list[Path]] = {}  # resolved folder -> its names under targets/
    for entry in sorted(d for d in targets_dir(root).iterdir() if d.is_dir()):
        resolved = entry.resolve()
        if home.is_relative_to(resolved):
            unreadable.append({"path": str(entry), "error": f"links to {resolved}, which holds the target sets: not a set"})
            continue
        folders.setdefault(resolved, []).append(entry)
    copies = []
    with duckdb.connect() as con:
        con.execute("CREATE TEMP TABLE forgotten AS SELECT unnest($ids::VARCHAR[]) AS id", {"ids": list(record_ids)})
        for resolved, names in folders.items():
            held = set()
            for file in sorted(resolved.glob("*.parquet")):  # inputs.parquet and every shard, replaced ones included
                held |= _held(con, file, unreadable)
            if held:
                names_in_use = [n.name for n in names]
                checkpoints = sorted({c for name in names_in_use for c in trained.get(name, [])})
                copies.append({"target_set": names[0].name, "path": str(names[0]), "names": names_in_use,
                               "interactions": len(held), "checkpoints": checkpoints})
    return copies, unreadable


def _held(con, file: Path, unreadable: list[dict]) -> set[str]:
    """Interaction ids in one Parquet file whose conversation is a forgotten record (`forgotten`); a file that
    cannot be read goes to `unreadable`, one without interaction ids (not a set file) is passed over."""
    try:
        columns = [row[0] for row in con.execute("DESCRIBE SELECT * FROM read_parquet($file)", {"file": str(file)}).fetchall()]
        if "interaction_id" not in columns:
            return set()
        return {row[0] for row in con.execute(
            """SELECT DISTINCT interaction_id FROM read_parquet($file)
               WHERE split_part(interaction_id, ':', 1) IN (SELECT id FROM forgotten)""", {"file": str(file)}).fetchall()}
    except (duckdb.Error, OSError) as error:
        unreadable.append({"path": str(file), "error": f"{type(error).__name__}: {error}"})
        return set()


def purge_target_sets(copies: list[dict], unreadable: list[dict]) -> tuple[list[str], list[dict]]:
    """Delete the target sets `derived_copies` found, whole (inputs, shards, snapshots, heatmaps; a set linked in
    from elsewhere goes with the folder it points to, and its links): (the sets deleted; `unreadable` less what
    went with them, plus the sets that could not be deleted, with why)."""
    purged, gone, failed = [], [], []
    for copy in copies:
        path = Path(copy["path"])
        folder = path.resolve()
        try:
            shutil.rmtree(folder)
            for link in (path.parent / name for name in copy["names"]):
                if link.is_symlink():
                    link.unlink()
            purged.append(str(path))
            gone.append(folder)
        except OSError as error:
            failed.append({"path": str(path), "error": f"{type(error).__name__}: {error}"})
    left = [u for u in unreadable if not any(Path(u["path"]).is_relative_to(folder) for folder in gone)]
    return purged, left + failed


def logged_heatmaps(record_ids: list[str], tracking_uri: str, experiment: str) -> tuple[list[dict], list[dict]]:
    """(per MLflow run whose heatmap page still shows an interaction of `record_ids`: its run id, target set
    and how many it shows; what could not be checked, with why). Read from each run's `SHOWN_TAG`; a run
    with a page but without the tag (logged before runs recorded it) is reported as unchecked, not guessed.
    A tracking store that does not exist yet holds nothing and is not created."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    from sdpo_platform.heatmap import SHOWN_TAG
    from sdpo_platform.registry import check_reachable

    forgotten = set(record_ids)
    if not forgotten or not _store_exists(tracking_uri):
        return [], []
    found, unreadable = [], []
    try:
        check_reachable(tracking_uri)  # a server down costs a report line in seconds, not minutes of retries
        client = MlflowClient(tracking_uri)
        found_experiment = client.get_experiment_by_name(experiment)
        runs, token = [], None
        while found_experiment is not None:  # every run of every set, deleted runs too: their artifacts stay
            page = client.search_runs([found_experiment.experiment_id], "tags.target_set LIKE '%'",
                                      run_view_type=ViewType.ALL, max_results=1000, page_token=token)
            runs += page
            token = page.token
            if not token:
                break
        for run in runs:
            run_id, tags = run.info.run_id, run.data.tags
            if SHOWN_TAG not in tags:
                if client.list_artifacts(run_id, "heatmaps"):
                    unreadable.append({"path": f"runs:/{run_id}/heatmaps",
                                       "error": f"logged before runs recorded the interactions a page shows ({SHOWN_TAG}): check it by hand"})
                continue
            shown = [i for i in json.loads(tags[SHOWN_TAG]) if i.rsplit(":", 1)[0] in forgotten]
            if shown and client.list_artifacts(run_id, "heatmaps"):  # not erased yet
                found.append({"run_id": run_id, "target_set": tags["target_set"], "interactions": len(shown)})
    except (MlflowException, OSError, ValueError) as error:  # a store that cannot be reached, a damaged tag
        unreadable.append({"path": tracking_uri, "error": f"{type(error).__name__}: {error}"})
    return found, unreadable


def registered_versions(target_sets: list[str], tracking_uri: str, model_name: str) -> tuple[list[dict], list[dict]]:
    """(per registered version of `model_name` trained on one of `target_sets` (its `target_set` tag): version,
    aliases and set, the `champion` among them being what serves; what could not be checked, with why).
    Nothing here retires a version: moving the aliases is the operator's decision."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from sdpo_platform.registry import check_reachable

    wanted = set(target_sets)
    if not wanted or not _store_exists(tracking_uri):
        return [], []
    try:
        check_reachable(tracking_uri)
        client = MlflowClient(tracking_uri)
        versions = client.search_model_versions(f"name = '{model_name}'")
        aliases: dict[str, list[str]] = {}
        if versions:
            for alias, version in client.get_registered_model(model_name).aliases.items():
                aliases.setdefault(str(version), []).append(alias)
        found = [{"model": model_name, "version": int(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
                  "target_set": v.tags["target_set"]}
                 for v in versions if v.tags.get("target_set") in wanted]
    except (MlflowException, OSError) as error:
        return [], [{"path": tracking_uri, "error": f"{type(error).__name__}: {error}"}]
    return sorted(found, key=lambda v: v["version"]), []


def erase_logged_heatmaps(found: list[dict], tracking_uri: str) -> tuple[list[str], list[dict]]:
    """Delete the heatmap pages of the runs `logged_heatmaps` found (the run, its metrics and its other
    artifacts stay) and tag the run `heatmaps_erased` when it still accepts tags: (the pages' `runs:/`
    folders deleted; those that could not be, with why)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    erased, failed = [], []
    client = MlflowClient(tracking_uri) if found else None
    for entry in found:
        folder = f"runs:/{entry['run_id']}/heatmaps"
        try:
            run = client.get_run(entry["run_id"])
            get_artifact_repository(run.info.artifact_uri).delete_artifacts("heatmaps")
            erased.append(folder)
        except (MlflowException, OSError) as error:
            failed.append({"path": folder, "error": f"{type(error).__name__}: {error}"})
            continue
        try:  # a deleted run takes no tags; its pages are gone all the same
            client.set_tag(entry["run_id"], "heatmaps_erased", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        except MlflowException:
            pass
    return erased, failed


def _store_exists(tracking_uri: str) -> bool:
    """Whether a local tracking store is there (opening a missing SQLite file would create one); a remote
    store is assumed to be."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).exists()
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        return Path(tracking_uri.removeprefix("file://")).exists()
    return True
