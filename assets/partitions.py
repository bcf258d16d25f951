"""Daily partitions by conversation time (file arrival when a record has none).

`SDPO_PARTITION_START` (ISO day, default 2020-01-01) is the first partition; records dated earlier
still land in the warehouse but can only be processed by `sdpo ingest` or a full rebuild.
"""

import os

import dagster as dg

PARTITION_START = os.environ.get("SDPO_PARTITION_START", "2020-01-01")

daily_partitions = dg.DailyPartitionsDefinition(start_date=PARTITION_START, end_offset=1)
