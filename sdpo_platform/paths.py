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
