"""One data root for all state, so tests, benchmarks and deployments never share files by accident."""

from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    """`$SDPO_HOME` if set, else `./.sdpo` (resolved against the working directory)."""
    root = Path(os.environ.get("SDPO_HOME", ".sdpo")).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def warehouse_path(root: Path | None = None) -> Path:
    return (root or data_root()) / "warehouse.duckdb"


def inbox_dir(root: Path | None = None) -> Path:
    path = (root or data_root()) / "inbox"
    path.mkdir(parents=True, exist_ok=True)
    return path


def targets_dir(root: Path | None = None) -> Path:
    path = (root or data_root()) / "targets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir(root: Path | None = None) -> Path:
    path = (root or data_root()) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def mlflow_tracking_uri(root: Path | None = None) -> str:
    """`$MLFLOW_TRACKING_URI` if set, else a SQLite file under the data root."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = (root or data_root()) / "mlflow"
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def mlflow_artifact_root(root: Path | None = None) -> str:
    path = (root or data_root()) / "mlflow" / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def write_jsonl_atomic(out_path: str | Path, rows, default=None) -> int:
    """Write `rows` (dicts) as JSONL through a temporary file renamed over `out_path`, so readers (the
    inbox sensor, ingestion) never see half a file; returns how many rows were written."""
    import json
    import tempfile

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    written = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False, default=default) + "\n")
                written += 1
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return written
