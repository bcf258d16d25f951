"""WildChat straight from the Hugging Face hub (through `datasets`), for users with network access.

The rows are streamed (no full download before the first record) and written as one JSONL file under
the inbox, then ingested like any other file: lineage (file, line) and idempotency work the same, and
the raw zone holds exactly what the hub returned. `dataset="parquet", data_files=...` reads local
Parquet files in WildChat's schema the same way (what the tests do, offline).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import duckdb

from sdpo_platform import paths
from sdpo_platform.config import IngestConfig
from sdpo_platform.ingest import IngestResult, ingest_files

DATASET = "allenai/WildChat-1M"


def iter_wildchat(dataset: str = DATASET, split: str = "train", data_files: str | list[str] | None = None,
                  limit: int | None = None) -> Iterator[dict]:
    """WildChat rows as plain dicts, streamed."""
    from datasets import load_dataset  # heavy import, only for this entry point

    rows = load_dataset(dataset, split=split, data_files=data_files, streaming=True)
    return islice(iter(rows), limit)


def write_wildchat_jsonl(out_path: str | Path, dataset: str = DATASET, split: str = "train",
                         data_files: str | list[str] | None = None, limit: int | None = None) -> int:
    """Write the rows to `out_path` as JSONL (timestamps as ISO strings), atomically; return how many."""
    return paths.write_jsonl_atomic(out_path, iter_wildchat(dataset, split, data_files, limit), default=_json_default)


def ingest_wildchat(con: duckdb.DuckDBPyConnection, dataset: str = DATASET, split: str = "train",
                    data_files: str | list[str] | None = None, limit: int | None = None,
                    inbox: str | Path | None = None, cfg: IngestConfig | None = None) -> IngestResult:
    """Stream WildChat into `inbox/wildchat/<name>.jsonl` and ingest it (format forced to wildchat).
    Partitions come from each conversation's own `timestamp`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset}-{split}" + (f"-{limit}" if limit else ""))
    out = Path(inbox or paths.inbox_dir()) / "wildchat" / f"{name}.jsonl"
    write_wildchat_jsonl(out, dataset, split, data_files, limit)
    return ingest_files(con, [out], format="wildchat", cfg=cfg)


def _json_default(value: object) -> str:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return str(value)
