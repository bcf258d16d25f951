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
    "interactions_kept", "target_rows", "target_tokens", "train_steps", "loss_first", "loss_last",
    "gap_before", "gap_after", "registered_model", "model_version", "aliases",
]


def dagster_home(root: Path) -> Path:
    """$DAGSTER_HOME (default: the data root's dagster/), holding the repo's instance config."""
    home = Path(os.environ.get("DAGSTER_HOME") or root / "dagster")
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


def run_demo(records: int = 300) -> dict:
    from assets.definitions import LINEAGE_JOB, defs
    from sdpo_platform.sharegpt import write_sharegpt_slice

    root = paths.data_root()
    os.environ["DAGSTER_HOME"] = str(dagster_home(root))
    written = write_sharegpt_slice(paths.inbox_dir(root) / "sharegpt_demo.jsonl", records)
    print(f"[demo] data root {root}; wrote {written} ShareGPT records to the inbox")
    started = time.monotonic()
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def(LINEAGE_JOB).execute_in_process(
            instance=instance,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        )
    if not result.success:
        failed = [e.step_key for e in result.get_step_failure_events()]
        raise SystemExit(f"[demo] run {result.run_id} failed at {failed}; open `make ui` to see why")
    value = result.output_for_node
    conversations, interactions = value("conversations"), value("interactions")
    targets, checkpoint = value("hindsight_targets"), value("distilled_checkpoint")
    evaluation, registered = value("evaluation"), value("registered_model")
    summary = {
        "raw_records": conversations["raw_records"],
        "conversations_kept": conversations["kept"],
        "conversations_quarantined": conversations["quarantined"],
        "interactions_total": interactions["total"],
        "interactions_kept": interactions["informative"],
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
    print(f"[demo] run {result.run_id} succeeded in {time.monotonic() - started:.0f}s")
    print(json.dumps(summary, indent=2))
    print(f"[demo] summary written to {root / 'demo_summary.json'}; `make ui` shows the lineage and MLflow")
    return summary
