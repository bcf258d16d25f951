"""A partition without triples (no logs that day, or only unusable lines) runs through the data stages with zero rows."""

from __future__ import annotations

import json

import dagster as dg

from assets.definitions import INGEST_JOB, build_definitions
from assets.resources import MlflowTracking, SdpoSettings, Warehouse
from tests.lineage_fixtures import arrived_on


def test_ingest_partition_passes_a_day_with_no_logs_and_a_day_of_invalid_lines(sdpo_home):
    inbox = sdpo_home / "inbox"
    inbox.mkdir()
    (inbox / "bad.jsonl").write_text('not json\n{"broken": \n')
    arrived_on(inbox / "bad.jsonl", "2026-01-07")
    config = sdpo_home / "config.json"
    config.write_text(json.dumps({"informativeness": {"use_model": False}}))  # no model: the kind prior only
    defs = build_definitions(settings=SdpoSettings(config_file=str(config), inbox=str(inbox)),
                             warehouse=Warehouse(), mlflow_tracking=MlflowTracking())
    with dg.DagsterInstance.ephemeral() as instance:
        for day in ("2026-01-06", "2026-01-07"):  # no logs; only invalid_json lines
            result = defs.resolve_job_def(INGEST_JOB).execute_in_process(instance=instance, partition_key=day, raise_on_error=False)
            assert [e.step_key for e in result.get_step_failure_events()] == [], day
            assert result.output_for_node("interactions")["total"] == 0
