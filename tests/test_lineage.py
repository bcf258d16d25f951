"""The whole lineage, in process, on tiny fixtures: counts reconcile, the sensor finds the right days,
a bad partition stops downstream in its run and stays out of later training runs."""

import duckdb
import mlflow
import dagster as dg

from assets.definitions import INGEST_JOB, LINEAGE_JOB, TRAIN_JOB, build_definitions
from assets.resources import MlflowTracking, SdpoSettings, Warehouse
from assets.schedules import REQUESTED_TAG, ROUND_TAG
from assets.sensors import inbox_run_requests
from tests.lineage_fixtures import FIXTURE_DAY, tiny_config, write_garbage_inbox, write_inbox

OTHER_DAY = "2026-01-06"


def _resources(home, model_dir):
    config = tiny_config(home / "config.json", model_dir)
    return (
        SdpoSettings(config_file=str(config), inbox=str(home / "inbox")),
        Warehouse(path=str(home / "warehouse.duckdb")),
    )


def _defs(home, model_dir):
    settings, warehouse = _resources(home, model_dir)
    return build_definitions(settings=settings, warehouse=warehouse, mlflow_tracking=MlflowTracking())


def test_whole_lineage_materializes_on_fixtures(sdpo_home, tiny_model_dir):
    expected = write_inbox(sdpo_home / "inbox")
    defs = _defs(sdpo_home, tiny_model_dir)
    requests, _ = inbox_run_requests(*_resources(sdpo_home, tiny_model_dir), cursor=None)
    assert [r.partition_key for r in requests] == [FIXTURE_DAY]
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(LINEAGE_JOB).execute_in_process(instance=instance, partition_key=FIXTURE_DAY)
        assert result.success
        checks = result.get_asset_check_evaluations()
        assert len(checks) == 10 and all(c.passed for c in checks), [c.description for c in checks if not c.passed]
        logged = [entry.user_message for entry in instance.all_logs(result.run_id)]

    conversations = result.output_for_node("conversations")
    assert conversations["raw_records"] == expected["raw_records"]
    n = expected["raw_records"]
    assert any(f"conversations: {n}/{n} records (100%)" in line for line in logged)  # progress in the run log
    assert conversations["records_kept"] + conversations["quarantined"] == conversations["raw_records"]
    assert conversations["kept"] == expected["good_conversations"]

    interactions = result.output_for_node("interactions")
    assert interactions["total"] == expected["good_conversations"]  # one follow-up per fixture conversation
    targets = result.output_for_node("hindsight_targets")
    assert targets["train_rows"] >= 1 and targets["validation_rows"] >= 1
    [scored_event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "hindsight_targets"]
    metadata = scored_event.materialization.metadata
    heatmap = metadata["heatmap"].value  # this run's page, beside the set
    assert heatmap == f"{targets['set_dir']}/heatmaps/extremes-{result.run_id[:8]}.html" and "informative" in open(heatmap).read()
    assert targets["path"] == f"{targets['set_dir']}/snapshots/{result.run_id}.json"  # downstream reads this run's rows
    assert "most informative" in metadata["heatmap_preview"].value and metadata["heatmap_mlflow_run"].value
    checkpoint = result.output_for_node("distilled_checkpoint")
    assert checkpoint["steps"] == 2 and len(checkpoint["losses"]) == 2
    registered = result.output_for_node("registered_model")
    assert registered["version"] == 1
    served = {p.name: p.default for p in mlflow.models.get_model_info(registered["model_uri"]).signature.params.params}
    assert served["max_new_tokens"] == 12  # registry.serve_max_new_tokens of the config, not the built-in 64
    assert registered["aliases"] == ["challenger", "champion"]  # first version: no champion yet
    assert registered["tags"]["data_partition"] == FIXTURE_DAY
    assert registered["tags"]["targets_snapshot"] == targets["path"]
    from sdpo_platform.registry import registered_snapshots

    assert registered_snapshots() == {targets["path"]}  # what `sdpo targets prune` keeps

    con = duckdb.connect(str(sdpo_home / "warehouse.duckdb"), read_only=True)
    reasons = dict(con.sql(
        "SELECT reason, count(*) FROM quarantine WHERE stage = 'conversations' AND level = 'record' GROUP BY 1"
    ).fetchall())
    assert sum(reasons.values()) == conversations["quarantined"] == 3
    judged = dict(con.sql("SELECT interaction_id, keep FROM interaction_assessments").fetchall())
    assert len(judged) == interactions["total"]  # every triple judged
    from sdpo_platform.targets import read_targets

    scored = set(read_targets(targets["path"])["interaction_id"])
    assert scored and all(judged[i] for i in scored)  # only kept triples are scored
    evaluation = result.output_for_node("evaluation")
    stored = con.sql("SELECT gap_before, gap_after, target_set FROM evaluations").fetchall()
    assert stored == [(evaluation["gap_before"], evaluation["gap_after"], targets["target_set"])]


