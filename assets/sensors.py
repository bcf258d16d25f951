"""The inbox sensor: new or changed log files become runs of the partitions they touch."""

import hashlib
import json
from typing import Callable

import dagster as dg
import duckdb

from assets.resources import SdpoSettings, Warehouse
from sdpo_platform.inbox import changed_files, pending_partitions, remembered, stamps, within_bytes
from sdpo_platform.stale import stale_partitions


def inbox_run_requests(settings: SdpoSettings, warehouse: Warehouse, cursor: str | None) -> tuple[list[dg.RunRequest], str]:
    """(one run request per day to build, the new cursor); shared by the sensor and `make demo`. The days:
    those new or changed inbox files touch, and the stale ones (`stale.py`: their duplicates point at
    conversations a changed file took away)."""
    seen = json.loads(cursor) if cursor else {}
    current = stamps(settings.inbox_dir())
    changed = changed_files(current, seen)
    cfg = settings.platform().ingest
    taken = within_bytes(changed, current, cfg.sensor_bytes_per_tick) if changed else []  # a large drop: several ticks
    if not taken and not warehouse.exists():
        return [], json.dumps(current)
    try:
        with warehouse.connect() as con:
            days = pending_partitions(taken, con, cfg)
            stale = stale_partitions(con)
    except duckdb.IOException:  # the warehouse is locked by a running job: look again next tick
        return [], cursor or "{}"
    batch = hashlib.sha256("|".join(f"{p}@{current[p]}" for p in taken).encode()).hexdigest()[:12]
    requests = [dg.RunRequest(partition_key=day, run_key=f"{day}:{batch}", tags={"sdpo/files": str(len(taken))}) for day in days]
    requests += [  # keyed by what vanished: asked once per dangling set, whatever the run's outcome
        dg.RunRequest(partition_key=day, run_key=f"{day}:stale:{digest}", tags={"sdpo/stale": digest})
        for day, digest in stale.items() if day not in days
    ]
    return requests, json.dumps(remembered(seen, current, changed, taken))


def drain_inbox(settings: SdpoSettings, warehouse: Warehouse, run_partition: Callable[[str], object]) -> list[str]:
    """Tick after tick of the sensor's question until no changed file is left, running each tick's days as
    they come; returns the days run. `make demo` uses it: one call, whatever the inbox's size, where the
    sensor would take one tick per `ingest.sensor_bytes_per_tick` of new files."""
    cursor, days = None, []
    while True:
        requests, next_cursor = inbox_run_requests(settings, warehouse, cursor)
        new = [r.partition_key for r in requests if r.partition_key not in days]  # a day runs once per drain
        for day in new:
            run_partition(day)
            days.append(day)
        if not new and next_cursor == cursor:
            return days
        cursor = next_cursor


def build_inbox_sensor(job) -> dg.SensorDefinition:
    @dg.sensor(job=job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
    def inbox_sensor(context: dg.SensorEvaluationContext, settings: SdpoSettings, warehouse: Warehouse):
        """Materialize raw → conversations → interactions for the days new or changed inbox files touch, and
        for the days whose duplicates pointed at conversations a changed file took away."""
        requests, cursor = inbox_run_requests(settings, warehouse, context.cursor)
        context.update_cursor(cursor)
        if not requests:
            return dg.SkipReason("no new or changed files in the inbox, no stale day")
        return requests

    return inbox_sensor
