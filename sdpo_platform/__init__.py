"""sdpo-platform: Self-Distillation Policy Optimization from raw chat logs.

The library does all the work and imports no Dagster; `assets/` wires it into a lineage.
"""

__version__ = "0.1.0"