def test_failing_blocking_check_stops_downstream(sdpo_home, tiny_model_dir):
    write_garbage_inbox(sdpo_home / "inbox")
    defs = _defs(sdpo_home, tiny_model_dir)
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(LINEAGE_JOB).execute_in_process(
            instance=instance, partition_key=FIXTURE_DAY, raise_on_error=False
        )
        assert not result.success
        evaluations = {c.asset_check_key.name: c for c in result.get_asset_check_evaluations()}
        assert evaluations["raw_records_valid"].passed
        assert not evaluations["conversations_reconcile"].passed
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert materialized == {"raw_interaction_logs", "conversations"}
        for downstream in ("interactions", "hindsight_targets", "distilled_checkpoint", "registered_model"):
            assert not result.is_node_success(downstream)


def test_partition_that_fails_later_is_excluded_from_training(sdpo_home, tiny_model_dir):
    """Day 2 first passes; its file is then replaced by garbage, so its check fails. Its old interactions go
    with the conversations they were built from, and the day stays blocked: a later training run (another
    job) must not train on anything of it."""
    inbox = sdpo_home / "inbox"
    write_inbox(inbox / "day1", FIXTURE_DAY)
    write_inbox(inbox / "day2", OTHER_DAY)
    settings, warehouse = _resources(sdpo_home, tiny_model_dir)
    defs = _defs(sdpo_home, tiny_model_dir)
    with dg.DagsterInstance.ephemeral() as instance:
        requests, cursor = inbox_run_requests(settings, warehouse, cursor=None)
        assert sorted(r.partition_key for r in requests) == [FIXTURE_DAY, OTHER_DAY]
        ingest = defs.resolve_job_def(INGEST_JOB)
        for request in requests:
            assert ingest.execute_in_process(instance=instance, partition_key=request.partition_key).success

        for name in ("sharegpt.jsonl", "openai.jsonl"):  # day 2's logs are replaced by unusable ones
            write_garbage_inbox(inbox / "day2", OTHER_DAY, name=name)
        requests, _ = inbox_run_requests(settings, warehouse, cursor)
        assert [r.partition_key for r in requests] == [OTHER_DAY]
        failed = ingest.execute_in_process(instance=instance, partition_key=OTHER_DAY, raise_on_error=False)
        assert not failed.success  # conversations check fails; interactions of day 2 are not rebuilt

        trained = defs.resolve_job_def(TRAIN_JOB).execute_in_process(instance=instance)
        assert trained.success
    con = duckdb.connect(str(sdpo_home / "warehouse.duckdb"), read_only=True)
    stale = con.sql("SELECT count(*) FROM interactions WHERE partition_date = DATE '2026-01-06'").fetchall()[0][0]
    assert stale == 0  # gone with day 2's old conversations (they used to stay, kept out by the gate alone) ...
    from sdpo_platform.targets import read_targets

    scored = read_targets(trained.output_for_node("hindsight_targets")["path"])
    days = con.execute(
        "SELECT DISTINCT partition_date::VARCHAR FROM interactions WHERE list_contains($ids, interaction_id)",
        {"ids": list(scored["interaction_id"])},
    ).fetchall()
    assert days == [(FIXTURE_DAY,)]  # ... but never scored for training


def test_second_round_scores_and_trains_on_the_champion(sdpo_home, tiny_model_dir):
    """DESIGN's frozen teacher moves forward: champion → new targets → new champion."""
    write_inbox(sdpo_home / "inbox")
    settings, warehouse = _resources(sdpo_home, tiny_model_dir)
    defs = build_definitions(settings=settings, warehouse=warehouse, mlflow_tracking=MlflowTracking())
    with dg.instance_for_test() as instance:
        first = defs.resolve_job_def(LINEAGE_JOB).execute_in_process(instance=instance, partition_key=FIXTURE_DAY)
        second = defs.resolve_job_def(TRAIN_JOB).execute_in_process(instance=instance)
        assert first.success and second.success
        read = {run.run_id: instance.get_run_by_id(run.run_id).tags.get(ROUND_TAG) for run in (first, second)}
        with dg.build_schedule_context(instance=instance, resources={"settings": settings, "warehouse": warehouse,
                                                                     "mlflow_tracking": MlflowTracking()}) as context:
            tonight = defs.resolve_schedule_def("nightly_retrain").evaluate_tick(context)
    checks = second.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks), [c.description for c in checks if not c.passed]  # incl. the registry round trip

    before, after = first.output_for_node("hindsight_targets"), second.output_for_node("hindsight_targets")
    assert before["teacher"] == f"base:{tiny_model_dir}"
    assert after["teacher"] == "models:/sdpo-test/1"  # the first round's champion scores the second round
    assert after["target_set"] != before["target_set"] and after["rows"] == before["rows"]  # a new set beside the old one
    assert after["base_model_path"] != before["base_model_path"]  # and carries the new LoRA
    registered = second.output_for_node("registered_model")
    assert registered["version"] == 2 and registered["tags"]["teacher"] == "models:/sdpo-test/1"

    # each run that registered a version is tagged with what its round read; the champion moved between them
    assert read == {first.run_id: before["round_inputs"], second.run_id: after["round_inputs"]}
    assert before["round_inputs"] != after["round_inputs"]
    if "champion" in registered["aliases"]:  # v2 is the new base: a third round has something new to start from
        assert tonight.run_requests[0].tags[REQUESTED_TAG] not in read.values()
    else:  # v1 stays: the same rows, model and settings would train the same candidate again
        assert tonight.skip_message.startswith(f"nothing changed since run {second.run_id[:8]}"), tonight.skip_message
