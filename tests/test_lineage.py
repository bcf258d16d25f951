"""The whole lineage, in process, on tiny fixtures: counts reconcile and a bad partition stops downstream."""

import duckdb
import dagster as dg
import pytest

from assets.definitions import LINEAGE_JOB, build_definitions
from assets.resources import MlflowTracking, SdpoSettings, Warehouse
from tests.lineage_fixtures import tiny_config, write_garbage_inbox, write_inbox


def _defs(home, model_dir):
    config = tiny_config(home / "config.json", model_dir)
    return build_definitions(
        settings=SdpoSettings(config_file=str(config), inbox=str(home / "inbox")),
        warehouse=Warehouse(path=str(home / "warehouse.duckdb")),
        mlflow_tracking=MlflowTracking(),
    )


def test_whole_lineage_materializes_on_fixtures(sdpo_home, tiny_model_dir):
    expected = write_inbox(sdpo_home / "inbox")
    defs = _defs(sdpo_home, tiny_model_dir)
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(LINEAGE_JOB).execute_in_process(instance=instance)
        assert result.success
        checks = result.get_asset_check_evaluations()
        assert len(checks) == 8 and all(c.passed for c in checks), [c.description for c in checks if not c.passed]

    conversations = result.output_for_node("conversations")
    assert conversations["raw_records"] == expected["raw_records"]
    assert conversations["kept"] + conversations["quarantined"] == conversations["raw_records"]
    assert conversations["kept"] == expected["good_conversations"]

    interactions = result.output_for_node("interactions")
    assert interactions["total"] == expected["good_conversations"]  # one follow-up per fixture conversation
    targets = result.output_for_node("hindsight_targets")
    assert targets["train_rows"] >= 1 and targets["validation_rows"] >= 1
    checkpoint = result.output_for_node("distilled_checkpoint")
    assert checkpoint["steps"] == 2 and len(checkpoint["losses"]) == 2
    registered = result.output_for_node("registered_model")
    assert registered["version"] == 1
    assert registered["aliases"] == ["challenger", "champion"]  # first version: no champion yet

    con = duckdb.connect(str(sdpo_home / "warehouse.duckdb"), read_only=True)
    reasons = dict(con.sql("SELECT reason, count(*) FROM quarantine WHERE stage = 'conversations' GROUP BY 1").fetchall())
    assert sum(reasons.values()) == conversations["quarantined"] == 3
    evaluation = result.output_for_node("evaluation")
    stored = con.sql("SELECT gap_before, gap_after, target_set FROM evaluations").fetchall()
    assert stored == [(evaluation["gap_before"], evaluation["gap_after"], targets["target_set"])]


def test_failing_blocking_check_stops_downstream(sdpo_home, tiny_model_dir):
    write_garbage_inbox(sdpo_home / "inbox")
    defs = _defs(sdpo_home, tiny_model_dir)
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(LINEAGE_JOB).execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        evaluations = {c.asset_check_key.name: c for c in result.get_asset_check_evaluations()}
        assert evaluations["raw_records_valid"].passed
        assert not evaluations["conversations_reconcile"].passed
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert materialized == {"raw_interaction_logs", "conversations"}
        for downstream in ("interactions", "hindsight_targets", "distilled_checkpoint", "registered_model"):
            assert not result.is_node_success(downstream)
