"""The code location: assets, checks, resources, the lineage job and its schedule."""

from __future__ import annotations

import dagster as dg

from assets.checks import lineage_checks
from assets.lineage import chat_log_inbox, lineage_assets
from assets.resources import MlflowTracking, SdpoSettings, Warehouse

LINEAGE_JOB = "sdpo_lineage"

sdpo_lineage = dg.define_asset_job(
    LINEAGE_JOB,
    selection=dg.AssetSelection.assets(*lineage_assets),
    description="Raw logs to a registered model, checks included (in-process: the steps share one model cache).",
    executor_def=dg.in_process_executor,
)

nightly_retrain = dg.ScheduleDefinition(
    name="nightly_retrain",
    job=sdpo_lineage,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Re-run the lineage on everything in the inbox every night (off until turned on in the UI).",
)


def build_definitions(
    settings: SdpoSettings | None = None,
    warehouse: Warehouse | None = None,
    mlflow_tracking: MlflowTracking | None = None,
) -> dg.Definitions:
    """Definitions with resources; tests pass their own (tiny model config, temp paths)."""
    return dg.Definitions(
        assets=[chat_log_inbox, *lineage_assets],
        asset_checks=lineage_checks,
        jobs=[sdpo_lineage],
        schedules=[nightly_retrain],
        resources={
            "settings": settings or SdpoSettings(config_file=dg.EnvVar("SDPO_CONFIG").get_value() or None),
            "warehouse": warehouse or Warehouse(),
            "mlflow_tracking": mlflow_tracking or MlflowTracking(),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        },
    )


defs = build_definitions()
