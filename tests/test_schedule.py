"""`nightly_retrain` runs a round only when something it reads changed since a round that finished."""

import json

import dagster as dg
from dagster._core.test_utils import create_run_for_test

from assets.definitions import TRAIN_JOB, build_definitions
from assets.resources import MlflowTracking, SdpoSettings, Warehouse
from assets.schedules import ROUND_TAG
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
    return request.tags[ROUND_TAG]


def test_the_nightly_round_is_skipped_only_when_nothing_it_reads_changed(sdpo_home):
    config = sdpo_home / "config.json"
    config.write_text(json.dumps({"registry": {"model_name": "sdpo-schedule-test"}}))
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
        assert _tick(defs, instance, settings, warehouse) == first  # a failed round did not train it: run again
        done = create_run_for_test(instance, job_name=TRAIN_JOB, tags={ROUND_TAG: first}, status=dg.DagsterRunStatus.SUCCESS)
        skipped = _tick(defs, instance, settings, warehouse)
        assert skipped.startswith(f"nothing changed since run {done.run_id[:8]}") and "2 kept interaction(s) from 2 day(s)" in skipped

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

        config.write_text(json.dumps({"registry": {"model_name": "sdpo-schedule-test"}, "training": {"steps": 7}}))
        assert _tick(defs, instance, settings, warehouse) not in (first, edited, blocked)  # a training setting changed


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
