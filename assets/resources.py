"""Resources: where state lives and which settings apply, swapped per deployment (never globals)."""


from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import dagster as dg
import duckdb

from sdpo_platform import paths, warehouse
from sdpo_platform.config import PlatformConfig


class SdpoSettings(dg.ConfigurableResource):
    """The platform config (a JSON file mirroring `PlatformConfig`; defaults when unset) and the inbox."""

    config_file: Optional[str] = None
    inbox: Optional[str] = None

    def platform(self) -> PlatformConfig:
        return PlatformConfig.load(self.config_file)

    def inbox_dir(self) -> Path:
        return Path(self.inbox) if self.inbox else paths.inbox_dir()


class Warehouse(dg.ConfigurableResource):
    """The DuckDB warehouse; one short-lived connection per asset or check."""

    path: Optional[str] = None

    def exists(self) -> bool:
        return (Path(self.path) if self.path else paths.warehouse_path()).exists()

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        con = warehouse.connect(self.path)
        try:
            yield con
        finally:
            con.close()


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking and registry; SQLite under the data root unless a URI is given."""

    tracking_uri: Optional[str] = None

    def configure(self) -> str:
        from sdpo_platform.registry import configure_mlflow

        return configure_mlflow(self.tracking_uri)
