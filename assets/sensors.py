"""The inbox sensor: new or changed log files become runs of the partitions they touch."""

import hashlib
import json
import sys
from typing import Callable

import dagster as dg
import duckdb

from assets.partitions import outside_message, outside_partitions
from assets.resources import SdpoSettings, Warehouse
from sdpo_platform.inbox import changed_files, pending_partitions, remembered, stamps, within_bytes
from sdpo_platform.stale import stale_partitions


def inbox_run_requests(settings: SdpoSettings, warehouse: Warehouse, cursor: str | None,
                       warn: Callable[[str], None] | None = None,
                       waiting: frozenset[str] = frozenset()) -> tuple[list[dg.RunRequest], str]:
    """(one run request per day to build, the new cursor); shared by the sensor and `make demo`. The days:
    those new or changed inbox files touch (`inbox.pending_partitions`), and the stale ones (`stale.py`:
    their rows point at conversations or raw records a changed file took away). Days outside the partitions
    get no request (one would fail the whole tick) but a `warn` line saying how to include them. Days in
    `waiting` (a run of the day is queued, not started) get none either: that run ingests every inbox file
    there when it starts and rebuilds its day whole, so a drop read over several ticks builds a day once. The
    files of such a tick stay unseen in the cursor, so a later tick asks again if that run never ingests them
    (requests for the other days repeat their run keys, which Dagster runs once).

    The warehouse is opened only for short queries: files are hashed and read (up to
    `ingest.sensor_bytes_per_tick`) with no connection open, so a run starting meanwhile is not locked out."""
    seen = json.loads(cursor) if cursor else {}
    if not settings.inbox_dir().is_dir() and warn is not None:  # a mistyped path would read as "nothing new" forever
        warn(f"the inbox {settings.inbox_dir()} does not exist: create it, or fix the settings resource's `inbox`")
    current = stamps(settings.inbox_dir())
    changed = changed_files(current, seen)
    cfg = settings.platform().ingest
    taken = within_bytes(changed, current, cfg.sensor_bytes_per_tick) if changed else []  # a large drop: several ticks
    stored = warehouse.exists()
    if not taken and not stored:
        return [], json.dumps(current)
    try:
        days = set(pending_partitions(taken, warehouse.connect if stored else None, cfg))
        stale = {}
        if stored:
            with warehouse.connect() as con:
                stale = stale_partitions(con)
    except duckdb.IOException:  # the warehouse is locked by a running job: look again next tick
        if warn is not None:
            warn(f"the warehouse is busy (a running job holds it): {len(taken)} new or changed file(s) wait for the next tick")
        return [], cursor or "{}"
    outside = outside_partitions(days | set(stale))
    if outside and warn is not None:
        warn(outside_message(outside))
    held = sorted((days - set(outside)) & waiting)
    if held and warn is not None:
        warn(f"day(s) {', '.join(held)} wait for their queued run, which ingests every inbox file when it starts; "
             f"the {len(taken)} file(s) read now are read again next tick, in case that run never starts")
    days = sorted(days - set(outside) - waiting)
    batch = hashlib.sha256("|".join(f"{p}@{current[p]}" for p in taken).encode()).hexdigest()[:12]
    requests = [dg.RunRequest(partition_key=day, run_key=f"{day}:{batch}", tags={"sdpo/files": str(len(taken))}) for day in days]
    requests += [  # keyed by what vanished: asked once per stale set, whatever the run's outcome
        dg.RunRequest(partition_key=day, run_key=f"{day}:stale:{digest}", tags={"sdpo/stale": digest})
        for day, digest in stale.items() if day not in days and day not in outside and day not in waiting
    ]
    # files of a held day stay unseen: a queued run that is cancelled (or fails before ingesting) must not lose them
    return requests, json.dumps(remembered(seen, current, changed, [] if held else taken))


def drain_inbox(settings: SdpoSettings, warehouse: Warehouse, run_partition: Callable[[str], object],
                warn: Callable[[str], None] | None = None) -> list[str]:
    """Tick after tick of the sensor's question until no changed file is left, running each tick's days as
    they come; returns the days run. `make demo` uses it: one call, whatever the inbox's size, where the
    sensor would take one tick per `ingest.sensor_bytes_per_tick` of new files. Days outside the partitions
    are not run, as with the sensor: `warn` (default: stderr) hears about them, once per drain."""
    told: set[str] = set()

    def tell(message: str) -> None:
        if message not in told:
            told.add(message)
            (warn or (lambda line: print(f"[inbox] {line}", file=sys.stderr)))(message)

    cursor, days = None, []
    while True:
        requests, next_cursor = inbox_run_requests(settings, warehouse, cursor, tell)
        new = [r.partition_key for r in requests if r.partition_key not in days]  # a day runs once per drain
        for day in new:
            run_partition(day)
            days.append(day)
        if not new and next_cursor == cursor:
            return days
        cursor = next_cursor


def waiting_days(instance: dg.DagsterInstance, job_name: str) -> frozenset[str]:
    """Days with a run of `job_name` queued and not started yet."""
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.QUEUED,
                                                                                   dg.DagsterRunStatus.NOT_STARTED]))
    return frozenset(run.tags["dagster/partition"] for run in runs if "dagster/partition" in run.tags)


def build_inbox_sensor(job) -> dg.SensorDefinition:
    @dg.sensor(job=job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
    def inbox_sensor(context: dg.SensorEvaluationContext, settings: SdpoSettings, warehouse: Warehouse):
        """Materialize raw → conversations → interactions for the days new or changed inbox files touch, and
        for the stale days (rows pointing at conversations or raw records a changed file took away)."""
        notes: list[str] = []

        def warn(message: str) -> None:
            notes.append(message)
            context.log.warning(message)

        requests, cursor = inbox_run_requests(settings, warehouse, context.cursor, warn, waiting_days(context.instance, job.name))
        context.update_cursor(cursor)
        if not requests:
            return dg.SkipReason(" | ".join(notes) or "no new or changed files in the inbox, no stale day")
        return requests

    return inbox_sensor
