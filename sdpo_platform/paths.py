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


def atomic_write(path: str | Path, write) -> None:
    """`write(temp_path)` next to `path`, then rename over it: readers never see half a file, and a failed
    write leaves the previous file as it was.

    The data reaches the disk before the rename, and the rename before this returns (fsync of the file,
    then of its folder): without that, a power loss can leave the new name on an empty file, which
    resumable work would take for a finished one.

    The temp file is created as `open` would create `path` (mode 0666 less the umask, not mkstemp's
    0600), so workers, trainers and the inbox sensor running as other users can read it.
    """
    import secrets

    path = Path(path)
    staging = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(staging)
        _fsync(staging, os.O_RDONLY)
        os.replace(staging, path)
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def _fsync(path: str | Path, flags: int) -> None:
    """Flush a file's (or a folder's entries') writes to the disk. A folder that cannot be opened for it
    (Windows) is passed over: there the rename is what the file system guarantees."""
    try:
        descriptor = os.open(path, flags)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_jsonl_atomic(out_path: str | Path, rows, default=None) -> int:
    """Write `rows` (dicts) as JSONL through `atomic_write` (creating the folder), so readers (the inbox
    sensor, ingestion) never see half a file; returns how many rows were written."""
    import json

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = [0]

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False, default=default) + "\n")
                written[0] += 1

    atomic_write(out_path, write)
    return written[0]
