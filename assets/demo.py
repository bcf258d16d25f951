"""`make demo`: the real lineage job on a ShareGPT slice, recorded in the same instance the UI opens."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import dagster as dg

from sdpo_platform import paths

REPO_ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = [
    "raw_records", "conversations_kept", "conversations_quarantined", "interactions_total",
    "interactions_kept", "teacher", "target_rows", "target_tokens", "train_steps", "loss_first", "loss_last",
    "gap_before", "gap_after", "registered_model", "model_version", "aliases",
]


def dagster_home(root: Path) -> Path:
    """$DAGSTER_HOME (default: the data root's dagster/), holding the repo's instance config."""
    home = Path(os.environ.get("DAGSTER_HOME") or root / "dagster")
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


def _execute(job_name: str, instance, partition_key: str | None = None):
    from assets.definitions import defs

    result = defs.resolve_job_def(job_name).execute_in_process(
        instance=instance,
        partition_key=partition_key,
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
    )
    if not result.success:
        failed = [e.step_key for e in result.get_step_failure_events()]
        raise SystemExit(f"[demo] {job_name} run {result.run_id} failed at {failed}; open `make ui` to see why")
    return result


def run_demo(records: int = 300) -> dict:
    """Inbox → (the sensor's) partition runs of the data stages → one training run, then the summary."""
    from assets.definitions import INGEST_JOB, TRAIN_JOB, defs
    from assets.sensors import drain_inbox
    from sdpo_platform.sharegpt import write_sharegpt_slice
    from sdpo_platform.assessments import kept_count
    from sdpo_platform.gating import blocked_partitions
    from sdpo_platform.warehouse import connect, stats

    root = paths.data_root()
    os.environ["DAGSTER_HOME"] = str(dagster_home(root))
    written = write_sharegpt_slice(paths.inbox_dir(root) / "sharegpt_demo.jsonl", records)
    print(f"[demo] data root {root}; wrote {written} ShareGPT records to the inbox")
    started = time.monotonic()
    resources = defs.resources
    with dg.DagsterInstance.get() as instance:

        def run_partition(day: str):
            print(f"[demo] data stages for partition {day}")
            _execute(INGEST_JOB, instance, day)

        days = drain_inbox(resources["settings"], resources["warehouse"], run_partition)
        result = _execute(TRAIN_JOB, instance)
    targets, checkpoint = result.output_for_node("hindsight_targets"), result.output_for_node("distilled_checkpoint")
    evaluation, registered = result.output_for_node("evaluation"), result.output_for_node("registered_model")
    with connect() as con:
        counts = stats(con)
        kept = kept_count(con, blocked_partitions(con))
    summary = {
        "raw_records": counts["raw_records"],
        "conversations_kept": counts["conversations_kept"],
        "conversations_quarantined": counts["quarantined"],
        "interactions_total": counts["interactions_total"],
        "interactions_kept": kept,  # kept by the informativeness/safety verdicts, unblocked days only
        "teacher": targets["teacher"],  # the round's model: base, or the previous champion
        "target_rows": targets["rows"],
        "target_tokens": targets["tokens"],
        "train_steps": checkpoint["steps"],
        "loss_first": float(checkpoint["loss_first"]),
        "loss_last": float(checkpoint["loss_last"]),
        "gap_before": float(evaluation["gap_before"]),
        "gap_after": float(evaluation["gap_after"]),
        "registered_model": registered["name"],
        "model_version": int(registered["version"]),
        "aliases": list(registered["aliases"]),
    }
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[demo] {len(days)} partition run(s) and training run {result.run_id} succeeded in {time.monotonic() - started:.0f}s")
    print(json.dumps(summary, indent=2))
    print(f"[demo] summary written to {root / 'demo_summary.json'}; `make ui` shows the lineage and MLflow")
    return summary
