"""The nightly round: `train_and_register` at 03:00, skipped when it would train nothing new (`rounds.py`)."""

import duckdb
import dagster as dg

from assets.resources import MlflowTracking, SdpoSettings, Warehouse
from sdpo_platform.rounds import round_inputs

ROUND_TAG = "sdpo/round_inputs"  # set by `registered_model` on its run: the digest of what the finished round read
REQUESTED_TAG = "sdpo/round_requested"  # set by the schedule on the run it asks for: the digest it computed
IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def same_round(instance: dg.DagsterInstance, digest: str) -> tuple[str, dg.DagsterRun] | None:
    """('finished', run) for the latest run that registered a version from exactly these round inputs, whichever
    job ran it; ('in flight', run) for a run the schedule asked for with them that has not ended; else None."""
    for state, tags, statuses in (("finished", {ROUND_TAG: digest}, [dg.DagsterRunStatus.SUCCESS]),
                                  ("in flight", {REQUESTED_TAG: digest}, IN_FLIGHT)):
        runs = instance.get_runs(filters=dg.RunsFilter(tags=tags, statuses=statuses), limit=1)
        if runs:
            return state, runs[0]
    return None


def build_nightly_retrain(job) -> dg.ScheduleDefinition:
    @dg.schedule(job=job, cron_schedule="0 3 * * *", name="nightly_retrain", default_status=dg.DefaultScheduleStatus.STOPPED)
    def nightly_retrain(context: dg.ScheduleEvaluationContext, settings: SdpoSettings, warehouse: Warehouse,
                        mlflow_tracking: MlflowTracking):
        """Retrain on every day whose checks passed, every night at 03:00 (off until turned on in the UI), unless a
        round on the same kept interactions, start, champion and settings finished or is still running."""
        from mlflow.exceptions import MlflowException

        if not warehouse.exists():
            return dg.SkipReason("no warehouse yet: nothing has been ingested")
        cfg = settings.platform()
        try:
            mlflow_tracking.configure()
            with warehouse.connect() as con:
                inputs = round_inputs(con, cfg)
        except (duckdb.IOException, OSError, MlflowException) as error:  # warehouse busy, tracking server down: let the run say
            context.log.warning(f"could not tell whether anything changed since the last round ({error}); running it")
            return dg.RunRequest()
        if inputs.interactions == 0:
            return dg.SkipReason(f"nothing to train on: {inputs.describe()}")
        found = same_round(context.instance, inputs.digest)
        if found is not None:
            state, run = found
            return dg.SkipReason(f"nothing changed since run {run.run_id[:8]} ({state}; {inputs.describe()}, same settings)")
        return dg.RunRequest(tags={REQUESTED_TAG: inputs.digest})

    return nightly_retrain
