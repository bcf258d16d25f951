"""The nightly round: `train_and_register` at 03:00, skipped when it would train nothing new (`rounds.py`)."""

import duckdb
import dagster as dg

from assets.resources import MlflowTracking, SdpoSettings, Warehouse
from sdpo_platform.rounds import round_inputs

ROUND_TAG = "sdpo/round_inputs"  # set by `hindsight_targets` on its run: the digest of what the round read


def finished_round(instance: dg.DagsterInstance, digest: str) -> dg.DagsterRun | None:
    """The latest run that succeeded after reading exactly these round inputs, whichever job ran it."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={ROUND_TAG: digest}, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1)
    return runs[0] if runs else None


def build_nightly_retrain(job) -> dg.ScheduleDefinition:
    @dg.schedule(job=job, cron_schedule="0 3 * * *", name="nightly_retrain", default_status=dg.DefaultScheduleStatus.STOPPED)
    def nightly_retrain(context: dg.ScheduleEvaluationContext, settings: SdpoSettings, warehouse: Warehouse,
                        mlflow_tracking: MlflowTracking):
        """Retrain on every day whose checks passed, every night at 03:00 (off until turned on in the UI), unless a
        run already finished on the same kept interactions, from the same round model, with the same settings."""
        from mlflow.exceptions import MlflowException

        from sdpo_platform.registry import round_champion, round_label

        if not warehouse.exists():
            return dg.SkipReason("no warehouse yet: nothing has been ingested")
        cfg = settings.platform()
        try:
            mlflow_tracking.configure()
            champion = round_champion(cfg.registry.model_name, cfg.registry.next_round_from)
            model_label = round_label(cfg.registry.model_name, cfg.model, champion)
            with warehouse.connect() as con:
                inputs = round_inputs(con, cfg, model_label)
        except (duckdb.IOException, OSError, MlflowException) as error:  # warehouse busy, tracking server down: let the run say
            context.log.warning(f"could not tell whether anything changed since the last round ({error}); running it")
            return dg.RunRequest()
        if inputs.interactions == 0:
            return dg.SkipReason(f"nothing to train on: {inputs.describe()}")
        done = finished_round(context.instance, inputs.digest)
        if done is not None:
            return dg.SkipReason(f"nothing changed since run {done.run_id[:8]} ({inputs.describe()}, same settings)")
        return dg.RunRequest(tags={ROUND_TAG: inputs.digest})

    return nightly_retrain
