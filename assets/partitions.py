"""Daily partitions by conversation time (file arrival when a record has none).

`SDPO_PARTITION_START` (ISO day, default 2020-01-01) is the first partition; records dated earlier
still land in the warehouse but can only be processed by `sdpo ingest` or a full rebuild, and so can
records dated after the last partition (today: `end_offset=1`), which only a wrong clock produces.
The inbox sensor asks for the days inside the range only and reports the others (`outside_partitions`).
"""

import os
from collections.abc import Iterable

import dagster as dg

PARTITION_START = os.environ.get("SDPO_PARTITION_START", "2020-01-01")

daily_partitions = dg.DailyPartitionsDefinition(start_date=PARTITION_START, end_offset=1)


def outside_partitions(days: Iterable[str]) -> list[str]:
    """The ISO `days` that are no partition of `daily_partitions` now: a run request for one would fail the whole
    sensor tick (DagsterUnknownPartitionError), the valid days with it."""
    first, last = daily_partitions.get_first_partition_key(), daily_partitions.get_last_partition_key()
    return sorted(day for day in set(days) if not first <= day <= last)


def outside_message(days: list[str]) -> str:
    """What to tell about `days` outside the partitions, and how to get them processed."""
    first, last = daily_partitions.get_first_partition_key(), daily_partitions.get_last_partition_key()
    early, late = [d for d in days if d < first], [d for d in days if d > last]
    parts = []
    if early:
        parts.append(f"{_listed(early)} before the first partition {first}: process them with `sdpo ingest FILE` (it builds "
                     f"a stored file's days that no run built), or set SDPO_PARTITION_START to {early[0]} or earlier, reload "
                     "the code location and backfill those days")
    if late:
        parts.append(f"{_listed(late)} after the last partition {last}: a wrong clock (a record's timestamp or a file's "
                     "mtime in the future); fix the source, or force a day with `sdpo ingest FILE --partition DAY`")
    return "no run for days outside the partitions: " + "; ".join(parts)


def _listed(days: list[str], most: int = 5) -> str:
    shown = ", ".join(days[:most])
    return f"{len(days)} day(s) ({shown}{', ...' if len(days) > most else ''})"
