"""`nightly_retrain` runs a round only when something it reads changed since a round that finished."""

import json

import dagster as dg
from dagster._core.test_utils import create_run_for_test

from assets.definitions import TRAIN_JOB, build_definitions
from assets.resources import MlflowTracking, SdpoSettings, Warehouse
from assets.schedules import REQUESTED_TAG, ROUND_TAG
from sdpo_platform.assessments import SCHEMA as ASSESSMENTS_SCHEMA
from sdpo_platform.gating import SCHEMA as GATING_SCHEMA
from sdpo_platform.warehouse import connect


def _add_triple(con, n: int, day: str, keep: bool = True, followup: str = "Too long, please shorten it.") -> None:
    interaction = f"conv{n}:1"
    con.execute(
        "INSERT INTO interactions VALUES (?, ?, 1, [{'role': 'user', 'content': ?}], ?, ?, true, '', 'train', ?::DATE)",
        [interaction, f"conv{n}", f"Question {n}?", f"Answer {n}.", followup, day],
    ).fetchall()
    con.execute(
        "INSERT INTO interaction_assessments VALUES (?, ?::DATE, 'refinement', [], 0.5, false, [], NULL, 0.8, ?, NULL)",
        [interaction, day, keep],
    ).fetchall()


def _tick(defs, instance, settings, warehouse):
    resources = {"settings": settings, "warehouse": warehouse, "mlflow_tracking": MlflowTracking()}
    with dg.build_schedule_context(instance=instance, resources=resources, repository_def=defs.get_repository_def()) as context:
        result = defs.resolve_schedule_def("nightly_retrain").evaluate_tick(context)
    if result.skip_message is not None:
        return result.skip_message
    (request,) = result.run_requests
    return request.tags[REQUESTED_TAG]


def test_the_nightly_round_is_skipped_only_when_nothing_it_reads_changed(sdpo_home, tiny_model_dir):
    import shutil

    base = shutil.copytree(tiny_model_dir, sdpo_home / "base")  # its files change below
    config = sdpo_home / "config.json"
    config.write_text(json.dumps({"model": str(base), "registry": {"model_name": "sdpo-schedule-test"}}))
    settings, warehouse = SdpoSettings(config_file=str(config)), Warehouse()
    defs = build_definitions(settings=settings, warehouse=warehouse)
    with dg.instance_for_test() as instance:  # a schedule's context needs an instance it can reference
        assert "nothing has been ingested" in _tick(defs, instance, settings, warehouse)
        with connect() as con:
            con.execute(ASSESSMENTS_SCHEMA).fetchall()
            con.execute(GATING_SCHEMA).fetchall()
        assert "nothing to train on: 0 kept interaction(s)" in _tick(defs, instance, settings, warehouse)

        with connect() as con:
            _add_triple(con, 1, "2026-01-05")
            _add_triple(con, 2, "2026-01-06")
        first = _tick(defs, instance, settings, warehouse)
        assert first == _tick(defs, instance, settings, warehouse)  # the same inputs, the same digest

        create_run_for_test(instance, job_name=TRAIN_JOB, tags={ROUND_TAG: first}, status=dg.DagsterRunStatus.FAILURE)
        # a successful run that only scored the targets (Materialize on hindsight_targets) registered nothing
        create_run_for_test(instance, job_name=TRAIN_JOB, tags={REQUESTED_TAG: first}, status=dg.DagsterRunStatus.SUCCESS)
        assert _tick(defs, instance, settings, warehouse) == first  # neither trained it: run again
        running = create_run_for_test(instance, job_name=TRAIN_JOB, tags={REQUESTED_TAG: first}, status=dg.DagsterRunStatus.STARTED)
        assert _tick(defs, instance, settings, warehouse).startswith(f"nothing changed since run {running.run_id[:8]} (in flight")
        instance.report_run_canceled(running)
        done = create_run_for_test(instance, job_name=TRAIN_JOB, tags={ROUND_TAG: first}, status=dg.DagsterRunStatus.SUCCESS)
        skipped = _tick(defs, instance, settings, warehouse)
        assert skipped.startswith(f"nothing changed since run {done.run_id[:8]} (finished")
        assert "2 kept interaction(s) from 2 day(s)" in skipped

        with connect() as con:  # a triple the judge did not keep is not trained on: still nothing new
            _add_triple(con, 3, "2026-01-06", keep=False)
        assert _tick(defs, instance, settings, warehouse) == skipped

        with connect() as con:  # one follow-up edited by a rebuilt day: new data
            con.execute("UPDATE interactions SET followup = 'Make it formal.' WHERE interaction_id = 'conv2:1'").fetchall()
        edited = _tick(defs, instance, settings, warehouse)
        assert edited not in (first, skipped)

        with connect() as con:  # the day fails a check: its rows leave the round
            con.execute("INSERT INTO partition_checks VALUES ('interactions', '2026-01-06', false, 'bad', now())").fetchall()
        blocked = _tick(defs, instance, settings, warehouse)
        assert blocked not in (first, edited)

        write_config = lambda **sections: config.write_text(json.dumps(  # noqa: E731
            {"model": str(base), "registry": {"model_name": "sdpo-schedule-test"}, **sections}))
        write_config(training={"device": "cuda:1"}, targets={"shard_size": 8, "batch_token_budget": 4096})
        assert _tick(defs, instance, settings, warehouse) == blocked  # where and how it runs changes nothing it trains
        write_config(training={"steps": 7})
        steps = _tick(defs, instance, settings, warehouse)
        assert steps not in (first, edited, blocked)  # a training setting changed
        (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())  # new weights, same spec
        retrained_base = _tick(defs, instance, settings, warehouse)
        assert retrained_base != steps
        steps = retrained_base

        from mlflow import MlflowClient

        client = MlflowClient()  # the tick configured the store under the data root
        client.create_registered_model("sdpo-schedule-test")
        client.create_model_version("sdpo-schedule-test", source=str(sdpo_home))
        client.set_registered_model_alias("sdpo-schedule-test", "champion", "1")
        from_champion = _tick(defs, instance, settings, warehouse)
        assert from_champion != steps  # a new champion: the next round starts from it
        write_config(training={"steps": 7}, registry={"model_name": "sdpo-schedule-test", "next_round_from": "base"})
        from_base = _tick(defs, instance, settings, warehouse)
        client.create_model_version("sdpo-schedule-test", source=str(sdpo_home))
        client.set_registered_model_alias("sdpo-schedule-test", "champion", "2")
        assert _tick(defs, instance, settings, warehouse) != from_base  # from the base, the champion is still the bar


def test_a_round_runs_when_it_cannot_tell_what_changed(sdpo_home):
    """A tracking server that is down must not skip the night silently: the run goes ahead and says why it fails."""
    with connect() as con:
        con.execute(ASSESSMENTS_SCHEMA).fetchall()
        _add_triple(con, 1, "2026-01-05")
    settings, warehouse = SdpoSettings(), Warehouse()
    defs = build_definitions(settings=settings, warehouse=warehouse)
    resources = {"settings": settings, "warehouse": warehouse, "mlflow_tracking": MlflowTracking(tracking_uri="http://127.0.0.1:9")}
    with dg.instance_for_test() as instance, dg.build_schedule_context(instance=instance, resources=resources) as context:
        result = defs.resolve_schedule_def("nightly_retrain").evaluate_tick(context)
    assert result.skip_message is None and len(result.run_requests) == 1
    assert ROUND_TAG not in result.run_requests[0].tags
