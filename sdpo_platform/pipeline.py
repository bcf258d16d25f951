"""The data stages end to end without Dagster (`sdpo ingest`): the same library calls and the same
quality suites as the assets, and the same partition verdicts, so a shell ingest gates training too."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import duckdb

from sdpo_platform import checks
from sdpo_platform.cleaning import build_conversations
from sdpo_platform.config import PlatformConfig
from sdpo_platform.gating import record_check
from sdpo_platform.ingest import ingest_files
from sdpo_platform.interactions import extract_interactions
from sdpo_platform.progress import stage_logger
from sdpo_platform.stale import stale_partitions

# A rebuild can leave another day stale (its record judged a duplicate of a conversation the next round removes),
# so stale days are followed for a few rounds; what is left then, the sensor's next tick or ingest finds.
MAX_STALE_ROUNDS = 3


def ingest_and_clean(con: duckdb.DuckDBPyConnection, paths: list[str | Path], cfg: PlatformConfig,
                     partition: str | None = None, format: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """raw → conversations → judged interactions for the partitions `paths` touch, and for the days whose
    duplicates pointed at conversations those files no longer hold (`stale.py`); returns what happened,
    including each partition's check verdicts (a failed one is recorded and blocks training).
    `log` receives progress lines (done/total, rate, ETA) of each stage."""
    progress = None if log is None else stage_logger(log, "ingest")
    ingested = ingest_files(con, paths, partition=partition, format=format, cfg=cfg.ingest, progress=progress)
    unbuilt = sorted(set(unbuilt_days(con, paths)) - set(ingested.partitions))
    return {
        "files": ingested.files,
        "files_rejected": ingested.files_rejected,
        "records_new": ingested.records_new,
        "partitions": ingested.partitions,
        "partitions_unbuilt": unbuilt,
        **rebuild_days(con, cfg, sorted(set(ingested.partitions) | set(unbuilt)), log),
        "errors": ingested.errors,
    }


def unbuilt_days(con: duckdb.DuckDBPyConnection, paths: list[str | Path]) -> list[str]:
    """Days holding records of these files that no run has built (no conversations verdict): a file stored by
    another day's run whose records fall on a day outside the Dagster partitions (before SDPO_PARTITION_START).
    `sdpo ingest FILE` builds them, although the file itself is unchanged."""
    from sdpo_platform.gating import SCHEMA as CHECKS_SCHEMA

    con.execute(CHECKS_SCHEMA).fetchall()
    files = [str(Path(path).expanduser().resolve()) for path in paths]
    return [row[0] for row in con.execute(
        """SELECT DISTINCT strftime(partition_date, '%Y-%m-%d') FROM raw_records r
           WHERE list_contains($files, source_file) AND partition_date IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM partition_checks c WHERE c.stage = 'conversations' AND c.partition_date = r.partition_date)
           ORDER BY 1""", {"files": files}).fetchall()]


def forget_and_rebuild(con: duckdb.DuckDBPyConnection, paths: list[str | Path], cfg: PlatformConfig, inbox: Path | None = None,
                       log: Callable[[str], None] | None = None, purge_targets: bool = False, tracking_uri: str | None = None) -> dict:
    """Erase ingested files (`forget.forget_files`) and rebuild the days they were in, so nothing built from
    them is left in the warehouse; returns the forgotten files, their days, what the rebuild did, and the
    copies outside the warehouse that hold their interactions: target sets (`forget.derived_copies`) and
    heatmap pages logged to MLflow (`forget.logged_heatmaps`, in `tracking_uri`, default the platform's),
    and the model versions registered from those sets (`forget.registered_versions`, listed, never retired),
    looked for before the erasure, so a damaged set costs its report line, never the erasure's. With
    `purge_targets` both are deleted. Whatever could not be read or deleted is listed under `unreadable`."""
    from sdpo_platform.forget import (derived_copies, erase_logged_heatmaps, forget_files, forgettable, logged_heatmaps,
                                      purge_target_sets, record_ids_of, registered_versions)
    from sdpo_platform.paths import mlflow_tracking_uri

    record_ids = record_ids_of(con, forgettable(con, paths, inbox, already_forgotten_ok=purge_targets))
    tracking_uri = tracking_uri or mlflow_tracking_uri()
    copies, unreadable = derived_copies(record_ids)
    pages, unchecked = logged_heatmaps(record_ids, tracking_uri, cfg.registry.experiment)
    versions, unlisted = registered_versions([c["target_set"] for c in copies], tracking_uri, cfg.registry.model_name)
    files, days = forget_files(con, paths, inbox, already_forgotten_ok=purge_targets)
    outcome = {"forgotten": files, "partitions": days, **rebuild_days(con, cfg, days, log)}
    purged, unreadable = purge_target_sets(copies, unreadable) if purge_targets else ([], unreadable)
    erased, not_erased = erase_logged_heatmaps(pages, tracking_uri) if purge_targets else ([], [])
    outcome |= {"target_sets_holding_them": copies, "target_sets_purged": purged, "heatmaps_showing_them": pages,
                "heatmaps_erased": erased, "model_versions_trained_on_them": versions,
                "unreadable": unreadable + unchecked + unlisted + not_erased}
    if log is not None and copies:
        action = f"{len(purged)} were deleted" if purge_targets else "still hold them (`sdpo forget --purge-targets` deletes those sets)"
        log(f"{sum(c['interactions'] for c in copies)} interaction(s) of the forgotten files are in {len(copies)} target set(s): "
            f"{action}; checkpoints trained on them: {sum(len(c['checkpoints']) for c in copies)} (retire them by hand)")
    if log is not None and versions:
        serving = [v["version"] for v in versions if "champion" in v["aliases"]]
        log(f"registered versions of {cfg.registry.model_name} trained on them: {', '.join(str(v['version']) for v in versions)}"
            + (f" (version {serving[0]} is the champion that serves)" if serving else "")
            + "; retire them by moving the aliases (nothing here does)")
    if log is not None and pages:
        action = f"{len(erased)} were deleted" if purge_targets else "still show them (`--purge-targets` deletes those pages)"
        log(f"{len(pages)} heatmap page(s) logged to MLflow show interactions of the forgotten files: {action}")
    if log is not None and outcome["unreadable"]:
        log(f"{len(outcome['unreadable'])} file(s) could not be checked or deleted: see `unreadable`")
    return outcome


def rebuild_days(con: duckdb.DuckDBPyConnection, cfg: PlatformConfig, days: list[str], log: Callable[[str], None] | None = None) -> dict:
    """Rebuild conversations and judged interactions of `days` and of every stale day (those left by earlier
    runs too), then of the days left stale by it, and record every rebuilt day's check verdicts."""

    def progress(stage: str):
        return None if log is None else stage_logger(log, stage)

    built, todo = [], sorted(set(days) | set(stale_partitions(con)))
    kept = quarantined = interactions = 0
    for _ in range(MAX_STALE_ROUNDS):  # then the days whose duplicates pointed at conversations these runs removed
        if not todo:
            break
        cleaned = build_conversations(con, cfg.cleaning, partitions=todo, progress=progress("conversations"))
        extracted = extract_interactions(con, cfg.interactions, partitions=todo, progress=progress("interactions"))
        kept, quarantined, interactions = kept + cleaned.kept, quarantined + cleaned.quarantined, interactions + extracted.total
        built += todo
        todo = sorted(set(stale_partitions(con)) - set(built))
    judge = _judge(con, cfg, log)
    verdicts = {}
    for day in sorted(built):
        for stage, report in (
            ("conversations", checks.check_conversations(con, cfg.cleaning, [day])),
            ("conversations_pii", checks.check_pii(con, [day])),
            ("interactions", checks.check_interactions(con, [day])),
            ("interactions_judged", judge(day)),
        ):
            record_check(con, stage, day, report.passed, report.description)
            verdicts.setdefault(day, {})[stage] = report.description if not report.passed else "passed"
    return {
        "partitions_stale": sorted(set(built) - set(days)),  # rebuilt because what their verdicts pointed at changed
        "conversations_kept": kept,
        "records_quarantined": quarantined,
        "interactions": interactions,
        "checks": verdicts,
    }


def _judge(con: duckdb.DuckDBPyConnection, cfg: PlatformConfig, log: Callable[[str], None] | None):
    """`day → report`: judge a day's triples as the `interactions` asset does (follow-up kind, the model signal,
    the safety guardrail, the caps; the model loaded once, only when a day has triples and the signal is on)
    and check the verdicts as its `interactions_judged` check does. Training keeps only judged triples."""
    from sdpo_platform.assessments import assess_partition, check_judged

    loaded: list = []

    def judge(day: str):
        n_triples = con.execute("SELECT count(*) FROM interactions WHERE partition_date = ?::DATE", [day]).fetchall()[0][0]
        if cfg.informativeness.use_model and n_triples and not loaded:
            from sdpo_platform.models import load_model

            if log is not None:
                log(f"informativeness: loading {cfg.model!r} for the model signal")
            loaded.extend(load_model(cfg.model))
        model, tokenizer = loaded or (None, None)
        assess_partition(con, day, cfg, model, tokenizer, progress=None if log is None else stage_logger(log, "informativeness"))
        return check_judged(con, day, cfg)

    return judge
