"""The code location: assets, checks, resources, the lineage job and its schedule."""

from __future__ import annotations

import dagster as dg

from assets.checks import lineage_checks
from assets.lineage import chat_log_inbox, lineage_assets
from assets.partitions import daily_partitions
from assets.resources import MlflowTracking, SdpoSettings, Warehouse
from assets.schedules import build_nightly_retrain
from assets.sensors import build_inbox_sensor

LINEAGE_JOB = "sdpo_lineage"
INGEST_JOB = "ingest_partition"
TRAIN_JOB = "train_and_register"
DATA_ASSETS, TRAINING_ASSETS = lineage_assets[:3], lineage_assets[3:]

sdpo_lineage = dg.define_asset_job(
    LINEAGE_JOB,
    selection=dg.AssetSelection.assets(*lineage_assets),
    description="One day's logs through cleaning, then training on every unblocked day, checks included.",
    executor_def=dg.in_process_executor,
)
ingest_partition = dg.define_asset_job(
    INGEST_JOB,
    selection=dg.AssetSelection.assets(*DATA_ASSETS),
    partitions_def=daily_partitions,
    description="raw → conversations → interactions for one day (what the inbox sensor and backfills run).",
    executor_def=dg.in_process_executor,
)
train_and_register = dg.define_asset_job(
    TRAIN_JOB,
    selection=dg.AssetSelection.assets(*TRAINING_ASSETS),
    description="Targets → checkpoint → evaluation → registry over every day whose checks passed.",
    executor_def=dg.in_process_executor,
)

nightly_retrain = build_nightly_retrain(train_and_register)


def build_definitions(
    settings: SdpoSettings | None = None,
    warehouse: Warehouse | None = None,
    mlflow_tracking: MlflowTracking | None = None,
) -> dg.Definitions:
    """Definitions with resources; tests pass their own (tiny model config, temp paths)."""
    return dg.Definitions(
        assets=[chat_log_inbox, *lineage_assets],
        asset_checks=lineage_checks,
        jobs=[sdpo_lineage, ingest_partition, train_and_register],
        schedules=[nightly_retrain],
        sensors=[build_inbox_sensor(ingest_partition)],
        # every step in one process, for jobs without their own executor too (the implicit asset job behind the UI's
        # Materialize and `dagster asset materialize`): DuckDB lets one process at a time open the warehouse
        executor=dg.in_process_executor,
        resources={
            "settings": settings or SdpoSettings(config_file=dg.EnvVar("SDPO_CONFIG").get_value() or None),
            "warehouse": warehouse or Warehouse(),
            "mlflow_tracking": mlflow_tracking or MlflowTracking(),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        },
    )


defs = build_definitions()
