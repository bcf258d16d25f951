"""The inbox sensor: new or changed log files become runs of the partitions they touch."""

import hashlib
import json
from typing import Callable

import dagster as dg
import duckdb

from assets.resources import SdpoSettings, Warehouse
from sdpo_platform.inbox import changed_files, pending_partitions, remembered, stamps, within_bytes


def inbox_run_requests(settings: SdpoSettings, warehouse: Warehouse, cursor: str | None) -> tuple[list[dg.RunRequest], str]:
    """(one run request per touched day, the new cursor); shared by the sensor and `make demo`."""
    seen = json.loads(cursor) if cursor else {}
    current = stamps(settings.inbox_dir())
    changed = changed_files(current, seen)
    if not changed:
        return [], json.dumps(current)
    cfg = settings.platform().ingest
    taken = within_bytes(changed, current, cfg.sensor_bytes_per_tick)  # a large drop is read over several ticks
    try:
        with warehouse.connect() as con:
            days = pending_partitions(taken, con, cfg)
    except duckdb.IOException:  # the warehouse is locked by a running job: look again next tick
        return [], cursor or "{}"
    batch = "|".join(f"{p}@{current[p]}" for p in taken)
    requests = [
        dg.RunRequest(partition_key=day, run_key=f"{day}:{hashlib.sha256(batch.encode()).hexdigest()[:12]}", tags={"sdpo/files": str(len(taken))})
        for day in days
    ]
    return requests, json.dumps(remembered(seen, current, changed, taken))


def drain_inbox(settings: SdpoSettings, warehouse: Warehouse, run_partition: Callable[[str], object]) -> list[str]:
    """Tick after tick of the sensor's question until no changed file is left, running each tick's days as
    they come; returns the days run. `make demo` uses it: one call, whatever the inbox's size, where the
    sensor would take one tick per `ingest.sensor_bytes_per_tick` of new files."""
    cursor, days = None, []
    while True:
        requests, next_cursor = inbox_run_requests(settings, warehouse, cursor)
        for request in requests:
            run_partition(request.partition_key)
            days.append(request.partition_key)
        if not requests and next_cursor == cursor:
            return days
        cursor = next_cursor


def build_inbox_sensor(job) -> dg.SensorDefinition:
    @dg.sensor(job=job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
    def inbox_sensor(context: dg.SensorEvaluationContext, settings: SdpoSettings, warehouse: Warehouse):
        """Materialize raw → conversations → interactions for the days new or changed inbox files touch."""
        requests, cursor = inbox_run_requests(settings, warehouse, context.cursor)
        context.update_cursor(cursor)
        if not requests:
            return dg.SkipReason("no new or changed files in the inbox")
        return requests

    return inbox_sensor
